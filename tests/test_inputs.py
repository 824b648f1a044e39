"""BACKUP in other wrappings, end to end through the installed CLI: compressed
as a whole, split into pieces, and inputs that are not backups at all, read
from a file, a folder and standard input."""

from __future__ import annotations

import os
import random
import re
import shutil
import subprocess
import tarfile
import zipfile
from pathlib import Path

import pytest
from conftest import Backup, MakeBackup, assert_restored, bin_dir, run_cli, run_main, sha
from make_backup import randbytes

COMPRESSORS = {
    "gzip": ["gzip", "-c"],
    "bzip2": ["bzip2", "-c"],
    "xz": ["xz", "-c"],
    "zstd": ["zstd", "-q", "-c"],
}
# What undoes each (gzip: the fastest installed of igzip, pigz, gzip).
DECOMPRESSOR = {"gzip": r"(igzip|pigz|gzip) -d -c", "bzip2": r"bzip2 -d -c", "xz": r"xz -d -c",
                "zstd": r"zstd -d -c -q"}


@pytest.fixture(scope="module")
def backup(make: MakeBackup) -> Backup:
    # Small chunks: many members, so piece boundaries fall mid-member and between them.
    return make(chunk_size=64 * 1024)


def compress(kind: str, src: Path, dst: Path) -> Path:
    with src.open("rb") as fin, dst.open("wb") as fout:
        subprocess.run(COMPRESSORS[kind], stdin=fin, stdout=fout, check=True)
    return dst


def split(src: Path, folder: Path, count: int = 6, aligned: bool = True) -> list[Path]:
    """The pieces ``split -b SIZE`` makes, in their (glob) order: about ``count``
    of them, of a multiple of 512 bytes like ``split -b 4G`` (or not)."""
    size = src.stat().st_size // count
    size = size // 512 * 512 if aligned else size + 3
    while src.stat().st_size % size == 0:  # a shorter last piece, as usual
        size -= 512
    folder.mkdir()
    subprocess.run(["split", "-b", str(size), str(src), str(folder / "backup.part-")], check=True)
    pieces = sorted(folder.iterdir())
    assert len(pieces) >= 4, pieces
    return pieces


def only_correct_files(out: Path, backup: Backup) -> None:
    """Whatever a failed run left under a final name is exactly the original."""
    expected = backup.expected_files()
    for path in out.rglob("*"):
        rel = str(path.relative_to(out))
        if path.is_file() and not path.is_symlink() and ".partial" not in rel and rel in expected:
            assert sha(path) == sha(expected[rel]), f"{rel} restored wrong"


@pytest.mark.parametrize("kind", sorted(COMPRESSORS))
def test_compressed_backup_restores(kind: str, backup: Backup, tmp_path: Path) -> None:
    packed = compress(kind, backup.path, tmp_path / f"backup.{kind}")
    out = tmp_path / "out"
    result = run_main("-v", "restore", packed, "--output", out, "--passphrase-file",
                      backup.passfile)
    assert result.code == 0, result.text
    assert f"{packed} is {kind}-compressed as a whole; reading it through" in result.err
    # the decompressor ran as a program of its own, logged like every other stage
    assert re.search(rf"^\+ {DECOMPRESSOR[kind]} < {re.escape(str(packed))}$", result.err,
                     re.M), result.err
    assert_restored(out, backup)


@pytest.mark.parametrize("kind", sorted(COMPRESSORS))
def test_compressed_backup_from_stdin(kind: str, backup: Backup, tmp_path: Path) -> None:
    packed = compress(kind, backup.path, tmp_path / f"backup.{kind}")
    out = tmp_path / "out"
    result = run_cli("-v", "restore", "-", "--output", out, "--passphrase-file", backup.passfile,
                     stdin=packed.read_bytes())
    assert result.code == 0, result.text
    assert f"standard input is {kind}-compressed as a whole" in result.err
    assert re.search(rf"^\+ {DECOMPRESSOR[kind]}$", result.err, re.M), result.err
    assert_restored(out, backup)


