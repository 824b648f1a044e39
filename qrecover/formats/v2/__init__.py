"""Format 2 (Qubes R2-Beta3 to R2): an HMAC per chunk, each chunk one tar volume.

The package's modules, each what it holds:

- ``format``: the two shapes of header, their authentication, the per-chunk
  check and decryption or decompression, :class:`Format2`;
- ``volumes``: the stored file's ``tar -M``, given the volumes one by one,
  and the guard across volumes;
- ``words`` and ``sh``: the v2 recovery page's procedure, its narration and
  its sh fragments (the renderers' side).

What the rest of qrecover.formats uses of it is named here.
"""

from __future__ import annotations

from qrecover.formats.v2.format import (
    KEYS,
    PAGE,
    RECOGNISED,
    VERSION,
    BackupHeaderV2,
    Format2,
    header_model,
)

__all__ = [
    "KEYS",
    "PAGE",
    "RECOGNISED",
    "VERSION",
    "BackupHeaderV2",
    "Format2",
    "header_model",
]
