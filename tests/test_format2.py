"""Format 2 (Qubes R2-Beta3 to R2) end to end, from the installed CLI.

Backups are written by scripts/make_backup_v2.py (real ``tar -M``, ``openssl
enc``, ``gzip``), with 40 KiB volumes so that a sparse 2 MiB image spans five
volumes and a member crosses every volume boundary.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import io
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import (
    PASSPHRASE,
    left_after,
    marked_env,
    marked_processes,
    qrecover_exe,
    run_cli,
    run_main,
)
from helpers import untar

SCRIPTS = Path(__file__).resolve().parent.parent / "scripts"
sys.path.insert(0, str(SCRIPTS))

import make_backup as mb  # noqa: E402
import make_backup_v2 as mb2  # noqa: E402

from qrecover.compat import removeprefix  # noqa: E402

pytestmark = pytest.mark.xdist_group("test_format2")  # module fixtures built once

TAPE_KIB = 40
PAGE = "backup-emergency-restore-v2"

# name: (variant, encrypted, compressed, hmac)
VARIANTS = {
    "r2-sha512": ("r2", True, False, "SHA512"),
    "r2-sha1": ("r2", True, False, "SHA1"),
    "r2-gzip": ("r2", False, True, "SHA512"),
    "r2-plain": ("r2", False, False, "SHA512"),
    "beta3": ("beta3", True, False, "SHA512"),
    "beta3-z": ("beta3", True, True, "SHA512"),
    "beta3-plain": ("beta3", False, False, "SHA512"),
}


@dataclass
class V2:
    path: Path
    passfile: Path
    manifest: mb2.BackupManifestV2


@pytest.fixture(scope="module")
def sample(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[mb.VmSpec], Path]:
    root = tmp_path_factory.mktemp("v2sample")
    vms, home = mb.make_sample_tree(root / "tree", image_mb=2)
    # A file with a path too long for a GNU multi-volume header (tar cuts it
    # to 100 bytes there), across several volumes of dom0's home.
    deep = home / ("a" * 60) / ("b" * 60)
    deep.mkdir(parents=True)
    (deep / ("c" * 50 + ".bin")).write_bytes(os.urandom(100_000))
    return vms, home


@pytest.fixture(scope="module")
def passfile(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("v2pass") / "pass"
    path.write_text(PASSPHRASE + "\n", encoding="utf-8")
    return path


_MADE: dict[str, V2] = {}


def backup(name: str, sample: tuple[list[mb.VmSpec], Path], passfile: Path,
           root: Path) -> V2:
    if name not in _MADE:
        variant, encrypted, compressed, digest = VARIANTS[name]
        vms, home = sample
        path = root / f"qubes-backup-{name}"
        manifest = mb2.make_backup_v2(path, PASSPHRASE, vms, dom0_home=home, variant=variant,
                                      encrypted=encrypted, compressed=compressed,
                                      hmac_algorithm=digest, tape_length_kib=TAPE_KIB)
        _MADE[name] = V2(path, passfile, manifest)
    return _MADE[name]


@pytest.fixture(scope="module")
def made(sample: tuple[list[mb.VmSpec], Path], passfile: Path,
         tmp_path_factory: pytest.TempPathFactory) -> dict[str, V2]:
    root = tmp_path_factory.mktemp("v2backups")
    return {name: backup(name, sample, passfile, root) for name in VARIANTS}


def assert_restored(v2: V2, out: Path) -> None:
    """Every inner member, byte for byte, symlink targets as the backup holds them."""
    manifest = v2.manifest
    owners = {f.name: f.vm for f in manifest.files}
    paths = {v["name"]: v["backup_path"] for v in manifest.vms if v["backup_path"]}
    paths["dom0"] = "dom0-home/user"
    checked = 0
    for entry in mb2.expected_members_v2(manifest):
        vm = owners[entry["stored"]]
        assert vm is not None
        name = entry["name"]
        if vm == "dom0":
            path = out / name
        else:
            rest = name[len(paths[vm]) + 1:]
            rest = "" if rest == "." else removeprefix(rest, "./")
            path = out / vm / rest if rest else out / vm
        if entry["type"] == "symlink":
            assert os.readlink(path) == entry["target"], entry["name"]
        elif entry["type"] == "dir":
            assert path.is_dir(), entry["name"]
        else:
            data = path.read_bytes()
            assert hashlib.sha256(data).hexdigest() == entry["sha256"], entry["name"]
            checked += 1
    assert checked > 10
    assert (out / "qubes.xml").read_text(encoding="utf-8") == manifest.qubes_xml
    img = out / "work" / "private.img"
    assert img.stat().st_blocks * 512 < img.stat().st_size // 2  # still sparse


def test_the_images_span_several_volumes(made: dict[str, V2]) -> None:
    manifest = made["r2-sha512"].manifest
    work = next(f for f in manifest.files if f.name == "vm7/private.img")
    assert work.chunks >= 3
    home = next(f for f in manifest.files if f.name == "dom0-home/user")
    assert home.chunks >= 3
    assert manifest.header is not None and "version" not in manifest.header


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_restore_byte_for_byte(name: str, made: dict[str, V2], tmp_path: Path) -> None:
    v2 = made[name]
    out = tmp_path / "out"
    run = run_main("restore", v2.path, "--passphrase-file", v2.passfile, "--output", out)
    assert run.code == 0, run.text
    assert "all HMACs matched" in run.text
    assert_restored(v2, out)
    assert not [p for p in out.iterdir() if p.name.startswith(".qrecover")]  # scratch gone


def test_verify_info_and_stdin(made: dict[str, V2], tmp_path: Path) -> None:
    v2 = made["r2-sha1"]
    run = run_main("verify", v2.path, "--passphrase-file", v2.passfile)
    assert run.code == 0, run.text
    assert "verified 14 stored file(s)" in run.text
    info = run_main("info", v2.path, "--passphrase-file", v2.passfile)
    assert info.code == 0, info.text
    assert "format 2, written by Qubes R2-Beta3 to R2" in info.out
    assert "HMAC-SHA1" in info.out
    beta3 = made["beta3-z"]
    info = run_main("info", beta3.path, "--passphrase-file", beta3.passfile)
    assert "format 2, written by Qubes R2-Beta3" in info.out
    assert "no backup-header" in info.out and "HMAC-MD5" in info.out
    out = tmp_path / "stdin"
    run = run_cli("restore", "-", "--passphrase-file", beta3.passfile, "--output", out,
                  stdin=beta3.path.read_bytes())
    assert run.code == 0, run.text
    assert_restored(beta3, out)


@pytest.mark.parametrize("name", ["r2-gzip", "beta3-plain"])
def test_a_folder_untarred_by_hand(name: str, made: dict[str, V2], tmp_path: Path) -> None:
    v2 = made[name]
    folder = tmp_path / "x"
    folder.mkdir()
    subprocess.run(["tar", "-i", "-xf", str(v2.path)], cwd=folder, check=True)
    out = tmp_path / "out"
    run = run_main("restore", folder, "--passphrase-file", v2.passfile, "--output", out)
    assert run.code == 0, run.text
    assert_restored(v2, out)


def test_dry_run_names_what_runs_and_writes_nothing(made: dict[str, V2],
                                                    tmp_path: Path) -> None:
    v2 = made["r2-sha512"]
    out = tmp_path / "out"
    run = run_main("restore", v2.path, "--passphrase-file", v2.passfile, "--output", out,
                   "--dry-run")
    assert run.code == 0, run.text
    assert PAGE in run.out and "tar -x -M" in run.out
    assert "openssl enc -d -aes-256-cbc -md md5 -pass env:backup_pass" in run.out
    assert not out.exists()
    out.mkdir()
    (out / "qubes.xml").write_text("mine")
    dry = run_main("restore", v2.path, "--passphrase-file", v2.passfile, "--output", out,
                   "--dry-run")
    real = run_main("restore", v2.path, "--passphrase-file", v2.passfile, "--output", out)
    assert dry.code == real.code == 6
    assert (out / "qubes.xml").read_text() == "mine"


@pytest.mark.parametrize("name", ["r2-sha512", "beta3-z", "r2-gzip"])
def test_script_under_dash_restores_the_same(name: str, made: dict[str, V2],
                                             tmp_path: Path) -> None:
    v2 = made[name]
    out = tmp_path / "out"
    script = run_main("script", v2.path, "--passphrase-file", v2.passfile, "--output", out)
    assert script.code == 0, script.err
    assert PAGE in script.out and PASSPHRASE not in script.out
    path = tmp_path / "recover.sh"
    path.write_text(script.out, encoding="utf-8")
    proc = subprocess.run(["dash", str(path)], env={**os.environ, "backup_pass": PASSPHRASE},
                          capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_restored(v2, out)


def test_transcript_replays_and_explain_tells_the_v2_steps(made: dict[str, V2],
                                                           tmp_path: Path) -> None:
    v2 = made["beta3"]
    out = tmp_path / "out"
    transcript = tmp_path / "t.sh"
    run = run_main("restore", v2.path, "--passphrase-file", v2.passfile, "--output", out,
                   "--transcript", transcript, "--explain")
    assert run.code == 0, run.text
    assert "Step 3 - verify vm7/private.img.002" in run.text
    assert "Steps 4-6 - vm7/private.img" in run.text and "tar -M" in run.text
    text = transcript.read_text(encoding="utf-8")
    assert PAGE in text and "steps 3-6" in text and PASSPHRASE not in text
    shutil.rmtree(out)
    proc = subprocess.run(["dash", str(transcript)], env={**os.environ,
                          "backup_pass": PASSPHRASE}, capture_output=True, text=True,
                          timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_restored(v2, out)


# -- damaged and hostile backups ------------------------------------------------


def test_missing_middle_and_last_volume(made: dict[str, V2], tmp_path: Path) -> None:
    v2 = made["r2-sha512"]
    for which, chunk, said in (("middle", "002", "vm7/private.img.002: chunk missing"),
                               ("last", "004", "continues in vm7/private.img.004, which is "
                                "not in the backup")):
        folder = untar(v2.path, tmp_path / which)
        for suffix in ("", ".hmac"):
            (folder / f"vm7/private.img.{chunk}{suffix}").unlink()
        out = tmp_path / f"out-{which}"
        run = run_cli("-q", "restore", folder, "--passphrase-file", v2.passfile,
                      "--output", out, timeout=120)
        assert run.code == 4, run.text
        assert said in run.text
        assert not (out / "work" / "private.img").exists()
        assert (out / "work" / "private.img.partial").exists()
        assert (out / "work" / "icon.png").exists()  # the other stored files restored
        assert "Traceback" not in run.text


def test_tampered_chunk(made: dict[str, V2], tmp_path: Path) -> None:
    v2 = made["r2-sha512"]
    folder = untar(v2.path, tmp_path / "x")
    chunk = folder / "vm7/private.img.000"
    data = bytearray(chunk.read_bytes())
    data[-100] ^= 1
    chunk.write_bytes(bytes(data))
    out = tmp_path / "out"
    run = run_main("-q", "restore", folder, "--passphrase-file", v2.passfile, "--output", out)
    assert run.code == 4, run.text
    assert "vm7/private.img.000: HMAC mismatch" in run.text
    assert not list((out / "work").glob("private.img*"))  # nothing of it placed
    assert (out / "work" / "firewall.xml").exists()


@pytest.mark.parametrize("name", ["r2-sha512", "beta3"])
def test_wrong_passphrase_writes_nothing(name: str, made: dict[str, V2],
                                         tmp_path: Path) -> None:
    v2 = made[name]
    wrong = tmp_path / "wrong"
    wrong.write_text("not it\n")
    out = tmp_path / "out"
    run = run_main("restore", v2.path, "--passphrase-file", wrong, "--output", out)
    assert run.code == 3, run.text
    assert not out.exists()


def _mac(path: Path, digest: str) -> None:
    value = hmac.new(PASSPHRASE.encode(), path.read_bytes(), digest).hexdigest()
    path.with_name(path.name + ".hmac").write_text(f"(stdin)= {value}\n")


def test_hostile_member_in_an_authenticated_volume(made: dict[str, V2],
                                                   tmp_path: Path) -> None:
    """A raw (unencrypted) format-2 volume with a device node, a FIFO and a
    '..' name, correctly HMAC'd: the device and FIFO are dropped, the '..'
    member stops that stored file, nothing lands outside the output."""
    v2 = made["r2-plain"]
    folder = untar(v2.path, tmp_path / "x")

    def volume(entries: list[tarfile.TarInfo]) -> bytes:
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tar:
            for info in entries:
                tar.addfile(info, io.BytesIO(b"x" * info.size) if info.size else None)
        return buf.getvalue()

    def entry(name: str, kind: bytes, size: int = 0) -> tarfile.TarInfo:
        info = tarfile.TarInfo(name)
        info.type, info.size = kind, size
        return info

    specials = folder / "appvms/work/firewall.xml.000"
    specials.write_bytes(volume([entry("appvms/work/firewall.xml", tarfile.REGTYPE, 5),
                                 entry("appvms/work/null", tarfile.CHRTYPE),
                                 entry("appvms/work/fifo", tarfile.FIFOTYPE)]))
    _mac(specials, "sha512")
    escape = folder / "appvms/work/icon.png.000"
    escape.write_bytes(volume([entry("appvms/work/../../evil", tarfile.REGTYPE, 3)]))
    _mac(escape, "sha512")
    out = tmp_path / "out"
    run = run_main("-q", "restore", folder, "--passphrase-file", v2.passfile, "--output", out)
    assert run.code == 4, run.text
    assert "character device, not restored" in run.text and "FIFO, not restored" in run.text
    assert "lies outside" in run.text
    assert (out / "work" / "firewall.xml").read_bytes() == b"xxxxx"
    assert not (out / "work" / "null").exists() and not (out / "work" / "fifo").exists()
    assert not (tmp_path / "evil").exists() and not (out / "evil").exists()
    assert (out / "work" / "private.img").exists()


def test_beta3_zlib_without_pigz_is_exit_5(made: dict[str, V2], tmp_path: Path) -> None:
    v2 = made["beta3-z"]
    bindir = tmp_path / "bin"
    bindir.mkdir()
    for folder in ("/usr/local/bin", "/usr/bin", "/bin"):
        for program in Path(folder).iterdir() if Path(folder).is_dir() else []:
            link = bindir / program.name
            if program.name != "pigz" and not os.path.lexists(link):
                link.symlink_to(program)
    run = run_main("restore", v2.path, "--passphrase-file", v2.passfile, "--output",
                   tmp_path / "out", env={"PATH": str(bindir)})
    assert run.code == 5, run.text
    assert "pigz" in run.err and "openssl enc -z" in run.err


def test_a_format3_backup_without_its_header_is_not_taken_for_beta3(tmp_path: Path) -> None:
    sample = Path(__file__).resolve().parent.parent / "fixtures" / "sample-backup"
    folder = tmp_path / "x"
    folder.mkdir()
    subprocess.run(["tar", "-i", "-xf", str(sample)], cwd=folder, check=True)
    for name in ("backup-header", "backup-header.hmac"):
        (folder / name).unlink()
    run = run_main("info", folder, env={"QRECOVER_PASSPHRASE": "x"})
    assert run.code == 4, run.text
    assert "not an HMAC-MD5, so not R2-Beta3" in run.err, run.err


# -- bounded scratch, and an interrupted run --------------------------------


@pytest.fixture(scope="module")
def big(passfile: Path, tmp_path_factory: pytest.TempPathFactory) -> V2:
    """40 MiB of random data in 1000 KiB volumes: 41 chunks of one stored file."""
    root = tmp_path_factory.mktemp("v2big")
    src = root / "work"
    src.mkdir()
    with (src / "private.img").open("wb") as fh:
        for _ in range(40):
            fh.write(os.urandom(1 << 20))
    path = root / "qubes-backup-big"
    manifest = mb2.make_backup_v2(path, PASSPHRASE, [mb.VmSpec("work", 7, source=src)],
                                  tape_length_kib=1000)
    return V2(path, passfile, manifest)


def _scratch_bytes(out: Path) -> int:
    """Chunk copies and plaintext volumes in qrecover's scratch (not the staging
    folder, which holds what is being restored)."""
    total = 0
    for scratch in out.glob(".qrecover-*"):
        try:
            entries = list(scratch.iterdir())
        except FileNotFoundError:  # the run ended and removed it since the glob
            continue
        for entry in entries:
            if entry.name.startswith(("chunk-", "plain-")):
                with contextlib.suppress(OSError):
                    total += entry.stat().st_size
    return total


def test_scratch_holds_a_few_volumes_not_the_stored_file(big: V2, tmp_path: Path) -> None:
    assert next(f for f in big.manifest.files if f.name == "vm7/private.img").chunks > 30
    out = tmp_path / "out"
    proc = subprocess.Popen([*qrecover_exe(), "-q", "restore", str(big.path),
                             "--passphrase-file", str(big.passfile), "--output", str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    peak, seen = 0, 0
    while proc.poll() is None:
        now = _scratch_bytes(out) if out.exists() else 0
        peak, seen = max(peak, now), seen + (now > 0)
        time.sleep(0.002)
    assert proc.wait() == 0, proc.stderr.read() if proc.stderr else ""
    assert seen > 10  # the sampling saw the run's scratch
    volume = 1000 * 1024
    assert peak <= 4 * volume, f"scratch peaked at {peak} bytes"
    assert (out / "work" / "private.img").stat().st_size == 40 << 20


def test_terminated_run_leaves_no_process_and_no_scratch(big: V2, tmp_path: Path) -> None:
    out = tmp_path / "out"
    proc, mark = _start_marked(big, out, stderr=subprocess.PIPE)
    _wait_for_tar_m(proc, mark)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 143
    left = left_after(mark)
    assert not left, left
    assert not list(out.glob(".qrecover-*"))
    assert not (out / "work" / "private.img").exists()


def _start_marked(big: V2, out: Path, stderr: int = subprocess.DEVNULL
                  ) -> tuple[subprocess.Popen[bytes], str]:
    """qrecover restoring ``big``, its environment (and so its programs') marked."""
    mark, env = marked_env()
    proc = subprocess.Popen([*qrecover_exe(), "-q", "restore", str(big.path),
                             "--passphrase-file", str(big.passfile), "--output", str(out)],
                            stdout=subprocess.DEVNULL, stderr=stderr, env=env)
    return proc, mark


def _wait_for_tar_m(proc: subprocess.Popen[bytes], mark: str) -> None:
    deadline = time.monotonic() + 60
    while not any("-M" in _cmdline(pid) for pid in marked_processes(mark) if pid != proc.pid):
        assert time.monotonic() < deadline and proc.poll() is None, "tar -M never started"
        time.sleep(0.002)


def test_a_killed_run_leaves_no_tar_waiting_for_ever(big: V2, tmp_path: Path) -> None:
    """SIGKILL, which qrecover cannot handle, at several moments of the volumes'
    feeding: tar -M is never left waiting for ever.  (When volumes came through a
    FIFO, a SIGKILL between qrecover's answer to tar's new-volume script and tar's
    open() of the FIFO left tar in open() for ever: 2 runs in 30 under load.  Each
    volume is now a file; the script reads end-of-file and tar stops.)"""
    for n, delay in enumerate((0.0, 0.02, 0.05, 0.1, 0.15, 0.25)):
        proc, mark = _start_marked(big, tmp_path / f"out{n}")
        _wait_for_tar_m(proc, mark)
        time.sleep(delay)  # a moment of the feeding, not a wait for an event
        proc.kill()
        proc.wait()
        left = left_after(mark)
        assert not left, (delay, left)


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def test_a_sparse_map_across_volumes_fails_that_file_clearly(tmp_path: Path,
                                                              passfile: Path) -> None:
    """GNU tar writes a fragmented sparse file's map (old GNU extension blocks)
    across a volume boundary in a form it cannot read back: that stored file
    fails at once with exit 4, named; the others are restored; nothing hangs."""
    vm, home = tmp_path / "vm", tmp_path / "user"
    vm.mkdir()
    home.mkdir()
    (vm / "private.img").write_bytes(b"p" * 5000)
    with (home / "fragmented.img").open("wb") as fh:
        for i in range(500):  # 500 extents: 24 map blocks, more than one 10 KiB volume
            fh.seek(i * 8192)
            fh.write(b"x" * 100)
        fh.truncate(500 * 8192)
    path = tmp_path / "b"
    mb2.make_backup_v2(path, PASSPHRASE, [mb.VmSpec("work", 7, source=vm)], dom0_home=home,
                       encrypted=False, tape_length_kib=10)
    out = tmp_path / "out"
    run = run_cli("-q", "restore", path, "--passphrase-file", passfile, "--output", out,
                  timeout=120)
    assert run.code == 4, run.text
    assert "dom0-home/user: GNU tar wrote the sparse map of 'dom0-home/user/fragmented.img'" \
        in run.text
    assert (out / "work" / "private.img").read_bytes() == b"p" * 5000
    assert (out / "dom0-home" / "user.partial").exists()
