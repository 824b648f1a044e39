"""One stored file's pipeline, fed chunk by chunk, and where its output lands.

The stages are the plan's (qrecover.plan); chunks come already checked by
the format.  ``cat`` feeds each chunk into the pipeline while the next one
is read.  What the pipeline extracted goes into a private staging folder
and is moved into place only once every stage exited 0; otherwise it is
kept as ``NAME.partial``.  Why a stored file failed is a typed error: the
first cause wins, and a cause replaces what was only its consequence.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import subprocess
import tempfile
from pathlib import Path
from typing import IO, Callable, List  # typing's: Placing is a runtime alias (3.8)

from qrecover.context import RunContext
from qrecover.errors import DiskFull, FeedFailed, OutputError, QrecoverError, StoredFileError
from qrecover.events import ChunkFed, ChunkSalvaged, FileFinished, PipelineStarted, SinkKind
from qrecover.formats.base import Format, OwnFeed
from qrecover.output import Output, tree_size
from qrecover.plan import PLACEHOLDER, Sink
from qrecover.report import FileResult
from qrecover.runner import (
    F_SETPIPE_SZ,
    PASS_ENV,
    PIPE_SIZE,
    Pipeline,
    Stage,
    StageResult,
    first_failure,
    own_failure,
)
from qrecover.salvage import SalvageLog, VerifiedPrefix
from qrecover.stages.extract import CuttingGuard, stop_on_cut, stop_when_drained
from qrecover.stages.guard import TarGuard
from qrecover.units import human_bytes

# Told (stored, owner, entries, folder) just before a stored file is placed.
Placing = Callable[[str, str, List[Path], Path], None]


class StoredFile:
    """One stored file's pipeline, fed chunk by chunk."""

    def __init__(
        self,
        *,
        stored: str,
        owner: str,
        sink: Sink,
        stages: list[Stage],
        ctx: RunContext,
        passphrase: str,
        scratch: Path,
        output: Output | None,
        fmt: Format,
        placing: Placing | None = None,
        salvage: SalvageLog | None = None,
    ) -> None:
        self.stored = stored
        self.sink = sink
        self._stages = stages
        self.ctx = ctx
        self.passphrase = passphrase
        self.scratch = scratch
        self.output = output
        self.placing = placing
        self.result = FileResult(stored, owner)
        self.pipeline: Pipeline | None = None
        self.feed_w: int | None = None
        self.out_file: IO[bytes] | None = None
        self.cat: Pipeline | None = None
        self.cat_path: Path | None = None
        self.cat_owned = False
        self.fmt = fmt
        self.volumes: OwnFeed | None = None  # fed by the format itself (format 2's tar -M)
        self._feeder = "cat"
        # restore --salvage: the account of unverified chunks (qrecover.salvage),
        # and for a compressed stream the second decompressor that counts what
        # the verified chunks before the first unverified one give
        self.salvage = salvage
        self.counter: VerifiedPrefix | None = None

    def _start(self) -> None:
        stages = self._stages
        if self.sink.kind is not SinkKind.EXTRACT:
            self.out_file = tempfile.TemporaryFile(dir=self.scratch)  # noqa: SIM115
        if self._start_own_feed():
            return
        read_end, self.feed_w = os.pipe()
        with contextlib.suppress(OSError):
            fcntl.fcntl(self.feed_w, F_SETPIPE_SZ, PIPE_SIZE)
        try:
            self.pipeline = Pipeline(
                stages,
                stdin=read_end,
                stdout=self.out_file,
                secrets={PASS_ENV: self.passphrase},
                guard=self._guard,
                note=f"fed the chunks of {self.stored} by {self._feeder}",
                log=self.ctx.command,
            ).start()
        finally:
            os.close(read_end)
        if self.salvage is not None and self.salvage.geometry.compressed:
            self.counter = VerifiedPrefix(stages[:-1], self.scratch, self.passphrase,
                                          self.ctx.command, self.stored)
        self._started()

    def _start_own_feed(self) -> bool:
        """The format's own feed (format 2: each plaintext one volume of tar -M),
        if it feeds this stored file itself; False: cat feeds one stream."""
        layout = self.salvage.layout if self.salvage is not None else None  # --salvage
        self.volumes = self.fmt.own_feed(self._stages[-1], self.scratch, self.sink.limit,
                                         self.stored, self.out_file, self.ctx.command, layout)
        if self.volumes is None:
            return False
        self.pipeline = self.volumes.pipeline  # started with the first volume
        return True

    def _started(self) -> None:
        stages = list(self.volumes.shown) if self.volumes is not None else self._stages
        # Told once it runs: the runner logged its command first.
        self.ctx.emit(
            PipelineStarted(
                self.stored,
                self.result.owner,
                tuple(stages),
                self.sink.kind,
                self.sink.staging,
                self.sink.folder_rel,
                self.sink.placeholder,
            )
        )

    def _guard(self, src: int, dst: int) -> TarGuard:
        stop = self._kill_extractor if stop_on_cut(self._stages[-1]) else None
        guard = CuttingGuard(src, dst, self.sink.limit, self.stored, prefix=self.stored, stop=stop)
        if self.salvage is not None:
            guard.layout = self.salvage.layout  # where each member's bytes lie
        return guard

    def _kill_extractor(self, fd: int) -> None:
        # From the guard's thread; data flows only once fed, after start() returned.
        if self.pipeline is not None and self.pipeline.procs:
            stop_when_drained(self.pipeline.procs[-1], fd)

    def _reap_cat(self) -> None:
        if self.cat is None:
            return
        (result,) = self.cat.wait()
        if self.counter is not None:  # its own cat reads the same chunk: before the unlink
            self.counter.reap()
        if self.cat_owned and self.cat_path is not None:
            with contextlib.suppress(FileNotFoundError):
                self.cat_path.unlink()
        self.cat = None
        if not result.ok:
            # Usually a consequence: the pipeline died and cat hit a closed pipe.
            self.fail(FeedFailed(f"feeding {self.cat_path}: {result.describe()}"))

    def feed(self, path: Path, owned: bool, member: str = "", feeder: Stage | None = None,
             unverified: str | None = None, zeros: bool = False) -> None:
        """Queue a verified chunk (with --salvage, perhaps one that is not:
        ``unverified`` says why); returns while cat (or the format's ``feeder``,
        format 1's ``tar -c``) is still feeding it."""
        if self.salvage is not None:
            size = path.stat().st_size
            self.salvage.fed_chunk(member or path.name, size, unverified, zeros)
            if unverified is not None:
                self.ctx.emit(ChunkSalvaged(self.stored, member or path.name, size,
                                            unverified, zeros))
        if self.pipeline is None:
            self._feeder = feeder.program if feeder is not None else "cat"  # for the log
            self._start()
        if self.volumes is not None:
            if self.volumes.feed(path, owned, member or path.name, unverified is not None):
                self._started()
            if self.salvage is not None and self.volumes.rebuilt is not None:
                self.salvage.chunks[-1].reason += f"; {self.volumes.rebuilt}"
            self.ctx.emit(ChunkFed(self.stored, member or path.name, path))
            return
        self._reap_cat()
        assert self.feed_w is not None
        stage = feeder if feeder is not None else Stage(("cat", str(path)))
        self.cat = Pipeline(
            [stage],
            stdin=subprocess.DEVNULL,
            stdout=self.feed_w,
            note=f"into the pipeline of {self.stored}",
            log=self.ctx.command,
        ).start()
        self.ctx.emit(ChunkFed(self.stored, member or path.name, path))
        self.cat_path = path
        self.cat_owned = owned
        if self.counter is not None:
            if unverified is None and not self.counter.closed:
                self.counter.feed(path)
            else:
                self.counter.close()  # only the chunks before the first unverified one

    def fail(self, error: QrecoverError) -> None:
        """Record why the stored file failed: the first cause wins, and a cause
        replaces an error that was only its consequence."""
        now = self.result.failure
        if now is None or (now.consequence and not error.consequence):
            self.result.failure = error

    def kill(self) -> None:
        if self.counter is not None:
            self.counter.kill()
        if self.volumes is not None:
            self.volumes.kill()
        for running in (self.cat, self.pipeline):
            if running is not None:
                running.kill()
        if self.feed_w is not None:
            os.close(self.feed_w)
            self.feed_w = None
        if self.out_file is not None:
            self.out_file.close()
            self.out_file = None

    def finish(self) -> FileResult:
        """Close the feed, wait for every stage, and place (or keep as partial)."""
        if self.volumes is not None and (problem := self.volumes.close()) is not None:
            self.fail(problem)
        self._reap_cat()
        if self.feed_w is not None:
            os.close(self.feed_w)
            self.feed_w = None
        results: list[StageResult] = []
        if self.pipeline is not None:
            results = self.pipeline.wait()
        elif self.result.error is None:
            self.fail(StoredFileError(f"{self.stored}: no chunk of it could be used"))
        guarded = self.pipeline.guarded if self.pipeline is not None else None
        if guarded is not None:
            self.result.notes.extend(guarded.skipped)
            self.result.expanded = guarded.passed
        failure = first_failure(results)
        # A stage before the guard that failed on its own (igzip stops short
        # of a damaged gzip stream's end) explains what the guard saw.
        cause = own_failure(results[:-1]) if guarded is not None else None
        if guarded is not None and guarded.error is not None and cause is None:
            # The guard cut the stream: what the stages said is a consequence.
            self.fail(StoredFileError(guarded.error))
        elif failure is not None:
            message = f"{self.stored}: {failure.describe()}"
            output = self.output
            if failure.output_trouble:
                if output is not None and (free := output.free_space()) is not None:
                    # tar may only say "Wrote only N of M bytes": give the facts
                    message += f" (free space left in {output.root}: {human_bytes(free)})"
                self.fail(DiskFull(message) if failure.disk_full else OutputError(message))
            else:
                self.fail(StoredFileError(message))
        if self.salvage is not None and self.salvage.used:
            self._salvaged(guarded)
        elif self.counter is not None:
            self.counter.kill()  # every chunk was verified: nothing to count
        if self.out_file is not None:
            self.out_file.seek(0)
        if self.sink.kind == SinkKind.LIST and self.out_file is not None:
            self.result.members = sum(1 for _ in self.out_file)
            self.out_file.close()  # a listing is only counted (the xml one is read on)
            self.out_file = None
        if self.sink.kind == SinkKind.EXTRACT:
            self._place()
        r = self.result
        finished = FileFinished(r.stored, r.owner, r.error, tuple(r.places), r.restored_bytes)
        self.ctx.emit(finished)
        return self.result

    def _salvaged(self, guarded: TarGuard | None) -> None:
        """--salvage, with unverified chunks fed: a failure that is not the
        output folder's (the decompressor or tar stopping at the damage) cuts
        the file there, and it is placed under its final name all the same."""
        assert self.salvage is not None
        if self.counter is not None:
            self.salvage.verified_prefix = self.counter.finish()
        failure = self.result.failure
        if failure is None or isinstance(failure, OutputError):
            return
        where = ""
        if guarded is not None:
            where = f" (the inner archive ended after byte {guarded.passed + guarded.dropped_in})"
        self.salvage.cut = f"{failure.message}{where}: the file ends where the stream stopped"
        self.result.failure = None

    def _place(self) -> None:
        output = self.output
        staging = self.sink.staging
        assert output is not None and staging is not None
        entries = sorted(staging.iterdir()) if staging.exists() else []
        if not entries:
            if self.result.ok and self.salvage is not None and self.salvage.cut is not None:
                self.fail(StoredFileError(f"{self.stored}: --salvage could restore nothing of "
                                          f"it: {self.salvage.cut}"))
            elif self.result.ok:
                self.fail(StoredFileError(f"{self.stored}: its archive held nothing to restore"))
            return
        folder = output.ensure_dir(self.sink.folder_rel)
        if self.sink.placeholder and self.result.ok:
            if _only_empty_file(entries):
                entries[0].unlink()
                staging.rmdir()
                self.result.places.append(folder)  # the qube's folder, empty
                return
            self.fail(StoredFileError(
                f"{self.stored}: R4.3's placeholder for a qube without files "
                "should be one empty file; it holds more"
            ))
        if self.result.ok and self.placing is not None:  # --resume records the intent
            self.placing(self.stored, self.result.owner, entries, folder)
        for entry in entries:
            size = tree_size(entry)
            try:
                self.result.places.append(output.place(entry, folder, partial=not self.result.ok))
            except OutputError as exc:
                self.fail(exc)
                self.result.places.append(output.place(entry, folder, partial=True))
            self.result.restored_bytes += size
        with contextlib.suppress(OSError):
            staging.rmdir()


def _only_empty_file(entries: list[Path]) -> bool:
    """Whether ``entries`` are R4.3's placeholder: one empty regular file ``empty``."""
    if [e.name for e in entries] != [PLACEHOLDER]:
        return False
    entry = entries[0]
    return not entry.is_symlink() and entry.is_file() and entry.stat().st_size == 0