@pytest.mark.parametrize("gunzip", ["igzip", "pigz", "gzip"])
@pytest.mark.parametrize("after", ["garbage", "zeros"])
def test_bytes_after_a_gzipped_backup_are_no_damage(
    gunzip: str, after: str, backup: Backup, tmp_path: Path
) -> None:
    """A backup gzipped as a whole, then random bytes or zeros (a copy on a larger
    disk): every gunzip restores it all.  gzip says "decompression OK, trailing
    garbage ignored" with its exit 2 (a warning): that is a note, not exit 4."""
    packed = compress("gzip", backup.path, tmp_path / "backup.gz")
    with packed.open("ab") as f:
        f.write(randbytes(random.Random(5), 4096) if after == "garbage" else bytes(1 << 20))
    path = bin_dir(tmp_path, ["tar", "openssl", "cat", gunzip])
    out = tmp_path / "out"
    result = run_main("-v", "restore", packed, "--output", out, "--passphrase-file",
                      backup.passfile, env={"PATH": str(path)})
    assert result.code == 0, result.text
    assert f"| {gunzip} -d -c" in result.err or f"+ {gunzip} -d -c" in result.err, result.err
    assert_restored(out, backup)
    if gunzip == "gzip" and after == "garbage":  # (zeros: gzip exits 0, without a word)
        assert f"note: {packed}: gzip exited 2: gzip: stdin: decompression OK" in result.err
    assert "problem" not in result.err and "damaged" not in result.err, result.err


def test_missing_decompressor_names_the_package(backup: Backup, tmp_path: Path) -> None:
    packed = compress("zstd", backup.path, tmp_path / "backup.zst")
    path = bin_dir(tmp_path, ["tar", "openssl", "gzip", "cat"])
    result = run_main("verify", packed, "--passphrase-file", backup.passfile,
                      env={"PATH": str(path)})
    assert result.code == 5, result.text
    assert "is zstd-compressed as a whole, and zstd not found" in result.err
    assert "apt-get install zstd" in result.err


