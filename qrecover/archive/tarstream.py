"""The outer archive's tar headers, read from a forward-only stream.

Qubes appended every chunk as its own small ``tar -cO --posix`` archive, so
the stream is ustar/PAX headers, member data padded to 512 bytes, and runs
of zero blocks (each small archive's end) between them.  What does not
start that way is not a Qubes backup, and is named ("a zip archive") instead
of being read block by block as a damaged one.  Once members have been read,
a block that is neither a valid header nor zeros where a header must be is
damage: it is stepped over (as ``tar -i`` does), block by block, to the next
valid member header of a name Qubes writes, and the range stepped over is
recorded (qrecover.damage), once, with where it is.  Nothing is seeked: a
pipe is stepped through as it is read.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import TYPE_CHECKING

from qrecover.archive.members import (
    MAX_MEMBER,
    NOT_REGULAR,
    REGULAR,
    Member,
    check_boundary,
    qubes_member,
    quoted,
    refusal,
)
from qrecover.archive.tarheaders import (
    BLOCK,
    MAX_EXTENDED,
    ZERO_BLOCK,
    Extended,
    TarError,
    is_ustar,
    kind_of,
    pax_records,
    size_of,
    text,
)
from qrecover.errors import BackupError
from qrecover.magic import describe

log = logging.getLogger("qrecover")

if TYPE_CHECKING:
    from qrecover.archive.sources import ByteInput
    from qrecover.damage import Damage

# Qubes' writer padded each small archive to one tar record (10 KiB); far
# more zeros than that is a zero-filled file before anything (refused), or,
# after members, the end of the backup on a larger disk or partition (a raw
# copy): reading stops there, and what is missing is reported as missing.
# /dev/zero must not be read forever either way.
MAX_ZERO_RUN = 1024 * 1024
# Damage is stepped over (``tar -i``) to the next member header: in a file to
# its end, in a pipe for at most this much (a few chunks' worth), so that
# /dev/urandom or a disk's empty end is not read forever.
MAX_SKIP_STREAM = 512 * 1024 * 1024
# Before any member, damage is stepped over only inside the first tar record
# (10 KiB, backup-header's small archive), to that member: the PAX header
# Qubes' tar wrote before it may be damaged; what has no backup-header there
# is not a backup, and is named by its first block as before.
FIRST_RECORD = 10240
_FIRST = ("backup-header", "qubes.xml.000")  # R2-Beta3 wrote no header


class Damaged(Exception):
    """Damage where a member header should be (see TarReader._damaged)."""

    def __init__(self, what: str, error: BackupError, fatal: bool) -> None:
        super().__init__(what)
        self.what = what
        self.error = error
        self.fatal = fatal


class _MemberStream:
    """One member's data: exactly its size, then its padding is skipped."""

    def __init__(self, reader: TarReader, name: str, size: int) -> None:
        self.reader = reader
        self.name = name
        self.left = size

    def read(self, n: int = -1) -> bytes:
        if self.left <= 0:
            return b""
        # Like a file's read: all that was asked for, short only at the member's end.
        want = self.left if n < 0 else min(n, self.left)
        data = self.reader.input.read_exact(want)
        if len(data) < want:
            raise EOFError(self.reader.ended())
        self.left -= len(data)
        return data

    def __enter__(self) -> _MemberStream:
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def close(self) -> None:
        pass


