"""Where a member's bytes lie in the inner archive, sparse maps included.

Only ``restore --salvage`` asks (qrecover.salvage): to say which bytes of a
restored file came from a chunk that could not be authenticated, an
archive's byte range must be mapped onto the file, and a sparse image's data
in the archive is only its data runs, one after the other.  The maps read:

* GNU old sparse (type ``S``, format 3's ``tar --sparse``): four ``(offset,
  length)`` entries in the header, 21 more in each extension block;
* PAX GNU sparse 1.0 (format 4): ``GNU.sparse.major=1`` in the pax header, the
  map as decimal lines at the start of the data, padded to 512 bytes;
* PAX GNU sparse 0.1: ``GNU.sparse.map=OFF,LEN,...`` in the pax header.

Any other member's data is the file itself.  The maps are read from the
archive as it came, so a damaged map gives a wrong mapping: the salvage
report says when an unverified range covers a member's headers or map.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from qrecover.archive.tarheaders import BLOCK, MAX_EXTENDED, Extended, TarError, number, readable

_ENTRY = 24  # one (offset, numbytes) pair of 12-byte octal fields


@dataclass(frozen=True)
class Extent:
    """Where one member's data lies in the inner archive (``restore --salvage``
    maps unverified ranges of the archive onto the restored files with it).

    Offsets count the archive as it came into the guard.  ``segments``: the
    ``(file offset, length)`` of each data run, in archive order, for a
    sparse member (None: the data is the file); ``map_bytes``: the PAX 1.0
    sparse map's blocks at the start of the data.
    """

    name: str
    header_start: int
    data_start: int
    size: int
    segments: tuple[tuple[int, int], ...] | None = None
    map_bytes: int = 0


def _old_entries(area: bytes) -> list[tuple[int, int]]:
    found = []
    for at in range(0, len(area) - _ENTRY + 1, _ENTRY):
        entry = area[at:at + _ENTRY]
        if not entry[:12].strip(b"\0 "):
            break
        try:
            found.append((number(entry[:12]), number(entry[12:])))
        except TarError:
            raise TarError("inner archive: malformed header (sparse map)") from None
    return found


def old_gnu_map(header: bytes, extension: bytes) -> tuple[tuple[int, int], ...]:
    """The data runs of a type ``S`` member: header, then each extension block."""
    runs = _old_entries(header[386:386 + 4 * _ENTRY])
    for at in range(0, len(extension), BLOCK):
        runs += _old_entries(extension[at:at + 21 * _ENTRY])
    return tuple(runs)


def _numbers(text: bytes) -> list[int]:
    parts = text.split(b"\n")[:-1]  # the last part is not complete yet
    if not all(p.isdigit() for p in parts):
        raise TarError("inner archive: malformed PAX 1.0 sparse map")
    return [int(p) for p in parts]


def _pairs(values: list[int]) -> tuple[tuple[int, int], ...]:
    return tuple((values[i], values[i + 1]) for i in range(0, len(values) - 1, 2))


def extent(
    header: bytes,
    meta: list[bytes],
    extension: bytes,
    start: int,
    size: int,
    read: Callable[[int], bytes],
) -> tuple[Extent, bytes]:
    """The member's :class:`Extent`, and the data bytes read to learn it (a
    PAX 1.0 map, which the caller passes on before the rest of the data);
    TarError for a map that cannot be read."""
    ext = Extended.of(meta)
    name = readable(ext.name(header))
    data_start = start + sum(map(len, meta)) + BLOCK + len(extension)
    if header[156] == ord("S"):
        return Extent(name, start, data_start, size, old_gnu_map(header, extension)), b""
    records = ext.pax
    if records.get("GNU.sparse.major") == "1" and size >= BLOCK:
        prefix = b""
        while True:
            if len(prefix) >= min(size, MAX_EXTENDED):
                raise TarError(f"inner archive: the sparse map of {name[:200]!r} is too long")
            prefix += read(BLOCK)
            values = _numbers(prefix)
            if values and len(values) >= 1 + 2 * values[0]:
                runs = _pairs(values[1:1 + 2 * values[0]])
                return Extent(name, start, data_start, size, runs, len(prefix)), prefix
    if "GNU.sparse.map" in records:
        raw = records["GNU.sparse.map"].split(",")
        if not all(p.isascii() and p.isdigit() for p in raw):
            raise TarError("inner archive: malformed GNU.sparse.map")
        return Extent(name, start, data_start, size, _pairs([int(p) for p in raw])), b""
    return Extent(name, start, data_start, size), b""


def to_file(ext: Extent, begin: int, end: int) -> list[tuple[int, int]]:
    """The ranges of ``ext``'s file that the archive's bytes ``[begin, end)`` hold."""
    lo, hi = max(begin, ext.data_start + ext.map_bytes), min(end, ext.data_start + ext.size)
    if lo >= hi:
        return []
    if ext.segments is None:
        return [(lo - ext.data_start, hi - ext.data_start)]
    found = []
    at = ext.data_start + ext.map_bytes
    for offset, length in ext.segments:
        a, b = max(lo, at), min(hi, at + length)
        if a < b:
            found.append((offset + a - at, offset + b - at))
        at += length
    return found


def file_offset(ext: Extent, point: int) -> int:
    """The offset in ``ext``'s file that the archive's byte ``point`` is at, or
    would be next (before the data: 0; past it: the file's end)."""
    if point <= ext.data_start + ext.map_bytes:
        return 0
    if ext.segments is None:
        return min(point, ext.data_start + ext.size) - ext.data_start
    at = ext.data_start + ext.map_bytes
    last = 0
    for offset, length in ext.segments:
        if point < at + length:
            return offset + point - at
        at += length
        last = offset + length
    return last
