"""``--other-copy``: two copies of one backup, each damaged in another chunk, give a
perfect restore; a copy of another backup, or under another passphrase, is refused;
``verify`` tells the damage (which stored files, which chunks, which copy has them good)
before anything is written.

Backups come from the generators (formats 2, 3 and 4); the damage is done to copies
of them the way media do it (bytes overwritten inside a chunk, a chunk file gone from
a folder, the file cut short), with Python's own tarfile to find where a member is.
"""

from __future__ import annotations

import json
import shutil
import sys
import tarfile
from pathlib import Path

import pytest
from conftest import PASSPHRASE, Backup, MakeBackup, assert_restored, gen, run_cli, run_main, sha
from helpers import untar

SCRIPTS = Path(__file__).resolve().parent.parent / "scripts"
sys.path.insert(0, str(SCRIPTS))

import make_backup_v2 as gen2  # noqa: E402


def data_offsets(path: Path) -> dict[str, tuple[int, int]]:
    """Each member's data offset and size in a (concatenated) tar file."""
    with tarfile.open(path, ignore_zeros=True) as tar:
        return {m.name: (m.offset_data, m.size) for m in tar}


def member_bytes(path: Path, name: str) -> bytes:
    offset, size = data_offsets(path)[name]
    with path.open("rb") as f:
        f.seek(offset)
        return f.read(size)