def test_damaged_compressed_backup(backup: Backup, tmp_path: Path) -> None:
    packed = compress("xz", backup.path, tmp_path / "backup.xz")
    data = bytearray(packed.read_bytes())
    data[len(data) // 2] ^= 0xFF
    packed.write_bytes(bytes(data))
    out = tmp_path / "out"
    result = run_main("restore", packed, "--output", out, "--passphrase-file", backup.passfile)
    assert result.code == 4, result.text
    assert "xz exited 1" in result.err
    assert "Traceback" not in result.text
    only_correct_files(out, backup)


def test_split_backup_in_order(backup: Backup, tmp_path: Path) -> None:
    pieces = split(backup.path, tmp_path / "pieces")
    out = tmp_path / "out"
    result = run_main("restore", *pieces, "--output", out, "--passphrase-file", backup.passfile)
    assert result.code == 0, result.text
    assert_restored(out, backup)


def test_dry_run_names_the_pieces_and_how_to_feed_them(backup: Backup, tmp_path: Path) -> None:
    pieces = split(backup.path, tmp_path / "pieces")
    result = run_main("restore", *pieces, "--output", tmp_path / "out", "--dry-run",
                      "--passphrase-file", backup.passfile)
    assert result.code == 0, result.text
    assert f"qubes.xml of {pieces[0]} ... {pieces[-1]} ({len(pieces)} pieces) are" in result.out
    cat = " ".join(["cat", *(str(p) for p in pieces)])
    assert f"  1    {cat} | tar -i -xvf -" in result.out, result.out
    packed = compress("xz", backup.path, tmp_path / "backup.xz")
    result = run_main("restore", packed, "--output", tmp_path / "out", "--dry-run",
                      "--passphrase-file", backup.passfile)
    assert result.code == 0, result.text
    assert f"  1    xz -d -c {packed} | tar -i -xvf -" in result.out, result.out
    assert not (tmp_path / "out").exists()


def test_split_pieces_of_unaligned_size(backup: Backup, tmp_path: Path) -> None:
    pieces = split(backup.path, tmp_path / "pieces", aligned=False)
    result = run_main("verify", *pieces, "--passphrase-file", backup.passfile)
    assert result.code == 0, result.text


def test_split_after_compress(backup: Backup, tmp_path: Path) -> None:
    packed = compress("gzip", backup.path, tmp_path / "backup.gz")
    pieces = split(packed, tmp_path / "pieces")
    out = tmp_path / "out"
    result = run_main("-v", "restore", *pieces, "--output", out, "--passphrase-file",
                      backup.passfile)
    assert result.code == 0, result.text
    assert "+ cat -- " in result.err  # the pieces go into the decompressor, in order
    assert_restored(out, backup)


def test_split_first_piece_not_first(backup: Backup, tmp_path: Path) -> None:
    pieces = split(backup.path, tmp_path / "pieces")
    pieces[0], pieces[1] = pieces[1], pieces[0]
    result = run_main("verify", *pieces, "--passphrase-file", backup.passfile)
    assert result.code == 4, result.text
    assert f"{pieces[0]}" in result.err and "Traceback" not in result.text
    assert re.search(r"first piece|not a tar archive", result.err), result.err


@pytest.mark.parametrize("op", ["swap", "drop"])
def test_split_pieces_out_of_order_or_missing(
    op: str, backup: Backup, tmp_path: Path
) -> None:
    pieces = split(backup.path, tmp_path / "pieces")
    assert len(pieces) >= 5
    if op == "swap":
        pieces[1], pieces[2] = pieces[2], pieces[1]
    else:
        del pieces[1]
    out = tmp_path / "out"
    result = run_main("restore", *pieces, "--output", out, "--passphrase-file", backup.passfile)
    assert result.code == 4, result.text
    # aa is followed by ac either way: the first boundary that is wrong
    assert f"piece {pieces[1]} does not continue piece {pieces[0]}" in result.err, result.err
    assert "Traceback" not in result.text
    only_correct_files(out, backup)


def test_split_last_pieces_missing(backup: Backup, tmp_path: Path) -> None:
    pieces = split(backup.path, tmp_path / "pieces")
    # (the very last piece may hold only the archive's end, zeros: without it
    # the bytes are still the whole backup, and the restore rightly succeeds)
    assert pieces[-2].read_bytes().strip(b"\0")
    out = tmp_path / "out"
    result = run_main("restore", *pieces[:-2], "--output", out, "--passphrase-file",
                      backup.passfile)
    assert result.code == 4, result.text
    assert "Traceback" not in result.text
    only_correct_files(out, backup)


def test_short_piece_in_the_middle(backup: Backup, tmp_path: Path) -> None:
    pieces = split(backup.path, tmp_path / "pieces")
    pieces.insert(1, pieces.pop())  # the short last piece given second
    result = run_main("verify", *pieces, "--passphrase-file", backup.passfile)
    assert result.code == 4, result.text
    assert "so it must be the last piece" in result.err


def test_pieces_usage_errors(backup: Backup, tmp_path: Path) -> None:
    result = run_main("verify", backup.path, backup.path, "--passphrase-file", backup.passfile)
    assert result.code == 2 and "given twice" in result.err, result.text
    result = run_main("verify", "-", backup.path, "--passphrase-file", backup.passfile)
    assert result.code == 2 and "standard input" in result.err, result.text


def test_script_of_a_compressed_backup_asks_for_the_file(backup: Backup, tmp_path: Path) -> None:
    packed = compress("gzip", backup.path, tmp_path / "backup.gz")
    result = run_main("script", packed, "--output", tmp_path / "out", "--passphrase-file",
                      backup.passfile)
    assert result.code == 0, result.text
    assert "backup=''" in result.out  # tar -i cannot read the .gz: the user names the backup


# -- not a backup: one line saying what it is, exit 4, via file, folder, stdin

RNG = random.Random(2026)
NOT_BACKUPS = {
    "random": (randbytes(RNG, 300_001), "not a tar archive, so not a Qubes backup: it starts "
               "with the bytes"),
    "zeros": (bytes(70_000), "zero-filled (70000 bytes of zeros): not a Qubes backup"),
    "zip": (b"", "it is a zip archive"),
}


def _zip(backup: Backup) -> bytes:
    path = backup.path.parent / "backup.zip"
    if not path.exists():
        with zipfile.ZipFile(path, "w") as z:
            z.write(backup.path, "qubes-backup")
    return path.read_bytes()


@pytest.mark.parametrize("via", ["file", "stdin"])
@pytest.mark.parametrize("what", sorted(NOT_BACKUPS))
def test_not_a_backup(what: str, via: str, backup: Backup, tmp_path: Path) -> None:
    data, message = NOT_BACKUPS[what]
    if what == "zip":
        data = _zip(backup)
    path = tmp_path / "input"
    path.write_bytes(data)
    out = tmp_path / "out"
    arg = path if via == "file" else "-"
    result = run_cli("restore", arg, "--output", out, "--passphrase-file", backup.passfile,
                     stdin=data if via == "stdin" else None)
    assert result.code == 4, result.text
    lines = [ln for ln in result.err.splitlines() if ln.startswith("qrecover: error:")]
    assert len(lines) == 1 and message in lines[0], result.err
    assert (str(path) if via == "file" else "standard input") in lines[0]
    assert not out.exists(), "nothing written for an input that is not a backup"


@pytest.mark.parametrize("what", sorted(NOT_BACKUPS))
def test_not_a_backup_in_a_folder(what: str, backup: Backup, tmp_path: Path) -> None:
    data, _message = NOT_BACKUPS[what]
    if what == "zip":
        data = _zip(backup)
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "qubes-backup").write_bytes(data)  # the file itself, put in a folder
    result = run_main("verify", folder, "--passphrase-file", backup.passfile)
    assert result.code == 4, result.text
    assert "no backup-header in this folder" in result.err
    # the same bytes as the members a folder should hold
    (folder / "backup-header").write_bytes(data[:4096])
    (folder / "backup-header.hmac").write_bytes(data[4096:8192])
    result = run_main("verify", folder, "--passphrase-file", backup.passfile)
    assert result.code == 4, result.text
    assert "backup-header" in result.err and "Traceback" not in result.text


