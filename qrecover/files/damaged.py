"""Which files inside a salvaged image lie on unverified bytes.

``restore --salvage`` (qrecover.salvage) writes, in ``SALVAGED.txt`` at the
top of DIR, the byte ranges of each restored file that came from chunks that
failed authentication.  For an ext2/3/4 image (a VM's ``private.img``) that
says little by itself; what the user needs is which files *inside* it to
distrust.  So ``qrecover files IMAGE`` (and ``restore --salvage --files``)
look for that record, and ask debugfs, read-only, which data blocks each
file and folder of the image owns (``blocks <INODE>``, batched like the
listings): a file with a block in an unverified range is named ``DAMAGED``.

Only the data blocks of files and folders are looked at: damage that falls
on the file system's own structures (inode tables, bitmaps, the journal) is
not attributed to any file (and debugfs may then misread the image itself).
"""

from __future__ import annotations

import os
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Tuple

from qrecover.compat import zip_strict
from qrecover.files.copy import open_image
from qrecover.files.debugfs import Debugfs, inode_spec
from qrecover.files.listing import Entry, show, walk
from qrecover.messages import err

_EXACT = re.compile(r"^  (.+): UNVERIFIED bytes ([0-9, -]+) \(exact")
_FROM = re.compile(r"^  (.+): from byte (\d+) on, UNVERIFIED")
_RECORDS = ("SALVAGED.txt", *(f"SALVAGED.{n}.txt" for n in range(1, 10)))
Range = Tuple[int, Optional[int]]  # [start, end) in bytes; end None: to the end


def _parse(line: str) -> tuple[str, list[Range]] | None:
    if (m := _EXACT.match(line)) is not None:
        spans: list[Range] = []
        for span in m[2].split(","):
            a, _, b = span.strip().partition("-")
            spans.append((int(a), int(b) + 1))
        return m[1], spans
    if (m := _FROM.match(line)) is not None:
        return m[1], [(int(m[2]), None)]
    return None


def recorded_ranges(image: Path) -> tuple[Path, list[Range]] | None:
    """The unverified ranges a SALVAGED.txt in one of ``image``'s folders (or
    the two above) gives for it, and that record; None: none does."""
    here = image.resolve()
    for folder in list(here.parents)[:3]:
        for name in _RECORDS:
            record = folder / name
            if not record.is_file():
                continue
            found: list[Range] = []
            with record.open(encoding="utf-8", errors="replace") as f:
                for line in f:
                    parsed = _parse(line.rstrip("\n"))
                    if parsed is None:
                        continue
                    target = folder / parsed[0]
                    if target.exists() and os.path.samefile(target, here):
                        found += parsed[1]
            if found:
                return record, found
    return None


def block_size(image: Path) -> int:
    """The ext file system's block size, from its superblock (at byte 1024)."""
    with image.open("rb") as f:
        f.seek(1024 + 24)
        (log,) = struct.unpack("<I", f.read(4))
    return 1024 << min(int(log), 6)


@dataclass(frozen=True)
class Damaged:
    entry: Entry
    blocks: int  # how many of its blocks are unverified


def _hit(blocks: list[int], ranges: list[tuple[int, int | None]]) -> int:
    return sum(1 for b in blocks for a, z in ranges if b >= a and (z is None or b < z))


def damaged_files(fs: Debugfs, ranges: list[Range]) -> list[Damaged]:
    """The files and folders of the image with a data block in ``ranges``."""
    size = block_size(fs.image)
    spans = [(a // size, None if z is None else -(-z // size)) for a, z in ranges]
    tree = walk(fs, "/")
    entries = [e for e in tree.entries if e.kind in ("file", "dir")]
    requests = [f"blocks {inode_spec(e.ino)}" for e in entries]
    found = []
    for entry, answer in zip_strict(entries, fs.answers(requests)):
        blocks = [int(w) for w in answer.split() if w.isdigit()]
        hit = _hit(blocks, spans)
        if hit:
            found.append(Damaged(entry, hit))
    return found


def name_damaged(image: Path) -> int:
    """Say which files of ``image`` lie on bytes its SALVAGED.txt calls
    unverified (stderr); how many (0 also when there is no such record)."""
    found = recorded_ranges(image)
    if found is None:
        return 0
    record, ranges = found
    fs = open_image(image)
    if not isinstance(fs, Debugfs) or fs.offset:  # NTFS, or a partition of a whole disk
        err(f"WARNING: {record} says parts of {image} are UNVERIFIED (restore --salvage used "
            "chunks that failed authentication); which files lie on them is worked out only "
            "for an image that is one ext2/3/4 file system: trust none of its files")
        return 1
    damaged = damaged_files(fs, ranges)
    err(f"WARNING: {record} says parts of {image} are UNVERIFIED (restore --salvage used "
        f"chunks that failed authentication); {len(damaged)} file(s) and folder(s) in it "
        "lie on those bytes: do not trust them")
    for d in damaged:
        err(f"DAMAGED   {show(d.entry.image_path)}{'/' if d.entry.kind == 'dir' else ''} "
            f"({d.blocks} of its blocks unverified)")
    return len(damaged)
