"""Format 4 (Qubes R4): every chunk encrypted and authenticated by scrypt on its own.

The package's modules, each what it holds:

- ``format``: the header model, the header's authentication, :class:`Format4`;
- ``chunks``: a chunk's key (``BACKUPID!NAME.NNN!``) and what becomes of it;
- ``works``: the chunks through the pool, handed back in chunk order;
- ``chunk_pool``: several ``scrypt dec`` at once, bounded, released in order;
- ``scrypt_cost``: what a chunk's key derivation costs, how many fit at once;
- ``scrypt_tool``: the installed ``scrypt``, its ``dec`` stage and shell form;
- ``head_start``: qubes.xml's key derivation started while the header's runs.

What the rest of qrecover.formats uses of it is named here.
"""

from __future__ import annotations

from qrecover.formats.v4.format import (
    MAX_HEADER_HMAC,
    PAGE,
    RECOGNISED,
    VERSION,
    BackupHeaderV4,
    Format4,
    claims,
    open_format,
)

__all__ = [
    "MAX_HEADER_HMAC",
    "PAGE",
    "RECOGNISED",
    "VERSION",
    "BackupHeaderV4",
    "Format4",
    "claims",
    "open_format",
]
