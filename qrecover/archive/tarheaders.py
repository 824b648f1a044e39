"""Tar headers, one 512-byte block at a time: the one parser qrecover has.

Every tar archive qrecover reads goes through it: the outer archive
(qrecover.archive.tarstream, another copy's index in qrecover.archive.copies), the inner
archive the guard screens (qrecover.stages.guard, format 2's volumes), a
packed format-1 folder's first file.  It reads what GNU tar reads: ustar
fields, numbers in octal or base-256, the checksum summed signed or unsigned,
PAX records, GNU long names and links.  What a reader refuses, steps over or
passes on is that reader's own policy, not this module's.
"""

from __future__ import annotations

from dataclasses import dataclass, field

BLOCK = 512
ZERO_BLOCK = bytes(BLOCK)
MAX_EXTENDED = 1024 * 1024  # the data of a PAX or GNU long-name header
# The types of headers that describe the member after them: PAX (x, and
# Solaris' X), GNU long name (L) and long link (K).
EXTENDED = frozenset(b"xXLK")
_HIGH = bytes(range(128, 256))


class TarError(ValueError):
    """A header field that GNU tar would not read either."""


def number(field_: bytes) -> int:
    """A numeric field as GNU tar reads it: octal digits after any spaces, ended
    by the field's end, a NUL or a space; or base-256, a first byte of 0x80 for
    a number too large for octal, 0xFF for a negative one (two's complement)."""
    if field_ and field_[0] & 0x80:
        if field_[0] == 0x80:
            return int.from_bytes(field_[1:], "big")
        if field_[0] == 0xFF:
            return int.from_bytes(field_, "big", signed=True)
        raise TarError(f"not a base-256 number (first byte {field_[0]:#x})")
    digits = field_.lstrip(b" ")
    end = next((i for i, c in enumerate(digits) if c in b"\0 \t\n\v\f\r"), len(digits))
    if any(c not in b"01234567" for c in digits[:end]):
        raise TarError(f"not an octal number: {digits[:12]!r}")
    return int(digits[:end] or b"0", 8)


def size_of(block: bytes) -> int:
    """The header's size field (a PAX ``size`` record overrides it: :class:`Extended`)."""
    found = number(block[124:136])
    if found < 0:
        raise TarError("a negative size")
    return found


def text(field_: bytes) -> str:
    """A text field: up to its first NUL, undecodable bytes kept (surrogateescape)."""
    return field_.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")


def kind_of(block: bytes) -> bytes:
    """The type flag, one byte: ``b"0"`` a file, ``b"x"`` a PAX header, ..."""
    return block[156:157]


def checksum_ok(block: bytes) -> bool:
    """Does the block's checksum match, summed unsigned (POSIX) or signed (old
    tars, which GNU tar still reads)?  An empty checksum field never does."""
    stored = block[148:156]
    if not stored.strip(b"\0 "):
        return False
    try:
        expected = number(stored)
    except TarError:
        return False
    rest = block[:148] + b" " * 8 + block[156:]
    unsigned = sum(rest)
    high = len(rest) - len(rest.translate(None, _HIGH))
    return expected in (unsigned, unsigned - 256 * high)


def is_ustar(block: bytes) -> bool:
    """A POSIX ustar or GNU header (magic ``ustar``) whose checksum matches."""
    return block[257:262] == b"ustar" and checksum_ok(block)


def header_name(block: bytes) -> str:
    """The name the header itself holds: a POSIX ustar header's prefix joined to
    its name field (an old GNU header keeps other fields where the prefix is)."""
    name = text(block[0:100])
    prefix = text(block[345:500]) if block[257:263] == b"ustar\0" else ""
    return f"{prefix}/{name}" if prefix else name


def pax_records(data: bytes) -> dict[str, str]:
    """PAX records, ``LEN key=value\\n``, each as long as its length says."""
    records: dict[str, str] = {}
    pos = 0
    while pos < len(data):
        space = data.find(b" ", pos, pos + 20)
        if space < 0 or not data[pos:space].isdigit():
            raise TarError("malformed PAX record")
        length = int(data[pos:space])
        record = data[space + 1 : pos + length]
        if length <= space - pos or pos + length > len(data) or not record.endswith(b"\n"):
            raise TarError("malformed PAX record")
        key, eq, value = record[:-1].partition(b"=")
        if not eq:
            raise TarError("PAX record without '='")
        records[key.decode("utf-8", "surrogateescape")] = value.decode("utf-8", "surrogateescape")
        pos += length
    return records


@dataclass
class Extended:
    """What the extended headers before a member say about it: its PAX records,
    its GNU long name and long link target."""

    pax: dict[str, str] = field(default_factory=dict)
    long_name: str | None = None
    long_link: str | None = None

    @classmethod
    def of(cls, blobs: list[bytes]) -> Extended:
        """From extended headers kept whole: each its header block, then its data."""
        found = cls()
        for blob in blobs:
            found.add(kind_of(blob), blob[BLOCK : BLOCK + size_of(blob)])
        return found

    @property
    def empty(self) -> bool:
        return not self.pax and self.long_name is None and self.long_link is None

    def add(self, type_: bytes, data: bytes) -> None:
        """One extended header's data (a global ``g`` header describes no member)."""
        if type_ in (b"x", b"X"):
            self.pax.update(pax_records(data))
        elif type_ == b"L":
            self.long_name = text(data)
        elif type_ == b"K":
            self.long_link = text(data)

    def name(self, block: bytes) -> str:
        """The member's name: GNU tar takes a PAX sparse file's real name, then
        PAX ``path``, then a GNU long name, then the header's own."""
        for key in ("GNU.sparse.name", "path"):
            if key in self.pax:
                return self.pax[key]
        return self.long_name if self.long_name is not None else header_name(block)

    def linkname(self, block: bytes) -> str:
        if "linkpath" in self.pax:
            return self.pax["linkpath"]
        return self.long_link if self.long_link is not None else text(block[157:257])

    def size(self, block: bytes) -> int:
        """The member's size: a PAX ``size`` record, else the header's field."""
        if "size" not in self.pax:
            return size_of(block)
        if not (self.pax["size"].isascii() and self.pax["size"].isdigit()):
            raise TarError("a PAX size record that is not a number")
        return int(self.pax["size"])

    @property
    def sparse(self) -> bool:
        """A GNU sparse file stored in PAX form (its data is not the file's)."""
        return any(key.startswith("GNU.sparse") for key in self.pax)


def readable(name: str) -> str:
    """A name as the guard judges and shows it: bytes that are not UTF-8 as U+FFFD."""
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
