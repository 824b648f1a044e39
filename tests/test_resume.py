"""restore --resume, end to end through the installed CLI on real backups
(scripts/make_backup.py, make_backup_v4.py): killed runs, damaged chunks,
another backup's folder, a broken record."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import tarfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from conftest import (
    PASSPHRASE,
    Backup,
    MakeBackup,
    assert_restored,
    gen,
    gen4,
    left_after,
    marked_env,
    qrecover_exe,
    run_cli,
    run_main,
)

RECORD = ".restore-record-qrecover.json"


def _record(out: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((out / RECORD).read_text())
    return data


def _placed(out: Path) -> list[str]:
    if not (out / RECORD).exists():
        return []
    return [k for k, v in _record(out)["files"].items() if v["status"] == "placed"]


def _stored_names(backup: Backup) -> list[str]:
    return [f.name for f in backup.manifest.files if f.vm is not None]


def _stat_places(out: Path, stored: list[str]) -> dict[str, tuple[int, int]]:
    """(inode, mtime_ns) of every file a recorded stored file placed."""
    found: dict[str, tuple[int, int]] = {}
    record = _record(out)["files"]
    for name in stored:
        for place in record[name]["places"]:
            for path in [out / place["path"], *(out / place["path"]).rglob("*")]:
                st = path.lstat()
                found[str(path)] = (st.st_ino, st.st_mtime_ns)
    return found


def _killed_mid_way(
    backup: Backup, out: Path, tmp: Path, sig: signal.Signals,
    meanwhile: Callable[[], None] | None = None,
) -> list[str]:
    """Feed the backup through a pipe we control, a little at a time; once the
    record shows a placed stored file, run ``meanwhile``, then send ``sig``.
    Returns what was placed."""
    data = backup.path.read_bytes()
    err = (tmp / "err").open("wb")
    mark, env = marked_env()
    proc = subprocess.Popen(
        [*qrecover_exe(), "restore", "-", "-o", str(out), "--passphrase-file",
         str(backup.passfile)],
        stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=err, env=env,
    )
    assert proc.stdin is not None
    sent = 0
    deadline = time.monotonic() + 120
    while not _placed(out):
        assert sent < len(data), "the restore ended before it could be interrupted"
        assert time.monotonic() < deadline
        proc.stdin.write(data[sent : sent + 4096])
        proc.stdin.flush()
        sent += 4096
        time.sleep(0.05)
    if meanwhile is not None:
        meanwhile()
    proc.send_signal(sig)
    proc.wait(timeout=60)
    with contextlib.suppress(BrokenPipeError):
        proc.stdin.close()
    err.close()
    assert proc.returncode == (143 if sig == signal.SIGTERM else -signal.SIGKILL)
    said = (tmp / "err").read_text()
    assert "Traceback" not in said
    if sig == signal.SIGTERM:  # what to do next is said, with what was kept
        assert "run the same restore again with --resume" in said, said
    left = left_after(mark)  # the pipeline's children a SIGKILL orphaned go by themselves
    assert not left, left
    placed = _placed(out)
    assert 0 < len(placed) < len(_stored_names(backup)), placed
    return placed


def _damage(backup: Backup, tmp: Path, vm: str, suffix: str, chunk: int = 0) -> tuple[Path, str]:
    """A copy of the backup with one byte of ``vm``'s chunk ``chunk`` of ``suffix`` flipped."""
    stored = next(f.name for f in backup.manifest.files if f.vm == vm and f.name.endswith(suffix))
    copy = tmp / "damaged-backup"
    shutil.copyfile(backup.path, copy)
    with tarfile.open(copy, ignore_zeros=True) as tar:  # Qubes wrote member by member
        names = (f"{stored}.{chunk:03d}", f"{stored}.{chunk:03d}.enc")
        member = next(m for m in tar if m.name in names)
    with copy.open("r+b") as f:
        f.seek(member.offset_data + member.size // 2)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0x40]))
    return copy, stored


@pytest.mark.parametrize("fmt", [3, 4])
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["SIGTERM", "SIGKILL"])
def test_killed_restore_resumes_to_the_same_bytes(
    make: MakeBackup, make4: MakeBackup, fmt: int, sig: signal.Signals, tmp_path: Path
) -> None:
    backup = make() if fmt == 3 else make4()
    out = tmp_path / "out"
    placed = _killed_mid_way(backup, out, tmp_path, sig)
    before = _stat_places(out, placed)
    # A user's own folder that merely looks like qrecover's scratch is kept.
    lookalike = out / ".qrecover-abcdefgh"
    lookalike.mkdir()
    (lookalike / "my-notes.txt").write_text("mine")
    if sig == signal.SIGKILL:
        assert [p for p in out.iterdir() if p.name.startswith(".qrecover-") and p != lookalike]
    # The dry run finds what the restore will find: with --resume it goes on
    # (exit 0) and names what it would keep; without, the folder stops it (6).
    listing = sorted(str(p) for p in out.rglob("*"))
    dry = run_main("restore", "--resume", "--dry-run", backup.path, "-o", out.name,
                   "--passphrase-file", backup.passfile, cwd=out.parent)  # relative DIR
    assert dry.code == 0, dry.text
    kept_line = next(line for line in dry.out.splitlines() if "it would keep" in line)
    assert sorted(kept_line.split(": ", 1)[1].split(", ")) == sorted(placed), kept_line
    assert "It would stop" not in dry.out, dry.out
    assert run_main("restore", "--dry-run", backup.path, "-o", out,
                    "--passphrase-file", backup.passfile).code == 6
    assert sorted(str(p) for p in out.rglob("*")) == listing, "a dry run changed DIR"
    assert _stat_places_now(before) == before
    # Read from the file this time: the backup is told by its content, not its path.
    result = run_main("restore", "--resume", backup.path, "-o", out,
                      "--passphrase-file", backup.passfile)
    assert result.code == 0, result.text
    for stored in placed:
        assert any(line.startswith("KEPT") and f" {stored} -> " in line
                   for line in result.out.splitlines()), (stored, result.out)
        row = next(line for line in result.out.splitlines() if f"  {stored}  " in line)
        assert row.endswith("kept (earlier run)"), row
    redone = [s for s in _stored_names(backup) if s not in placed]
    for stored in redone:
        assert any(line.startswith("RESTORED") and f" {stored} -> " in line
                   for line in result.out.splitlines()), (stored, result.out)
    assert f"{len(placed)} of them kept from an earlier run" in result.out
    assert _stat_places_now(before) == before, "a placed file was rewritten"
    assert (lookalike / "my-notes.txt").read_text() == "mine"
    shutil.rmtree(lookalike)
    assert_restored(out, backup)
    assert not (out / RECORD).exists(), "a finished restore leaves no record"


