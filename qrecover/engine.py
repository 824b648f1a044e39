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
   qrecover.formats.v4_jobs), whose outcomes come back strictly in chunk
   order; the engine asks it for room before it reads each chunk, so
   scratch stays bounded (two chunks for format 3, about ``2 * jobs + 2``
   for format 4).
4. a stored file that fails stops there: what its pipeline already wrote is
   kept only as ``NAME.partial``; the other stored files go on.

The engine knows nothing of versions; a dry run walks the same steps up to
the plan and starts nothing for the stored files.
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from pathlib import Path

from qrecover import formats
from qrecover.container import (
    HEADER,
    HEADER_HMAC,
    QUBES_XML,
    FolderSource,
    StreamSource,
    Truncated,
    parse_member_name,
)
from qrecover.context import RunContext
from qrecover.dry_run import dry_findings
from qrecover.errors import (
    BackupError,
    MissingProgramError,
    OutputError,
    ProgramFailed,
    StoredFileError,
)
from qrecover.events import ChunkChecked, HeaderVerified, InventoryRead
from qrecover.formats.base import ChunkWorks, Completed, Format
from qrecover.header import MAX_HEADER
from qrecover.inventory import MAX_XML, Entity, Inventory
from qrecover.members import Members, misplaced
from qrecover.output import Output
from qrecover.plan import XML_SINK, Plan, obstacles
from qrecover.report import FileResult, Observer, Quiet, Report, Request, missing
from qrecover.resume import Resume, identity
from qrecover.runner import control, which
from qrecover.scratch import ChunkStore, ScratchNames
from qrecover.stages.extract import pick_programs
from qrecover.stored import StoredFile


