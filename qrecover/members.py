"""The outer archive's members, one at a time, with one of look-ahead.

A chunk's ``.hmac`` (format 3) is the member after it, and a stored file
ends where the next member belongs to another: the engine and the formats
peek at the next member before taking it.  A broken stream ends the members
and is remembered, so that what was read before it is still reported.
:func:`misplaced` says why a member cannot be a stored file's next chunk.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

from qrecover import signals
from qrecover.container import ChunkName, Member
from qrecover.errors import BackupError, StoredFileError

if TYPE_CHECKING:
    from qrecover.formats.base import Format


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
