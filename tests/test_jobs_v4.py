"""Format 4 with several ``scrypt dec`` at once (--jobs): the same bytes, the same
failures, bounded scratch, and nothing left behind when interrupted.

The backups are written by scripts/make_backup_v4.py (R4's writer, real scrypt, a
cheap key derivation); every stored file has many chunks, so that several are in
flight at once and their plaintext must be put back in order."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
from conftest import (
    PASSPHRASE,
    Backup,
    MakeBackup,
    assert_restored,
    children_of,
    family_of,
    gen,
    qrecover_exe,
    run_cli,
    run_main,
    sha,
    sigint_as_at_a_terminal,
)
from helpers import flip, untar

# its fixtures build something big: all its tests on one worker, so it is built once
pytestmark = pytest.mark.xdist_group("test_jobs_v4")

CHUNK = 64 * 1024


@pytest.fixture(scope="module")
def many4(make4: MakeBackup, tmp_path_factory: pytest.TempPathFactory) -> Backup:
    """Two VMs of 1.5 MiB incompressible data each, in 64 KiB chunks: 25 chunks a
    stored file, in two stored files (and small ones besides)."""
    root = tmp_path_factory.mktemp("many4")
    vms = []
    for name, qid in (("work", 7), ("mail", 8)):
        src = root / name
        src.mkdir()
        (src / "private.img").write_bytes(os.urandom(3 << 19))
        (src / "notes.txt").write_bytes(b"kept\n" * 1000)
        vms.append(gen.VmSpec(name, qid, source=src))
    return make4(vms=vms, dom0_home=None, chunk_size=CHUNK)


def restore_ok(backup: Backup, where: Path | str, out: Path, *extra: str,
               stdin: bytes | None = None) -> None:
    args = ("restore", where, "-o", out, "--passphrase-file", backup.passfile, *extra)
    result = run_main(*args) if stdin is None else run_cli(*args, stdin=stdin)
    assert result.code == 0, result.text
    assert "every chunk authenticated by scrypt" in result.out
    assert_restored(out, backup)


def test_many_chunks_per_stored_file(many4: Backup) -> None:
    names = many4.manifest.member_names()
    for vm in ("vm7", "vm8"):
        assert f"{vm}/private.img.020.enc" in names  # the fixture is what the tests need


@pytest.mark.parametrize("jobs", ["1", "2"])
def test_jobs_restore_byte_for_byte_from_a_file(many4: Backup, tmp_path: Path, jobs: str) -> None:
    restore_ok(many4, many4.path, tmp_path / "out", "--jobs", jobs)


def test_jobs_2_from_stdin(many4: Backup, tmp_path: Path) -> None:
    restore_ok(many4, "-", tmp_path / "out", "--jobs", "2", stdin=many4.path.read_bytes())


def test_jobs_2_from_a_folder(many4: Backup, tmp_path: Path) -> None:
    folder = untar(many4.path, tmp_path / "untarred")
    before = sorted(p.name for p in (folder / "vm7").iterdir())
    restore_ok(many4, folder, tmp_path / "out", "--jobs", "2")
    assert sorted(p.name for p in (folder / "vm7").iterdir()) == before  # read in place


def test_verify_takes_jobs(many4: Backup) -> None:
    result = run_main("verify", many4.path, "--passphrase-file", many4.passfile, "--jobs", "2")
    assert result.code == 0, result.text


def test_jobs_0_is_a_usage_error(many4: Backup, tmp_path: Path) -> None:
    result = run_main("restore", many4.path, "-o", tmp_path / "o", "--passphrase-file",
                      many4.passfile, "--jobs", "0")
    assert result.code == 2, result.text
    assert not (tmp_path / "o").exists()


def test_v_logs_every_scrypt_dec_with_its_memory_cap(many4: Backup, tmp_path: Path) -> None:
    result = run_main("-v", "restore", many4.path, "-o", tmp_path / "o", "--passphrase-file",
                      many4.passfile, "--jobs", "2")
    assert result.code == 0, result.text
    chunks = [n for n in many4.manifest.member_names() if n.endswith(".enc")]
    logged = [line for line in result.err.splitlines() if "scrypt dec -M " in line]
    for chunk in chunks:
        assert sum(f" {chunk} " in line for line in logged) == 1, chunk
    assert PASSPHRASE not in result.text


def _tampered(backup: Backup, tmp_path: Path) -> Path:
    folder = untar(backup.path, tmp_path / "untarred")
    victim = folder / "vm7" / "private.img.012.enc"
    flip(victim, victim.stat().st_size // 2)  # in the ciphertext: only scrypt's final HMAC notices
    return folder


def test_tampered_middle_chunk_same_outcome_with_jobs_1_and_2(
    many4: Backup, tmp_path: Path
) -> None:
    folder = _tampered(many4, tmp_path)
    outcomes = []
    for jobs in ("1", "2"):
        out = tmp_path / f"out{jobs}"
        result = run_main("restore", folder, "-o", out, "--passphrase-file", many4.passfile,
                          "--jobs", jobs)
        said = [line for line in result.err.splitlines() if "private.img.012.enc" in line]
        assert result.code == 4, result.text
        assert said and "scrypt" in said[0], result.err
        assert not (out / "work" / "private.img").exists()
        partial = out / "work" / "private.img.partial"
        # chunks 000-011 only: 12 chunks' worth of the image, none of chunk 012
        size = partial.stat().st_size
        assert 0 < size <= 12 * CHUNK, size
        source = many4.vms[0].source / "private.img"
        with source.open("rb") as f:
            assert partial.read_bytes() == f.read(size)
        # the other stored files were still restored
        expected = {k: v for k, v in many4.expected_files().items() if k != "work/private.img"}
        for rel, src in expected.items():
            assert sha(out / rel) == sha(src), rel
        assert not [p for p in out.rglob("*") if p.name.startswith(".qrecover")]
        outcomes.append((result.code, said, sha(partial)))
    assert outcomes[0] == outcomes[1]


def _scratch_files(out: Path) -> int:
    """Chunk files in qrecover's scratch now (the staging folders are output)."""
    count = 0
    for scratch in out.glob(".qrecover-*"):
        for dirpath, dirnames, filenames in os.walk(scratch):
            dirnames[:] = [d for d in dirnames if not d.startswith("stage")]
            count += len(filenames)
            del dirpath
    return count


