"""The outer archive's members: the names Qubes wrote, in their order, and
the members themselves, one at a time, with one of look-ahead.

Member names come from the backup and are checked before any use: relative,
ASCII, no ``..``, and only the shapes Qubes wrote (:func:`parse_member_name`),
in the order it wrote them (:func:`follows`).  A chunk's ``.hmac`` (format 3)
is the member after it, and a stored file ends where the next member belongs
to another: the engine and the formats peek at the next member before taking
it (:class:`Members`).  A broken stream ends the members and is remembered,
so that what was read before it is still reported.  :func:`misplaced` says
why a member cannot be a stored file's next chunk.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING

from qrecover import signals
from qrecover.errors import BackupError, StoredFileError

if TYPE_CHECKING:
    from qrecover.damage import Damage
    from qrecover.formats.base import Format

HEADER = "backup-header"
HEADER_HMAC = "backup-header.hmac"
QUBES_XML = "qubes.xml"
# Reads of member data: what the engine copies and HMACs at a time.
READ_SIZE = 64 * 1024
MAX_NAME = 512

# One path component of a stored name: what Qubes' file and VM names look like.
_COMPONENT = re.compile(r"^[A-Za-z0-9_+-][A-Za-z0-9_.+-]*$")
# NAME.NNN or NAME.NNN.hmac (format 3), NAME.NNN.enc (format 4); "%03d"
# numbering, so chunk 1000 is NAME.1000.  Which shapes a backup may hold
# depends on its format: the engine refuses the other format's shapes.
_CHUNK = re.compile(r"^(?P<stored>.+)\.(?P<index>[0-9]{3,})(?:(?P<hmac>\.hmac)|(?P<enc>\.enc))?$")


@dataclass(frozen=True, order=True)
class ChunkName:
    """``vm7/private.img.012`` parsed: stored file, index, whether it is the .hmac
    (format 3) or a scrypt-encrypted ``.enc`` chunk (format 4)."""

    stored: str
    index: int
    is_hmac: bool = False
    is_enc: bool = False

    @property
    def name(self) -> str:
        suffix = ".hmac" if self.is_hmac else ".enc" if self.is_enc else ""
        return f"{self.stored}.{self.index:03d}{suffix}"

    @property
    def data_name(self) -> str:
        return f"{self.stored}.{self.index:03d}"


def validate_stored_name(stored: str) -> None:
    """A stored file's name, e.g. ``vm7/private.img``, ``vm3/.``, ``dom0-home/user``."""
    parts = stored.split("/")
    if not 1 <= len(parts) <= 3:
        raise ValueError("unexpected depth")
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        # A template's whole directory is stored under the name ".".
        if last and part == "." and len(parts) > 1:
            continue
        if part in ("", ".", "..") or not _COMPONENT.match(part):
            raise ValueError(f"bad path component {part!r}")


def parse_member_name(name: str) -> ChunkName | None:
    """Parse and validate an outer member name.

    Returns None for the two header members; raises BackupError for anything
    that is not a shape Qubes wrote (absolute paths, ``..``, control
    characters, non-ASCII, non-canonical chunk numbers).
    """
    shown = name.encode("ascii", "backslashreplace").decode("ascii")
    if len(name) > MAX_NAME or not name.isascii() or not name.isprintable():
        raise BackupError(f"outer archive: refusing member name {shown[:120]!r}")
    if name in (HEADER, HEADER_HMAC):
        return None
    if name.startswith("/"):
        raise BackupError(f"outer archive: refusing member {shown!r}: absolute path")
    match = _CHUNK.match(name)
    if match is None or name.startswith("/"):
        raise BackupError(f"outer archive: unexpected member {shown!r} (not a Qubes chunk name)")
    digits = match.group("index")
    index = int(digits)
    if digits != f"{index:03d}":
        raise BackupError(f"outer archive: non-canonical chunk number in {shown!r}")
    stored = match.group("stored")
    try:
        validate_stored_name(stored)
    except ValueError as exc:
        raise BackupError(f"outer archive: refusing member {shown!r}: {exc}") from None
    return ChunkName(stored, index, match.group("hmac") is not None, match.group("enc") is not None)


class Truncated(BackupError):
    """The backup ends (or its stream breaks) inside a member."""


class Unreadable(BackupError):
    """A chunk file of a folder cannot be read: that chunk is lost, the others go on."""