def _stat_places_now(before: dict[str, tuple[int, int]]) -> dict[str, tuple[int, int]]:
    now = {}
    for path in before:
        st = os.lstat(path)
        now[path] = (st.st_ino, st.st_mtime_ns)
    return now


def test_damaged_chunk_then_resume_from_stdin_redoes_only_that_file(
    make: MakeBackup, tmp_path: Path
) -> None:
    backup = make(chunk_size=16 * 1024)
    # Chunk 1 damaged: chunk 0 was restored, and kept as private.img.partial.
    damaged, stored = _damage(backup, tmp_path, "work", "private.img", chunk=1)
    out = tmp_path / "out"
    first = run_main("restore", damaged, "-o", out, "--passphrase-file", backup.passfile)
    assert first.code == 4, first.text
    assert (out / "work" / "private.img.partial").exists()
    assert not (out / "work" / "private.img").exists()
    record = _record(out)["files"]
    assert record[stored]["status"] == "partial"
    others = [s for s in _stored_names(backup) if s != stored]
    assert sorted(_placed(out)) == sorted(others)
    before = _stat_places(out, others)
    # Without --resume the folder is refused as today, and the hint names --resume.
    again = run_main("restore", backup.path, "-o", out, "--passphrase-file", backup.passfile)
    assert again.code == 6 and "--resume" in again.err, again.text
    # The good backup, from a pipe this time: only the damaged stored file is redone.
    result = run_cli("restore", "--resume", "-", "-o", out, "--passphrase-file",
                     backup.passfile, stdin=backup.path.read_bytes())
    assert result.code == 0, result.text
    restored = [line for line in result.out.splitlines() if line.startswith("RESTORED")]
    assert len(restored) == 1 and f" {stored} -> " in restored[0], result.out
    kept = [line for line in result.out.splitlines() if line.startswith("KEPT")]
    assert len(kept) == len(others)
    assert _stat_places_now(before) == before
    assert_restored(out, backup)


