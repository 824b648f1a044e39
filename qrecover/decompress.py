"""The decompression stage, chosen from the header's allow-listed filter."""

from __future__ import annotations

from qrecover.header import DECOMPRESSORS, AnyHeader
from qrecover.runner import Stage


def decompress_stage(header: AnyHeader) -> Stage | None:
    """``gzip -d`` / ``bzip2 -d`` / ``xz -d`` ...; None for an uncompressed backup."""
    name = header.filter
    if name is None:
        return None
    return Stage(DECOMPRESSORS[name])
