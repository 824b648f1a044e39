"""One streaming pass over a backup: authenticate, then run the plan.

The order is the recovery page's, done for every stored file in turn:

1. read ``backup-header`` and ``backup-header.hmac``; the format
   (qrecover.formats) authenticates the header before it is parsed;
2. read ``qubes.xml`` like any stored file, select the VMs, and make the
   plan (qrecover.plan): every stored file's stages, its place, its budget,
   and what would stop the run;
3. for each stored file, take its chunks in numeric order: the format reads
   each off the stream into private scratch and checks it (format 3: its
   HMAC; format 4: scrypt), and only then does ``cat`` feed it into the
   stored file's one pipeline (qrecover.stored).  The per-chunk step runs
   in the format's ``ChunkWorks`` (format 4: several ``scrypt dec`` at once,
   qrecover.formats.v4.works), whose outcomes come back strictly in chunk
   order; the engine asks it for room before it reads each chunk, so
   scratch stays bounded (two chunks for format 3, about ``2 * jobs + 2``
   for format 4).  The works' outcomes run on across stored files: while
   one stored file is fed, the chunks of the next ones are already read
   and checked (format 4: up to ``--jobs`` key derivations at once, however
   small the stored files).  A stored file is begun (its size budget set,
   its first chunk fed) only once every stored file before it finished, so
   what is fed, told and placed is in the backup's order whatever ``--jobs``.
4. a stored file that fails stops there: what its pipeline already wrote is
   kept only as ``NAME.partial``; the other stored files go on.

The engine knows nothing of versions; a dry run walks the same steps up to
the plan and starts nothing for the stored files.
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from qrecover import formats
from qrecover.archive.container import FolderSource, StreamSource
from qrecover.archive.members import (
    QUBES_XML,
    Members,
    Truncated,
    Unreadable,
    misplaced,
    parse_member_name,
)
from qrecover.borrowing import Borrowing
from qrecover.context import RunContext
from qrecover.damage_costs import Costs
from qrecover.dry_run import dry_findings
from qrecover.errors import (
    BackupError,
    OutputError,
    QrecoverError,
    StoredFileError,
    UsageError,
)
from qrecover.events import HeaderVerified, InventoryRead, Mode
from qrecover.fallback import Copies
from qrecover.finished import finished_before
from qrecover.formats.base import ChunkWorks, Completed, Format, Started
from qrecover.inventory import MAX_XML, Entity, Inventory
from qrecover.opening import check_programs, read_header
from qrecover.output import Output
from qrecover.plan import XML_SINK, Plan, obstacles
from qrecover.report import FileResult, Observer, Report, Request, missing
from qrecover.resume import Resume, identity
from qrecover.salvage import fill_gap, new_log, record
from qrecover.scratch import ChunkStore, ScratchNames
from qrecover.stages.extract import pick_programs
from qrecover.stored import StoredFile


@dataclass(eq=False)
class _Open:
    """A stored file whose chunks the engine read or is reading; some of them
    may still be in the works.  Only the first open one is fed."""

    job: StoredFile
    store: ChunkStore
    owner: Entity | None  # None: qubes.xml
    members: Members  # the stream it is read from (BACKUP's, or none: from the copies)
    expected: int = 0  # chunks that came in order
    read: bool = False  # every member of it taken off the stream
    tail: bool = True  # ask costs.tail_lost when it ends (the stream still as it left it)
    begun: bool = False  # its budget set and the observer told


class Recovery:
    """The whole procedure for one backup; ``run()`` returns a Report."""

    def __init__(
        self,
        source: StreamSource | FolderSource,
        passphrase: str,
        request: Request,
        ctx: RunContext | None = None,
        copies: Copies | None = None,
    ) -> None:
        self.ctx = ctx if ctx is not None else RunContext()
        # --other-copy: where a chunk BACKUP lost may be found (qrecover.fallback)
        self.copies = copies if copies is not None else Copies([], "", self.ctx.command)
        self.source = source
        self.passphrase = passphrase
        self.key = passphrase.encode("utf-8")
        self.request = request
        self.observer: Observer = self.ctx  # the pass's progress, as events of the run
        self.fmt: Format | None = None
        self.output: Output | None = None
        self.scratch: Path | None = None
        self.report = Report(output=request.output)
        self._seen: set[str] = set()
        self._spent: dict[str, int] = {}
        self._open: deque[_Open] = deque()  # read, not finished yet; the first is fed
        self._plan_now: Plan | None = None
        self.resume: Resume | None = None  # DIR's record (qrecover/resume.py)
        self.header_raw = b""  # backup-header and its .hmac: part of the backup's identity
        self.xml_macs: list[str] = []  # qubes.xml's chunk HMACs (format 3): likewise
        self.names: ScratchNames | None = None
        self.borrowing = Borrowing(
            self.copies, self.report, self.ctx, self.xml_macs, request.mode is Mode.VERIFY
        )
        self.report.healed_by_copies = bool(self.borrowing)
        self.works: ChunkWorks | None = None
        self._early: list[Started] = []  # begun with the header (format 4: qubes.xml's scrypt)
        # igzip or pigz, and bsdtar, when installed: faster than gzip -d, GNU tar
        self.gunzip, self.extractor = pick_programs()
        self.costs = Costs.of(source)  # damaged ranges, and what each cost
        self.report.damage = self.costs.log.ranges

    # -- the pass -----------------------------------------------------------

    def run(self) -> Report:
        request = self.request
        headerless = formats.detect(source=self.source)  # format 1: a folder, no header
        members = Members(headerless.members() if headerless else self.source.members(),
                          self.costs.position)
        try:
            self.fmt = fmt = headerless or self._read_header(members)
            if headerless is not None:
                self.ctx.emit(HeaderVerified(fmt))
                if self.copies:
                    raise UsageError("--other-copy: a format-1 backup authenticates nothing, "
                                     "so a good chunk cannot be told from a bad one")
            self.report.fmt = fmt
            check_programs(fmt, self.gunzip, self.extractor, self.ctx.command)
            writes = request.mode is Mode.RESTORE and not request.dry_run
            if writes:
                assert request.output is not None
                self.output = Output(request.output, request.force)
                self.output.prepare()
                self.scratch = Path(tempfile.mkdtemp(prefix=".qrecover-", dir=self.output.root))
            else:
                self.scratch = Path(tempfile.mkdtemp(prefix="qrecover-"))
            self.names = ScratchNames(self.scratch)
            log, jobs = self.ctx.command, request.jobs
            self.works = fmt.chunk_works(self.passphrase, self.scratch, log, jobs)
            # a failed chunk does not cancel the next ones: a copy may replace it, and
            # verify tells every damaged chunk
            self.works.keep_going = bool(self.copies) or request.mode is Mode.VERIFY
            self.borrowing.fmt = fmt
            xml = self._read_qubes_xml(members, self._plan(fmt, ()))
            self.copies.check_xml(self.borrowing.own_xml)  # formats 2 and 3: the same backup?
            inventory = formats.read_inventory(fmt, xml, self.report.problems)
            self.report.inventory = inventory
            selected = inventory.select(request.vms, request.exclude, request.skip_dom0_home)
            self.report.selected = selected
            self.ctx.emit(InventoryRead(inventory, selected))
            plan = self.report.plan = self._plan(fmt, selected)
            if request.mode.plans_only:
                return self.report
            if request.dry_run:  # what would run and what would stop it; nothing started
                found = dry_findings(plan, request.resume, fmt, self.header_raw, xml, self.xml_macs)
                self.report.stops, self.report.kept = found.stops, found.kept
                self.report.excused = found.excused
                return self.report
            if self.output is not None:
                if request.resume and finished_before(self.output, xml, plan.entities()):
                    self.report.nothing_left = True  # a restore of it into DIR finished
                    return self.report
                # DIR's restore record (--resume): the earlier run's own files are no obstacle
                ident = identity(fmt, self.header_raw, xml, self.xml_macs)
                self.resume = Resume.begin(
                    self.output, request.resume, ident, fmt.version, self.scratch, selected
                )
                self.resume.emit = self.ctx.emit
                stops = obstacles(plan, self.resume.excused, request.resume)
                if stops:
                    raise stops[0]
                self.resume.write_xml(xml)  # qubes.xml (unless resumed) and the record
            self._stream(members, inventory, plan)
            if self.resume is not None and self.report.ok:
                self.resume.finished()  # nothing left to resume
        except BaseException:
            for entry in self._open:
                entry.job.kill()
            raise
        finally:
            self._cleanup()
        return self.report

    def _plan(self, fmt: Format, selected: tuple[Entity, ...]) -> Plan:
        request = self.request
        return Plan(
            fmt=fmt,
            mode=request.mode,
            selected=selected,
            gunzip=self.gunzip,
            output=request.output,
            force=request.force,
            size_limit=request.size_limit,
            extractor=self.extractor,  # bsdtar or GNU tar
        )

    def _cleanup(self) -> None:
        if self.works is not None:
            self.works.close()  # its children stopped and its scratch gone first
            self.works = None
        for early in self._early:
            early.close()  # killed if still running, its private folder removed
        if self.scratch is not None:
            shutil.rmtree(self.scratch, ignore_errors=True)
            self.scratch = None
        if self.output is not None and self.output.created:
            with contextlib.suppress(OSError):
                self.output.root.rmdir()  # only if we made it and nothing landed
        if self.resume is not None:
            self.resume.release()  # DIR's lock, last: our scratch is gone by now

    def _read_header(self, members: Members) -> Format:
        label = getattr(self.source, "label", "the backup")
        fmt, self.header_raw = read_header(members, label, self.passphrase, self.ctx, self.copies,
                                           self.report.notes, self.request.jobs, self._early)
        return fmt

    def _job(self, plan: Plan, stored: str, owner: str, sink_staging: Entity | None) -> StoredFile:
        assert self.scratch is not None
        if sink_staging is None:
            sink = XML_SINK
        else:
            staging = None
            if plan.mode is Mode.RESTORE:
                assert self.names is not None
                staging = self.names.fresh("stage")
                staging.mkdir(mode=0o700)
            sink = plan.sink(sink_staging, stored, staging, self._spent.get(owner, 0))
        return StoredFile(
            stored=stored,
            owner=owner,
            sink=sink,
            stages=plan.stages(sink),
            ctx=self.ctx,
            passphrase=self.passphrase,
            scratch=self.scratch,
            output=self.output,
            placing=self.resume.placing if self.resume is not None else None,
            fmt=plan.fmt,
            salvage=new_log(self.request.salvage, plan.fmt, self.gunzip, stored, sink),
        )

    def _read_qubes_xml(self, members: Members, plan: Plan) -> bytes:
        try:
            first = members.require("qubes.xml.000")
            name = parse_member_name(first.name)
        except QrecoverError:
            if not self.copies:
                raise
            name = None
        if name is None or name.stored != QUBES_XML:
            if not self.copies:
                raise BackupError("qubes.xml.000 is missing after the header: cannot tell "
                                  "which VMs the backup holds")
            # BACKUP lost it: its chunks from the other copies (fill_tail), checked as ever
            self.report.notes.append("qubes.xml: missing from the backup; its chunks were "
                                     "looked for in the other copies")
            members_for_xml = Members(iter(()))
        else:
            members_for_xml = members
        job = self._job(plan, QUBES_XML, "", None)  # killed if the run stops
        self._plan_now = plan
        entry = self._opened(job, None, members_for_xml)
        self._consume(members_for_xml, entry)
        entry.read = True
        self._settle()
        result = job.result
        if members.error is not None and not (self.copies and result.ok):
            raise members.error
        if not result.ok:
            raise BackupError(f"qubes.xml: {result.error}")
        assert job.out_file is not None
        data = job.out_file.read(MAX_XML + 1)
        job.out_file.close()
        return data

    def _stream(self, members: Members, inventory: Inventory, plan: Plan) -> None:
        chosen = {e.backup_path for e in plan.selected}
        while True:
            member = members.peek()
            if member is None:
                break
            name = parse_member_name(member.name)
            if name is None:
                raise BackupError(f"{member.name}: appears again inside the backup")
            owner = inventory.owner(name.stored)
            if owner is None:
                self._settle()
                members.take()
                self.report.problems.append(
                    f"{member.name}: stored file not listed in qubes.xml; skipped"
                )
                continue
            if owner.backup_path not in chosen or not self.request.wants(name.stored, owner):
                members.take()  # the stream skips its bytes without reading them into us
                self.observer.data_read(name.stored, member.size)
                continue
            if self.resume is not None and self.resume.keeps(name.stored):  # placed earlier
                self._settle()  # the stored files before it end first
                kept = self.resume.read_through(members, name.stored, owner.name, self.observer)
                self.report.files.append(kept)
                continue
            self._one_file(plan, members, name.stored, owner)
        self._settle()
        if self.borrowing:  # stored files BACKUP lost whole, or after where it broke off
            self.borrowing.rest(self._seen, inventory, chosen, members.error,
                                lambda stored, owner: self._from_copies(plan, stored, owner))
        elif members.error is not None:
            self.costs.broken(members, self.report.problems)
        self.report.problems += missing(plan.selected, self.report.files, self.request.only)

    def _one_file(self, plan: Plan, members: Members, stored: str, owner: Entity) -> None:
        """Read ``stored``'s chunks into the works; it ends now, or (while its
        chunks are still checked) once a later stored file's first outcome comes."""
        self._plan_now = plan
        entry = self._opened(self._job(plan, stored, owner.name, owner), owner, members)
        entry.expected = self._consume(members, entry)
        entry.read = True
        after = members.peek()
        if self.borrowing or after is None or after.after_damage is not None or (
                members.error is not None):
            # --other-copy fills its tail from the copies; damage or the stream's end
            # after it is charged to it with the stream as it is now
            self._settle()
        else:
            entry.tail = False  # nothing lost after it: costs.tail_lost would not charge

    def _opened(self, job: StoredFile, owner: Entity | None, members: Members) -> _Open:
        assert self.names is not None
        store = ChunkStore(self.names, self.passphrase, self.ctx.command, self.observer, job)
        entry = _Open(job, store, owner, members)
        self._open.append(entry)
        self._begin()
        return entry

    def _begin(self) -> None:
        """The first open stored file is the one fed: its budget is what its VM's
        earlier stored files left (as with one job), and the observer is told."""
        if not self._open or self._open[0].begun:
            return
        entry = self._open[0]
        entry.begun = True
        owner, job = entry.owner, entry.job
        if owner is None:
            return
        plan = self._plan_now
        assert plan is not None
        spent = self._spent.get(owner.name, 0)
        job.sink = replace(job.sink, limit=plan.sink(owner, job.stored, job.sink.staging,
                                                     spent).limit)
        self.observer.file_started(job.stored, owner.name)

    def _settle(self) -> None:
        """Every outcome still in the works used, and every stored file read ends."""
        assert self.works is not None
        self._use(self.works.drain())
        while self._open and self._open[0].read:
            self._end_first()

    def _end_first(self) -> None:
        """The first open stored file ends (placed, or kept as .partial), then the
        next one begins."""
        entry = self._open[0]
        job = entry.job
        result = job.finish()
        self._open.popleft()  # killed with the others if the run stops before this
        if entry.owner is None:  # qubes.xml: read by _read_qubes_xml
            self._begin()
            return
        plan = self._plan_now
        assert plan is not None
        if not result.ok and entry.tail:  # its last chunks lost in damage after them?
            self.costs.tail_lost(entry.members, job.stored, entry.expected, plan.fmt,
                                 self.report)
        owner = entry.owner.name
        self._spent[owner] = self._spent.get(owner, 0) + result.expanded
        self.report.files.append(result)
        if job.salvage is not None and job.salvage.used:
            assert self.output is not None
            record(self.report, job, result, self.output)  # SALVAGED.txt, loudly
        if self.resume is not None:
            self.resume.placed(result)
        # Special files were left out: the rest of the stored file is
        # complete and verified, but the backup was not restored whole.
        self.report.problems.extend(f"{result.stored}: {note}" for note in result.notes)
        self.observer.file_done(result)
        if isinstance(result.failure, OutputError) and result.failure.fatal:
            raise result.failure
        self._begin()  # its budget what this one left

    def _from_copies(self, plan: Plan, stored: str, owner: Entity) -> None:
        """A stored file BACKUP never reached, whole from the other copies."""
        none = Members(iter(()))
        if self.resume is not None and self.resume.keeps(stored):  # placed earlier
            self.report.files.append(
                self.resume.read_through(none, stored, owner.name, self.observer))
        else:
            self._one_file(plan, none, stored, owner)

    # -- one stored file ----------------------------------------------------

    def _consume(self, members: Members, entry: _Open) -> int:
        """Take every member of ``entry``'s stored file; the format checks each chunk
        (returns how many came in order).  Its outcomes may still be in the works."""
        job, store = entry.job, entry.store
        stored = job.stored
        if stored in self._seen:
            job.fail(StoredFileError(f"{stored}: its chunks appear in two places in the backup"))
        self._seen.add(stored)
        fmt = self.fmt
        assert fmt is not None
        works = self.works
        assert works is not None
        expected = 0
        elsewhere: set[int] = set()  # chunks taken whole (with their .hmac) from a copy
        while True:
            member = members.peek()
            if member is None:
                break
            name = parse_member_name(member.name)
            if name is None or name.stored != stored:
                break
            members.take()
            if member.after_damage is not None:  # chunks lost in the damage before it
                self.costs.lost_before(member.after_damage, name, stored, expected)
            if job.result.error is not None:
                if self.request.mode is Mode.VERIFY:  # tell every damaged chunk, not the first
                    try:
                        self.borrowing.check_only(store, member, name, members)
                    except Truncated as exc:
                        members.stop(exc)
                continue
            if name.is_hmac and name.index in elsewhere:
                continue  # the .hmac of a chunk BACKUP could not give: unused
            problem = misplaced(fmt, member, name, stored, expected)
            if problem is not None and fmt.owns_chunk(name) and (
                name.index > expected or (name.is_hmac and name.index == expected)
            ):
                # chunks missing before it (or, for an .hmac alone, its own chunk)
                self._settle()  # the chunks before them come first
                upto = name.index + 1 if name.is_hmac else name.index
                if self.borrowing.fill(job, store, expected, upto, problem.message):
                    elsewhere.update(range(expected, upto))
                    expected = upto
                    if name.is_hmac:
                        continue  # its chunk came whole, with its own .hmac, from a copy
                    problem = None
            if problem and fill_gap(job, fmt, name, expected, store.scratch_file,
                                    self._settle):
                expected, problem = name.index, None  # --salvage: zeros stand for the gap
            if problem is not None:
                self._settle()  # the chunks before it come first
                job.fail(problem)
                continue
            try:
                self._use(works.admit())  # room in scratch for one more
                pending = fmt.read_chunk(store, member, name, members)
            except Unreadable as exc:  # a chunk file of a folder: that chunk only
                self._settle()
                failure = self.costs.unreadable(member, stored, exc)
                if self.borrowing.fill(job, store, expected, expected + 1, exc.message):
                    elsewhere.add(expected)  # ... or from a copy
                    expected += 1
                else:
                    job.fail(failure)
                continue
            except Truncated as exc:
                self._settle()
                if self.borrowing.fill(job, store, expected, expected + 1, exc.message):
                    self.borrowing.fill_tail(job, store, expected + 1)
                else:
                    job.fail(exc)
                members.stop(exc)
                self.costs.cut(member, stored, exc.message)
                return expected
            except BackupError as exc:
                if member.path is None or not self.borrowing:
                    raise
                # a chunk file of a folder that cannot be opened: from a copy
                self._settle()
                if not self.borrowing.fill(job, store, expected, expected + 1, exc.message):
                    job.fail(StoredFileError(f"{exc.message}; no other copy has it good"))
                elsewhere.add(expected)
                expected += 1
                continue
            self.costs.span(member, members.last)
            expected += 1
            self._use(works.submit(pending, member.name, member.size))
            self.observer.in_flight(works.in_flight)
        if self.borrowing:
            self._settle()  # its own chunks first, then what the copies hold after them
            self.borrowing.fill_tail(job, store, expected)
        return expected

    def _use(self, done: list[Completed]) -> None:
        """Each outcome to its stored file, in order: one of a later stored file
        means every open one before it has all of its outcomes, so those end
        first.  Fed in chunk order, or taken from a copy; a chunk lost is
        charged to its damage."""
        for chunk in done:
            name = parse_member_name(chunk.member)
            stored = name.stored if name is not None else ""
            while len(self._open) > 1 and self._open[0].job.stored != stored:
                assert self._open[0].read, "an outcome of a stored file not read yet"
                self._end_first()
            entry = self._open[0]
            self.borrowing.use(entry.job, entry.store, [chunk], self._charger(entry.job.stored))

    def _charger(self, stored: str) -> Callable[[str, str], None]:
        return lambda member, reason: self.costs.charge(member, stored, reason)


def run(
    source: StreamSource | FolderSource,
    passphrase: str,
    request: Request,
    ctx: RunContext | None = None,
    copies: Copies | None = None,
) -> Report:
    """Run the procedure; raises QrecoverError for what stops everything."""
    return Recovery(source, passphrase, request, ctx, copies).run()


__all__ = ["FileResult", "Report", "Request", "run"]
