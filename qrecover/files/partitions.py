"""Partition tables (GPT, MBR) and what a file system's first bytes are, parsed in Python.

An R4 template's or standalone VM's ``root.img`` has a GPT table (partition
1 EFI system, 2 BIOS boot, 3 the root ext4), a Windows qube's ``private.img``
an MBR table with one NTFS partition.  Every read is bounded: the GPT header
is one sector (its checksum checked; the backup header in the last sector
is read when it does not match), its entry array at most
:data:`MAX_GPT_ENTRIES` entries of at most :data:`MAX_ENTRY_SIZE` bytes and
inside the image, an MBR's chain of logical partitions at most
:data:`MAX_LOGICAL` links long and never visiting a sector twice, and a
partition that does not lie inside the image is shown with that problem and
never probed.  A table that breaks these rules raises a
:class:`BackupError` (exit 4) naming what is wrong.  Sectors are 512 bytes,
as in every image Qubes makes.
"""

from __future__ import annotations

import struct
import uuid
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from qrecover.errors import BackupError

EXT_MAGIC = b"\x53\xef"  # 0xEF53, little-endian
EXT_MAGIC_OFFSET = 1080  # superblock at 1024, s_magic at +56
SECTOR = 512
EXT = "ext2/3/4 file system"
NTFS = "NTFS file system"
READABLE = (EXT, NTFS)
MAX_GPT_ENTRIES = 1024  # real tables have 128
MAX_ENTRY_SIZE = 4096  # real entries are 128 bytes
MAX_LOGICAL = 128  # logical partitions followed in an MBR's extended chain

# GPT partition type GUIDs (UEFI spec; freedesktop's discoverable partitions).
GPT_TYPES = {
    "c12a7328-f81f-11d2-ba4b-00a0c93ec93b": "EFI system",
    "21686148-6449-6e6f-744e-656564454649": "BIOS boot",
    "0fc63daf-8483-4772-8e79-3d69d8477de4": "Linux filesystem",
    "4f68bce3-e8cd-4db1-96e7-fbcaf984b709": "Linux root (x86-64)",
    "b921b045-1df0-41c3-af44-4c6f280d3fae": "Linux root (arm64)",
    "0657fd6d-a4ab-43c4-84e5-0933c84b4f4f": "Linux swap",
    "e6d6d379-f507-44c2-a23c-238f2a3df928": "Linux LVM",
    "a19d880f-05fc-4d3b-a006-743f0f84911e": "Linux RAID",
    "ca7d7ccb-63ed-4c53-861c-1742536059cc": "LUKS",
    "ebd0a0a2-b9e5-4433-87c0-68b6b72699c7": "Microsoft basic data",
    "e3c9e316-0b5c-4db8-817d-f92df00215ae": "Microsoft reserved",
    "de94bba4-06d1-4d40-a16a-bfd50179d6ac": "Windows recovery",
}
# MBR partition type bytes.
MBR_TYPES = {
    0x01: "FAT12",
    0x04: "FAT16",
    0x06: "FAT16",
    0x07: "NTFS/exFAT",
    0x0B: "FAT32",
    0x0C: "FAT32 (LBA)",
    0x0E: "FAT16 (LBA)",
    0x27: "Windows recovery",
    0x82: "Linux swap",
    0x83: "Linux",
    0x8E: "Linux LVM",
    0xEF: "EFI system",
    0xFD: "Linux RAID",
}
EXTENDED = (0x05, 0x0F, 0x85)
PROTECTIVE = 0xEE


@dataclass(frozen=True)
class Partition:
    number: int
    type: str  # "Linux filesystem", "EFI system", "0x83 Linux", ...
    offset: int  # bytes from the start of the image
    size: int
    content: str | None  # what its first bytes hold (EXT, NTFS, ...), None: not recognised
    problem: str | None = None  # e.g. it does not lie inside the image: never read

    def describe(self) -> str:
        what = self.problem or self.content or "unknown content"
        return f"partition {self.number} ({self.type}) at byte offset {self.offset}: {what}"


@dataclass(frozen=True)
class Table:
    kind: str  # "GPT" or "MBR"
    partitions: tuple[Partition, ...]
    notes: tuple[str, ...] = ()  # damage worth telling that did not stop the reading


def read_at(f: BinaryIO, offset: int, size: int) -> bytes:
    if offset > 1 << 62:  # past any file; seek would not take it
        return b""
    f.seek(offset)
    return f.read(size)


