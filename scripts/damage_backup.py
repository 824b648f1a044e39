#!/usr/bin/env python3
"""Damage a copy of a Qubes backup the way failing media do, and say what was hit.

What media do to a backup (FORMAT-NOTES, "What damage does to each stage"):
a sector that cannot be read comes out of ``ddrescue`` as zeros (512 B, or
4 KiB on newer disks), a bad USB stick returns garbage, bits flip, a copy is
cut short, a file of an untarred folder goes missing or cannot be read.
This script makes each of them in a copy of a backup written by the
generators (make_backup*.py), and writes a manifest (JSON) naming every
damaged byte range and the outer members whose bytes it touches, so that a
test can check that qrecover restores everything else byte for byte and
reports exactly what was damaged::

    damage_backup.py BACKUP OUT --zero-header vm7/private.img.001 --sector 4096
    damage_backup.py BACKUP OUT --zero-in vm7/private.img.001:1000 --flip 123456:3
    damage_backup.py BACKUP OUT --garbage 200000:700 --truncate 800000
    damage_backup.py FOLDER OUT --remove vm7/private.img.001.hmac

Unreadable sectors (EIO) are made for real by scripts/eio_fs.py (a FUSE
file system); ``--unreadable START:LEN`` here only records the range in the
manifest and prints the ``--bad`` option for eio_fs.py.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import tarfile
from dataclasses import asdict, dataclass, field
from pathlib import Path


def randbytes(rng: random.Random, n: int) -> bytes:
    """``rng.randbytes(n)`` (Python 3.9 and later), on Python 3.8 too."""
    return rng.getrandbits(n * 8).to_bytes(n, "little") if n else b""

SECTOR = 512


@dataclass(frozen=True)
class OuterMember:
    """One member of the outer archive: its headers start at ``offset``, its
    data at ``data``; ``end`` is past its data's padding."""

    name: str
    offset: int
    data: int
    size: int

    @property
    def end(self) -> int:
        return self.data + -(-self.size // 512) * 512

    @property
    def needed(self) -> int:
        """Where the bytes begin without which it is lost: its ustar header,
        which holds its name and size when the name fits (100 bytes); the PAX
        header before it only adds times, and a reader can do without it."""
        return self.data - 512 if len(self.name) <= 100 else self.offset


@dataclass
class Hit:
    """One damaged range and the members whose bytes it touches."""

    kind: str  # zero, garbage, flip, truncate, unreadable, remove
    start: int
    end: int
    members: list[str] = field(default_factory=list)


def outer_members(backup: Path) -> list[OuterMember]:
    """The outer archive's members as Qubes appended them (tarfile, ``ignore_zeros``)."""
    with tarfile.open(backup, mode="r:", ignore_zeros=True) as tar:
        return [OuterMember(m.name, m.offset, m.offset_data, m.size) for m in tar]


def touched(members: list[OuterMember], start: int, end: int) -> list[str]:
    """The members that bytes ``start``..``end`` damage: their header or data (the
    padding after the data is read past unchecked, as tar does)."""
    return [m.name for m in members if m.needed < end and start < m.data + m.size]


def sector_range(offset: int, sector: int) -> tuple[int, int]:
    """The ``sector``-aligned range holding byte ``offset``."""
    start = offset - offset % sector
    return start, start + sector


class Damager:
    """A copy of a backup file, damaged in memory, written out with its manifest."""

    def __init__(self, backup: Path, seed: int = 0) -> None:
        self.members = outer_members(backup)
        self.data = bytearray(backup.read_bytes())
        self.original = bytes(self.data)
        self.hits: list[Hit] = []
        self.random = random.Random(seed)

    def member(self, name: str) -> OuterMember:
        return next(m for m in self.members if m.name == name)

    def _hit(self, kind: str, start: int, end: int) -> Hit:
        end = min(end, len(self.data))
        same = kind != "truncate" and self.data[start:end] == self.original[start:end]
        # zeros over zeros (an image's holes) change nothing: no member is hit
        hit = Hit(kind, start, end, [] if same else touched(self.members, start, end))
        self.hits.append(hit)
        return hit

    def zero(self, start: int, length: int) -> Hit:
        self.data[start : start + length] = bytes(len(self.data[start : start + length]))
        return self._hit("zero", start, start + length)

    def garbage(self, start: int, length: int) -> Hit:
        size = len(self.data[start : start + length])
        self.data[start : start + length] = randbytes(self.random, size)
        return self._hit("garbage", start, start + length)

    def flip(self, offset: int, bit: int) -> Hit:
        self.data[offset] ^= 1 << bit
        return self._hit("flip", offset, offset + 1)

    def truncate(self, size: int) -> Hit:
        hit = self._hit("truncate", size, len(self.data))
        del self.data[size:]
        return hit

    def unreadable(self, start: int, length: int) -> Hit:
        """Recorded only: eio_fs.py makes these bytes fail with EIO."""
        return self._hit("unreadable", start, start + length)

    def zero_header(self, name: str, sector: int = SECTOR) -> Hit:
        """Zeros over the sector holding ``name``'s tar header (ddrescue's unreadable sector)."""
        start, end = sector_range(self.member(name).data - 512, sector)
        return self.zero(start, end - start)

    def zero_inside(self, name: str, at: int, sector: int = SECTOR) -> Hit:
        """Zeros over the sector holding byte ``at`` of ``name``'s data."""
        start, end = sector_range(self.member(name).data + at, sector)
        return self.zero(start, end - start)

    def write(self, out: Path) -> Path:
        out.write_bytes(self.data)
        manifest = out.with_name(out.name + ".damage.json")
        manifest.write_text(json.dumps([asdict(h) for h in self.hits], indent=1))
        return manifest


def _pair(text: str) -> tuple[str, int]:
    left, _, right = text.rpartition(":")
    return left, int(right)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("backup", type=Path, help="a backup file (or an untarred folder)")
    parser.add_argument("out", type=Path, help="the damaged copy to write")
    parser.add_argument("--sector", type=int, default=SECTOR, help="512 or 4096")
    parser.add_argument("--seed", type=int, default=0, help="for --garbage")
    parser.add_argument("--zero", action="append", default=[], metavar="START:LEN")
    parser.add_argument("--zero-header", action="append", default=[], metavar="MEMBER")
    parser.add_argument("--zero-in", action="append", default=[], metavar="MEMBER:OFFSET")
    parser.add_argument("--garbage", action="append", default=[], metavar="START:LEN")
    parser.add_argument("--flip", action="append", default=[], metavar="OFFSET:BIT")
    parser.add_argument("--unreadable", action="append", default=[], metavar="START:LEN")
    parser.add_argument("--truncate", type=int, metavar="SIZE")
    parser.add_argument("--remove", action="append", default=[], metavar="FILE",
                        help="a folder: leave this chunk file out of the copy")
    args = parser.parse_args()
    if args.backup.is_dir():
        shutil.copytree(args.backup, args.out, symlinks=True)
        for name in args.remove:
            (args.out / name).unlink()
        print(json.dumps({"removed": args.remove}))
        return
    damager = Damager(args.backup, args.seed)
    for spec in args.zero:
        start, length = map(int, spec.split(":"))
        damager.zero(start, length)
    for name in args.zero_header:
        damager.zero_header(name, args.sector)
    for spec in args.zero_in:
        name, at = _pair(spec)
        damager.zero_inside(name, at, args.sector)
    for spec in args.garbage:
        start, length = map(int, spec.split(":"))
        damager.garbage(start, length)
    for spec in args.flip:
        offset, bit = map(int, spec.split(":"))
        damager.flip(offset, bit)
    for spec in args.unreadable:
        start, length = map(int, spec.split(":"))
        damager.unreadable(start, length)
        print(f"eio_fs.py option: --bad {args.out.name}:{start}-{start + length}")
    if args.truncate is not None:
        damager.truncate(args.truncate)
    print(damager.write(args.out))


if __name__ == "__main__":
    main()
