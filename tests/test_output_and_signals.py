"""Output-folder problems, interruption, and where the passphrase may never appear."""

from __future__ import annotations

import contextlib
import os
import signal
import stat
import subprocess
import time
from pathlib import Path

import pytest
from conftest import (
    PASSPHRASE,
    Backup,
    MakeBackup,
    children_of,
    family_of,
    gen,
    qrecover_exe,
    run_cli,
    sha,
    sigint_as_at_a_terminal,
)
from helpers import mounted_tmpfs

# its fixtures build something big: all its tests on one worker, so it is built once
pytestmark = pytest.mark.xdist_group("test_output_and_signals")


@pytest.fixture(scope="module")
def big(make: MakeBackup, tmp_path_factory: pytest.TempPathFactory) -> Backup:
    """One VM with 24 MiB of incompressible data in 1 MiB chunks."""
    src = tmp_path_factory.mktemp("big") / "work"
    src.mkdir()
    (src / "private.img").write_bytes(os.urandom(24 << 20))
    (src / "icon.png").write_bytes(b"icon")
    return make(
        vms=[gen.VmSpec("work", 7, source=src)],
        dom0_home=None,
        chunk_size=1 << 20,
        compression=None,
    )



def start_half_fed(
    backup: Backup, out: Path, extra: tuple[str, ...] = ()
) -> tuple[subprocess.Popen[bytes], bytes]:
    """Start a restore from a pipe and feed it half the backup, then wait for
    its pipeline to be running (the rest stays unsent)."""
    data = backup.path.read_bytes()
    env = {k: v for k, v in os.environ.items() if k != "QRECOVER_PASSPHRASE"}
    proc = subprocess.Popen(
        [
            *qrecover_exe(),
            "restore",
            "-",
            "--output",
            str(out),
            "--passphrase-file",
            str(backup.passfile),
            *extra,
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
        preexec_fn=sigint_as_at_a_terminal,
    )
    assert proc.stdin is not None
    proc.stdin.write(data[: len(data) // 2])
    proc.stdin.flush()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        names = {_comm(c) for c in children_of(proc.pid)}
        # cat only runs to feed a pipeline: tar alone may still be `tar --version`
        if "cat" in names and names & {"tar", "bsdtar"}:  # bsdtar extracts where installed
            return proc, data
        time.sleep(0.02)
    proc.kill()
    raise AssertionError("the restore's pipeline never started")


def test_passphrase_in_no_command_line_and_scratch_is_private(big: Backup, tmp_path: Path) -> None:
    out = tmp_path / "out"
    proc, _ = start_half_fed(big, out)
    try:
        secret = PASSPHRASE.encode()
        # qrecover and every process under it (other tests may be running
        # the fixture writer, which like Qubes' writer has pass: in its argv)
        # cat comes and goes, one chunk at a time: look until the whole
        # pipeline is seen at once (each look checks every command line below)
        deadline = time.monotonic() + 20
        family = family_of(proc.pid)
        while len(family) < 4 and time.monotonic() < deadline:
            time.sleep(0.01)
            family = family_of(proc.pid)
        assert len(family) >= 4, family  # qrecover, cat, openssl, tar at least
        for pid in family:
            with contextlib.suppress(OSError):
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
                assert secret not in cmdline, cmdline
        for child in children_of(proc.pid):
            with contextlib.suppress(OSError):
                environ = Path(f"/proc/{child}/environ").read_bytes()
                comm = Path(f"/proc/{child}/comm").read_text().strip()
                # only openssl enc is given the passphrase, in its environment
                assert comm == "openssl" or secret not in environ, comm
        scratch = [p for p in out.iterdir() if p.name.startswith(".qrecover-")]
        assert len(scratch) == 1
        assert stat.S_IMODE(scratch[0].stat().st_mode) == 0o700
        for path in scratch[0].rglob("chunk-*"):
            with contextlib.suppress(FileNotFoundError):  # fed and removed meanwhile
                assert stat.S_IMODE(path.stat().st_mode) == 0o600
    finally:
        proc.kill()
        proc.communicate()


@pytest.mark.parametrize(("sig", "code"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_interrupted_restore_cleans_up(big: Backup, tmp_path: Path, sig: int, code: int) -> None:
    out = tmp_path / "out"
    proc, _ = start_half_fed(big, out)
    kids = children_of(proc.pid)
    assert kids
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == code, err
    assert b"Traceback" not in err
    assert b"--resume" in err  # what was placed is kept, and how to go on
    for kid in kids:  # killed and reaped before qrecover exited
        assert not Path(f"/proc/{kid}").exists(), kid
    leftovers = [p.name for p in out.rglob("*")]
    assert not any(n.startswith(".qrecover-") for n in leftovers), leftovers
    # private.img was being restored: it must not be there under its final name
    assert not (out / "work" / "private.img").exists()


def test_symlink_in_output_is_never_written_through(default_backup: Backup, tmp_path: Path) -> None:
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    out = tmp_path / "out"
    out.mkdir()
    (out / "work").symlink_to(outside)
    result = run_cli(
        "restore",
        default_backup.path,
        "-o",
        out,
        "--force",
        "--passphrase-file",
        default_backup.passfile,
    )
    assert result.code == 6, result.text
    assert "symbolic link" in result.err and "work" in result.err
    assert list(outside.iterdir()) == []


def test_read_only_output_folder(default_backup: Backup, tmp_path: Path) -> None:
    with mounted_tmpfs(tmp_path / "ro", "4m") as where:
        subprocess.run(["mount", "-o", "remount,ro", str(where)], check=True)
        result = run_cli(
            "restore",
            default_backup.path,
            "-o",
            where / "out",
            "--passphrase-file",
            default_backup.passfile,
        )
        assert result.code == 6, result.text
        assert "Traceback" not in result.text and str(where) in result.err


def test_full_disk(big: Backup, tmp_path: Path) -> None:
    with mounted_tmpfs(tmp_path / "small", "6m") as where:
        out = where / "out"
        result = run_cli("restore", big.path, "-o", out, "--passphrase-file", big.passfile)
        assert result.code == 6, result.text
        assert "Traceback" not in result.text
        assert "space" in result.err.lower()
        assert not any(p.name.startswith(".qrecover-") for p in out.rglob("*"))
        final = out / "work" / "private.img"
        if final.exists():  # only if it was complete and verified
            assert sha(final) == sha(big.vms[0].source / "private.img")


def _comm(pid: int) -> str:
    """A process's name; "" once it has ended (between two looks at /proc: normal)."""
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""
