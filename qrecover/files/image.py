"""What an image file holds, read in Python before any program sees it.

``qrecover files`` reads ext2/3/4 file systems (with debugfs) and NTFS ones
(with The Sleuth Kit, :mod:`qrecover.files.ntfs`), either as the whole image
(a VM's ``private.img``) or as one partition of a whole-disk image, whose
table :mod:`qrecover.files.partitions` parses: nothing is mounted, the chosen
partition is read through its byte offset.  Anything else gets a message
saying what it is instead.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from qrecover.errors import BackupError, UsageError
from qrecover.files.partitions import (
    EXT,
    EXT_MAGIC_OFFSET,
    NTFS,
    READABLE,
    Partition,
    Table,
    probe_content,
    read_at,
    read_partitions,
    read_table,
    table_lines,
)

__all__ = [
    "EXT",
    "NTFS",
    "Partition",
    "Table",
    "Volume",
    "check_image",
    "find_volume",
    "image_table",
    "probe_content",
    "read_partitions",
    "read_table",
    "table_lines",
]


@dataclass(frozen=True)
class Volume:
    """The file system qrecover reads: the whole image, or one partition of it."""

    image: Path
    offset: int
    content: str  # EXT or NTFS
    partition: Partition | None = None
    table: Table | None = None


def _pick(image: Path, table: Table, number: int | None) -> Partition:
    shown = "; ".join(p.describe() for p in table.partitions) or "no partitions"
    if number is not None:
        for p in table.partitions:
            if p.number == number:
                return p
        numbers = ", ".join(str(p.number) for p in table.partitions) or "none"
        raise UsageError(
            f"{image}: has no partition {number} (its {table.kind} table has: {numbers})",
            hint=f"see them with: qrecover files {image} --list",
        )
    for content in READABLE:
        for p in table.partitions:
            if p.content == content and p.problem is None:
                return p
    raise BackupError(
        f"{image}: no partition of its {table.kind} table holds an ext2/3/4 or NTFS file "
        f"system: {shown}"
    )


@contextlib.contextmanager
def _opened(image: Path) -> Iterator[tuple[BinaryIO, int]]:
    """The image open for reading and its size; its troubles as one-line errors."""
    try:
        with image.open("rb") as f:
            yield f, os.fstat(f.fileno()).st_size
    except FileNotFoundError:
        raise UsageError(f"{image}: no such file") from None
    except IsADirectoryError:
        raise UsageError(f"{image}: is a folder, not an image file") from None
    except BackupError as exc:
        raise BackupError(f"{image}: {exc.message}", exc.hint) from None
    except OSError as exc:
        raise UsageError(f"{image}: cannot read ({exc.strerror})") from None


def image_table(image: Path) -> Table | None:
    """The partition table of ``image`` (None: it is one file system, or unknown)."""
    with _opened(image) as (f, size):
        return None if probe_content(f) in READABLE else read_table(f, size)


def find_volume(image: Path, partition: int | None = None) -> Volume:
    """The file system to read in ``image``: the whole image, or a partition of it
    (``partition``, else the first ext2/3/4 one, else the first NTFS one)."""
    chosen: Partition | None = None
    with _opened(image) as (f, size):
        content = probe_content(f)
        table = None if content in READABLE else read_table(f, size)
        head = read_at(f, 0, 65536)
        if table is not None:
            chosen = _pick(image, table, partition)
    if table is not None and chosen is not None:
        if chosen.problem is not None or chosen.content not in READABLE:
            raise BackupError(
                f"{image}: cannot read {chosen.describe()}",
                hint="qrecover reads ext2/3/4 and NTFS file systems; --list shows the partitions",
            )
        return Volume(image, chosen.offset, chosen.content, chosen, table)
    if partition is not None:
        raise UsageError(
            f"{image}: has no partition table (it is one file system), so no --partition"
        )
    if content in READABLE:
        return Volume(image, 0, content)
    if content is None and head[257:262] == b"ustar":
        raise UsageError(
            f"{image} is a tar archive, not a VM image: a Qubes backup? then name the VM "
            "whose files you want",
            hint=f"qrecover files {image} --vm NAME --output DIR",
        )
    raise BackupError(_not_readable(image, content, size, head))


def _not_readable(image: Path, content: str | None, size: int, head: bytes) -> str:
    what = f"{image} holds no file system qrecover reads (ext2/3/4, NTFS)"
    if content is not None:
        return f"{what}: it holds a {content}"
    if size == 0:
        return f"{what}: it is empty"
    if head.count(0) == len(head):
        return (
            f"{what}: its first {len(head)} bytes are all zeros "
            "(an image never formatted, or damaged)"
        )
    return (
        f"{what}: no ext superblock (magic 0xEF53 at byte {EXT_MAGIC_OFFSET}), no NTFS boot "
        "sector and no partition table; it may be damaged or not an image at all"
    )


def check_image(image: Path) -> None:
    """Raise a helpful :class:`BackupError` unless ``image`` holds a file system we read."""
    find_volume(image)