@pytest.mark.parametrize(("source", "bound"), [("file", 2 * 2 + 2), ("folder", 2 + 2)])
def test_scratch_stays_bounded(many4: Backup, tmp_path: Path, source: str, bound: int) -> None:
    """Looked at over and over during a --jobs 2 restore: never more chunk files in
    scratch than docs/formats.md says (2*jobs+2 from a file, jobs+2 from a folder), and
    never more scrypt dec at once than --jobs."""
    where = many4.path if source == "file" else untar(many4.path, tmp_path / "untarred")
    out = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if k != "QRECOVER_PASSPHRASE"}
    proc = subprocess.Popen(
        [*qrecover_exe(), "restore", str(where), "-o", str(out), "--passphrase-file",
         str(many4.passfile), "--jobs", "2"],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
    )
    most_files = most_scrypts = 0
    deadline = time.monotonic() + 240
    while proc.poll() is None and time.monotonic() < deadline:
        most_files = max(most_files, _scratch_files(out))
        scrypts = 0
        for pid in family_of(proc.pid):
            try:
                comm = Path(f"/proc/{pid}/comm").read_text().strip()
            except OSError:
                continue
            scrypts += comm == "scrypt"
        most_scrypts = max(most_scrypts, scrypts)
        time.sleep(0.001)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert_restored(out, many4)
    assert most_files >= 1, "scratch was never seen: the test observed nothing"
    assert most_files <= bound, most_files
    assert most_scrypts <= 2, most_scrypts


