"""Format-4 chunks decrypted several at once, released strictly in order.

Every R4 chunk has its own salt and is authenticated on its own, so several
``scrypt dec`` may run at once; only their plaintext must reach the
decompressor in chunk order.  :class:`ChunkPool` takes chunk jobs in
submission order, runs at most ``plan.jobs`` of them (and no more than the
memory budget holds: each reserves its chunk's peak RSS), each into a private
scratch file, and hands them back in submission order, each only once its
scrypt has exited 0 (scrypt may write plaintext before it finds damage).

A failure at chunk k of a stored file (a *group*) stops that group there:
its later chunks are refused or killed and their scratch removed; what came
before k is still released, then a :class:`Failed` for k; other groups go on.

Scratch stays bounded: at most ``window`` chunks (``jobs + 1`` by default)
are outstanding, counting the one the caller is copying in after
:meth:`ChunkPool.admit`; each holds its input, and while scrypt runs also
its growing plaintext.  With the plaintext the caller is feeding, that is at
most ``2 * jobs + 2`` chunk files when inputs are scratch copies (a stream or
a backup file), ``jobs + 2`` when scrypt reads them in place (a folder).

The caller's thread submits and takes; worker threads only wait on their
``scrypt dec`` (the CPU is in scrypt).  All state is on the pool; closing it
(also on Interrupted) kills every child and removes all its scratch.

The engine's loop (qrecover.formats.v4.works is its format-4 side), one pool::

    with ChunkPool(tool, passphrase, scratch, plan) as pool:
        for chunk in chunks:                  # as the reader meets them
            handle(pool.admit())              # blocks while the window is full
            src = pool.input_path()           # copy the .enc here (or read in place)
            pool.submit(ChunkJob(..., params=read_params(src, chunk.name)))
            handle(pool.ready())
        handle(pool.drain())  # each Decrypted: cat its plain, unlink; a Failed: stop"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import threading
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Callable, Literal, Union

from qrecover import signals
from qrecover.formats.v4.scrypt_cost import (
    InsufficientMemory,
    JobPlan,
    ScryptParams,
    human,
    limit_args,
)
from qrecover.formats.v4.scrypt_tool import ScryptTool, dec_pipeline, dec_stage
from qrecover.runner import Pipeline, Stage, StageResult, log_command

if TYPE_CHECKING:
    from qrecover.formats.v4.head_start import HeadStart

_PIPE_SAFE = 4096  # a pipe holds this much without a reader (scrypt -P's passphrase)


@dataclass(frozen=True)
class ChunkJob:
    """One chunk to authenticate and decrypt."""

    group: str  # its stored file: a failure stops only this group's later chunks
    index: int  # its number in the stored file
    name: str  # the member, for messages: vm7/private.img.003.enc
    prefix: str  # what precedes the passphrase: BACKUPID!vm7/private.img.003!
    src: Path  # what scrypt reads
    src_owned: bool  # a scratch copy, removed once scrypt is done with it
    params: ScryptParams  # its stated cost (scrypt_cost.read_params of src)
    # its scrypt dec already running since before the header authenticated
    # (qrecover.formats.v4.head_start): waited for instead of a new one
    started: HeadStart | None = None


@dataclass(frozen=True)
class Decrypted:
    """A chunk scrypt authenticated; ``plain`` is the caller's to feed, then remove."""

    job: ChunkJob
    plain: Path
    result: StageResult
    seconds: float  # scrypt's wall time
    finished: float  # time.monotonic() when scrypt exited


@dataclass(frozen=True)
class Failed:
    """The chunk that stops its group; nothing of it is usable."""

    job: ChunkJob
    result: StageResult | None  # None: scrypt could not be run
    error: str  # what went wrong, for the message (result.describe() or the OSError)


Outcome = Union[Decrypted, Failed]  # typing's: a runtime alias on Python 3.8
StartListener = Callable[[ChunkJob, Stage], None]

_State = Literal["queued", "running", "done", "dropped"]


@dataclass(eq=False)
class _Entry:
    job: ChunkJob
    plain: Path
    state: _State = "queued"
    outcome: Outcome | None = None
    pipeline: Pipeline | None = None
    cancelled: bool = False
    thread: threading.Thread | None = None
    started: float = 0.0
    reserved: int = 0


@dataclass
class _Counters:
    running: int = 0
    memory: int = 0
    seq: int = 0
    peak_running: int = 0
    threads: list[threading.Thread] = field(default_factory=list)