@dataclass
class Member:
    """One file of the backup, readable once, in order."""

    name: str
    size: int
    stream: IO[bytes] | None = None  # for a member of a stream
    path: Path | None = None  # for a file of an untarred folder
    at: int | None = None  # where its first tar header starts in the stream
    data_end: int | None = None  # where its data ends in the stream
    after_damage: Damage | None = None  # the first member after a damaged range

    def open(self) -> IO[bytes]:
        if self.stream is not None:
            return self.stream
        assert self.path is not None
        try:
            return self.path.open("rb")
        except OSError as exc:
            raise Unreadable(f"{self.path}: cannot open ({exc.strerror})") from None

    def read_all(self, limit: int) -> bytes:
        """The whole member, refused when larger than ``limit``."""
        if self.size > limit:
            raise BackupError(f"{self.name}: {self.size} bytes, more than the {limit} allowed")
        try:
            with self.open() as f:
                data = f.read(limit + 1)
        except OSError as exc:
            if self.path is not None:
                raise Unreadable(f"{self.path}: cannot read ({exc.strerror})") from None
            raise Truncated(f"{self.name}: the backup ends inside this member "
                            f"(truncated backup): {exc}") from None
        except EOFError as exc:
            raise Truncated(f"{self.name}: the backup ends inside this member "
                            f"(truncated backup): {exc}") from None
        if len(data) != self.size:
            raise Truncated(f"{self.name}: truncated ({len(data)} of {self.size} bytes)")
        return data


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


def written_order(name: str) -> tuple[int, str, int, int]:
    """Where Qubes wrote member ``name``: the sort key of a folder untarred by hand."""
    if name == HEADER:
        return (0, "", 0, 0)
    if name == HEADER_HMAC:
        return (0, "", 0, 1)
    match = _CHUNK.match(name)
    if match is None:
        return (3, name, 0, 0)
    stored = match.group("stored")
    # qubes.xml first, then stored files by name; chunks in numeric order,
    # each followed by its .hmac (so .999 then .1000, never the glob's order).
    rank = 1 if stored == QUBES_XML else 2
    return (rank, stored, int(match.group("index")), 1 if match.group("hmac") else 0)


def quoted(name: str) -> str:
    return repr(name.encode("ascii", "backslashreplace").decode()[:120])


def follows(prev: str, name: str) -> bool:
    """Can member ``name`` come right after ``prev`` in a backup Qubes wrote?
    The header, its .hmac, then each stored file's chunks in order, each
    format-3 chunk followed by its .hmac.  Unknown shapes are not judged here
    (the engine refuses them with their own message)."""
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


def refusal(name: str) -> str | None:
    """Why no Qubes backup holds a member of this name, if none does."""
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


class Members:
    """Members one at a time; a broken stream ends it and is remembered."""

    def __init__(self, it: Iterator[Member], position: Callable[[], int] | None = None) -> None:
        self._it = it
        self._next: Member | None = None
        self._done = False
        self.error: BackupError | None = None
        self.last: Member | None = None  # the member taken last
        self._position = position  # how far the stream is read, for where it broke
        self.error_at: int | None = None

    def peek(self) -> Member | None:
        signals.check()  # each member is a place to stop at (qrecover.signals)
        if self._next is None and not self._done:
            try:
                self._next = next(self._it)
            except StopIteration:
                self._done = True
            except BackupError as exc:
                self.stop(exc)
        return self._next

    def take(self) -> Member | None:
        member = self.peek()
        self._next = None
        if member is not None:
            self.last = member
        return member

    def stop(self, error: BackupError) -> None:
        self._done = True
        self._next = None
        if self.error is None:
            self.error = error
            self.error_at = self._position() if self._position is not None else None

    def require(self, what: str) -> Member:
        member = self.peek()
        if member is None:
            if self.error is not None:
                raise self.error
            raise BackupError(f"{what} is missing: the backup ends before it")
        return member


def misplaced(
    fmt: Format, member: Member, name: ChunkName, stored: str, expected: int
) -> StoredFileError | None:
    """Why this member cannot be the next chunk of ``stored``, if it cannot."""
    if not fmt.owns_chunk(name):
        return StoredFileError(
            f"{member.name}: not a chunk name of a format-{fmt.version} backup "
            "(format 3 has NAME.NNN and NAME.NNN.hmac, format 4 NAME.NNN.enc)"
        )
    if name.is_hmac:
        return StoredFileError(
            f"{member.name}: an .hmac without its chunk (chunk {name.data_name} missing)"
        )
    if name.index != expected:
        want = ChunkName(stored, expected).name
        what = "duplicated or out of order" if name.index < expected else "missing"
        return StoredFileError(f"{want}: chunk {what} (found {member.name} instead)")
    return None