def test_folder_with_a_fifo_for_a_chunk(backup: Backup, tmp_path: Path) -> None:
    folder = tmp_path / "untarred"
    folder.mkdir()
    subprocess.run(["tar", "-i", "-xf", str(backup.path), "-C", str(folder)], check=True)
    chunk = next(folder.glob("vm*/private.img.000"))
    chunk.unlink()
    os.mkfifo(chunk)  # not a file where a chunk should be: named, never opened (no hang)
    result = run_main("verify", folder, "--passphrase-file", backup.passfile)
    assert result.code == 4, result.text
    assert "not a regular file" in result.err
    shutil.rmtree(folder)


def test_a_name_with_a_newline_and_an_escape_stays_one_printable_line(tmp_path: Path) -> None:
    """A piece's name is someone else's choice: it must not forge a second line
    (`qrecover: success`) nor reach the terminal as an escape sequence."""
    hostile = tmp_path / "ev\nqrecover: success\x1b[31m"
    hostile.write_bytes(randbytes(random.Random(7), 4096))
    result = run_main("-v", "verify", hostile, env={"QRECOVER_PASSPHRASE": "x"})
    assert result.code == 4, result.text
    assert "\x1b" not in result.err
    lines = result.err.splitlines()
    assert not any(line.startswith("qrecover: success") for line in lines), result.err
    assert any("ev\\nqrecover: success\\x1b[31m" in line for line in lines), result.err


def test_raw_disk_copy_with_zeros_after_the_backup(backup: Backup, tmp_path: Path) -> None:
    """A backup copied onto a larger disk and read back (dd): megabytes of zeros
    after its end are where it ends; everything is restored, exit 0, and a note
    says where reading stopped.  (/dev/zero would not be read forever.)"""
    disk = tmp_path / "disk.img"
    size = backup.path.stat().st_size
    disk.write_bytes(backup.path.read_bytes() + bytes(3 << 20))
    out = tmp_path / "out"
    result = run_main("restore", disk, "--output", out, "--passphrase-file", backup.passfile)
    assert result.code == 0, result.text
    assert "taken as the end of the backup" in result.err, result.err
    assert_restored(out, backup)
    # The same zeros in the middle are damage (ddrescue's unreadable sectors): looked
    # past, everything after them is read; reported once, exit 4 as for any damage.
    with tarfile.open(backup.path, ignore_zeros=True) as tar:  # as the writer appended it
        start = next(m for m in tar if m.name.startswith("dom0-home/")).offset
    data = backup.path.read_bytes()
    disk.write_bytes(data[:start] + bytes(3 << 20) + data[start:])
    assert disk.stat().st_size == size + (3 << 20)
    result = run_main("verify", disk, "--passphrase-file", backup.passfile)
    assert result.code == 4, result.text
    assert "taken as the end of the backup" not in result.err
    assert f"damaged: {disk}: " in result.err and "no chunk known lost" in result.err, result.err
    assert re.search(r"OK .* dom0-home/\S+ ", result.out), result.text
    assert "missing from the backup" not in result.text


def test_an_ordinary_tar_is_named_with_what_it_holds(tmp_path: Path) -> None:
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "main.c").write_text("int main(void) { return 0; }\n")
    project = tmp_path / "project.tar"
    subprocess.run(["tar", "-cf", str(project), "-C", str(tmp_path), "src/main.c"], check=True)
    result = run_main("verify", project, env={"QRECOVER_PASSPHRASE": "x"})
    assert result.code == 4, result.text
    assert (f"error: {project}: does not start with backup-header (found 'src/main.c'): "
            "not a Qubes backup of format 2, 3 or 4") in result.err, result.err
    result = run_cli("verify", "-", stdin=project.read_bytes(), env={"QRECOVER_PASSPHRASE": "x"})
    assert result.code == 4 and "error: standard input: does not start" in result.err, result.err
