"""Tar headers of the outer archive, one 512-byte block at a time: their
fields, checksum and PAX records, strictly read; which members Qubes writes,
and in what order (qrecover.tarstream reads the stream with them)."""

from __future__ import annotations

import struct

from qrecover.errors import BackupError

BLOCK = 512
ZERO_BLOCK = bytes(BLOCK)
# Qubes cut every stored file into chunks of at most 100 MiB (FORMAT-NOTES);
# a member declaring far more would only fill the scratch folder (a small
# compressed input can expand to any size), so it is refused before any copy.
MAX_MEMBER = 256 * 1024 * 1024
REGULAR = (b"0", b"\0", b"7")
NOT_REGULAR = {
    b"1": "a hard link", b"2": "a symbolic link", b"3": "a character device",
    b"4": "a block device", b"6": "a FIFO", b"S": "a GNU sparse file",
    b"M": "the continuation of a multi-volume archive", b"V": "a volume label",
}


def number(field: bytes) -> int:
    """A numeric header field: octal digits, or GNU's base-256 (top bit set)."""
    if field and field[0] & 0x80:
        if field[0] != 0x80:
            raise ValueError("negative or oversized base-256 number")
        return int.from_bytes(field[1:], "big")
    text = field.split(b"\0", 1)[0].strip(b" ")
    if not text:
        return 0
    if any(c not in b"01234567" for c in text):
        raise ValueError(f"not an octal number: {text[:12]!r}")
    return int(text, 8)


def text(field: bytes) -> str:
    return field.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")


def checksum_ok(block: bytes) -> bool:
    """Is this 512-byte block a tar header (its checksum, signed or unsigned)?"""
    if block[257:262] != b"ustar":  # first: cheap, when stepping over damage block by block
        return False
    try:
        stored = number(block[148:156])
    except ValueError:
        return False
    if not block[148:156].strip(b"\0 "):
        return False
    unsigned = sum(block) - sum(block[148:156]) + 8 * 32
    signed = sum(struct.unpack("512b", block)) - sum(struct.unpack("8b", block[148:156])) + 8 * 32
    return stored in (unsigned, signed) and block[257:262] == b"ustar"


def parse_pax(data: bytes) -> dict[str, str]:
    """PAX records, ``LEN key=value\\n``; strict: a bad record is damage."""
    records: dict[str, str] = {}
    pos = 0
    while pos < len(data):
        space = data.find(b" ", pos, pos + 20)
        if space < 0 or not data[pos:space].isdigit():
            raise ValueError("malformed PAX record")
        length = int(data[pos:space])
        record = data[space + 1 : pos + length]
        if length <= space - pos or pos + length > len(data) or not record.endswith(b"\n"):
            raise ValueError("malformed PAX record")
        key, eq, value = record[:-1].partition(b"=")
        if not eq:
            raise ValueError("PAX record without '='")
        records[key.decode("utf-8", "surrogateescape")] = value.decode("utf-8", "surrogateescape")
        pos += length
    return records


def quoted(name: str) -> str:
    return repr(name.encode("ascii", "backslashreplace").decode()[:120])


def follows(prev: str, name: str) -> bool:
    """Can member ``name`` come right after ``prev`` in a backup Qubes wrote?
    The header, its .hmac, then each stored file's chunks in order, each
    format-3 chunk followed by its .hmac.  Unknown shapes are not judged here
    (the engine refuses them with their own message)."""
    from qrecover.container import HEADER, HEADER_HMAC, QUBES_XML, parse_member_name

    if prev == HEADER:
        return name == HEADER_HMAC
    try:
        before, after = parse_member_name(prev), parse_member_name(name)
    except BackupError:
        return True
    if after is None:
        return False
    if prev == HEADER_HMAC:
        return after.stored == QUBES_XML and after.index == 0 and not after.is_hmac
    if before is None:
        return True
    if not before.is_hmac and not before.is_enc:
        return after.is_hmac and (after.stored, after.index) == (before.stored, before.index)
    nxt = (after.stored, after.index) == (before.stored, before.index + 1)
    return not after.is_hmac and after.is_enc == before.is_enc and (nxt or after.index == 0)


class Damaged(Exception):
    """Damage where a member header should be (see TarReader._damaged)."""

    def __init__(self, what: str, error: BackupError, fatal: bool) -> None:
        super().__init__(what)
        self.what = what
        self.error = error
        self.fatal = fatal


def refusal(name: str) -> str | None:
    """Why no Qubes backup holds a member of this name, if none does."""
    from qrecover.container import parse_member_name

    try:
        parse_member_name(name)
    except BackupError as exc:
        return exc.message
    return None


def qubes_member(name: str, kind: bytes, size: int) -> bool:
    """A member Qubes could have written: a regular file of at most 100 MiB
    with the name of a header, a chunk or an .hmac."""
    return kind in REGULAR and 0 <= size <= MAX_MEMBER and refusal(name) is None


def check_boundary(pieces: list[str], index: int, count: int, last: str, name: str,
                   crossed: bool) -> None:
    """Pieces of a split backup: does the member after a piece boundary (in
    piece ``index``) follow the one before it, in the order Qubes wrote them?"""
    from qrecover.container import HEADER, QUBES_XML

    # R2-Beta3 wrote no header: its backups start with qubes.xml.000
    if count == 0 and name not in (HEADER, f"{QUBES_XML}.000"):
        raise BackupError(
            f"the first piece, {pieces[0]}, does not start the backup: its first "
            f"member is {quoted(name)}, not {HEADER} (pieces out of order?)"
        )
    if crossed and not follows(last, name):
        raise BackupError(
            f"piece {pieces[index]} does not continue piece {pieces[index - 1]}: "
            f"the member before the boundary is {quoted(last)}, the one after it "
            f"{quoted(name)} (pieces out of order, or one missing?)"
        )