def probe_content(f: BinaryIO, offset: int = 0) -> str | None:
    """What the bytes at ``offset`` hold, if we recognise it."""
    if read_at(f, offset + EXT_MAGIC_OFFSET, 2) == EXT_MAGIC:
        return EXT
    head = read_at(f, offset, 90)
    if head[3:11] == b"NTFS    ":
        return NTFS
    if head[3:11] == b"EXFAT   ":
        return "exFAT file system"
    if head[82:87] == b"FAT32" or head[54:59] in (b"FAT12", b"FAT16"):
        return "FAT file system"
    if head[:6] == b"LUKS\xba\xbe":
        return "LUKS encrypted volume"
    if head[:4] == b"XFSB":
        return "XFS file system"
    if head[:4] == b"hsqs":
        return "squashfs file system"
    if read_at(f, offset + 0x10040, 8) == b"_BHRfS_M":
        return "btrfs file system"
    if read_at(f, offset + 4086, 10) in (b"SWAPSPACE2", b"SWAP-SPACE"):
        return "swap space"
    if read_at(f, offset + 0x218, 8) == b"LVM2 001":
        return "LVM physical volume"
    return None


def _partition(f: BinaryIO, size: int, number: int, kind: str, first: int, count: int) -> Partition:
    """A partition of ``count`` sectors from sector ``first``; probed only if inside the image."""
    offset, length = first * SECTOR, count * SECTOR
    if count <= 0:
        problem = "empty (its last sector is before its first)"
        return Partition(number, kind, offset, 0, None, problem)
    if offset + length > size:
        problem = f"ends at byte {offset + length}, past the end of the image ({size} bytes)"
        return Partition(number, kind, offset, length, None, problem)
    return Partition(number, kind, offset, length, probe_content(f, offset))


def _gpt_header(f: BinaryIO, lba: int) -> tuple[bytes, str | None]:
    """The GPT header at ``lba``, and what is wrong with it (None: nothing)."""
    header = read_at(f, lba * SECTOR, SECTOR)
    if header[:8] != b"EFI PART":
        return header, "no GPT header signature"
    hsize = struct.unpack_from("<I", header, 12)[0]
    if not 92 <= hsize <= SECTOR:
        return header, f"a header size of {hsize} bytes"
    want = struct.unpack_from("<I", header, 16)[0]
    blanked = header[:16] + bytes(4) + header[20:hsize]
    if zlib.crc32(blanked) != want:
        return header, "a header checksum that does not match"
    return header, None


def _gpt(f: BinaryIO, size: int) -> Table:
    header, wrong = _gpt_header(f, 1)
    notes: list[str] = []
    if wrong is not None:
        last = size // SECTOR - 1
        backup, backup_wrong = _gpt_header(f, last) if last > 1 else (b"", "no room")
        if backup_wrong is not None:
            raise BackupError(
                f"its GPT partition table is damaged: the primary header has {wrong}, "
                f"the backup header (last sector) has {backup_wrong}"
            )
        notes.append(f"the primary GPT header has {wrong}; the backup header was read")
        header = backup
    entries_lba, count, entry_size, entries_crc = struct.unpack_from("<QIII", header, 72)
    if count > MAX_GPT_ENTRIES:
        raise BackupError(
            f"its GPT header claims {count} partition entries (more than {MAX_GPT_ENTRIES}): "
            "damaged or crafted"
        )
    if entry_size < 128 or entry_size > MAX_ENTRY_SIZE or entry_size % 8:
        raise BackupError(
            f"its GPT header claims {entry_size}-byte partition entries (expected 128): "
            "damaged or crafted"
        )
    start = entries_lba * SECTOR
    if entries_lba < 1 or start + count * entry_size > size:
        raise BackupError(
            f"its GPT partition entries (sector {entries_lba}, {count} x {entry_size} bytes) "
            "do not lie inside the image: damaged or crafted"
        )
    table = read_at(f, start, count * entry_size)
    if zlib.crc32(table) != entries_crc:
        notes.append("the GPT partition entries' checksum does not match (damaged table?)")
    parts: list[Partition] = []
    for i in range(count):
        entry = table[i * entry_size : (i + 1) * entry_size]
        if entry[:16] == bytes(16):
            continue  # an unused entry
        guid = str(uuid.UUID(bytes_le=entry[:16]))
        kind = GPT_TYPES.get(guid, f"type {guid}")
        first, last = struct.unpack_from("<QQ", entry, 32)
        parts.append(_partition(f, size, i + 1, kind, first, last - first + 1))
    return Table("GPT", tuple(parts), tuple(notes))


