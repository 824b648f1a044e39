"""A chunk BACKUP lost, taken from the first other copy where it authenticates.

The engine (qrecover.engine) asks :class:`Copies` for a chunk that is
missing, unreadable or fails its check in BACKUP.  Each copy is asked in the
order given: its chunk (and, formats 2 and 3, its ``.hmac``, from the same
copy) goes through the format's own ``read_chunk`` and per-chunk step,
exactly as a chunk of BACKUP does, so a copy can never make qrecover accept
a chunk it would have refused.  What was lost where, and where it came from,
is kept as :class:`ChunkDamage` for the report (``verify`` tells it before
anything is written).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from qrecover.archive.copies import OtherCopy, check_header
from qrecover.archive.members import ChunkName, Member
from qrecover.compat import removesuffix
from qrecover.errors import OutputError, QrecoverError
from qrecover.formats.base import ChunkOutcome, ChunkStore, Format
from qrecover.runner import CommandLog


@dataclass
class ChunkDamage:
    """One chunk BACKUP did not give good, and what became of it."""

    stored: str
    chunk: str  # the member name, vm1/private.img.003 (.enc)
    problem: str  # what was wrong with BACKUP's
    copy: str | None = None  # the other copy it was taken from; None: none had it good
    tried: list[str] = field(default_factory=list)  # what was wrong in the copies tried

    @property
    def said(self) -> str:
        """The problem without the chunk's name in front (it is said beside it)."""
        for name in (self.chunk, removesuffix(self.chunk, ".enc")):
            if self.problem.startswith(f"{name}: "):
                return self.problem[len(name) + 2:]
        return self.problem

    def as_json(self) -> dict[str, object]:
        return {"chunk": self.chunk, "problem": self.said, "taken_from": self.copy,
                "other_copies": list(self.tried)}


@dataclass
class Fetched:
    """A chunk a copy gave good (``outcome`` with a plaintext), or why none did."""

    outcome: ChunkOutcome | None
    copy: OtherCopy | None
    size: int
    command: str
    tried: list[str]


class _Next:
    """The members after a copy's chunk, for ``read_chunk``: only its ``.hmac``."""

    def __init__(self, member: Member | None) -> None:
        self._member = member

    def peek(self) -> Member | None:
        return self._member

    def take(self) -> Member | None:
        member, self._member = self._member, None
        return member


def chunk_name(fmt: Format, stored: str, index: int) -> ChunkName:
    """The data member of chunk ``index`` in this format (``.enc`` for format 4)."""
    enc = ChunkName(stored, index, is_enc=True)
    return enc if fmt.owns_chunk(enc) else ChunkName(stored, index)


class Copies:
    """The run's other copies, in the order given."""

    def __init__(self, copies: Sequence[OtherCopy], backup: str, log: CommandLog) -> None:
        self.copies = list(copies)
        self.backup = backup
        self.log = log

    def __bool__(self) -> bool:
        return bool(self.copies)

    def check_header(
        self, header: bytes, header_hmac: bytes, authenticates: Callable[[bytes, bytes], object]
    ) -> None:
        for copy in self.copies:
            check_header(copy, header, header_hmac, self.backup, authenticates)

    def check_xml(self, own: dict[int, str]) -> None:
        for copy in self.copies:
            copy.check_xml_macs(own, self.backup)

    def whole(self) -> bool:
        """Was a copy read without damage to its end (so what it lacks, BACKUP lacked)?"""
        return any(not copy.damage for copy in self.copies)

    def holds(self, name: ChunkName) -> bool:
        return any(copy.member(name.name) is not None for copy in self.copies)

    def stored_names(self) -> list[str]:
        names: dict[str, None] = {}
        for copy in self.copies:
            names.update(dict.fromkeys(copy.stored_names()))
        return list(names)

    def fetch(self, fmt: Format, store: ChunkStore, name: ChunkName) -> Fetched:
        """The chunk from the first copy where the format authenticates it."""
        tried: list[str] = []
        for copy in self.copies:
            member = copy.member(name.name)
            if member is None:
                tried.append(f"{copy.label}: missing")
                continue
            hmac = copy.member(name.name + ".hmac") if not name.is_enc else None
            names = [name.name] + ([hmac.name] if hmac is not None else [])
            command = copy.take_command(names)
            self.log(f"{command}  # --other-copy {copy.label}: {name.name} from there")
            try:
                outcome = fmt.read_chunk(store, member, name, _Next(hmac)).complete()
            except OutputError:
                raise
            except (QrecoverError, OSError, EOFError) as exc:
                tried.append(f"{copy.label}: unreadable ({exc})")
                continue
            if outcome.error is not None:
                if isinstance(outcome.error, OutputError):
                    return Fetched(outcome, copy, member.size, command, tried)
                tried.append(f"{copy.label}: {outcome.reason or outcome.error.message}")
                continue
            return Fetched(outcome, copy, member.size, command, tried)
        return Fetched(None, None, 0, "", tried)

    def close(self) -> None:
        for copy in self.copies:
            copy.close()