@pytest.mark.parametrize("fmt", [3, 4])
def test_resume_refused_on_another_backups_folder(
    make: MakeBackup, make4: MakeBackup, sample_tree: tuple[list[Any], Path], fmt: int,
    tmp_path: Path,
) -> None:
    backup = make() if fmt == 3 else make4()
    # A second backup written with the same settings: its header can be the same bytes.
    vms, home = sample_tree
    work = tmp_path / "work"
    work.mkdir()
    other = tmp_path / "other-backup"
    writer = gen.make_backup if fmt == 3 else gen4.make_backup_v4
    writer(other, PASSPHRASE, vms, dom0_home=home, workdir=work)
    damaged, _ = _damage(backup, tmp_path, "work", "private.img")
    out = tmp_path / "out"
    assert run_main("restore", damaged, "-o", out, "--passphrase-file", backup.passfile).code == 4
    scratch = out / ".qrecover-abcdefgh"  # as a killed run leaves it
    scratch.mkdir()
    (scratch / "stage-1").mkdir()
    snapshot = {str(p): p.lstat().st_mtime_ns for p in out.rglob("*")}
    result = run_main("restore", "--resume", other, "-o", out, "--passphrase-file",
                      backup.passfile)
    assert result.code == 6, result.text
    assert "another backup" in result.err and "Traceback" not in result.text
    assert {str(p): p.lstat().st_mtime_ns for p in out.rglob("*")} == snapshot


def test_format4_resume_runs_no_scrypt_for_kept_files(make4: MakeBackup, tmp_path: Path) -> None:
    backup = make4()
    damaged, stored = _damage(backup, tmp_path, "work", "private.img")
    out = tmp_path / "out"
    first = run_main("restore", damaged, "-o", out, "--passphrase-file", backup.passfile)
    assert first.code == 4, first.text
    kept = _placed(out)
    assert stored not in kept and kept
    result = run_main("-v", "restore", "--resume", backup.path, "-o", out,
                      "--passphrase-file", backup.passfile)
    assert result.code == 0, result.text
    decrypted = [line for line in result.err.splitlines() if "scrypt dec" in line]
    assert any(f" {stored}.000.enc " in line for line in decrypted), decrypted
    for name in kept:
        assert not any(f" {name}." in line for line in decrypted), (name, decrypted)
    assert_restored(out, backup)


@pytest.mark.parametrize(
    ("content", "said"),
    [
        (b"not json at all\n", "not a valid qrecover restore record"),
        (b'{"qrecover_restore_record": 1}', "backup: Field required"),
        (b'{"qrecover_restore_record": 1, "backup": "' + b"0" * 64 + b'", "format": 3, '
         b'"files": {"x": {"owner": "w", "status": "weird", "chunks": 1, "places": []}}}',
         "status"),
    ],
)
def test_broken_record_is_a_clear_error(
    make: MakeBackup, content: bytes, said: str, tmp_path: Path
) -> None:
    backup = make()
    out = tmp_path / "out"
    out.mkdir()
    (out / RECORD).write_bytes(content)
    result = run_main("restore", "--resume", backup.path, "-o", out, "--passphrase-file",
                      backup.passfile)
    assert result.code == 6, result.text
    assert said in result.err and str(out / RECORD) in result.err
    assert "Traceback" not in result.text
    assert sorted(p.name for p in out.iterdir()) == [RECORD]


