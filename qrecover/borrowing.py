"""The chunks of a stored file as their check completes: fed in chunk order, or,
where BACKUP lost one (``--other-copy``), taken from a copy and fed in its
place; and what was damaged, recorded for the report.

:class:`Borrowing` is asked by the engine (qrecover.engine) where a chunk of
BACKUP is missing (a gap in the numbering, an ``.hmac`` alone, the stream
broken off), unreadable, or fails its check; it asks the copies
(qrecover.fallback) and feeds what one of them gives, in the chunk's place
in the order.  Without copies it only records the damage, which ``verify``
tells (qrecover.damage_report).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from qrecover.archive.members import QUBES_XML, ChunkName, Member, Truncated, parse_member_name
from qrecover.context import RunContext
from qrecover.errors import BackupError, OutputError, StoredFileError
from qrecover.events import ChunkBorrowed, ChunkChecked
from qrecover.fallback import ChunkDamage, Copies, chunk_name
from qrecover.formats.base import ChunkOutcome, ChunkStore, Completed, Format, MemberStream
from qrecover.inventory import Entity, Inventory
from qrecover.report import Report
from qrecover.stored import StoredFile


def feed(job: StoredFile, store: ChunkStore, member: str, outcome: ChunkOutcome) -> None:
    """A good chunk's plaintext into its stored file's pipeline."""
    assert outcome.plain is not None
    try:
        job.feed(outcome.plain, outcome.owned, member, outcome.feeder,
                 outcome.unverified)  # --salvage: used although it failed its check
    except OSError as exc:
        store.drop(outcome.plain, outcome.owned)
        job.fail(StoredFileError(f"{member}: could not start the pipeline ({exc})"))


class Borrowing:
    """The run's other copies, as the engine uses them, and the damage it met."""

    def __init__(self, copies: Copies, report: Report, ctx: RunContext,
                 xml_macs: list[str], verify: bool) -> None:
        self.copies = copies
        self.report = report
        self.ctx = ctx
        self.xml_macs = xml_macs  # the run's qubes.xml HMACs (its identity), appended to
        self.own_xml: dict[int, str] = {}  # ... those of BACKUP's own chunks, by index
        self.verify = verify  # tell every damaged chunk, not only the first
        self.fmt: Format | None = None

    def __bool__(self) -> bool:
        return bool(self.copies)

    def use(self, job: StoredFile, store: ChunkStore, done: list[Completed],
            charge: Callable[[str, str], None]) -> None:
        """Feed ``job`` the chunks whose step is done, in chunk order; one that
        failed is taken from another copy, else it stops ``job`` (nothing after it
        is used)."""
        for chunk in done:
            outcome = chunk.outcome
            if job.result.error is not None:  # stopped at an earlier chunk: unused
                if outcome.plain is not None:
                    store.drop(outcome.plain, outcome.owned)
                elif outcome.error is not None and self.verify:
                    self.record(job.stored, chunk.member, outcome.reason or outcome.error.message)
                continue
            bad = outcome.error
            if outcome.unverified is not None or (
                    bad is not None and not isinstance(bad, OutputError)):
                # another copy's good chunk first; --salvage's unverified one only if none
                name = parse_member_name(chunk.member)
                problem = outcome.reason or (bad.message if bad is not None
                                             else outcome.unverified or "")
                if name is not None and self.borrow(job, store, name, problem, chunk.size):
                    if outcome.plain is not None:
                        store.drop(outcome.plain, outcome.owned)
                    continue
            if outcome.checked and outcome.unverified is None:  # else: ChunkSalvaged, when fed
                self.ctx.emit(ChunkChecked(chunk.member, chunk.size, outcome.reason))
            if job.stored == QUBES_XML and outcome.mac:
                self.xml_macs.append(outcome.mac)
                if (name := parse_member_name(chunk.member)) is not None:
                    self.own_xml[name.index] = outcome.mac
            if outcome.error is not None:
                if isinstance(outcome.error, StoredFileError):  # to the damage it lay in
                    charge(chunk.member, outcome.reason or "failed its check")
                if self.copies and not isinstance(outcome.error, OutputError):
                    job.fail(StoredFileError(f"{outcome.error.message}; no other copy has it "
                                             "good either"))
                job.fail(outcome.error)
                continue
            feed(job, store, chunk.member, outcome)

    def record(self, stored: str, member: str, problem: str) -> None:
        self.report.chunk_damage.append(ChunkDamage(stored, member, problem))

    def check_only(self, store: ChunkStore, member: Member, name: ChunkName,
                   members: MemberStream) -> None:
        """verify, after a stored file failed: check its later chunks all the same
        (nothing of them is used), so that the report names every damaged one."""
        fmt = self.fmt
        assert fmt is not None
        if not fmt.owns_chunk(name) or name.is_hmac:
            return
        try:
            outcome = fmt.read_chunk(store, member, name, members).complete()
        except Truncated as exc:
            self.record(name.stored, member.name, exc.message)
            raise
        if outcome.plain is not None:
            store.drop(outcome.plain, outcome.owned)
        if outcome.error is not None:
            self.record(name.stored, member.name, outcome.reason or outcome.error.message)

    def fill(self, job: StoredFile, store: ChunkStore, start: int, stop: int,
             problem: str) -> bool:
        """Chunks ``start`` to ``stop - 1``, missing in BACKUP, from the other copies."""
        assert self.fmt is not None
        for index in range(start, stop):
            name = chunk_name(self.fmt, job.stored, index)
            if not self.borrow(job, store, name, problem, None):
                return False
        return True

    def fill_tail(self, job: StoredFile, store: ChunkStore, expected: int) -> None:
        """Chunks after the last BACKUP holds of the stored file, if a copy holds them."""
        assert self.fmt is not None
        while self.copies and job.result.error is None:
            name = chunk_name(self.fmt, job.stored, expected)
            if not self.copies.holds(name):
                return
            if not self.borrow(job, store, name, f"{name.name}: missing from the backup", None):
                job.fail(StoredFileError(f"{name.name}: missing from the backup, and no other "
                                         "copy has it good"))
                return
            expected += 1

    def borrow(self, job: StoredFile, store: ChunkStore, name: ChunkName, problem: str,
               counted: int | None) -> bool:
        """Take chunk ``name`` from the first other copy where it authenticates and
        feed it; False (and the damage recorded) when none does.  ``counted``: the
        size of BACKUP's bad chunk, already counted in the stored file's figures."""
        assert self.fmt is not None
        damage = ChunkDamage(job.stored, name.name, problem)
        self.report.chunk_damage.append(damage)
        if not self.copies:
            return False
        figures = job.result.chunks, job.result.stored_bytes  # copies tried count no chunk
        got = self.copies.fetch(self.fmt, store, name)
        job.result.chunks, job.result.stored_bytes = figures
        damage.tried = got.tried
        outcome = got.outcome
        if outcome is None or got.copy is None:
            return False
        if outcome.error is not None:  # the output side failed (a full disk)
            job.fail(outcome.error)
            return True
        damage.copy = got.copy.label
        job.result.chunks += 0 if counted is not None else 1  # BACKUP's bad one was counted
        job.result.stored_bytes += got.size - (counted or 0)
        self.ctx.emit(ChunkBorrowed(name.name, got.size, got.copy.label, got.command, problem))
        if job.stored == QUBES_XML and outcome.mac:
            self.xml_macs.append(outcome.mac)
        feed(job, store, name.name, outcome)
        return True

    def rest(self, seen: Iterable[str], inventory: Inventory, chosen: set[str],
             broke: BackupError | None, one_file: Callable[[str, Entity], None]) -> None:
        """The selected stored files BACKUP never reached (it broke off, or lost
        them whole), from the other copies (``one_file``); each chunk authenticated
        as ever.  Where BACKUP broke off is a note if a copy was read whole."""
        fmt = self.fmt
        assert fmt is not None
        done = set(seen)
        taken = 0
        for stored in self.copies.stored_names():
            owner = inventory.owner(stored)
            if stored in done or owner is None or owner.backup_path not in chosen:
                continue
            if self.copies.holds(chunk_name(fmt, stored, 0)):
                taken += 1
                one_file(stored, owner)
        if broke is not None and not self.copies.whole():
            self.report.problems.append(
                f"{broke}; no other copy was read whole, without damage, so what BACKUP held "
                "after it may not all have been found"
            )
        elif broke is not None:
            # Said, not a failure: a copy read whole gave what BACKUP held after it.
            self.report.notes.append(
                f"{broke}; what BACKUP held after it was looked for in the other copies "
                f"({taken} stored file(s) taken whole from them)"
            )
