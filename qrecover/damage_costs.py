"""What each damaged range cost: the chunks lost in it or failed by it.

The engine tells :class:`Costs` where every chunk it read lies (a range of
the stream, or its chunk file in a folder), and which chunks failed or never
came; each is charged to the damaged range it lies in or borders
(qrecover.damage), or, where no range is known (a flipped bit inside a
chunk), to a new range: the chunk itself.
"""

from __future__ import annotations

from collections.abc import Callable

from qrecover.archive.container import StreamSource
from qrecover.archive.members import ChunkName, Member, Members, Unreadable
from qrecover.damage import Damage, DamageLog
from qrecover.errors import StoredFileError
from qrecover.formats.base import Format
from qrecover.report import Report


class Costs:
    """Charges chunks to the damaged ranges of one pass."""

    def __init__(self, log: DamageLog, label: str, where: Callable[[int], str] | None,
                 position: Callable[[], int] = lambda: 0) -> None:
        self.log = log
        self.label = label  # the backup's, for ranges of its stream
        self.where = where  # how the reader names a place of the stream (None: a folder)
        self.position = position  # how far the stream has been read
        self.spans: dict[str, tuple[str, int, int | None]] = {}

    @classmethod
    def of(cls, source: object) -> Costs:
        """For BACKUP as opened: a stream (its reader's ranges), or a folder."""
        if isinstance(source, StreamSource):
            return cls(source.damage, source.label, source.input.where, lambda: source.position)
        return cls(getattr(source, "damage", None) or DamageLog(),
                   getattr(source, "label", "the backup"), None)

    def unreadable(self, member: Member, stored: str, error: Unreadable) -> StoredFileError:
        """A chunk file of a folder that cannot be read: a range of its own."""
        assert member.path is not None
        self.log.add(str(member.path), 0, member.size, "cannot be read").charge(member.name,
                                                                                 stored)
        return StoredFileError(error.message)

    def span(self, member: Member, last: Member | None) -> None:
        """Where a chunk (with its .hmac, ``last``) lies: a range of the stream, or its file."""
        if member.path is not None:
            self.spans[member.name] = (str(member.path), 0, member.size)
        elif member.at is not None:
            end = last.data_end if last is not None and last.data_end is not None else None
            if end is not None:
                end += -end % 512  # its padding: damage may begin right after it
            self.spans[member.name] = (self.label, member.at, end)

    def cut(self, member: Member, stored: str, what: str) -> None:
        """The stream ends inside this chunk: from it to the end is damage."""
        if member.at is not None:
            self.spans[member.name] = (self.label, member.at, None)
            self.charge(member.name, stored, what)

    def charge(self, chunk: str, stored: str, what: str) -> None:
        """A chunk failed (its check, its .hmac, its end): charged to the damaged
        range it lies in, or, where none is known, to itself as a new one."""
        span = self.spans.get(chunk)
        if span is None:
            return
        label, start, end = span
        found = self.log.at(label, start, end)
        if found is None:
            where = self.where(start) if self.where is not None and label == self.label else ""
            what = what if what.startswith(chunk) else f"{chunk}: {what}"
            found = self.log.add(label, start, end, what, where)
        found.charge(chunk, stored)

    @staticmethod
    def lost_before(damage: Damage, name: ChunkName, stored: str, expected: int) -> None:
        """The first member after a damaged range: the chunks of its stored file
        before it that never came were lost there."""
        first = expected if name.stored == stored else 0
        for index in range(first, name.index):
            damage.charge(ChunkName(name.stored, index, is_enc=name.is_enc).name, name.stored)
        if name.is_hmac:
            damage.charge(name.data_name, name.stored)

    def broken(self, members: Members, problems: list[str]) -> Damage | None:
        """The stream broke (truncated, a decompressor failed): the rest is one
        damaged range, reported with the others (a folder: a problem)."""
        assert members.error is not None
        if self.where is None or members.error_at is None:
            if str(members.error) not in problems:
                problems.append(str(members.error))
            return None
        at = members.error_at
        return self.log.add(self.label, at, None, members.error.message, self.where(at))

    def tail_lost(self, members: Members, stored: str, expected: int, fmt: Format,
                  report: Report) -> None:
        """A stored file that failed, and after whose last chunk came damage (or the
        stream's end): its next chunks (if it had more) may have been lost there."""
        after = members.peek()
        damage = after.after_damage if after is not None else None
        if damage is None and members.error is not None:
            damage = self.broken(members, report.problems)
        if damage is None:
            return
        enc = fmt.owns_chunk(ChunkName(stored, 0, is_enc=True))  # format 4's NAME.NNN.enc
        chunk = ChunkName(stored, expected, is_enc=enc).name
        if chunk in damage.chunks:  # cut short in it: the ones after it are gone too
            damage.charge(f"any chunk after {chunk}", stored)
        else:
            damage.charge(f"{chunk} and any after it (if it had more)", stored)
