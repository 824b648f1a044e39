"""The decompression stage, chosen from the header's allow-listed filter."""

from __future__ import annotations

from qrecover.header import DECOMPRESSORS, AnyHeader
from qrecover.runner import Stage

# Filters whose output any gzip decompressor reads.
_GZIP_FAMILY = ("gzip", "pigz")

def decompress_stage(header: AnyHeader, pigz: bool = False) -> Stage | None:
    """``gzip -d`` / ``bzip2 -d`` / ``xz -d`` ...; None for an uncompressed backup.

    ``pigz``: the caller found pigz installed.  For gzip data ``pigz -d``
    writes the same bytes as ``gzip -d`` but reads, checks and writes in
    threads of its own: about 1.7x faster on 2 cores (scripts/bench).
    Without pigz, a backup written with ``pigz`` is read by ``gzip -d``.
    """
    name = header.filter
    if name is None:
        return None
    if name in _GZIP_FAMILY:
        return Stage(("pigz", "-d") if pigz else ("gzip", "-d"))
    return Stage(DECOMPRESSORS[name])