def test_resume_of_a_finished_restore_says_there_is_nothing_left_to_do(
    make: MakeBackup, tmp_path: Path
) -> None:
    """Issue 22: exit 0, nothing written; the finished restore is known by what it
    left: no record, this backup's qubes.xml, every selected VM's folder."""
    backup = make()
    out = tmp_path / "out"
    assert run_main("restore", backup.path, "-o", out, "--passphrase-file",
                    backup.passfile).code == 0
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    result = run_main("restore", "--resume", backup.path, "-o", out, "--passphrase-file",
                      backup.passfile)
    assert result.code == 0 and "nothing left to do" in result.out, result.text
    assert "RESTORED" not in result.out
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == before
    # A VM's folder gone: it is not a finished restore any more; said as before.
    shutil.rmtree(out / "sys-net")
    result = run_main("restore", "--resume", backup.path, "-o", out, "--passphrase-file",
                      backup.passfile)
    assert result.code == 6 and "nothing to resume" in result.err, result.text
    # --resume into an empty folder is an ordinary restore.
    fresh = tmp_path / "fresh"
    result = run_main("restore", "--resume", backup.path, "-o", fresh, "--passphrase-file",
                      backup.passfile)
    assert result.code == 0, result.text
    assert_restored(fresh, backup)


def test_resume_with_vm_leaves_the_other_vms_leftovers_and_the_record(
    make: MakeBackup, tmp_path: Path
) -> None:
    backup = make(chunk_size=16 * 1024)
    damaged, stored = _damage(backup, tmp_path, "work", "private.img", chunk=1)
    out = tmp_path / "out"
    assert run_main("restore", damaged, "-o", out, "--passphrase-file", backup.passfile).code == 4
    partial = out / "work" / "private.img.partial"
    assert partial.exists()
    result = run_main("restore", "--resume", "--vm", "sys-net", backup.path, "-o", out,
                      "--passphrase-file", backup.passfile)
    assert result.code == 0, result.text
    assert partial.exists(), "a VM not named with --vm was touched"
    assert _record(out)["files"][stored]["status"] == "partial"
    result = run_main("restore", "--resume", backup.path, "-o", out,
                      "--passphrase-file", backup.passfile)
    assert result.code == 0, result.text
    assert_restored(out, backup)
    assert not (out / RECORD).exists()


def test_a_second_restore_into_the_same_folder_is_refused(
    make: MakeBackup, tmp_path: Path
) -> None:
    backup = make()
    out = tmp_path / "out"
    seen: list[str] = []

    def second() -> None:
        result = run_main("restore", "--resume", backup.path, "-o", out,
                          "--passphrase-file", backup.passfile)
        seen.append(f"{result.code} {result.err}")

    _killed_mid_way(backup, out, tmp_path, signal.SIGTERM, meanwhile=second)
    assert seen[0].startswith("6 ") and "another qrecover" in seen[0], seen
    result = run_main("restore", "--resume", backup.path, "-o", out,
                      "--passphrase-file", backup.passfile)
    assert result.code == 0, result.text
    assert_restored(out, backup)


def test_a_partial_the_record_never_heard_of_is_no_obstacle_and_is_kept(
    make: MakeBackup, tmp_path: Path
) -> None:
    """A full disk can stop the record's write after a .partial was placed: the
    resume must still go on, and leave that .partial alone (review finding)."""
    backup = make(chunk_size=16 * 1024)
    damaged, stored = _damage(backup, tmp_path, "work", "private.img", chunk=1)
    out = tmp_path / "out"
    first = run_main("restore", damaged, "-o", out, "--passphrase-file", backup.passfile)
    assert first.code == 4, first.text
    partial = out / "work" / "private.img.partial"
    content = partial.read_bytes()
    # The record as a failed write left it: the partial stored file not in it.
    data = _record(out)
    del data["files"][stored]
    (out / RECORD).write_text(json.dumps(data))
    result = run_main("restore", "--resume", backup.path, "-o", out, "--passphrase-file",
                      backup.passfile)
    assert result.code == 0, result.text
    assert partial.read_bytes() == content  # never removed or replaced
    partial.unlink()
    assert_restored(out, backup)
