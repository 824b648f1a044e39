"""Format 4 with many small stored files: chunks of different stored files are
checked at once (--jobs), yet the run tells and writes exactly what one job does.

The backup (scripts/make_backup_v4.py: R4's writer, real scrypt, a cheap key
derivation) has six VMs of two one-chunk stored files each; chunks in three
different stored files are damaged (one in the ciphertext, where only scrypt's
final HMAC notices; one in its scrypt header; one cut short), so that the pool
has later stored files' chunks in flight when each failure comes back."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest
from conftest import Backup, MakeBackup, gen, run_cli, run_main, sha

pytestmark = pytest.mark.xdist_group("test_jobs_many_v4")

VMS = ("work", "mail", "bank", "chat", "vault", "print")
# chunks damaged in three different stored files: vm8's and vm10's images and
# vm12's firewall.xml
DAMAGED = ("vm8/private.img.000.enc", "vm10/private.img.000.enc", "vm12/firewall.xml.000.enc")


@pytest.fixture(scope="module")
def small_vms(make4: MakeBackup, tmp_path_factory: pytest.TempPathFactory) -> Backup:
    root = tmp_path_factory.mktemp("small_vms")
    vms = []
    for qid, name in enumerate(VMS, start=7):
        src = root / name
        src.mkdir()
        (src / "private.img").write_bytes(os.urandom(40 << 10))
        (src / "firewall.xml").write_bytes(f"<firewall vm=\"{name}\"/>\n".encode() * 200)
        vms.append(gen.VmSpec(name, qid, source=src))
    return make4(vms=vms, dom0_home=None, chunk_size=1 << 20)


def _members(backup: Path) -> list[str]:
    """The backup's members in the order the stream holds them."""
    return subprocess.run(["tar", "-i", "-tf", str(backup)], check=True, capture_output=True,
                          text=True).stdout.splitlines()


@pytest.fixture(scope="module")
def damaged(small_vms: Backup, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The backup with a chunk damaged in each of three stored files, its members
    in the writer's order again (one tar stream)."""
    folder = tmp_path_factory.mktemp("damaged")
    subprocess.run(["tar", "-i", "-xf", str(small_vms.path), "-C", str(folder)], check=True)
    ciphertext, header, cut = (folder / name for name in DAMAGED)
    data = bytearray(ciphertext.read_bytes())
    data[len(data) // 2] ^= 0x01
    ciphertext.write_bytes(bytes(data))
    data = bytearray(header.read_bytes())
    data[20] ^= 0x40  # in scrypt's header: its checksum no longer matches
    header.write_bytes(bytes(data))
    cut.write_bytes(cut.read_bytes()[:-100])
    backup = folder / "damaged.tar"
    subprocess.run(["tar", "-cf", str(backup), "-C", str(folder), "--format=gnu",
                    *_members(small_vms.path)], check=True)
    return backup


def test_the_fixture_is_what_the_tests_need(small_vms: Backup) -> None:
    names = small_vms.manifest.member_names()
    for qid in range(7, 7 + len(VMS)):
        for stored in ("private.img", "firewall.xml"):
            assert f"vm{qid}/{stored}.000.enc" in names
            assert f"vm{qid}/{stored}.001.enc" not in names  # one chunk each
    assert all(name in names for name in DAMAGED)


def _normal(text: str) -> str:
    """A run's words without what differs between any two runs: the scratch
    folder's random name, the minute, and the --jobs asked for."""
    text = re.sub(r"\.qrecover-[A-Za-z0-9_]+", ".qrecover-X", text)
    text = re.sub(r"\d{4}-\d\d-\d\d \d\d:\d\d UTC", "DATE", text)
    text = re.sub(r" in \d+:\d\d \([^)]*\)", " in TIME", text)  # the summary's wall time
    return re.sub(r" --jobs \d", "", text)


def _restore(backup: Backup, where: Path, tmp_path: Path, jobs: str) -> tuple[object, ...]:
    out = tmp_path / "out"  # the same paths each time: the words name them
    transcript = tmp_path / "t.sh"
    result = run_main("restore", where, "-o", out, "--passphrase-file", backup.passfile,
                      "--transcript", transcript, "--explain", "--jobs", jobs)
    files = {
        str(p.relative_to(out)): sha(p) for p in sorted(out.rglob("*")) if p.is_file()
    }
    told = [line for line in result.err.splitlines() if ".enc" in line]
    shown = _normal(transcript.read_text(encoding="utf-8"))
    subprocess.run(["rm", "-rf", str(out), str(transcript)], check=True)
    return (result.code, _normal(result.out), told, _normal(result.err), files, shown)


def test_failures_in_several_stored_files_the_same_whatever_jobs(
    small_vms: Backup, damaged: Path, tmp_path: Path
) -> None:
    runs = {jobs: _restore(small_vms, damaged, tmp_path, jobs) for jobs in ("1", "2", "4")}
    code, out, told, err, files, transcript = runs["1"]
    assert code == 4, err
    # each damaged chunk narrated as the stream met it (the writer's order), and
    # each of their stored files told failed
    at = [err.find(name) for name in sorted(DAMAGED, key=_members(small_vms.path).index)]
    assert min(at) >= 0 and at == sorted(at), err
    failed = {line.split()[2].rstrip(":") for line in out.splitlines()
              if line.startswith("FAILED")}
    assert failed == {n.rsplit(".", 2)[0] for n in DAMAGED}, out
    assert all(any(name in line for line in told) for name in DAMAGED), told
    assert all(name in transcript for name in DAMAGED)  # each chunk's step, replayable
    for vm, stored in (("mail", "private.img"), ("chat", "private.img"), ("print", "firewall.xml")):
        assert f"{vm}/{stored}" not in files  # its only chunk failed: nothing of it written
    restored = {k for k in files if not k.endswith(".partial")}
    assert {"work/private.img", "bank/private.img", "print/private.img"} <= restored
    for rel in restored & set(small_vms.expected_files()):
        assert files[rel] == sha(small_vms.expected_files()[rel]), rel
    assert runs["2"] == runs["1"]
    assert runs["4"] == runs["1"]


def test_verify_tells_the_same_failures_whatever_jobs(
    small_vms: Backup, damaged: Path
) -> None:
    said = {}
    for jobs in ("1", "2", "4"):
        result = run_main("verify", damaged, "--passphrase-file", small_vms.passfile,
                          "--jobs", jobs)
        assert result.code == 4, result.text
        said[jobs] = (_normal(result.out), _normal(result.err))
    assert all(name in said["1"][0] + said["1"][1] for name in DAMAGED), said["1"]
    assert said["2"] == said["1"]
    assert said["4"] == said["1"]


def test_many_small_stored_files_restored_whole_from_stdin_with_jobs(
    small_vms: Backup, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    result = run_cli("restore", "-", "-o", out, "--passphrase-file", small_vms.passfile,
                      "--jobs", "4", stdin=small_vms.path.read_bytes())
    assert result.code == 0, result.text
    for rel, src in small_vms.expected_files().items():
        assert sha(out / rel) == sha(src), rel