class Recovery:
    """The whole procedure for one backup; ``run()`` returns a Report."""

    def __init__(
        self,
        source: StreamSource | FolderSource,
        passphrase: str,
        request: Request,
        observer: Observer | None = None,
        ctx: RunContext | None = None,
    ) -> None:
        self.ctx = ctx if ctx is not None else RunContext()
        self.source = source
        self.passphrase = passphrase
        self.key = passphrase.encode("utf-8")
        self.request = request
        self.observer: Observer = observer or Quiet()
        self.fmt: Format | None = None
        self.output: Output | None = None
        self.scratch: Path | None = None
        self.report = Report(output=request.output)
        self._seen: set[str] = set()
        self._spent: dict[str, int] = {}
        self._active: StoredFile | None = None
        self.resume: Resume | None = None  # DIR's record (qrecover/resume.py)
        self.header_raw = b""  # backup-header and its .hmac: part of the backup's identity
        self.xml_macs: list[str] = []  # qubes.xml's chunk HMACs (format 3): likewise
        self.names: ScratchNames | None = None
        self.works: ChunkWorks | None = None
        # igzip or pigz, and bsdtar, when installed: faster than gzip -d, GNU tar
        self.gunzip, self.extractor = pick_programs()

    # -- the pass -----------------------------------------------------------

    def run(self) -> Report:
        request = self.request
        headerless = formats.folder_format(self.source)  # format 1: a folder, no header
        members = Members(headerless.members() if headerless else self.source.members())
        try:
            self.fmt = fmt = headerless or self._read_header(members)
            if headerless is not None:
                self.ctx.emit(HeaderVerified(fmt))
            self.report.fmt = fmt
            self._check_programs(fmt)
            writes = request.mode == "restore" and not request.dry_run
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
            xml = self._read_qubes_xml(members, self._plan(fmt, ()))
            inventory = formats.read_inventory(fmt, xml, self.report.problems)
            self.report.inventory = inventory
            selected = inventory.select(request.vms, request.exclude, request.skip_dom0_home)
            self.report.selected = selected
            self.ctx.emit(InventoryRead(inventory, selected))
            plan = self.report.plan = self._plan(fmt, selected)
            if request.mode == "info":
                return self.report
            if request.dry_run:  # what would run and what would stop it; nothing started
                found = dry_findings(plan, request.resume, fmt, self.header_raw, xml, self.xml_macs)
                self.report.stops, self.report.kept = found.stops, found.kept
                self.report.excused = found.excused
                return self.report
            self.observer.planned(selected)
            if self.output is not None:
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
            if self._active is not None:
                self._active.kill()
            raise
        finally:
            self._cleanup()
        return self.report

    def _plan(self, fmt: Format, selected: tuple[Entity, ...]) -> Plan:
        request = self.request
        return Plan(
            fmt,
            request.mode,
            selected,
            self.gunzip,
            request.output,
            request.force,
            request.size_limit, self.extractor,  # bsdtar or GNU tar
        )

    def _cleanup(self) -> None:
        if self.works is not None:
            self.works.close()  # its children stopped and its scratch gone first
            self.works = None
        if self.scratch is not None:
            shutil.rmtree(self.scratch, ignore_errors=True)
            self.scratch = None
        if self.output is not None and self.output.created:
            with contextlib.suppress(OSError):
                self.output.root.rmdir()  # only if we made it and nothing landed
        if self.resume is not None:
            self.resume.release()  # DIR's lock, last: our scratch is gone by now

    def _read_header(self, members: Members) -> Format:
        if members.peek() is None and members.error is None:
            raise BackupError("the backup is empty (no members): not a Qubes backup")
        first = members.require("backup-header")
        if first.name != HEADER and (bare := formats.headerless(first.name)) is not None:
            self.ctx.emit(HeaderVerified(bare))  # none to verify: qubes.xml.000's HMAC is first
            return bare
        members.take()
        if first.name != HEADER:
            name = first.name.encode("ascii", "backslashreplace").decode()[:80]
            raise BackupError(formats.packed_hint(name) or (  # a packed format-1 folder?
                f"{getattr(self.source, 'label', 'the backup')}: does not start with "
                f"backup-header (found {name!r}): "
                "not a Qubes backup of format 2, 3 or 4"
            ))
        data = first.read_all(MAX_HEADER)
        second = members.require("backup-header.hmac")
        if second.name != HEADER_HMAC:
            raise BackupError("backup-header.hmac is missing: the header cannot be verified")
        members.take()
        hmac_text = second.read_all(formats.MAX_HEADER_HMAC)
        self.header_raw = data + b"\0" + hmac_text
        fmt = formats.authenticate(data, hmac_text, self.passphrase, self.ctx.command)
        self.ctx.emit(HeaderVerified(fmt))
        return fmt

    def _check_programs(self, fmt: Format) -> None:
        needed = ["tar", self.extractor, "cat", *fmt.programs(self.gunzip)]
        for program in needed:
            which(program)
        try:
            version = control("tar", "--version", log=self.ctx.command)
        except ProgramFailed:  # busybox's tar, for one, has no --version
            version = ""
        if "GNU tar" not in version:
            raise MissingProgramError(
                "tar is not GNU tar (needed for sparse VM images)",
                hint="install GNU tar (package 'tar') and put it first on PATH",
            )
        fmt.check_programs(self.ctx.command)

    def _job(self, plan: Plan, stored: str, owner: str, sink_staging: Entity | None) -> StoredFile:
        assert self.scratch is not None
        if sink_staging is None:
            sink = XML_SINK
        else:
            staging = None
            if plan.mode == "restore":
                assert self.names is not None
                staging = self.names.fresh("stage")
                staging.mkdir(mode=0o700)
            sink = plan.sink(sink_staging, stored, staging, self._spent.get(owner, 0))
        return StoredFile(
            stored,
            owner,
            sink,
            plan.stages(sink),
            self.ctx,
            self.passphrase,
            self.scratch,
            self.output,
            self.resume.placing if self.resume is not None else None,
            plan.fmt.multi_volume,
        )

    def _read_qubes_xml(self, members: Members, plan: Plan) -> bytes:
        first = members.require("qubes.xml.000")
        name = parse_member_name(first.name)
        if name is None or name.stored != QUBES_XML:
            raise BackupError(
                "qubes.xml.000 is missing after the header: cannot tell which VMs the backup holds"
            )
        job = self._active = self._job(plan, QUBES_XML, "", None)  # killed if the run stops
        self._consume(members, job)
        result = job.finish()
        self._active = None
        if members.error is not None:
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
                kept = self.resume.read_through(members, name.stored, owner.name, self.observer)
                self.report.files.append(kept)
                continue
            job = self._job(plan, name.stored, owner.name, owner)
            self.observer.file_started(name.stored, owner.name)
            self._active = job
            self._consume(members, job)
            result = job.finish()
            self._active = None
            self._spent[owner.name] = self._spent.get(owner.name, 0) + result.expanded
            self.report.files.append(result)
            if self.resume is not None:
                self.resume.placed(result)
            # Special files were left out: the rest of the stored file is
            # complete and verified, but the backup was not restored whole.
            self.report.problems.extend(f"{result.stored}: {note}" for note in result.notes)
            self.observer.file_done(result)
            if isinstance(result.failure, OutputError) and result.failure.fatal:
                raise result.failure
        if members.error is not None:
            self.report.problems.append(str(members.error))
        self.report.problems += missing(plan.selected, self.report.files, self.request.only)

    # -- one stored file ----------------------------------------------------

    def _consume(self, members: Members, job: StoredFile) -> None:
        """Take every member of ``job``'s stored file; the format checks each chunk."""
        stored = job.stored
        if stored in self._seen:
            job.fail(StoredFileError(f"{stored}: its chunks appear in two places in the backup"))
        self._seen.add(stored)
        fmt = self.fmt
        assert fmt is not None
        assert self.names is not None
        store = ChunkStore(self.names, self.passphrase, self.ctx.command, self.observer, job)
        works = self.works
        assert works is not None
        expected = 0
        while True:
            member = members.peek()
            if member is None:
                break
            name = parse_member_name(member.name)
            if name is None or name.stored != stored:
                break
            members.take()
            if job.result.error is not None:
                continue
            problem = misplaced(fmt, member, name, stored, expected)
            if problem is not None:
                self._use(job, store, works.drain())  # the chunks before it come first
                job.fail(problem)
                continue
            try:
                self._use(job, store, works.admit())  # room in scratch for one more
                pending = fmt.read_chunk(store, member, name, members)
            except Truncated as exc:
                self._use(job, store, works.drain())
                job.fail(exc)
                members.stop(exc)
                break
            expected += 1
            self._use(job, store, works.submit(pending, member.name, member.size))
            self.observer.in_flight(works.in_flight)
        self._use(job, store, works.drain())

    def _use(self, job: StoredFile, store: ChunkStore, done: list[Completed]) -> None:
        """Feed ``job`` the chunks whose step is done, in chunk order; the first
        that failed stops it (nothing after it is used)."""
        for chunk in done:
            outcome = chunk.outcome
            if job.result.error is not None:  # stopped at an earlier chunk: unused
                if outcome.plain is not None:
                    store.drop(outcome.plain, outcome.owned)
                continue
            if outcome.checked:
                self.ctx.emit(ChunkChecked(chunk.member, chunk.size, outcome.reason))
            if job.stored == QUBES_XML and outcome.mac:
                self.xml_macs.append(outcome.mac)
            if outcome.error is not None:
                job.fail(outcome.error)
                continue
            assert outcome.plain is not None
            try:
                job.feed(outcome.plain, outcome.owned, chunk.member, outcome.feeder)
            except OSError as exc:
                store.drop(outcome.plain, outcome.owned)
                job.fail(StoredFileError(f"{chunk.member}: could not start the pipeline ({exc})"))


def run(
    source: StreamSource | FolderSource,
    passphrase: str,
    request: Request,
    observer: Observer | None = None,
    ctx: RunContext | None = None,
) -> Report:
    """Run the procedure; raises QrecoverError for what stops everything."""
    return Recovery(source, passphrase, request, observer, ctx).run()


__all__ = ["FileResult", "Report", "Request", "run"]