class ChunkPool:
    """At most ``plan.jobs`` ``scrypt dec`` at once, results in submission order.

    ``on_start`` is called (from a worker thread: it must be thread-safe,
    as logging is) with each job and the exact stage about to run, for ``-v``.
    """

    def __init__(
        self,
        tool: ScryptTool,
        passphrase: str,
        scratch: Path,
        plan: JobPlan,
        *,
        window: int | None = None,
        on_start: StartListener | None = None,
    ) -> None:
        self.tool = tool
        self.plan = plan
        self.window = window if window is not None else plan.jobs + 1
        if self.window < 1:
            raise ValueError("window must be at least 1")
        self.dir = Path(tempfile.mkdtemp(prefix="chunks-", dir=scratch))
        self._passphrase = passphrase
        self._on_start = on_start
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._queue: deque[_Entry] = deque()
        self._stopped: dict[str, int] = {}  # group -> index of its failed chunk
        self._n = _Counters()
        self._closed = False

    # -- the caller's side ---------------------------------------------------

    def input_path(self) -> Path:
        """A fresh private path in the pool's scratch for the caller's copy of a chunk."""
        with self._lock:
            self._n.seq += 1
            return self.dir / f"enc-{self._n.seq}"

    def stopped(self, group: str) -> bool:
        """Has a chunk of ``group`` failed (so its later chunks are refused)?"""
        with self._lock:
            return group in self._stopped

    def admit(self) -> list[Outcome]:
        """Block until one more chunk may be copied in and submitted.

        Returns what was taken meanwhile, in order: the caller handles each
        (feeds a Decrypted, stops a group on Failed) exactly as from :meth:`take`.
        """
        taken: list[Outcome] = []
        with self._changed:
            while True:
                if self._outstanding() < self.window:
                    return taken
                outcome = self._take_locked()
                if outcome is not None:
                    taken.append(outcome)
                else:
                    signals.wait_condition(self._changed)

    def submit(self, job: ChunkJob) -> bool:
        """Queue ``job`` (after :meth:`admit`); False, and its copy removed, if
        its group already stopped at an earlier chunk.  InsufficientMemory if
        the chunk alone needs more than the plan's whole budget."""
        with self._lock:
            if self._closed:
                raise RuntimeError("submit on a closed ChunkPool")
            if self._outstanding() >= self.window:
                raise RuntimeError("submit without room: call admit() first")
            if job.params.rss > self.plan.budget:
                # the caller checks with scrypt_cost.check_fits first; never run it anyway
                self._remove_src(job)
                raise InsufficientMemory(
                    f"{job.name}: its key derivation needs {human(job.params.rss)}, "
                    f"more than the {human(self.plan.budget)} all scrypt jobs may use",
                    hint="restore on a machine with more RAM",
                )
            stop = self._stopped.get(job.group)
            if stop is not None and job.index > stop:
                self._remove_src(job)
                return False
            self._n.seq += 1
            self._queue.append(_Entry(job, self.dir / f"plain-{self._n.seq}"))
            self._schedule()
        return True

    def take(self, block: bool = True) -> Outcome | None:
        """The next outcome in submission order; None when nothing is
        outstanding (or, with ``block=False``, when the next is not done)."""
        with self._changed:
            while True:
                outcome = self._take_locked()
                if outcome is not None or not self._queue or not block:
                    return outcome
                signals.wait_condition(self._changed)

    def ready(self) -> list[Outcome]:
        """Every outcome that can be taken now without waiting, in order."""
        out: list[Outcome] = []
        while (outcome := self.take(block=False)) is not None:
            out.append(outcome)
        return out

    def drain(self) -> Iterator[Outcome]:
        """Every outstanding outcome, in order, waiting for each."""
        while (outcome := self.take()) is not None:
            yield outcome

    @property
    def running(self) -> int:  # how many scrypt dec run now (an int read: atomic)
        return self._n.running

    @property
    def peak_running(self) -> int:
        """The most ``scrypt dec`` that ran at once so far."""
        return self._n.peak_running  # an int read: atomic

    def close(self) -> None:
        """Kill every running scrypt, wait for them, remove all the pool's scratch."""
        with self._lock:
            self._closed = True
            for entry in self._queue:
                self._cancel(entry)
            threads = list(self._n.threads)
        for thread in threads:
            signals.join(thread, timeout=30)
        with self._lock:
            for entry in self._queue:
                self._remove_src(entry.job)
            self._queue.clear()
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> ChunkPool:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- scheduling (always under self._lock) -------------------------------

    def _outstanding(self) -> int:
        return sum(1 for entry in self._queue if entry.state != "dropped")

    def _take_locked(self) -> Outcome | None:
        """Pop the head if it is done (dropped entries before it go too)."""
        while self._queue and self._queue[0].state == "dropped":
            self._queue.popleft()
        if not self._queue or self._queue[0].state != "done":
            return None
        head = self._queue.popleft()
        self._changed.notify_all()
        assert head.outcome is not None
        return head.outcome

    def _schedule(self) -> None:
        """Start queued jobs in order while the job count and memory allow;
        never one out of order, so a big chunk cannot be starved."""
        self._n.threads = [t for t in self._n.threads if t.is_alive()]
        for entry in self._queue:
            if entry.state != "queued":
                continue
            need = entry.job.params.rss
            if self._n.running >= self.plan.jobs:
                return
            if self._n.running and self._n.memory + need > self.plan.budget:
                return
            entry.state = "running"
            entry.reserved = need
            self._n.running += 1
            self._n.memory += need
            self._n.peak_running = max(self._n.peak_running, self._n.running)
            entry.thread = threading.Thread(target=self._run, args=(entry,), daemon=True)
            self._n.threads.append(entry.thread)
            entry.thread.start()

    def _cancel(self, entry: _Entry) -> None:
        entry.cancelled = True
        if entry.state == "queued":
            entry.state = "dropped"
            self._remove_src(entry.job)
        elif entry.state == "running" and entry.pipeline is not None:
            for proc in entry.pipeline.procs:
                with contextlib.suppress(OSError):
                    proc.kill()  # the worker thread reaps it
        elif entry.state == "done":
            entry.state = "dropped"
            with contextlib.suppress(FileNotFoundError):
                entry.plain.unlink()
        self._changed.notify_all()

    def _stop_group(self, group: str, index: int) -> None:
        """Chunk ``index`` of ``group`` failed: nothing after it is used."""
        self._stopped[group] = min(index, self._stopped.get(group, index))
        for entry in self._queue:
            if entry.job.group == group and entry.job.index > index:
                self._cancel(entry)

    def _remove_src(self, job: ChunkJob) -> None:
        if job.src_owned:
            with contextlib.suppress(FileNotFoundError):
                job.src.unlink()

    # -- a worker: one scrypt dec -------------------------------------------

    def _run(self, entry: _Entry) -> None:
        job = entry.job
        result: StageResult | None = None
        error = ""
        entry.started = time.monotonic()
        try:
            result = self._decrypt(entry)
        except Exception as exc:  # a worker must report back, or take() waits forever
            error = f"could not run scrypt ({exc})"
        finished = time.monotonic()
        with self._changed:
            self._n.running -= 1
            self._n.memory -= entry.reserved
            self._remove_src(job)
            if entry.cancelled:
                entry.state = "dropped"
                with contextlib.suppress(FileNotFoundError):
                    entry.plain.unlink()
            elif result is not None and result.ok:
                entry.outcome = Decrypted(
                    job, entry.plain, result, finished - entry.started, finished
                )
                entry.state = "done"
            else:
                with contextlib.suppress(FileNotFoundError):
                    entry.plain.unlink()  # scrypt may have written some before it failed
                entry.outcome = Failed(job, result, result.describe() if result else error)
                entry.state = "done"
                self._stop_group(job.group, job.index)
            if not self._closed:
                self._schedule()
            self._changed.notify_all()

    def _decrypt(self, entry: _Entry) -> StageResult | None:
        job = entry.job
        if job.started is not None:
            return self._adopt(entry, job.started)
        stage = limited_stage(self.tool, job.params, job.src, entry.plain)
        if self._on_start is not None:
            self._on_start(job, stage)
        pipeline, read_end = dec_pipeline(self.tool, stage, job.prefix + self._passphrase)
        try:
            with self._lock:
                if entry.cancelled:
                    return None
                # Started under the lock, so that a cancel either sees the
                # pipeline (and kills it) or happened before (and we skip it).
                entry.pipeline = pipeline.start()
            (result,) = pipeline.wait()
        finally:
            if read_end >= 0:
                os.close(read_end)
        return result

    def _adopt(self, entry: _Entry, started: HeadStart) -> StageResult | None:
        """The chunk's scrypt dec, started before the header authenticated:
        waited for as if started now; its plaintext moved to ``entry.plain``."""
        if self._on_start is not None:
            self._on_start(entry.job, started.stage)
        log_command(started.pipeline.render())
        with self._lock:
            if entry.cancelled:
                return None
            entry.pipeline = started.pipeline
        try:
            result = started.wait()
            if result.ok:
                shutil.move(str(started.plain), str(entry.plain))
        finally:
            started.close()  # its folder: the input, and the plaintext if not moved
        return result


def limited_stage(tool: ScryptTool, params: ScryptParams, src: Path, plain: Path) -> Stage:
    """``scrypt dec`` of ``src`` into ``plain`` under ``-M``, the chunk's own cost."""
    base = dec_stage(tool, str(src), str(plain))
    argv = (*base.argv[:2], *limit_args(params), *base.argv[2:])
    return Stage(argv, secret_env=base.secret_env)

