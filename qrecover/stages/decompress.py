"""The decompression stage, chosen from the header's allow-listed filter."""

from __future__ import annotations

import shutil

from qrecover.header import DECOMPRESSORS, Header
from qrecover.runner import Stage

# Filters whose output any gzip decompressor reads.
_GZIP_FAMILY = ("gzip", "pigz")
# Programs that undo gzip, fastest first.  Each writes the same bytes as
# ``gzip -d`` and checks the stream's CRC-32 and length the same way (a
# corrupted or cut stream: exit status 1).  ``igzip`` (Intel ISA-L, package
# isal) decompresses about 5x faster than gzip; ``pigz -d`` about 1.5x,
# with threads of its own for reading, checking and writing (scripts/bench).
GUNZIPS = ("igzip", "pigz", "gzip")


def pick_gunzip() -> str:
    """The fastest gzip decompressor on PATH (``gzip`` when none is: it is then
    reported missing like any other program)."""
    return next((name for name in GUNZIPS if shutil.which(name)), "gzip")


def decompress_stage(header: Header, gunzip: str = "gzip") -> Stage | None:
    """``gzip -d`` / ``bzip2 -d`` / ``xz -d`` ...; None for an uncompressed backup.

    ``gunzip``: which program of :data:`GUNZIPS` undoes gzip data (the
    caller's :func:`pick_gunzip`); a backup written with ``pigz`` is gzip data.
    """
    name = header.filter
    if name is None:
        return None
    if name in _GZIP_FAMILY:
        if gunzip not in GUNZIPS:
            raise ValueError(f"not a gzip decompressor: {gunzip}")
        return Stage((gunzip, "-d"))
    return Stage(DECOMPRESSORS[name])