def _mbr_kind(ptype: int) -> str:
    name = MBR_TYPES.get(ptype)
    return f"0x{ptype:02x} {name}" if name else f"0x{ptype:02x}"


def _mbr_entries(sector: bytes) -> list[tuple[int, int, int]]:
    """(type, first sector, sector count) of the four slots of an MBR or EBR."""
    found = []
    for i in range(4):
        ptype = sector[446 + 16 * i + 4]
        start, count = struct.unpack_from("<II", sector, 446 + 16 * i + 8)
        found.append((ptype, start, count))
    return found


def _mbr(f: BinaryIO, size: int, mbr: bytes) -> Table | None:
    parts: list[Partition] = []
    notes: list[str] = []
    extended: tuple[int, int] | None = None
    for i, (ptype, start, count) in enumerate(_mbr_entries(mbr)):
        if ptype == 0 or count == 0:
            continue
        if ptype in EXTENDED:
            extended = extended or (start, count)
            continue
        parts.append(_partition(f, size, i + 1, _mbr_kind(ptype), start, count))
    if extended is not None:
        parts += _logical(f, size, extended[0], notes)
    if not parts and extended is None:
        return None  # a boot-sector signature alone: a FAT/NTFS volume, not a table
    return Table("MBR", tuple(parts), tuple(notes))


def _logical(f: BinaryIO, size: int, base: int, notes: list[str]) -> list[Partition]:
    """The logical partitions of an extended partition: a chain of EBRs, followed
    at most :data:`MAX_LOGICAL` links and never to a sector seen before."""
    parts: list[Partition] = []
    seen: set[int] = set()
    ebr_lba = base
    while True:
        if ebr_lba in seen or len(seen) >= MAX_LOGICAL:
            raise BackupError(
                f"its MBR's chain of logical partitions loops or is longer than {MAX_LOGICAL} "
                f"(at sector {ebr_lba}): damaged or crafted"
            )
        seen.add(ebr_lba)
        ebr = read_at(f, ebr_lba * SECTOR, SECTOR)
        if len(ebr) < SECTOR or ebr[510:512] != b"\x55\xaa":
            notes.append(f"the logical-partition record at sector {ebr_lba} is missing or damaged")
            return parts
        (ptype, start, count), (ntype, nstart, _n) = _mbr_entries(ebr)[:2]
        if ptype and count:
            number = 5 + len(parts)
            parts.append(_partition(f, size, number, _mbr_kind(ptype), ebr_lba + start, count))
        if ntype not in EXTENDED or nstart == 0:
            return parts
        ebr_lba = base + nstart


def read_table(f: BinaryIO, size: int) -> Table | None:
    """The partition table of a disk image (GPT or MBR), if it has one.

    Raises :class:`BackupError` for a table that cannot be read safely.
    """
    mbr = read_at(f, 0, SECTOR)
    if len(mbr) < SECTOR or mbr[510:512] != b"\x55\xaa":
        return None
    if any(ptype == PROTECTIVE for ptype, _s, _c in _mbr_entries(mbr)):
        return _gpt(f, size)
    return _mbr(f, size, mbr)


def read_partitions(f: BinaryIO) -> tuple[str, list[Partition]] | None:
    """(kind, partitions) of the image open as ``f``, or None without a table."""
    f.seek(0, 2)
    table = read_table(f, f.tell())
    return None if table is None else (table.kind, list(table.partitions))


def table_lines(image: Path, table: Table, chosen: Partition | None) -> list[str]:
    """``--list`` of a whole-disk image: its partitions, the one read marked ``*``."""
    lines = [f"{image}: {table.kind} partition table"]
    lines.append(f"  {'#':>2} {'TYPE':<24} {'OFFSET':>14} {'SIZE':>14}  FOUND")
    for p in table.partitions:
        mark = "*" if chosen is not None and p.number == chosen.number else " "
        found = p.problem or p.content or "unknown content"
        lines.append(f"{mark} {p.number:>2} {p.type[:24]:<24} {p.offset:>14} {p.size:>14}  {found}")
    return lines
