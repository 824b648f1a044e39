"""Format 4: qubes.xml's key derivation runs while the header's does (issue 25, item 2).

A scrypt first on PATH logs when each ``scrypt dec`` starts and ends (and runs the
real one), so that the overlap is shown by the order of those lines, not by a
clock.  Nothing of qubes.xml's early output is used before the header
authenticates: a wrong passphrase or an altered header still stops with exit 3
and the same message, and leaves nothing in the temporary folder."""

from __future__ import annotations

import os
import re
import shutil
import signal
import stat
import subprocess
import time
from pathlib import Path

import pytest
from conftest import Backup, MakeBackup, bin_dir, qrecover_exe, run_cli, run_main
from helpers import untar

from qrecover.archive.members import Member
from qrecover.errors import EXIT_SIGTERM
from qrecover.formats.v4 import head_start  # the module, not begin_early
from qrecover.formats.v4.scrypt_cost import cores

pytestmark = pytest.mark.xdist_group("test_format4_e2e")  # make4's backups built once


def _logging_scrypt(tmp_path: Path, hold: Path | None = None) -> tuple[Path, Path]:
    """A PATH folder with tar, gzip, cat and a scrypt that logs ``start``/``end`` of
    each ``dec`` with its input file, around the real scrypt; ``hold``: the
    header's waits until that file exists."""
    bindir = bin_dir(tmp_path, ["tar", "gzip", "cat"])
    log = tmp_path / "scrypt.log"
    real = shutil.which("scrypt")
    script = bindir / "scrypt"
    script.write_text(
        "#!/bin/sh\n"
        'if [ "$1" != dec ]; then exec ' f'{real} "$@"; fi\n'
        'eval "input=\\${$(($# - 1))}"\n'  # the input: the one before the output file
        f'echo "start $input" >> {log}\n'
        + (f'case "$input" in *backup-header.hmac) while [ ! -e {hold} ]; do sleep 0.1; done;;'
           ' esac\n' if hold is not None else "")
        + f'{real} "$@"; code=$?\n'
        f'echo "end $input" >> {log}\n'
        'exit $code\n'
    )
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    return bindir, log


def _events(log: Path) -> list[str]:
    """``start header``, ``end xml`` ...: each dec by what it decrypts."""
    out = []
    for line in log.read_text().splitlines():
        what, path = line.split(" ", 1)
        kind = ("header" if path.endswith("backup-header.hmac")
                else "xml" if "qrecover-early-" in path or "qubes.xml" in path else "other")
        out.append(f"{what} {kind}")
    return out


@pytest.mark.parametrize("source", ["file", "folder"])
def test_info_derives_both_keys_at_once(make4: MakeBackup, tmp_path: Path, source: str) -> None:
    backup = make4()
    where = backup.path if source == "file" else untar(backup.path, tmp_path / "untarred")
    bindir, log = _logging_scrypt(tmp_path)
    result = run_main("info", where, "--passphrase-file", backup.passfile,
                      env={"PATH": str(bindir)})
    assert result.code == 0, result.text
    events = _events(log)
    assert events.count("start xml") == 1, events  # started once, and that one used
    assert events.count("start header") == 1, events
    if cores() >= 2:  # the memory model holds both tiny derivations
        assert events.index("start xml") < events.index("end header"), events
    else:  # one at a time, as before
        assert events.index("start xml") > events.index("end header"), events
    assert "work" in result.out and "backup-id" in result.out


def test_jobs_1_one_derivation_at_a_time_same_words(make4: MakeBackup, tmp_path: Path) -> None:
    backup = make4()
    bindir, log = _logging_scrypt(tmp_path)
    out = {}
    for jobs in ("1", "2"):
        log.unlink(missing_ok=True)
        result = run_main("verify", backup.path, "--passphrase-file", backup.passfile,
                          "--jobs", jobs, env={"PATH": str(bindir)})
        assert result.code == 0, result.text
        out[jobs] = re.sub(r" in \d+:\d\d \([^)]*\)", " in TIME", result.out)
        events = _events(log)
        assert events.count("start xml") == 1, events
        if jobs == "1":
            assert events.index("start xml") > events.index("end header"), events
    assert out["1"] == out["2"]


