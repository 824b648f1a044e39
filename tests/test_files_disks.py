"""qrecover files on whole-disk images: GPT (a template's root.img), MBR, NTFS, bad tables.

The disks are written by scripts/ext4image.py (GPT and MBR from their
specifications, around file systems made by mkfs.ext4 -d) and
scripts/ntfsimage.py (mkntfs, filled through ntfs-3g); qrecover reads them
with debugfs through the partition's offset, and fls/icat for NTFS.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import random
import stat
import struct
import zlib
from pathlib import Path

import ext4image
import ntfsimage
import pytest
from conftest import bin_dir, run_main, sha

from qrecover.errors import QrecoverError
from qrecover.files import image as img

pytestmark = pytest.mark.xdist_group("test_files")

EXT = "ext2/3/4 file system"


def _system_tree(root: Path) -> Path:
    """What a template's root file system holds, in miniature."""
    (root / "etc" / "yum.repos.d").mkdir(parents=True)
    (root / "etc" / "hostname").write_text("fedora-41\n")
    (root / "etc" / "yum.repos.d" / "qubes.repo").write_text("[qubes]\nenabled=1\n")
    (root / "usr" / "local" / "bin").mkdir(parents=True)
    (root / "usr" / "local" / "bin" / "tool").write_text("#!/bin/sh\necho tool\n")
    os.chmod(root / "usr" / "local" / "bin" / "tool", 0o755)
    (root / "home").mkdir()
    os.utime(root / "etc" / "hostname", (1470279173, 1470279173))
    return root