class TarReader:
    """Members of the outer archive, one at a time; see the module docstring."""

    def __init__(self, data: ByteInput) -> None:
        self.input = data
        self.label = data.label
        self.skipping: int | None = None  # where the damage being stepped over began
        self.skip_what = ""
        self.zeros_only = True  # nothing but zero blocks in it so far
        self.after: Damage | None = None  # for the next member: the damage before it
        # A file is stepped over to its end; a pipe only so far (/dev/zero is endless).
        seekable = not data.via and all(p.size is not None for p in data.pieces)
        self.max_skip = 1 << 62 if seekable else MAX_SKIP_STREAM
        self.first_error: BackupError | None = None  # the first block was no tar header

    def ended(self) -> str:
        """Why the stream ended early, for a truncation message."""
        where = self.input.where(self.input.position)
        failed = self.input.failure(wait=True)  # its output ended: it has ended, or is ending
        if failed is not None:
            return f"{failed} at {where}"
        if len(self.input.pieces) > 1:
            last = self.input.pieces[-1].label
            return f"the last piece, {last}, ends there (is a piece missing?)"
        return f"it ends at {where}"

    def _damaged(self, offset: int, what: str, since_piece: bool) -> Damaged:
        """Damage where a member header should be.  Fatal (an error) when it
        says the pieces are out of order; otherwise stepped over, to the next
        member header (``tar -i``)."""
        where = self.input.where(offset)
        index = self.input.piece_at(offset)
        if since_piece and index > 0 and not self.input.via:
            piece, prev = self.input.pieces[index], self.input.pieces[index - 1]
            return Damaged(what, BackupError(
                f"piece {piece.label} does not continue piece {prev.label}: {what} at {where}, "
                "where a member should start (pieces out of order, or one missing?)"
            ), True)
        return Damaged(what, BackupError(
            f"{self.label}: outer archive damaged at {where}: {what}"), False)

    def _skip(self, count: int) -> None:
        """Skip ``count`` bytes of member data (what the engine did not read)."""
        while count > 0:
            data = self.input.read(min(count, 1024 * 1024))
            if not data:
                raise BackupError(f"{self.label}: the backup ends inside a member "
                                  f"(truncated backup): {self.ended()}")
            count -= len(data)

    def _extended(self, size: int, offset: int) -> bytes:
        if size > MAX_EXTENDED:
            raise self._damaged(offset, f"an extended header of {size} bytes", False)
        data = self.input.read_exact(size)
        if len(data) < size:
            raise BackupError(f"{self.label}: the backup ends inside an extended tar header "
                              f"(truncated backup): {self.ended()}")
        self._skip_padding(size)
        return data

    def _first_block(self, block: bytes, zeros: int = 0) -> BackupError:
        what = describe(block, "what follows" if zeros else "it")
        if zeros:
            what = f"it starts with {zeros} bytes of zeros; {what}"
        return BackupError(f"{self.label}: not a tar archive, so not a Qubes backup: {what}")

    def members(self) -> Iterator[Member]:
        count = 0
        zeros = 0
        ext = Extended()  # what the extended headers read so far say of their member
        piece = entry_piece = end_piece = self.input.piece_at(0)
        last = ""
        entry = entry_zeros = 0  # where the entry being read (its first header) starts
        resynced = False  # that entry was found by stepping over damage
        while True:
            offset = self.input.position
            block = self.input.read_exact(BLOCK)
            # a block whose last byte lies in another piece crosses the boundary too
            crossed = self.input.piece_at(offset + len(block) - 1) != piece
            if len(block) < BLOCK:
                if count > 0:
                    self._decompressor_failed(offset + len(block))
                if self.skipping is not None:
                    if count == 0:
                        raise self._not_a_backup()
                    self._ended_in_damage(offset + len(block))
                    return
                self.input.finish()  # a decompressor that failed says why the bytes ended
                if not ext.empty:
                    raise BackupError(f"{self.label}: the backup ends after an extended tar "
                                      f"header (truncated backup): {self.ended()}")
                if count == 0 and offset == 0 and not block:
                    raise BackupError(f"{self.label}: empty (0 bytes): not a Qubes backup")
                if count == 0 and not block.strip(b"\0"):
                    raise BackupError(f"{self.label}: zero-filled ({offset + len(block)} bytes "
                                      "of zeros): not a Qubes backup")
                if block.strip(b"\0"):
                    if count == 0:
                        raise self._first_block(block, offset)
                    raise BackupError(f"{self.label}: the backup ends inside a tar header "
                                      f"(truncated backup): {self.ended()}")
                return
            if self.skipping is not None:
                if count == 0 and offset >= FIRST_RECORD:
                    raise self._not_a_backup()
                if offset - self.skipping > self.max_skip:
                    self._ended_in_damage(None)
                    return
                if block == ZERO_BLOCK:
                    continue
                if not self._resumes_here(block, first=count == 0):
                    self.zeros_only = False
                    continue  # still inside the damage
                self._resumed(offset)
                resynced, zeros = True, 0
            if block == ZERO_BLOCK:
                zeros += BLOCK
                if zeros > MAX_ZERO_RUN:
                    where = self.input.where(offset + BLOCK - zeros)
                    if count == 0:
                        raise BackupError(f"{self.label}: zero-filled: more than "
                                          f"{MAX_ZERO_RUN} bytes of zeros at {where}")
                    # a copy on a larger disk ends in zeros; unreadable sectors
                    # ddrescue filled are zeros too: looked past, to a member or the end
                    self._step_over(offset + BLOCK - zeros, "", zeros_only=True)
                    zeros = 0
                continue
            zeros_before, zeros = zeros, 0
            if ext.empty:
                entry, entry_zeros = offset, zeros_before
            try:
                if not is_ustar(block):
                    if count == 0 and offset in (0, zeros_before):  # not a tar, or damaged
                        raise Damaged("a broken tar header", self._first_block(block, offset),
                                       False)
                    raise self._damaged(offset, "a broken tar header", crossed)
                piece = self.input.piece_at(offset + BLOCK - 1)
                if ext.empty:
                    entry_piece = piece  # where this entry's first header is
                kind = kind_of(block)
                try:
                    size = ext.size(block)
                except TarError as exc:
                    what = ("PAX header with a bad size" if "size" in ext.pax
                            else f"tar header with a bad size ({exc})")
                    raise self._damaged(offset, what, False) from None
                if kind in (b"x", b"g", b"L", b"K"):
                    data = self._extended(size, offset)
                    try:
                        if kind == b"g":
                            pax_records(data)  # read for its damage; it names no member
                        else:
                            ext.add(kind, data)
                    except TarError as exc:
                        raise self._damaged(offset, str(exc), False) from None
                    continue
                name = ext.name(block)
                if ext.sparse:
                    kind = b"S"
                ext = Extended()
                if resynced and (not qubes_member(name, kind, size)
                                 or (count == 0 and name not in _FIRST)):
                    raise self._damaged(offset, f"a tar header of {quoted(name)}", False)
            except Damaged as damage:
                if damage.fatal:
                    raise damage.error from None
                if count == 0:  # the first record: its PAX header damaged, or not a tar
                    self.first_error = self.first_error or damage.error
                    if offset >= FIRST_RECORD:
                        raise self._not_a_backup() from None
                ext = Extended()
                # from the end of the last member read: the zeros before the entry included
                self._step_over(entry - entry_zeros, damage.what)
                continue
            if size > MAX_MEMBER:
                raise BackupError(f"outer archive: member {quoted(name)} declares {size} bytes, "
                                  f"more than any chunk Qubes writes (100 MiB)")
            if kind == b"5":
                self._skip(size)
                self._skip_padding(size)
                continue
            if kind not in REGULAR:
                what = NOT_REGULAR.get(kind, f"of tar type {kind!r}")
                shown = name.encode("ascii", "backslashreplace").decode()[:120]
                raise BackupError(f"outer archive: member {shown!r} is not a regular file "
                                  f"(it is {what})")
            if count > 0 and (refused := refusal(name)) is not None:
                # a well-formed member with a name no Qubes backup holds (a damaged
                # PAX path, or planted): its bytes are stepped over, never used
                self._skip(size)
                self._skip_padding(size)
                self.after = self.input.damage.add(self.label, entry, self.input.position,
                                                   refused, self.input.where(entry))
                continue
            if len(self.input.pieces) > 1:
                self._check_boundary(count, last, name, entry_piece != end_piece)
            count += 1
            last = name
            after, self.after = self.after, None
            resynced = False
            stream = _MemberStream(self, name, size)
            yield Member(name, size, stream=stream, at=entry,  # type: ignore[arg-type]
                         data_end=self.input.position + size, after_damage=after)
            rest, stream.left = stream.left, 0
            self._skip(rest)
            self._skip_padding(size)
            end_piece = self.input.piece_at(self.input.position - 1)

    # -- stepping over damage ---------------------------------------------

    def _decompressor_failed(self, end: int) -> None:
        """A backup compressed as a whole whose decompressor failed: what it
        wrote was read (every chunk in it is authenticated on its own); the
        failure is damage from where its output ended (its damage is before
        that, in its input, where no offset of ours can name it)."""
        try:
            self.input.finish()
        except BackupError as exc:
            self.input.damage.add(self.label, end, None, f"{exc.message}; everything "
                                  f"{self.input.via} wrote before it was read",
                                  self.input.where(end))

    def _step_over(self, start: int, what: str, zeros_only: bool = False) -> None:
        """Begin stepping over bytes from ``start``: what is there is no member."""
        if self.skipping is None:
            self.skipping, self.skip_what = start, what
        elif what and not self.skip_what:
            self.skip_what = what
        self.zeros_only = zeros_only and self.zeros_only

    def _not_a_backup(self) -> BackupError:
        """What the first block said, when no backup-header followed it in the first record."""
        assert self.first_error is not None
        return self.first_error

    def _resumes_here(self, block: bytes, first: bool = False) -> bool:
        """Could a member start at this block?  A tar header (checksum, ustar)
        of a PAX record or of a regular file that Qubes could have written
        (``first``: the first member, backup-header); anything else inside
        damage is stepped over."""
        if not is_ustar(block):
            return False
        kind = kind_of(block)
        if kind in (b"x", b"L"):
            return True
        try:
            size = size_of(block)
        except TarError:
            return False
        name = text(block[0:100])
        return qubes_member(name, kind, size) and (not first or name in _FIRST)

    def _resumed(self, offset: int) -> None:
        """A member header again at ``offset``: the range before it is one damage."""
        assert self.skipping is not None
        start, self.skipping = self.skipping, None
        if self.zeros_only:
            what = f"{offset - start} bytes of zeros where members should be"
        else:
            what = self.skip_what or "no tar header"
        self.after = self.input.damage.add(
            self.label, start, offset, f"{what}; stepped over to the next member header",
            self.input.where(start),
        )
        self.zeros_only = True

    def _ended_in_damage(self, end: int | None) -> None:
        """The input ended (or, on a pipe, too much was stepped over) inside damage."""
        assert self.skipping is not None
        start, self.skipping = self.skipping, None
        if self.zeros_only:  # zeros to the end: where the backup ends (a larger disk)
            log.warning("note: %s: more than %d bytes of zeros at %s: taken as the end "
                        "of the backup (a copy on a larger disk?); nothing after them "
                        "is read", self.label, MAX_ZERO_RUN, self.input.where(start))
            return
        what = self.skip_what or "no tar header"
        if end is None:
            what += f"; no member header in the {self.max_skip} bytes after it: reading stopped"
        else:
            what += "; no member header after it"
        self.input.damage.add(self.label, start, end, what, self.input.where(start))
        self.input.finish()  # a decompressor that failed says why

    def _check_boundary(self, count: int, last: str, name: str, crossed: bool) -> None:
        index = self.input.piece_at(self.input.position - BLOCK)
        check_boundary([p.label for p in self.input.pieces], index, count, last, name, crossed)

    def _skip_padding(self, size: int) -> None:
        pad = -size % BLOCK
        if pad and len(self.input.read_exact(pad)) < pad:
            raise BackupError(f"{self.label}: the backup ends inside a member's padding "
                              f"(truncated backup): {self.ended()}")


__all__ = ["TarReader"]