def test_wrong_passphrase_exit_3_same_message_nothing_left(
    make4: MakeBackup, tmp_path: Path
) -> None:
    backup = make4()
    bindir, log = _logging_scrypt(tmp_path)
    bad = tmp_path / "bad"
    bad.write_text("not it\n")
    said = {}
    for how in ("default", "jobs1", "stdin"):
        tmp = tmp_path / f"tmp-{how}"
        tmp.mkdir()
        out = tmp_path / "out"
        env = {"PATH": str(bindir), "TMPDIR": str(tmp)}
        where = "-" if how == "stdin" else backup.path
        extra = ["--jobs", "1"] if how == "jobs1" else []
        result = run_cli("restore", where, "-o", out, "--passphrase-file", bad, *extra,
                         stdin=backup.path.read_bytes() if how == "stdin" else None, env=env)
        assert result.code == 3, result.text
        assert "passphrase" in result.err and "Traceback" not in result.text
        said[how] = result.err
        assert not out.exists()
        assert list(tmp.iterdir()) == []  # the early input and plaintext removed
    assert said["default"] == said["jobs1"]  # --jobs 1: nothing begun early
    events = _events(log)
    if cores() >= 2:
        assert events.count("start xml") == 2, events  # begun, and stopped: none of it used


def test_altered_header_exit_3_early_output_unused(make4: MakeBackup, tmp_path: Path) -> None:
    """A header altered to claim another backup id does not authenticate: exit 3,
    the qubes.xml derivation begun under it killed and its folder removed."""
    backup = make4()
    folder = untar(backup.path, tmp_path / "untarred")
    header = folder / "backup-header"
    text = header.read_text()
    backup_id = backup.manifest.header["backup-id"]
    header.write_text(text.replace(backup_id, "19990101T000000-1"))
    bindir, log = _logging_scrypt(tmp_path)
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    result = run_cli("info", folder, "--passphrase-file", backup.passfile,
                     env={"PATH": str(bindir), "TMPDIR": str(tmp)})
    assert result.code == 3, result.text
    assert "backup-header" in result.err and "altered" in result.err
    assert list(tmp.iterdir()) == []
    events = _events(log)
    assert events.count("start xml") <= 1 and events.count("start header") == 1, events


def test_a_head_start_under_another_backup_id_is_not_used(
    make4: MakeBackup, tmp_path: Path
) -> None:
    """The early derivation is handed over only under the authenticated backup id:
    under another one it is stopped and its folder removed (the chunk is then
    decrypted again, under the right key)."""
    backup = make4()
    folder = untar(backup.path, tmp_path / "untarred")
    chunk = folder / "qubes.xml.000.enc"
    member = Member("qubes.xml.000.enc", chunk.stat().st_size, path=chunk)
    header = (folder / "backup-header").read_bytes()
    mac = (folder / "backup-header.hmac").read_bytes()
    started = head_start.start(member, header, mac, "pass", None)
    if cores() < 2:
        assert started is None  # one derivation at a time
        return
    assert started is not None
    assert isinstance(member.stream, head_start.Replay)
    assert member.stream.read() == chunk.read_bytes()  # read again, the same bytes
    assert started.claim(member.name, "19990101T000000-1") is None
    assert started.closed and not started.folder.exists()
    assert started.claim(member.name, backup.manifest.header["backup-id"]) is None


def test_jobs_1_starts_nothing_early(make4: MakeBackup, tmp_path: Path) -> None:
    backup: Backup = make4()
    folder = untar(backup.path, tmp_path / "untarred")
    chunk = folder / "qubes.xml.000.enc"
    member = Member("qubes.xml.000.enc", chunk.stat().st_size, path=chunk)
    header = (folder / "backup-header").read_bytes()
    mac = (folder / "backup-header.hmac").read_bytes()
    assert head_start.start(member, header, mac, "pass", 1) is None
    assert member.stream is None


def test_sigterm_while_the_header_is_authenticated_stops_both(
    make4: MakeBackup, tmp_path: Path
) -> None:
    """SIGTERM while the header's scrypt runs (held until told) and qubes.xml's was
    begun: the exit code of SIGTERM, and nothing left in the temporary folder."""
    backup = make4()
    bindir, log = _logging_scrypt(tmp_path, hold=tmp_path / "never")
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "QRECOVER_PASSPHRASE"}
    proc = subprocess.Popen(
        [*qrecover_exe(), "info", str(backup.path), "--passphrase-file", str(backup.passfile)],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        env={**env, "PATH": str(bindir), "TMPDIR": str(tmp)},
    )
    deadline = time.monotonic() + 120  # a bound on the wait, not a measurement
    while "start header" not in (_events(log) if log.exists() else []):
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == EXIT_SIGTERM, err
    assert b"Traceback" not in err
    assert list(tmp.iterdir()) == []
    events = _events(log)
    if cores() >= 2:
        assert events.index("start xml") < events.index("start header"), events