@pytest.fixture(scope="session")
def template_root(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(root.img, tree): a GPT disk, 1 EFI, 2 BIOS boot, 3 the ext4 root."""
    base = tmp_path_factory.mktemp("template")
    tree = _system_tree(base / "tree")
    fs = ext4image.make_ext4(tree, base / "root.fs", 8)
    disk = ext4image.make_template_root(base / "root.img", fs)
    disk.chmod(0o444)
    return disk, tree


def _windows_tree(root: Path) -> Path:
    docs = root / "Users" / "user" / "Documents"
    docs.mkdir(parents=True)
    (docs / "Grüße aus Köln.txt").write_text("Grüße - ünïcödé ✓\r\n")
    (docs / "tax return 2016.pdf").write_bytes(hashlib.shake_256(b"pdf").digest(70_000))
    (root / "Users" / "user" / "Desktop").mkdir()
    (root / "Users" / "user" / "Desktop" / "todo.txt").write_text("buy milk\r\n")
    for path in [*root.rglob("*")]:
        os.utime(path, (1470279173, 1470279173))
    return root


@pytest.fixture(scope="session")
def windows_private(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(private.img, tree): a Windows qube's private disk, MBR + one NTFS partition."""
    base = tmp_path_factory.mktemp("windows")
    tree = _windows_tree(base / "tree")
    try:
        disk = ntfsimage.make_windows_private(tree, base / "private.img")
    except ntfsimage.NotMountable as exc:
        pytest.skip(f"cannot fill an NTFS image here ({exc}); needs root and /dev/fuse")
    return disk, tree


def _same(copied: Path, source: Path, modes: bool = True) -> None:
    want = {p.relative_to(source) for p in source.rglob("*")}
    assert {p.relative_to(copied) for p in copied.rglob("*")} == want
    for rel in want:
        s, d = (source / rel).lstat(), (copied / rel).lstat()
        assert stat.S_IFMT(d.st_mode) == stat.S_IFMT(s.st_mode), rel
        if modes:
            assert stat.S_IMODE(d.st_mode) == stat.S_IMODE(s.st_mode), rel
        if stat.S_ISREG(s.st_mode):
            assert sha(copied / rel) == sha(source / rel), rel
            assert int(d.st_mtime) == int(s.st_mtime), rel


# -- GPT: a template's root.img -------------------------------------------------


def test_list_shows_the_partitions(template_root: tuple[Path, Path]) -> None:
    disk, _tree = template_root
    result = run_main("files", disk, "--list")
    assert result.code == 0, result.text
    rows = [line.split("  ") for line in result.out.splitlines()[1:]]
    rows = [[cell.strip() for cell in row if cell.strip()] for row in rows]
    assert rows == [
        ["# TYPE", "OFFSET", "SIZE", "FOUND"],
        ["1 EFI system", "1048576", "1048576", "unknown content"],
        ["2 BIOS boot", "2097152", "1048576", "unknown content"],
        ["*", "3 Linux filesystem", "3145728", str(8 * 1024 * 1024), EXT],
    ]
    assert result.out.startswith(f"{disk}: GPT partition table\n")
    assert f"files {disk} --partition 3 --list /" in result.err
    # with a PATH: the table, then the tree of partition 3
    result = run_main("files", disk, "--list", "/etc")
    assert result.code == 0, result.text
    assert "-rw-r--r--           10  /etc/hostname" in result.out
    assert "/etc/yum.repos.d/qubes.repo" in result.out


def test_copy_from_the_root_partition(template_root: tuple[Path, Path], tmp_path: Path) -> None:
    disk, tree = template_root
    out = tmp_path / "out"
    result = run_main("-v", "files", disk, "/etc", "/usr/local", "-o", out)
    assert result.code == 0, result.text
    assert f"'{disk}?offset=3145728'" in result.err  # read through partition 3's offset
    assert "mount" not in result.text
    _same(out / "etc", tree / "etc")
    _same(out / "local", tree / "usr" / "local")
    assert sorted(p.name for p in out.iterdir()) == ["etc", "local"]


def test_choosing_a_partition(template_root: tuple[Path, Path], tmp_path: Path) -> None:
    disk, _tree = template_root
    out = tmp_path / "out"
    result = run_main("files", disk, "/etc", "--partition", "3", "-o", out)
    assert result.code == 0, result.text
    result = run_main("files", disk, "/etc", "--partition", "1", "-o", tmp_path / "o1")
    assert result.code == 4, result.text
    assert "cannot read partition 1 (EFI system) at byte offset 1048576: unknown content" in (
        result.err
    )
    result = run_main("files", disk, "/etc", "--partition", "9", "-o", tmp_path / "o9")
    assert result.code == 2, result.text
    assert "has no partition 9 (its GPT table has: 1, 2, 3)" in result.err
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o9").exists()
    # a plain file system has no partitions to choose from
    fs = tmp_path / "fs.img"
    ext4image.make_ext4(_system_tree(tmp_path / "t"), fs, 4)
    result = run_main("files", fs, "/etc", "--partition", "1", "-o", tmp_path / "o2")
    assert result.code == 2 and "has no partition table" in result.err


def test_damaged_primary_gpt_header_falls_back_to_the_backup(
    template_root: tuple[Path, Path], tmp_path: Path
) -> None:
    disk = tmp_path / "root.img"
    data = bytearray(template_root[0].read_bytes())
    data[512 + 24] ^= 0xFF  # the primary header's own LBA: its checksum no longer matches
    disk.write_bytes(bytes(data))
    result = run_main("files", disk, "/etc", "-o", tmp_path / "out")
    assert result.code == 0, result.text
    assert (tmp_path / "out" / "etc" / "hostname").read_text() == "fedora-41\n"
    listed = run_main("files", disk, "--list")
    assert "the primary GPT header has a header checksum that does not match; the backup " \
        "header was read" in listed.err


# -- MBR --------------------------------------------------------------------------


def _mbr_with_logical(tmp_path: Path, fs: Path, loop: bool = False) -> Path:
    """An MBR disk: partition 1 extended, holding logical partition 5 (the ext4)."""
    sectors = (fs.stat().st_size + 511) // 512
    disk = tmp_path / "logical.img"
    mbr = bytearray(512)
    mbr[446:462] = struct.pack("<B3sB3sII", 0, bytes(3), 0x05, bytes(3), 2048, sectors + 4096)
    mbr[510:512] = b"\x55\xaa"
    ebr = bytearray(512)
    ebr[446:462] = struct.pack("<B3sB3sII", 0, bytes(3), 0x83, bytes(3), 2048, sectors)
    link = struct.pack("<B3sB3sII", 0, bytes(3), 0x05, bytes(3), 1, 1)  # next: base + 1
    if loop:
        ebr[462:478] = link
    ebr[510:512] = b"\x55\xaa"
    with disk.open("wb") as f:
        f.write(mbr)
        f.seek(2048 * 512)
        f.write(ebr)
        if loop:  # the EBR at base + 1 links to base + 1: itself
            back = bytearray(512)
            back[462:478] = link
            back[510:512] = b"\x55\xaa"
            f.write(back)
        f.seek(4096 * 512)
        f.write(fs.read_bytes())
    return disk


def test_logical_partition_and_a_looping_chain(tmp_path: Path) -> None:
    tree = _system_tree(tmp_path / "tree")
    fs = ext4image.make_ext4(tree, tmp_path / "fs.img", 4)
    disk = _mbr_with_logical(tmp_path, fs)
    result = run_main("files", disk, "--list")
    assert "*  5 0x83 Linux" in result.out, result.text
    result = run_main("files", disk, "/etc", "-o", tmp_path / "out")
    assert result.code == 0, result.text
    _same(tmp_path / "out" / "etc", tree / "etc")
    looping = _mbr_with_logical(tmp_path, fs, loop=True)
    result = run_main("files", looping, "/etc", "-o", tmp_path / "o2")
    assert result.code == 4, result.text
    assert "chain of logical partitions loops or is longer than 128" in result.err
    assert "Traceback" not in result.text and not (tmp_path / "o2").exists()


# -- hostile tables ---------------------------------------------------------------


def _gpt_disk(count: int = 128, entry_size: int = 128, entries_lba: int = 2,
              first: int = 2048, last: int = 4095, sectors: int = 4096) -> bytes:
    """A GPT disk whose header says what it is given, with valid checksums."""
    disk = bytearray(sectors * 512)
    disk[446 + 4] = 0xEE
    disk[446 + 8 : 446 + 16] = struct.pack("<II", 1, sectors - 1)
    disk[510:512] = b"\x55\xaa"
    entries = bytearray(128 * 128)
    entries[:16] = bytes.fromhex("af3dc60f838472478e793d69d8477de4")  # Linux filesystem
    entries[32:48] = struct.pack("<QQ", first, last)
    room = len(disk) - entries_lba * 512
    if room > 0 and entries_lba >= 2:
        disk[entries_lba * 512 : entries_lba * 512 + min(room, len(entries))] = entries[:room]
    header = bytearray(struct.pack("<8sIIIIQQQQ16sQIII", b"EFI PART", 0x10000, 92, 0, 0, 1,
                                   sectors - 1, 34, sectors - 34, bytes(16), entries_lba,
                                   count, entry_size, zlib.crc32(bytes(entries))))
    header[16:20] = zlib.crc32(bytes(header)).to_bytes(4, "little")
    disk[512 : 512 + 92] = header
    return bytes(disk)


@pytest.mark.parametrize(
    ("options", "said"),
    [
        ({"count": 1 << 31}, "claims 2147483648 partition entries (more than 1024)"),
        ({"entry_size": 4}, "claims 4-byte partition entries (expected 128)"),
        ({"entry_size": 1 << 30}, "claims 1073741824-byte partition entries"),
        ({"entries_lba": 1 << 60}, "do not lie inside the image"),
        ({"entries_lba": 0}, "do not lie inside the image"),
    ],
)
def test_hostile_gpt_header_is_refused(options: dict[str, int], said: str, tmp_path: Path) -> None:
    disk = tmp_path / "hostile.img"
    disk.write_bytes(_gpt_disk(**options))
    result = run_main("files", disk, "/etc", "-o", tmp_path / "out")
    assert result.code == 4, result.text
    assert said in result.err and "damaged or crafted" in result.err
    assert "Traceback" not in result.text and not (tmp_path / "out").exists()


def test_partition_outside_the_image_is_never_read(tmp_path: Path) -> None:
    disk = tmp_path / "short.img"
    disk.write_bytes(_gpt_disk(first=2048, last=(1 << 64) - 1))
    result = run_main("files", disk, "--list")
    assert result.code == 0, result.text
    assert "past the end of the image (2097152 bytes)" in result.out
    result = run_main("files", disk, "--list", "/")
    assert result.code == 4 and "no partition of its GPT table holds" in result.err
    backwards = tmp_path / "backwards.img"
    backwards.write_bytes(_gpt_disk(first=4000, last=3000))
    result = run_main("files", backwards, "--partition", "1", "-o", tmp_path / "o")
    assert result.code == 4 and "empty (its last sector is before its first)" in result.err


def test_mangled_tables_never_crash() -> None:
    """Random damage to a valid GPT or MBR disk: a table, None or a QrecoverError; never
    anything else, and never a read past the bounds (the reads are counted)."""
    rng = random.Random(20261207)
    gpt = _gpt_disk()
    mbr = bytearray(4096 * 512)
    mbr[446:462] = struct.pack("<B3sB3sII", 0, bytes(3), 0x05, bytes(3), 8, 100)
    mbr[510:512] = b"\x55\xaa"
    for base in (gpt, bytes(mbr)):
        for _ in range(300):
            data = bytearray(base)
            for _ in range(rng.randint(1, 12)):
                at = rng.choice([rng.randrange(446, 512), rng.randrange(512, 604),
                                 rng.randrange(1024, 1200), rng.randrange(len(data))])
                data[at] = rng.randrange(256)
            if rng.random() < 0.5:  # make the checksums match the damage
                hdr = data[512:604]
                hdr[16:20] = bytes(4)
                data[528:532] = zlib.crc32(bytes(hdr)).to_bytes(4, "little")
            f = _CountingReader(bytes(data))
            with contextlib.suppress(QrecoverError):
                img.read_table(f, len(data))
            assert f.read_bytes <= 2 * 1024 * 1024, f.read_bytes


class _CountingReader(io.BytesIO):
    def __init__(self, data: bytes) -> None:
        super().__init__(data)
        self.read_bytes = 0

    def read(self, size: int | None = -1) -> bytes:
        chunk = super().read(size)
        self.read_bytes += len(chunk)
        return chunk


# -- NTFS: a Windows qube's private.img --------------------------------------------


def test_windows_private_img(windows_private: tuple[Path, Path], tmp_path: Path) -> None:
    disk, tree = windows_private
    result = run_main("files", disk, "--list")
    assert result.code == 0, result.text
    assert "*  1 0x07 NTFS/exFAT" in result.out and "NTFS file system" in result.out
    result = run_main("files", disk, "--list", "/")
    assert result.code == 0, result.text
    assert "$MFT" not in result.out and "$OrphanFiles" not in result.out
    assert "-rw-r--r--        70000  /Users/user/Documents/tax return 2016.pdf" in result.out
    out = tmp_path / "out"
    result = run_main("-v", "files", disk, "/Users/user", "-o", out)
    assert result.code == 0, result.text
    assert "fls -l -u -z UTC -o 2048 -f ntfs" in result.err and "icat -o 2048" in result.err
    _same(out / "user", tree / "Users" / "user", modes=False)
    assert stat.S_IMODE((out / "user" / "Desktop" / "todo.txt").stat().st_mode) == 0o644


def test_windows_private_img_without_sleuthkit(
    windows_private: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    disk, _tree = windows_private
    monkeypatch.setenv("PATH", str(bin_dir(tmp_path, ["printf"])))
    result = run_main("files", disk, "/Users", "-o", tmp_path / "out")
    assert result.code == 5, result.text
    assert result.err.count("\n") == 1
    assert "icat not found" in result.err and "sleuthkit" in result.err
    assert not (tmp_path / "out").exists()