@pytest.mark.parametrize(("sig", "code"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_interrupted_jobs_2_restore_stops_every_child(
    many4: Backup, tmp_path: Path, sig: int, code: int
) -> None:
    """Half the backup on stdin, --jobs 2: once the pipeline runs, the signal stops
    every child (scrypt dec, cat, the decompressor, tar) and removes all scratch."""
    out = tmp_path / "out"
    data = many4.path.read_bytes()
    env = {k: v for k, v in os.environ.items() if k != "QRECOVER_PASSPHRASE"}
    proc = subprocess.Popen(
        [*qrecover_exe(), "restore", "-", "-o", str(out), "--passphrase-file",
         str(many4.passfile), "--jobs", "2"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
        preexec_fn=sigint_as_at_a_terminal,
    )
    assert proc.stdin is not None
    proc.stdin.write(data[: len(data) // 2])
    proc.stdin.flush()
    deadline = time.monotonic() + 60
    kids: list[int] = []
    while time.monotonic() < deadline:
        kids = children_of(proc.pid)
        names = set()
        for kid in kids:
            try:
                names.add(Path(f"/proc/{kid}/comm").read_text().strip())
            except OSError:
                continue
        if names & {"tar", "bsdtar"}:  # bsdtar extracts where installed
            break
        time.sleep(0.01)
    else:
        proc.kill()
        raise AssertionError("the restore's pipeline never started")
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == code, err
    assert b"Traceback" not in err
    for kid in kids:  # killed and reaped before qrecover exited
        assert not Path(f"/proc/{kid}").exists(), kid
    leftovers = [p.name for p in out.rglob("*")]
    assert not any(n.startswith(".qrecover-") for n in leftovers), leftovers
    assert not [p for p in out.rglob("private.img") if p.is_file()]


def test_progress_line_shows_the_chunks_in_flight() -> None:
    import io

    from qrecover.progress import Display

    out = io.StringIO()
    display = Display(out, 8 << 20, width=200)
    display.file_started("vm7/private.img", "work")
    display.in_flight(2)
    display.data_read("vm7/private.img", 1 << 20)
    assert "work vm7/private.img 1.0 MiB (2 in flight) | " in out.getvalue()
    display.in_flight(0)
    assert display.file_bytes() == "1.0 MiB"


# -- the memory rule, on chunks written by `scrypt enc` with a stated cost -------

BACKUP_ID = "20230405T123455-1234"


def _enc_chunk(folder: Path, index: int, log_n: int) -> tuple[Path, str]:
    """A chunk of vm7/private.img written as R4's writer did (scrypt enc under
    BACKUPID!NAME!PASSPHRASE), at the given cost; returns it and its member name."""
    from qrecover.archive.members import ChunkName

    name = ChunkName("vm7/private.img", index, is_enc=True)
    plain = folder / f"plain{index}"
    plain.write_bytes(os.urandom(4096))
    enc = folder / f"enc{index}"
    secret = f"{BACKUP_ID}!{name.data_name}!{PASSPHRASE}"
    subprocess.run(
        ["scrypt", "enc", "--logN", str(log_n), "-r", "8", "-p", "1", "--passphrase",
         "env:S", str(plain), str(enc)],
        env={**os.environ, "S": secret}, check=True,
    )
    return enc, name.name


def _works(tmp_path: Path, available: int) -> tuple[object, object]:
    from qrecover.formats.v4 import BackupHeaderV4, Format4
    from qrecover.formats.v4.scrypt_cost import HEADROOM, GiB, Memory, plan_jobs
    from qrecover.formats.v4.scrypt_tool import ScryptTool
    from qrecover.formats.v4.works import ScryptWorks

    header = BackupHeaderV4(version=4, hmac_algorithm="scrypt", compressed=False,
                            backup_id=BACKUP_ID)
    fmt = Format4(header, ScryptTool("env"))
    logged: list[str] = []

    def planner(params: object, chunk: str, requested: int | None) -> object:
        # a machine with 2 cores and `available` bytes over the headroom
        memory = Memory(total=8 * GiB, available=HEADROOM + available)
        return plan_jobs(params, chunk, requested=requested, cpus=2,  # type: ignore[arg-type]
                         memory=memory, ceiling=4 * GiB)

    scratch = tmp_path / "scratch"
    scratch.mkdir()
    works = ScryptWorks(fmt.keys, PASSPHRASE, scratch, logged.append, None,
                        planner=planner)  # type: ignore[arg-type]
    return works, fmt


def _pending(fmt: object, enc: Path, member: str) -> object:
    from qrecover.archive.members import parse_member_name
    from qrecover.formats.v4.chunks import ScryptChunk

    name = parse_member_name(member)
    assert name is not None
    return ScryptChunk(fmt.keys, None, member, name, enc, True, enc.with_suffix(".p"))  # type: ignore[arg-type, attr-defined]


def test_a_chunk_alone_over_the_memory_is_exit_6_naming_it(tmp_path: Path) -> None:
    from qrecover.formats.v4.scrypt_cost import InsufficientMemory, MiB

    enc, member = _enc_chunk(tmp_path, 0, 14)  # 16 MiB of key derivation
    works, fmt = _works(tmp_path, available=8 * MiB)
    with pytest.raises(InsufficientMemory) as caught:
        works.submit(_pending(fmt, enc, member), member, enc.stat().st_size)  # type: ignore[attr-defined]
    assert caught.value.exit_code == 6
    assert member in str(caught.value) and "logN=14" in str(caught.value)
    assert not enc.exists()  # its scratch copy is gone; nothing of it ran
    works.close()  # type: ignore[attr-defined]


def test_a_later_chunk_over_the_budget_stops_after_the_earlier_ones(tmp_path: Path) -> None:
    from qrecover.formats.v4.scrypt_cost import InsufficientMemory, MiB

    small, first = _enc_chunk(tmp_path, 0, 10)  # 1 MiB of key derivation: fits
    big, second = _enc_chunk(tmp_path, 1, 16)  # 64 MiB: does not
    works, fmt = _works(tmp_path, available=16 * MiB)
    done = works.submit(_pending(fmt, small, first), first, 1)  # type: ignore[attr-defined]
    done += works.drain()  # type: ignore[attr-defined]
    assert [c.member for c in done] == [first]
    assert done[0].outcome.error is None and done[0].outcome.plain.read_bytes() == (
        tmp_path / "plain0"
    ).read_bytes()
    with pytest.raises(InsufficientMemory) as caught:
        works.submit(_pending(fmt, big, second), second, 1)  # type: ignore[attr-defined]
    assert second in str(caught.value)
    works.close()  # type: ignore[attr-defined]
    assert not list((tmp_path / "scratch").iterdir())


def test_transcript_and_explain_do_not_depend_on_jobs(many4: Backup, tmp_path: Path) -> None:
    """The same backup gives the same transcript and narration, in chunk order,
    whether one scrypt dec runs at a time or two (but for the argv they quote)."""
    shown = []
    for jobs in ("1", "2"):
        out = tmp_path / "out"
        transcript = tmp_path / "t.sh"
        extra = () if jobs == "1" else ("--jobs", "2")
        result = run_main("restore", many4.path, "-o", out, "--passphrase-file", many4.passfile,
                          "--transcript", transcript, "--explain", *extra)
        assert result.code == 0, result.text
        text = transcript.read_text(encoding="utf-8").replace(" --jobs 2", "")
        # the minute the transcript was written in (the two runs may straddle one)
        text = re.sub(r"\d{4}-\d\d-\d\d \d\d:\d\d UTC", "DATE", text)
        chunks = [n for n in many4.manifest.member_names() if n.startswith("vm7/private.img.")]
        at = [text.find(f"{n} ") for n in chunks]
        assert all(i >= 0 for i in at) and at == sorted(at), chunks  # every chunk, in order
        # the scratch folder's name is random in every run
        narration = re.sub(r"\.qrecover-[A-Za-z0-9_]+", ".qrecover-X", result.err)
        narration = re.sub(r"\d{4}-\d\d-\d\d \d\d:\d\d UTC", "DATE", narration)
        shown.append((text, narration.replace(" --jobs 2", "")))
        subprocess.run(["rm", "-rf", str(out), str(transcript)], check=True)
    assert shown[0][0] == shown[1][0]
    assert shown[0][1] == shown[1][1]
