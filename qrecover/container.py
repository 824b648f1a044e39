"""The outer archive: a concatenation of small tar archives, read in one pass.

Qubes appended each chunk and each ``.hmac`` to the backup as its own
``tar -cO --posix`` archive, so the file holds many end-of-archive markers
(the recovery page's ``tar -i``).  qrecover reads it as a stream, never
seeking, so a backup can come from a pipe (``ssh host cat backup |``).  A
folder that a person already untarred by hand (the page's step 1) is read in
the same order.

Member names come from the backup and are checked before any use: relative,
ASCII, no ``..``, and only the shapes Qubes wrote.
"""

from __future__ import annotations

import os
import re
import stat
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from qrecover.damage import Damage, DamageLog
from qrecover.errors import BackupError
from qrecover.sources import ByteInput, open_input
from qrecover.tarstream import MAX_MEMBER, TarReader

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


class StreamSource:
    """Members of a (possibly concatenated) tar stream: a file, pieces, a pipe."""

    def __init__(self, data: ByteInput) -> None:
        self.input = data
        self.label = data.label
        # What the pass will read, for the progress display: the file's or the
        # pieces' sizes; None for a pipe or what a decompressor writes.
        sizes = [piece.size for piece in data.pieces]
        self.size = None if data.via or None in sizes else sum(s or 0 for s in sizes)
        self.damage = data.damage  # the ranges stepped over (qrecover.damage)

    @property
    def position(self) -> int:
        """How far the stream has been read."""
        return self.input.position

    def members(self) -> Iterator[Member]:
        try:
            yield from TarReader(self.input).members()
        finally:
            self.input.close()


def _chunk_sort_key(name: str) -> tuple[int, str, int, int]:
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


class FolderSource:
    """A backup a person already untarred (``tar -i -xf backup`` into a folder)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.label = str(root)
        self.damage = DamageLog()  # chunk files that cannot be read, or fail their check

    def members(self) -> Iterator[Member]:
        names: list[str] = []
        for dirpath, dirnames, filenames in os.walk(self.root):
            dirnames.sort()
            rel_dir = os.path.relpath(dirpath, self.root)
            for filename in filenames:
                rel = filename if rel_dir == "." else f"{rel_dir}/{filename}"
                names.append(rel)
        beta3 = {f"{QUBES_XML}.000", f"{QUBES_XML}.000.hmac"} <= set(names)  # R2-Beta3: none
        if HEADER not in names and not beta3:
            raise BackupError(
                f"{self.root}: no backup-header in this folder (is it an untarred Qubes backup?)"
            )
        for name in sorted(names, key=_chunk_sort_key):
            path = self.root / name
            st = path.lstat()
            if not stat.S_ISREG(st.st_mode):
                raise BackupError(f"{path}: not a regular file")
            if st.st_size > MAX_MEMBER:  # as for a tar member: scratch stays bounded
                raise BackupError(f"{path}: {st.st_size} bytes, more than any chunk Qubes "
                                  "writes (100 MiB)")
            yield Member(name, st.st_size, path=path)


def open_source(backups: str | Sequence[str]) -> StreamSource | FolderSource:
    """BACKUP as given on the command line: a file, ``-`` for stdin, a folder,
    or the pieces of a split backup in order."""
    if isinstance(backups, str):
        backups = [backups]
    if len(backups) == 1 and backups[0] != "-" and Path(backups[0]).is_dir():
        return FolderSource(Path(backups[0]))
    return StreamSource(open_input(backups))
