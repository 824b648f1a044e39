"""What an image file holds, read in Python before any program sees it.

``qrecover files`` reads ext2/3/4 file systems only.  Anything else gets a
message saying what it is instead: a whole disk with a partition table (a
template's ``root.img``; with the offset to mount the ext partition), a LUKS,
XFS, btrfs or squashfs volume, swap, an image of zeros, or nothing known.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from qrecover.errors import BackupError, UsageError

EXT_MAGIC = b"\x53\xef"  # 0xEF53, little-endian
EXT_MAGIC_OFFSET = 1080  # superblock at 1024, s_magic at +56
SECTOR = 512


@dataclass(frozen=True)
class Partition:
    number: int
    offset: int  # bytes from the start of the image
    size: int
    content: str  # "ext2/3/4 file system", "unknown content", ...


def _read_at(f: BinaryIO, offset: int, size: int) -> bytes:
    f.seek(offset)
    return f.read(size)


def probe_content(f: BinaryIO, offset: int = 0) -> str | None:
    """What the bytes at ``offset`` hold, if we recognise it."""
    if _read_at(f, offset + EXT_MAGIC_OFFSET, 2) == EXT_MAGIC:
        return "ext2/3/4 file system"
    head = _read_at(f, offset, 8)
    if head[:6] == b"LUKS\xba\xbe":
        return "LUKS encrypted volume"
    if head[:4] == b"XFSB":
        return "XFS file system"
    if head[:4] == b"hsqs":
        return "squashfs file system"
    if _read_at(f, offset + 0x10040, 8) == b"_BHRfS_M":
        return "btrfs file system"
    if _read_at(f, offset + 4086, 10) in (b"SWAPSPACE2", b"SWAP-SPACE"):
        return "swap space"
    return None


def read_partitions(f: BinaryIO) -> tuple[str, list[Partition]] | None:
    """The partition table of a disk image (GPT or MBR), if it has one."""
    mbr = _read_at(f, 0, SECTOR)
    if len(mbr) < SECTOR or mbr[510:512] != b"\x55\xaa":
        return None
    gpt = _read_at(f, SECTOR, 92)
    parts: list[Partition] = []
    if gpt[:8] == b"EFI PART":
        entries_lba, count, entry_size = struct.unpack_from("<QII", gpt, 72)
        count = min(count, 128)
        if entry_size < 128 or entry_size > 4096:
            return "GPT", []
        table = _read_at(f, entries_lba * SECTOR, count * entry_size)
        for i in range(len(table) // entry_size):
            entry = table[i * entry_size : (i + 1) * entry_size]
            if entry[:16] == bytes(16):
                continue
            first, last = struct.unpack_from("<QQ", entry, 32)
            offset = first * SECTOR
            size = (last - first + 1) * SECTOR if last >= first else 0
            parts.append(
                Partition(i + 1, offset, size, probe_content(f, offset) or "unknown content")
            )
        return "GPT", parts
    for i in range(4):
        entry = mbr[446 + 16 * i : 462 + 16 * i]
        ptype = entry[4]
        start, sectors = struct.unpack_from("<II", entry, 8)
        if ptype == 0 or start == 0 or sectors == 0:
            continue
        if ptype == 0xEE:  # protective MBR of a GPT disk whose header we could not read
            return "GPT (protective MBR)", []
        offset = start * SECTOR
        parts.append(
            Partition(
                i + 1, offset, sectors * SECTOR, probe_content(f, offset) or "unknown content"
            )
        )
    if not parts:
        return None  # a boot-sector signature alone: a FAT/NTFS volume, not a table
    return "MBR", parts


def check_image(image: Path) -> None:
    """Raise a helpful :class:`BackupError` unless ``image`` is an ext2/3/4 file system."""
    try:
        with image.open("rb") as f:
            content = probe_content(f)
            if content == "ext2/3/4 file system":
                return
            table = None if content else read_partitions(f)
            size = image.stat().st_size
            head = _read_at(f, 0, 65536)
    except FileNotFoundError:
        raise UsageError(f"{image}: no such file") from None
    except IsADirectoryError:
        raise UsageError(f"{image}: is a folder, not an image file") from None
    except OSError as exc:
        raise UsageError(f"{image}: cannot read ({exc.strerror})") from None
    what = f"{image} is not an ext2/3/4 file system"
    if table is not None:
        kind, parts = table
        shown = "; ".join(
            f"partition {p.number} at byte offset {p.offset} ({p.content})" for p in parts
        )
        target = next(
            (p for p in parts if p.content.startswith("ext")), parts[0] if parts else None
        )
        hint = "qrecover files reads file-system images such as a VM's private.img"
        if target is not None:
            hint += (
                f"; to read partition {target.number}, mount it read-only: "
                f"sudo mount -o loop,ro,offset={target.offset} {image} /mnt"
            )
        raise BackupError(
            f"{what}: it is a whole disk image with an {kind} partition table "
            f"(like a template's or standalone VM's root.img)" + (f": {shown}" if shown else ""),
            hint=hint,
        )
    if content is not None:
        raise BackupError(f"{what}: it holds a {content}")
    if size == 0:
        raise BackupError(f"{what}: it is empty")
    if head.count(0) == len(head):
        raise BackupError(
            f"{what}: its first {len(head)} bytes are all zeros "
            "(an image never formatted, or damaged)"
        )
    raise BackupError(
        f"{what}: no ext superblock (magic 0xEF53 at byte {EXT_MAGIC_OFFSET}) and no "
        "partition table; it may be damaged or not an image at all"
    )