def damaged_copy(src: Path, dst: Path, member: str) -> Path:
    """A byte-for-byte copy of ``src`` with 4 bytes overwritten inside ``member``'s data."""
    shutil.copyfile(src, dst)
    offset, size = data_offsets(src)[member]
    assert size > 8
    with dst.open("r+b") as f:
        f.seek(offset + size // 2)
        old = f.read(4)
        f.seek(offset + size // 2)
        f.write(bytes(b ^ 0xFF for b in old))
    return dst


def chunks_of(backup: Backup, stored: str) -> list[str]:
    names = [n for n in backup.manifest.member_names()
             if n.startswith(stored + ".") and not n.endswith(".hmac")]
    assert len(names) >= 3, names
    return names


def restore(backup: Path | str, out: Path, passfile: Path, *extra: str | Path) -> tuple[int, str]:
    result = run_main("restore", backup, "-o", out, "--passphrase-file", passfile, *extra)
    assert "Traceback" not in result.text
    return result.code, result.text


@pytest.fixture
def v3(make: MakeBackup) -> Backup:
    return make(chunk_size=16 * 1024)


def test_format3_two_damaged_copies_restore_perfectly(v3: Backup, tmp_path: Path) -> None:
    first, second = chunks_of(v3, "vm7/private.img")[:2]
    a = damaged_copy(v3.path, tmp_path / "A", first)
    b = damaged_copy(v3.path, tmp_path / "B", second)
    code, text = restore(a, tmp_path / "alone", v3.passfile)
    assert code == 4 and f"{first}: HMAC mismatch" in text  # one copy alone cannot

    out = tmp_path / "out"
    code, text = restore(a, out, v3.passfile, "--other-copy", b, "--json")
    assert code == 0, text
    assert_restored(out, v3)
    assert f"chunk {first}: HMAC mismatch; taken from {b}" in text
    assert "1 chunk(s) taken from the other copies" in text
    doc = json.loads(text[text.index("{"):text.rindex("}") + 1])
    (damaged,) = doc["integrity"]["damaged"]
    assert damaged["stored"] == "vm7/private.img" and damaged["recovered"] is True
    assert [c["chunk"] for c in damaged["chunks"]] == [first]
    assert damaged["chunks"][0]["taken_from"] == str(b)
    assert "vm7/private.img" not in doc["integrity"]["intact"] and doc["integrity"]["intact"]


def test_format3_from_stdin_with_a_folder_copy_missing_a_chunk(v3: Backup, tmp_path: Path) -> None:
    """BACKUP on standard input; the other copy is a folder untarred by hand whose
    chunk (and .hmac) files of another chunk are gone."""
    first, second = chunks_of(v3, "vm7/private.img")[:2]
    a = damaged_copy(v3.path, tmp_path / "A", first)
    folder = untar(v3.path, tmp_path / "folder")
    (folder / second).unlink()
    (folder / f"{second}.hmac").unlink()
    out = tmp_path / "out"
    result = run_cli("restore", "-", "-o", out, "--passphrase-file", v3.passfile,
                     "--other-copy", folder, stdin=a.read_bytes())
    assert result.code == 0, result.text
    assert_restored(out, v3)
    assert f"chunk {first}: HMAC mismatch; taken from {folder}" in result.err


def test_format3_truncated_backup_rest_from_the_copy(v3: Backup, tmp_path: Path) -> None:
    """BACKUP cut short in the middle of a chunk: that chunk, the rest of its stored
    file, and every stored file after it come from the other copy."""
    first = chunks_of(v3, "vm7/private.img")[1]
    offset, _ = data_offsets(v3.path)[first]
    cut = tmp_path / "cut"
    cut.write_bytes(v3.path.read_bytes()[: offset + 100])
    out = tmp_path / "out"
    code, text = restore(cut, out, v3.passfile, "--other-copy", v3.path)
    assert code == 0, text
    assert_restored(out, v3)
    assert "truncated" in text and "taken whole from them" in text


def test_other_backup_with_the_same_header_is_refused(make: MakeBackup, v3: Backup,
                                                      tmp_path: Path) -> None:
    """Two format-3 backups made with the same settings have the same header, byte for
    byte: qubes.xml's chunk HMACs (over ciphertext with a random salt) tell them apart."""
    other = make()
    assert member_bytes(other.path, "backup-header") == member_bytes(v3.path, "backup-header")
    out = tmp_path / "out"
    code, text = restore(v3.path, out, v3.passfile, "--other-copy", other.path)
    assert code == 4, text
    assert f"--other-copy {other.path}: not a copy of" in text
    assert "qubes.xml.000.hmac differs" in text


def test_copy_under_another_passphrase_is_refused(v3: Backup, tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "private.img").write_bytes(b"x" * 4096)
    other = tmp_path / "other"
    gen.make_backup(other, "another passphrase", [gen.VmSpec("tiny", 7, source=src)],
                    workdir=tmp_path)
    out = tmp_path / "out"
    code, text = restore(v3.path, out, v3.passfile, "--other-copy", other)
    assert code == 4, text
    assert f"--other-copy {other}: its backup-header.hmac does not authenticate" in text
    assert not out.exists()  # refused before anything was written


def test_verify_tells_the_damage_before_anything_is_written(v3: Backup, tmp_path: Path) -> None:
    chunks = chunks_of(v3, "vm7/private.img")
    a = damaged_copy(v3.path, tmp_path / "A", chunks[0])
    a2 = damaged_copy(a, tmp_path / "A2", chunks[2])  # two damaged chunks in one stored file
    b = damaged_copy(v3.path, tmp_path / "B", chunks[1])
    result = run_main("verify", a2, "--passphrase-file", v3.passfile, "--json")
    assert result.code == 4, result.text
    assert "DAMAGED" in result.err and "--salvage" in result.err
    assert f"chunk {chunks[0]}: HMAC mismatch; no other copy given" in result.err
    assert f"chunk {chunks[2]}: HMAC mismatch; no other copy given" in result.err
    doc = json.loads(result.out)
    (damaged,) = doc["integrity"]["damaged"]
    assert [c["chunk"] for c in damaged["chunks"]] == [chunks[0], chunks[2]]
    assert damaged["recovered"] is False and "--salvage" in damaged["hint"]

    result = run_main("verify", a2, "--passphrase-file", v3.passfile, "--other-copy", b)
    assert result.code == 0, result.text
    assert f"chunk {chunks[0]}: HMAC mismatch; good in {b} (restore with --other-copy" \
        in result.err
    assert f"chunk {chunks[2]}: HMAC mismatch; good in {b}" in result.err
    assert "RECOVERED" in result.err


def test_format4_damaged_file_and_folder_copies(make4: MakeBackup, tmp_path: Path) -> None:
    """Format 4 (parallel scrypt dec): BACKUP a folder missing one .enc file, the
    other copy a file with another chunk garbled; and the other way round."""
    backup = make4(chunk_size=16 * 1024)
    first, second = chunks_of(backup, "vm7/private.img")[:2]
    folder = untar(backup.path, tmp_path / "folder")
    (folder / first).unlink()
    garbled = damaged_copy(backup.path, tmp_path / "garbled", second)

    out = tmp_path / "out"
    code, text = restore(folder, out, backup.passfile, "--other-copy", garbled)
    assert code == 0, text
    assert_restored(out, backup)
    assert f"chunk {first}: chunk missing" in text
    assert f"taken from {garbled}" in text

    out2 = tmp_path / "out2"
    code, text = restore(garbled, out2, backup.passfile, "--other-copy", folder, "-j", "2")
    assert code == 0, text
    assert_restored(out2, backup)
    assert f"chunk {second}: " in text and f"taken from {folder}" in text


def test_format4_other_backup_is_refused(make4: MakeBackup, tmp_path: Path) -> None:
    backup = make4(chunk_size=16 * 1024)
    other = make4()  # another backup-id
    code, text = restore(backup.path, tmp_path / "out", backup.passfile,
                         "--other-copy", other.path)
    assert code == 4, text
    assert f"--other-copy {other.path}: its backup-header differs" in text


def test_format2_pieces_as_the_other_copy(tmp_path: Path) -> None:
    """Format 2 (each chunk one volume of tar -M); the other copy given as its pieces."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "private.img").write_bytes(bytes(range(256)) * 800)  # 200 KiB: 5 volumes
    passfile = tmp_path / "pass"
    passfile.write_text(PASSPHRASE + "\n", encoding="utf-8")
    path = tmp_path / "v2"
    manifest = gen2.make_backup_v2(path, PASSPHRASE, [gen.VmSpec("tiny", 7, source=src)],
                                   tape_length_kib=40, workdir=tmp_path)
    names = [n for n in manifest.member_names() if n.startswith("vm7/private.img.")
             and not n.endswith(".hmac")]
    assert len(names) >= 3
    a = damaged_copy(path, tmp_path / "A", names[1])
    b = damaged_copy(path, tmp_path / "B", names[2])
    data = b.read_bytes()
    (tmp_path / "B.aa").write_bytes(data[: len(data) // 2])
    (tmp_path / "B.ab").write_bytes(data[len(data) // 2:])
    out = tmp_path / "out"
    pieces = f"{tmp_path / 'B.aa'},{tmp_path / 'B.ab'}"
    code, text = restore(a, out, passfile, "--other-copy", pieces)
    assert code == 0, text
    assert sha(out / "tiny" / "private.img") == sha(src / "private.img")
    assert f"chunk {names[1]}: HMAC mismatch; taken from {pieces}" in text


def test_outer_damage_and_two_copies_each_damaged(v3: Backup, tmp_path: Path) -> None:
    """4 KiB of zeros over a chunk's tar header in BACKUP (an unreadable sector, as
    ddrescue leaves it); each other copy lacks a different chunk: each chunk comes from
    the first copy where it authenticates."""
    chunks = chunks_of(v3, "vm7/private.img")
    with tarfile.open(v3.path, ignore_zeros=True) as tar:
        header = next(m.offset for m in tar if m.name == chunks[0])
    zeroed = tmp_path / "zeroed"
    shutil.copyfile(v3.path, zeroed)
    with zeroed.open("r+b") as f:
        f.seek(header // 4096 * 4096)
        f.write(bytes(4096))
    a = damaged_copy(v3.path, tmp_path / "A", chunks[0])
    b = damaged_copy(v3.path, tmp_path / "B", chunks[1])
    out = tmp_path / "out"
    code, text = restore(zeroed, out, v3.passfile, "--other-copy", a, "--other-copy", b)
    assert code == 0, text
    assert_restored(out, v3)
    assert f"chunk {chunks[0]}: " in text and f"taken from {b}" in text
    code, text = restore(zeroed, tmp_path / "out2", v3.passfile, "--other-copy", a)
    assert code == 4 and f"{a}: HMAC mismatch" in text  # A alone does not have it good


def test_dry_run_checks_and_names_the_other_copy(v3: Backup, tmp_path: Path) -> None:
    b = damaged_copy(v3.path, tmp_path / "B", chunks_of(v3, "vm7/private.img")[0])
    result = run_main("restore", v3.path, "-o", tmp_path / "out", "--passphrase-file",
                      v3.passfile, "--dry-run", "--other-copy", b)
    assert result.code == 0, result.text
    assert f"other copy {b}: the same backup" in result.out
    assert not (tmp_path / "out").exists()
    result = run_main("verify", v3.path, "--passphrase-file", v3.passfile,
                      "--other-copy", "-")
    assert result.code == 2 and "must be seekable" in result.err


def test_folder_backup_missing_a_chunk_file_but_not_its_hmac(v3: Backup, tmp_path: Path) -> None:
    chunks = chunks_of(v3, "vm7/private.img")
    folder = untar(v3.path, tmp_path / "folder")
    (folder / chunks[1]).unlink()  # its .hmac stays, alone
    b = damaged_copy(v3.path, tmp_path / "B", chunks[0])
    out = tmp_path / "out"
    code, text = restore(folder, out, v3.passfile, "--other-copy", b)
    assert code == 0, text
    assert_restored(out, v3)
    assert f"chunk {chunks[1]}: {chunks[1]}.hmac: an .hmac without its chunk" in text
    assert f"taken from {b}" in text


def test_backup_and_copy_both_cut_short_is_no_success(v3: Backup, tmp_path: Path) -> None:
    """A copy that is itself cut short cannot tell what BACKUP lost after its own end."""
    offsets = data_offsets(v3.path)
    first = chunks_of(v3, "vm7/private.img")[1]
    names = list(offsets)
    later = next(n for n in names[names.index(first) + 2:] if offsets[n][1] > 1000)
    data = v3.path.read_bytes()
    cut, copy = tmp_path / "cut", tmp_path / "copy"
    cut.write_bytes(data[: offsets[first][0] + 100])
    copy.write_bytes(data[: offsets[later][0] + offsets[later][1] // 2])
    code, text = restore(cut, tmp_path / "out", v3.passfile, "--other-copy", copy)
    assert code == 4, text
    assert "no other copy was read whole" in text


def test_format4_verify_names_every_damaged_chunk(make4: MakeBackup, tmp_path: Path) -> None:
    """With several scrypt dec at once, the chunks in flight after a damaged one are
    checked all the same, and each damaged one is named."""
    backup = make4(chunk_size=16 * 1024)
    chunks = chunks_of(backup, "vm7/private.img")
    a = damaged_copy(backup.path, tmp_path / "A", chunks[0])
    a2 = damaged_copy(a, tmp_path / "A2", chunks[2])
    result = run_main("verify", a2, "--passphrase-file", backup.passfile, "-j", "4", "--json")
    assert result.code == 4, result.text
    (damaged,) = json.loads(result.out)["integrity"]["damaged"]
    assert [c["chunk"] for c in damaged["chunks"]] == [chunks[0], chunks[2]]
    assert all("scrypt" in c["problem"] for c in damaged["chunks"])


# -- BACKUP's header (and qubes.xml) damaged: taken from the other copy -----------------


def zeroed(src: Path, dst: Path, start: int, length: int) -> Path:
    """A copy of ``src`` with ``length`` bytes from ``start`` zeroed (an unreadable
    sector, as ddrescue leaves it)."""
    data = bytearray(src.read_bytes())
    data[start:start + length] = bytes(length)
    dst.write_bytes(bytes(data))
    return dst


@pytest.mark.parametrize("fmt", [3, 4])
def test_damaged_header_taken_from_the_other_copy(
    fmt: int, v3: Backup, make4: MakeBackup, tmp_path: Path
) -> None:
    """BACKUP's backup-header fails its check (a flipped byte); the other copy,
    damaged in a chunk, has it good: the header comes from there, BACKUP's
    chunks are read on, the damaged chunk from the copy: a perfect restore,
    exit 0, and the header's origin said.  info and verify too.  Without the
    copy: exit 3, as before; with a wrong passphrase, exit 3 still."""
    backup = v3 if fmt == 3 else make4(chunk_size=16 * 1024)
    chunk = chunks_of(backup, "vm7/private.img")[1]
    bad_header = damaged_copy(backup.path, tmp_path / "A", "backup-header")
    copy = damaged_copy(backup.path, tmp_path / "B", chunk)
    code, text = restore(bad_header, tmp_path / "alone", backup.passfile)
    assert code == 3 and not (tmp_path / "alone").exists(), text

    out = tmp_path / "out"
    code, text = restore(bad_header, out, backup.passfile, "--other-copy", copy, "--json")
    assert code == 0, text
    assert_restored(out, backup)
    said = (f"note: backup-header: in {bad_header} it does not authenticate with the "
            f"passphrase (damaged); taken from the other copy {copy}, where it authenticates")
    assert said in text
    doc = json.loads(text[text.index("{"):text.rindex("}") + 1])
    assert any("taken from the other copy" in n for n in doc["integrity"]["notes"])

    info = run_main("info", bad_header, "--passphrase-file", backup.passfile,
                    "--other-copy", copy)
    assert info.code == 0 and "VMs with data in this backup" in info.out, info.text
    assert said in info.err
    verify = run_main("verify", bad_header, "--passphrase-file", backup.passfile,
                      "--other-copy", copy)
    assert verify.code == 0 and said in verify.err, verify.text

    wrong = tmp_path / "wrong"
    wrong.write_text("not the passphrase\n")
    refused = run_main("info", bad_header, "--passphrase-file", wrong, "--other-copy", copy)
    assert refused.code == 3, refused.text


def test_zeroed_header_and_qubes_xml_taken_from_the_other_copy(
    v3: Backup, tmp_path: Path
) -> None:
    """The backup's first members (backup-header, its .hmac, qubes.xml.000 and its
    .hmac) under zeros, as ddrescue leaves unreadable sectors: both come from
    the other copy, the VMs' chunks from BACKUP."""
    with tarfile.open(v3.path, ignore_zeros=True) as tar:
        after_xml = next(m.offset for m in tar if m.name.startswith("vm"))
    copy = damaged_copy(v3.path, tmp_path / "B", chunks_of(v3, "vm7/private.img")[0])
    code, text = restore(zeroed(v3.path, tmp_path / "A", 1024, after_xml - 1024),
                         tmp_path / "out", v3.passfile, "--other-copy", copy)
    assert code == 0, text
    assert_restored(tmp_path / "out", v3)
    assert f"taken from the other copy {copy}, where it authenticates" in text
    assert "qubes.xml: missing from the backup; its chunks were looked for" in text


def test_format2_damaged_header_taken_from_the_other_copy(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "private.img").write_bytes(bytes(range(256)) * 800)
    passfile = tmp_path / "pass"
    passfile.write_text(PASSPHRASE + "\n", encoding="utf-8")
    path = tmp_path / "v2"
    gen2.make_backup_v2(path, PASSPHRASE, [gen.VmSpec("tiny", 7, source=src)],
                        tape_length_kib=40, workdir=tmp_path)
    bad = damaged_copy(path, tmp_path / "A", "backup-header")
    out = tmp_path / "out"
    code, text = restore(bad, out, passfile, "--other-copy", path)
    assert code == 0, text
    assert sha(out / "tiny" / "private.img") == sha(src / "private.img")
    assert f"taken from the other copy {path}" in text
