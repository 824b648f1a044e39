"""One streaming pass over a backup: verify, decrypt, decompress, extract.

The order is the recovery page's, done for every stored file in turn:

1. read ``backup-header`` and ``backup-header.hmac`` (step 1), authenticate
   the header before reading it (step 2), parse it (step 3); the shape of
   ``backup-header.hmac`` tells format 3 from format 4 (qrecover.formats);
2. for each stored file (``qubes.xml`` first), take its chunks in numeric
   order; copy each to private scratch while computing its HMAC, compare
   with its ``.hmac`` (step 4), and only then let ``cat`` feed it into the
   stored file's one ``openssl enc -d | gzip -d | tar -x`` pipeline
   (steps 5-7).  While ``cat`` feeds chunk N, chunk N+1 is read and
   verified, so scratch holds at most two chunks whatever the backup's size.
   Format 4 instead decrypts each ``.enc`` chunk with ``scrypt dec`` into a
   scratch file, and ``cat`` feeds that plaintext into ``gzip -d | tar -x``
   only once scrypt has exited 0 (it checks the chunk's HMAC at the end).
3. a stored file that fails stops there: what its pipeline already wrote is
   kept only as ``NAME.partial``; the other stored files go on.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import hmac
import os
import shutil
import subprocess
import tarfile
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Literal, Protocol

from qrecover.container import (
    HEADER,
    HEADER_HMAC,
    QUBES_XML,
    READ_SIZE,
    ChunkName,
    FolderSource,
    Member,
    StreamSource,
    Truncated,
    parse_member_name,
)
from qrecover.decompress import pick_gunzip
from qrecover.errors import BackupError, MissingProgramError, OutputError, QrecoverError
from qrecover.extract import extract_stage, list_stage, placement, qubes_xml_stage
from qrecover.formats import MAX_HEADER_HMAC, Format, Format3, Format4, authenticate
from qrecover.guard import TarGuard
from qrecover.header import MAX_HEADER, AnyHeader
from qrecover.inventory import MAX_XML, Entity, Inventory, parse_inventory
from qrecover.output import Output, tree_size
from qrecover.progress import human_bytes
from qrecover.resume import Resume, identity
from qrecover.runner import (
    F_SETPIPE_SZ,
    PASS_ENV,
    PIPE_SIZE,
    Pipeline,
    Stage,
    StageResult,
    control,
    first_failure,
    own_failure,
    which,
)
from qrecover.transcript import (
    ChunkDecrypted,
    ChunkFed,
    ChunkRejected,
    ChunkVerified,
    FileFinished,
    HeaderVerified,
    HeaderVerifiedV4,
    InventoryRead,
    PipelineStarted,
    about,
    emit,
)
from qrecover.verify import MAX_HMAC_FILE, Digest, matches, parse_hmac_text

Mode = Literal["info", "verify", "restore"]
# Messages from a stage that mean the output side failed, not the backup.
_OUTPUT_TROUBLE = (
    "No space left on device",
    "Disk quota exceeded",
    "Read-only file system",
    "Permission denied",
    "Cannot write",  # GNU tar
    "Wrote only",  # GNU tar's short write, as on a disk that just filled up
)
FULL = "no space left"


@dataclass
class Request:
    mode: Mode
    vms: Sequence[str] = ()
    output: Path | None = None
    force: bool = False
    size_limit: bool = True
    resume: bool = False  # --resume: skip what DIR's record says is placed


# How far an entity's inner archives may exceed the size qubes.xml declares
# for it (du of the VM's folder) before qrecover calls it a decompression bomb.
SIZE_FACTOR = 2
SIZE_SLACK = 64 * 1024 * 1024


@dataclass
class FileResult:
    """What became of one stored file."""

    stored: str
    owner: str  # VM name, "dom0", or "" for qubes.xml
    chunks: int = 0
    stored_bytes: int = 0
    restored_bytes: int = 0
    members: int = 0
    places: list[Path] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    error: str | None = None
    output_trouble: bool = False
    kept: bool = False  # placed by an earlier run; skipped by --resume

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def problem(self) -> str:
        """``STORED: what went wrong``, naming the stored file once."""
        return about(self.stored, self.error or "ok")


@dataclass
class Report:
    header: AnyHeader | None = None
    inventory: Inventory | None = None
    selected: tuple[Entity, ...] = ()
    files: list[FileResult] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)  # not tied to one stored file
    output: Path | None = None

    @property
    def ok(self) -> bool:
        return not self.problems and all(f.ok for f in self.files)


class Observer(Protocol):
    """Told about the pass as it goes (the CLI's lines, the progress display)."""

    def planned(self, selected: Sequence[Entity]) -> None: ...
    def file_started(self, stored: str, owner: str) -> None: ...
    def data_read(self, stored: str, nbytes: int) -> None: ...
    def file_done(self, result: FileResult) -> None: ...


class _Quiet:
    def planned(self, selected: Sequence[Entity]) -> None:
        pass

    def file_started(self, stored: str, owner: str) -> None:
        pass

    def data_read(self, stored: str, nbytes: int) -> None:
        pass

    def file_done(self, result: FileResult) -> None:
        pass


class _Peekable:
    """Members one at a time; a broken stream ends it and is remembered."""

    def __init__(self, it: Iterator[Member]) -> None:
        self._it = it
        self._next: Member | None = None
        self._done = False
        self.error: BackupError | None = None

    def peek(self) -> Member | None:
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
        return member

    def stop(self, error: BackupError) -> None:
        self._done = True
        self._next = None
        if self.error is None:
            self.error = error

    def require(self, what: str) -> Member:
        member = self.peek()
        if member is None:
            if self.error is not None:
                raise self.error
            raise BackupError(f"{what} is missing: the backup ends before it")
        return member


def _is_output_trouble(text: str) -> bool:
    return any(marker in text for marker in _OUTPUT_TROUBLE)


@dataclass
class _Sink:
    """Where a stored file's inner archive goes."""

    kind: Literal["capture", "list", "extract"]
    staging: Path | None = None
    strip: int = 0
    folder_rel: str = ""
    limit: int | None = None  # bytes the inner archive may expand to


class _StoredFile:
    """One stored file's pipeline, fed chunk by chunk."""

    def __init__(self, engine: Recovery, stored: str, owner: str, sink: _Sink) -> None:
        self.engine = engine
        self.stored = stored
        self.sink = sink
        self.result = FileResult(stored, owner)
        self.pipeline: Pipeline | None = None
        self.feed_w: int | None = None
        self.out_file: IO[bytes] | None = None
        self.cat: Pipeline | None = None
        self.cat_path: Path | None = None
        self.cat_owned = False

    def stages(self) -> list[Stage]:
        fmt = self.engine.fmt
        assert fmt is not None
        stages = fmt.stream_stages(self.engine.gunzip)
        if self.sink.kind == "capture":
            stages.append(qubes_xml_stage())
        elif self.sink.kind == "list":
            stages.append(list_stage())
        else:
            assert self.sink.staging is not None
            stages.append(extract_stage(self.sink.staging, self.sink.strip))
        return stages

    def _start(self) -> None:
        stages = self.stages()
        read_end, self.feed_w = os.pipe()
        with contextlib.suppress(OSError):
            fcntl.fcntl(self.feed_w, F_SETPIPE_SZ, PIPE_SIZE)
        if self.sink.kind != "extract":
            self.out_file = tempfile.TemporaryFile(dir=self.engine.scratch)  # noqa: SIM115
        emit(
            PipelineStarted(
                self.stored,
                self.result.owner,
                tuple(stages),
                self.sink.kind,
                self.sink.staging,
                self.sink.folder_rel,
            )
        )
        try:
            self.pipeline = Pipeline(
                stages,
                stdin=read_end,
                stdout=self.out_file,
                secrets={PASS_ENV: self.engine.passphrase},
                guard=self._guard,
            ).start()
        finally:
            os.close(read_end)

    def _guard(self, src: int, dst: int) -> TarGuard:
        return TarGuard(src, dst, self.sink.limit, self.stored, prefix=self.stored)

    def _reap_cat(self) -> None:
        if self.cat is None:
            return
        (result,) = self.cat.wait()
        if self.cat_owned and self.cat_path is not None:
            with contextlib.suppress(FileNotFoundError):
                self.cat_path.unlink()
        self.cat = None
        if not result.ok and self.result.error is None:
            # Usually a consequence: the pipeline died and cat hit a closed pipe.
            self.result.error = f"feeding {self.cat_path}: {result.describe()}"

    def feed(self, path: Path, owned: bool, member: str = "") -> None:
        """Queue a verified chunk; returns while cat is still feeding it."""
        if self.pipeline is None:
            self._start()
        self._reap_cat()
        assert self.feed_w is not None
        stage = Stage(("cat", str(path)))
        emit(ChunkFed(self.stored, member or path.name, path))
        self.cat = Pipeline(
            [stage], stdin=subprocess.DEVNULL, stdout=self.feed_w
        ).start()
        self.cat_path = path
        self.cat_owned = owned

    def fail(self, message: str, output_trouble: bool = False) -> None:
        if self.result.error is None:
            self.result.error = message
            self.result.output_trouble = output_trouble

    def kill(self) -> None:
        for running in (self.cat, self.pipeline):
            if running is not None:
                running.kill()
        if self.feed_w is not None:
            os.close(self.feed_w)
            self.feed_w = None

    def finish(self) -> FileResult:
        """Close the feed, wait for every stage, and place (or keep as partial)."""
        self._reap_cat()
        if self.feed_w is not None:
            os.close(self.feed_w)
            self.feed_w = None
        results: list[StageResult] = []
        if self.pipeline is not None:
            results = self.pipeline.wait()
        elif self.result.error is None:
            self.fail(f"{self.stored}: no chunk of it could be used")
        guarded = self.pipeline.guarded if self.pipeline is not None else None
        if guarded is not None:
            self.result.notes.extend(guarded.skipped)
            self.engine.spend(self.result.owner, guarded.passed)
        failure = first_failure(results)
        # A stage before the guard that failed on its own (igzip stops short
        # of a damaged gzip stream's end) explains what the guard saw.
        cause = own_failure(results[:-1]) if guarded is not None else None
        if guarded is not None and guarded.error is not None and cause is None:
            # The guard cut the stream: what the stages said is a consequence.
            if self.result.error is not None and self.result.error.startswith("feeding"):
                self.result.error = None
            self.fail(guarded.error)
        elif failure is not None:
            trouble = _is_output_trouble(failure.stderr)
            cat_error = self.result.error is not None and self.result.error.startswith("feeding")
            if cat_error:
                self.result.error = None
            message = f"{self.stored}: {failure.describe()}"
            output = self.engine.output
            if trouble and output is not None and (free := output.free_space()) is not None:
                # tar may only say "Wrote only N of M bytes": give the facts
                message += f" (free space left in {output.root}: {human_bytes(free)})"
            self.fail(message, output_trouble=trouble)
        if self.out_file is not None:
            self.out_file.seek(0)
        if self.sink.kind == "list" and self.out_file is not None:
            self.result.members = sum(1 for _ in self.out_file)
        if self.sink.kind == "extract":
            self._place()
        r = self.result
        emit(FileFinished(r.stored, r.owner, r.error, tuple(r.places), r.restored_bytes))
        return self.result

    def _place(self) -> None:
        output = self.engine.output
        staging = self.sink.staging
        assert output is not None and staging is not None
        entries = sorted(staging.iterdir()) if staging.exists() else []
        if not entries:
            if self.result.ok:
                self.fail(f"{self.stored}: its archive held nothing to restore")
            return
        folder = output.ensure_dir(self.sink.folder_rel)
        if self.result.ok and self.engine.resume is not None:  # resume hook: record intent
            self.engine.resume.placing(self.stored, self.result.owner, entries, folder)
        for entry in entries:
            size = tree_size(entry)
            try:
                self.result.places.append(output.place(entry, folder, partial=not self.result.ok))
            except OutputError as exc:
                self.fail(str(exc), output_trouble=True)
                self.result.places.append(output.place(entry, folder, partial=True))
            self.result.restored_bytes += size
        with contextlib.suppress(OSError):
            staging.rmdir()


class Recovery:
    """The whole procedure for one backup; ``run()`` returns a Report."""

    def __init__(
        self,
        source: StreamSource | FolderSource,
        passphrase: str,
        request: Request,
        observer: Observer | None = None,
    ) -> None:
        self.source = source
        self.passphrase = passphrase
        self.key = passphrase.encode("utf-8")
        self.request = request
        self.observer: Observer = observer or _Quiet()
        self.header: AnyHeader | None = None
        self.fmt: Format | None = None
        self.output: Output | None = None
        self.scratch: Path | None = None
        self.report = Report(output=request.output)
        self._seen: set[str] = set()
        self._spent: dict[str, int] = {}
        self._stage_n = 0
        self._plain_n = 0
        self._active: _StoredFile | None = None
        self.resume: Resume | None = None  # DIR's record (qrecover/resume.py)
        self.header_raw = b""
        self.xml_macs: list[str] = []  # qubes.xml's verified chunk HMACs: part of its identity
        # igzip or pigz, when installed, undo gzip faster than gzip -d.
        self.gunzip = pick_gunzip()

    # -- the pass -----------------------------------------------------------

    def run(self) -> Report:
        members = _Peekable(self.source.members())
        try:
            self.fmt = self._read_header(members)
            self.header = self.fmt.header
            self.report.header = self.header
            self._check_programs(self.fmt)
            if self.request.mode == "restore":
                assert self.request.output is not None
                self.output = Output(self.request.output, self.request.force)
                self.output.prepare()
                self.scratch = Path(tempfile.mkdtemp(prefix=".qrecover-", dir=self.output.root))
            else:
                self.scratch = Path(tempfile.mkdtemp(prefix="qrecover-"))
            xml = self._read_qubes_xml(members)
            inventory = parse_inventory(xml)
            self.report.inventory = inventory
            selected = inventory.select(self.request.vms)
            self.report.selected = selected
            emit(InventoryRead(inventory, selected))
            if self.request.mode == "info":
                return self.report
            self.observer.planned(selected)
            if self.output is not None:
                # resume hook: check DIR's record, clean a killed run's scratch
                ident = identity(self.fmt, self.header_raw, xml, self.xml_macs)
                self.resume = Resume.begin(self.output, self.request.resume, ident,
                                           self.fmt.version, self.scratch, selected)
                self._check_conflicts(selected)
                self.resume.write_xml(xml)  # writes qubes.xml (unless resumed) and the record
            self._stream(members, inventory, selected)
            if self.resume is not None and self.report.ok:  # resume hook: nothing left to resume
                self.resume.finished()
        except BaseException:
            if self._active is not None:
                self._active.kill()
            raise
        finally:
            self._cleanup()
        return self.report

    def _cleanup(self) -> None:
        if self.scratch is not None:
            shutil.rmtree(self.scratch, ignore_errors=True)
            self.scratch = None
        if self.output is not None and self.output.created:
            with contextlib.suppress(OSError):
                self.output.root.rmdir()  # only if we made it and nothing landed

    def _read_header(self, members: _Peekable) -> Format:
        if members.peek() is None and members.error is None:
            raise BackupError("the backup is empty (no members): not a Qubes backup")
        first = members.require("backup-header")
        members.take()
        if first.name != HEADER:
            name = first.name.encode("ascii", "backslashreplace").decode()[:80]
            if name.startswith("qubes.xml.000"):
                raise BackupError(
                    "no backup-header: this looks like a format 2 backup "
                    "(Qubes R2 beta), which qrecover does not read"
                )
            raise BackupError(
                f"the backup does not start with backup-header (found {name!r}): "
                "not a Qubes backup of format 3 or 4"
            )
        data = first.read_all(MAX_HEADER)
        second = members.require("backup-header.hmac")
        if second.name != HEADER_HMAC:
            raise BackupError("backup-header.hmac is missing: the header cannot be verified")
        members.take()
        hmac_text = second.read_all(MAX_HEADER_HMAC)
        self.header_raw = data + b"\0" + hmac_text  # resume: part of the backup's identity
        fmt = authenticate(data, hmac_text, self.passphrase)
        if isinstance(fmt, Format3):
            emit(HeaderVerified(fmt.header))
        else:
            emit(HeaderVerifiedV4(fmt))
        return fmt

    def _check_programs(self, fmt: Format) -> None:
        needed = ["tar", "cat", *fmt.programs(self.gunzip)]
        for program in needed:
            which(program)
        if "GNU tar" not in control("tar", "--version"):
            raise MissingProgramError(
                "tar is not GNU tar (needed for sparse VM images)",
                hint="install GNU tar (package 'tar') and put it first on PATH",
            )
        stage = next((s for s in fmt.stream_stages() if s.program == "openssl"), None)
        if stage is not None:
            self._check_cipher(stage.argv[3])

    @staticmethod
    def _check_cipher(flag: str) -> None:
        """Is the backup's (allow-listed) cipher in this OpenSSL? Say so now,
        not as a 'bad decrypt' later.  ``openssl enc -list`` exists since 1.1;
        from an OpenSSL that cannot list, nothing is concluded."""
        listed = control("openssl", "enc", "-list").split()
        if listed and flag not in listed:
            raise MissingProgramError(
                f"this OpenSSL cannot decrypt {flag[1:]}, the cipher the backup names",
                hint="use an OpenSSL build that has it (openssl enc -list shows what it has)",
            )

    def _read_qubes_xml(self, members: _Peekable) -> bytes:
        first = members.require("qubes.xml.000")
        name = parse_member_name(first.name)
        if name is None or name.stored != QUBES_XML:
            raise BackupError(
                "qubes.xml.000 is missing after the header: cannot tell which VMs the backup holds"
            )
        job = _StoredFile(self, QUBES_XML, "", _Sink("capture", limit=MAX_XML + SIZE_SLACK))
        self._consume(members, job)
        result = job.finish()
        if members.error is not None:
            raise members.error
        if not result.ok:
            raise BackupError(f"qubes.xml: {result.error}")
        assert job.out_file is not None
        data = job.out_file.read(MAX_XML + 1)
        job.out_file.close()
        return data

    def _check_conflicts(self, selected: Sequence[Entity]) -> None:
        assert self.output is not None
        # Even with --force, never write through a symbolic link inside DIR.
        for rel in [QUBES_XML, *(e.dest for e in selected)]:
            path = self.output.root
            for part in Path(rel).parts:
                path = path / part
                if path.is_symlink():
                    raise OutputError(f"{path}: is a symbolic link; refusing to write "
                                      "through it", hint="remove it or choose another --output")
        if self.output.force:
            return
        existing = self.output.conflicts([QUBES_XML, *(e.dest for e in selected)])
        if self.resume is not None:  # resume hook: the earlier run's own files are no conflict
            existing = [p for p in existing if not self.resume.excused(p)]
        if existing:
            shown = ", ".join(str(p) for p in existing[:5])
            raise OutputError(
                f"would overwrite existing files: {shown}",
                hint="choose an empty --output folder, use --force"  # resume: named unless given
                + ("" if self.request.resume else ", or --resume to continue an interrupted "
                   "restore of the same backup"),
            )

    def _stream(self, members: _Peekable, inventory: Inventory, selected: Sequence[Entity]) -> None:
        chosen = {e.backup_path for e in selected}
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
            if owner.backup_path not in chosen:
                members.take()  # the stream skips its bytes without reading them into us
                self.observer.data_read(name.stored, member.size)
                continue
            if self.resume is not None and self.resume.keeps(name.stored):  # resume hook: skip
                kept = self.resume.read_through(members, name.stored, owner.name, self.observer)
                self.report.files.append(kept)
                continue
            job = _StoredFile(self, name.stored, owner.name, self._sink_for(owner, name.stored))
            self.observer.file_started(name.stored, owner.name)
            self._active = job
            self._consume(members, job)
            result = job.finish()
            self._active = None
            self.report.files.append(result)
            if self.resume is not None:  # resume hook: record what was placed
                self.resume.placed(result)
            # Special files were left out: the rest of the stored file is
            # complete and verified, but the backup was not restored whole.
            self.report.problems.extend(f"{result.stored}: {note}" for note in result.notes)
            self.observer.file_done(result)
            if result.output_trouble and not result.ok and self._is_fatal_output(result):
                raise OutputError(result.error or "output problem")
        if members.error is not None:
            self.report.problems.append(str(members.error))
        found = {f.stored for f in self.report.files}
        for entity in selected:
            required = entity.required_stored()
            if required is None and not any(f.owner == entity.name for f in self.report.files):
                required = f"{entity.backup_path}/*"
            if required is not None and required not in found:
                self.report.problems.append(
                    f"{required}: missing from the backup, although qubes.xml says "
                    f"{entity.name}'s data is in it (truncated or damaged backup?)"
                )

    @staticmethod
    def _is_fatal_output(result: FileResult) -> bool:
        # A full or read-only disk will fail every later file too: stop.
        return result.error is not None and any(
            m in result.error.lower() for m in (FULL, "disk quota", "read-only", "wrote only")
        )

    def spend(self, owner: str, size: int) -> None:
        self._spent[owner] = self._spent.get(owner, 0) + size

    def _limit(self, owner: Entity) -> int | None:
        """What is left of the entity's budget; None when there is no limit."""
        if not self.request.size_limit or owner.size <= 0:
            return None
        budget = owner.size * SIZE_FACTOR + SIZE_SLACK
        return max(0, budget - self._spent.get(owner.name, 0))

    def _sink_for(self, owner: Entity, stored: str) -> _Sink:
        limit = self._limit(owner)
        if self.request.mode != "restore":
            return _Sink("list", limit=limit)
        assert self.scratch is not None
        self._stage_n += 1
        staging = self.scratch / f"stage-{self._stage_n}"
        staging.mkdir(mode=0o700)
        strip, folder = placement(owner.backup_path, owner.dest, stored)
        return _Sink("extract", staging, strip, folder, limit)

    # -- one stored file ----------------------------------------------------

    def _consume(self, members: _Peekable, job: _StoredFile) -> None:
        """Take every member of ``job``'s stored file, verifying and feeding chunks."""
        stored = job.stored
        if stored in self._seen:
            job.fail(f"{stored}: its chunks appear in two places in the backup")
        self._seen.add(stored)
        fmt = self.fmt
        assert fmt is not None
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
            if name.is_enc != isinstance(fmt, Format4):
                job.fail(
                    f"{member.name}: not a chunk name of a format-{fmt.version} backup "
                    "(format 3 has NAME.NNN and NAME.NNN.hmac, format 4 NAME.NNN.enc)"
                )
                continue
            if name.is_hmac:
                job.fail(
                    f"{member.name}: an .hmac without its chunk (chunk {name.data_name} missing)"
                )
                continue
            if name.index != expected:
                want = ChunkName(stored, expected).name
                what = "duplicated or out of order" if name.index < expected else "missing"
                job.fail(f"{want}: chunk {what} (found {member.name} instead)")
                continue
            if isinstance(fmt, Format4):
                try:
                    self._scrypt_chunk(fmt, member, name, job)
                except Truncated as exc:
                    job.fail(str(exc))
                    members.stop(exc)
                    break
                expected += 1
                continue
            try:
                path, owned, digest_hex = self._take_chunk(member, fmt.header.digest, stored)
            except Truncated as exc:
                job.fail(str(exc))
                members.stop(exc)
                break
            job.result.chunks += 1
            job.result.stored_bytes += member.size
            nxt = members.peek()
            nxt_name = parse_member_name(nxt.name) if nxt is not None else None
            if nxt is None or nxt_name != ChunkName(stored, name.index, True):
                self._drop(path, owned)
                job.fail(f"{member.name}.hmac is missing: the chunk cannot be verified")
                continue
            members.take()
            try:
                expected_hex = (
                    parse_hmac_text(nxt.read_all(MAX_HMAC_FILE))
                    if nxt.size <= MAX_HMAC_FILE
                    else None
                )
            except Truncated as exc:
                self._drop(path, owned)
                job.fail(str(exc))
                members.stop(exc)
                break
            if expected_hex is None:
                self._drop(path, owned)
                job.fail(f"{nxt.name}: not an HMAC line (or larger than 4 KiB)")
                continue
            if not matches(digest_hex, expected_hex):
                self._drop(path, owned)
                emit(ChunkRejected(member.name, nxt.name, "HMAC mismatch"))
                job.fail(
                    f"{member.name}: HMAC mismatch: the chunk is damaged or was "
                    "tampered with; nothing of it was used"
                )
                continue
            emit(ChunkVerified(member.name, nxt.name, fmt.header.digest, member.size))
            if stored == QUBES_XML:  # resume: the backup's identity (qrecover/resume.py)
                self.xml_macs.append(digest_hex)
            try:
                job.feed(path, owned, member.name)
            except OSError as exc:
                self._drop(path, owned)
                job.fail(f"{member.name}: could not start the pipeline ({exc})")
            expected += 1

    def _scrypt_chunk(
        self, fmt: Format4, member: Member, name: ChunkName, job: _StoredFile
    ) -> None:
        """Format 4: decrypt a chunk to scratch with scrypt; feed it only if scrypt
        authenticated it (scrypt may write plaintext before it finds damage)."""
        src, owned, _ = self._take_chunk(member, None, name.stored)
        job.result.chunks += 1
        job.result.stored_bytes += member.size
        assert self.scratch is not None
        self._plain_n += 1
        plain = self.scratch / f"plain-{self._plain_n}"
        try:
            result = fmt.decrypt_chunk(name, src, plain, self.passphrase)
        except OSError as exc:
            result = None
            job.fail(f"{member.name}: could not run scrypt ({exc})")
        finally:
            self._drop(src, owned)
        if result is None:
            self._drop(plain, True)
            return
        decrypted = ChunkDecrypted(
            member.name, name.data_name, fmt.chunk_prefix(name), fmt, member.size
        )
        if not result.ok:
            self._drop(plain, True)
            emit(dataclasses.replace(decrypted, error=result.describe()))
            if _is_output_trouble(result.stderr):
                job.fail(f"{member.name}: {result.describe()}", output_trouble=True)
                return
            job.fail(
                f"{member.name}: scrypt could not authenticate the chunk: it is damaged "
                f"or was tampered with; nothing of it was used ({result.describe()})"
            )
            return
        emit(decrypted)
        try:
            job.feed(plain, True, member.name)
        except OSError as exc:
            self._drop(plain, True)
            job.fail(f"{member.name}: could not start the pipeline ({exc})")

    def _drop(self, path: Path, owned: bool) -> None:
        if owned:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()

    def _take_chunk(
        self, member: Member, digest: Digest | None, stored: str = ""
    ) -> tuple[Path, bool, str]:
        """Compute the chunk's HMAC (format 3; ``digest`` None: none to compute)
        while copying it to private scratch, which is what gets fed on: a file in
        an untarred folder could change between its check and its use.  Format 4
        needs no copy from a folder: scrypt reads the chunk once, and what it
        wrote is what is fed on."""
        mac = digest.new(self.key) if digest is not None else None
        if member.path is not None and mac is None:
            return member.path, False, ""
        assert self.scratch is not None
        path = self.scratch / f"chunk-{member.name.replace('/', '_')}"
        stream = member.open()
        try:
            return self._copy_chunk(member, stream, path, mac, stored)
        finally:
            if member.path is not None:
                stream.close()

    def _copy_chunk(
        self, member: Member, stream: IO[bytes], path: Path, mac: hmac.HMAC | None, stored: str
    ) -> tuple[Path, bool, str]:
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except OSError as exc:
            raise OutputError(f"scratch file {path}: {exc.strerror}") from None
        got = 0
        try:
            while True:
                try:
                    block = stream.read(READ_SIZE)
                except (tarfile.TarError, EOFError, OSError) as exc:
                    raise Truncated(f"{member.name}: the backup ends inside this chunk "
                                     f"(truncated backup): {exc}") from None
                if not block:
                    break
                got += len(block)
                if mac is not None:
                    mac.update(block)
                self.observer.data_read(stored, len(block))
                view = memoryview(block)
                while view:
                    view = view[os.write(fd, view) :]
        except OSError as exc:
            os.close(fd)
            path.unlink()
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise OutputError(f"no space left for scratch copy of {member.name} "
                                  f"in {self.scratch}") from None
            raise OutputError(f"scratch copy of {member.name}: {exc.strerror}") from None
        except BaseException:
            os.close(fd)
            path.unlink()
            raise
        os.close(fd)
        if got != member.size:
            path.unlink()
            raise Truncated(f"{member.name}: truncated ({got} of {member.size} bytes)")
        return path, True, mac.hexdigest() if mac is not None else ""


def run(
    source: StreamSource | FolderSource,
    passphrase: str,
    request: Request,
    observer: Observer | None = None,
) -> Report:
    """Run the procedure; raises QrecoverError for what stops everything."""
    return Recovery(source, passphrase, request, observer).run()


__all__ = ["FileResult", "QrecoverError", "Report", "Request", "run"]
