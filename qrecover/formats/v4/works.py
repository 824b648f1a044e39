"""Format 4's chunks, several ``scrypt dec`` at once, handed back in chunk order.

The engine reads each chunk off the stream (qrecover.formats.v4.format
``read_chunk``) and submits it here; a :class:`~qrecover.formats.v4.chunk_pool.ChunkPool`
runs the ``scrypt dec``, each into private scratch and under its ``-M``
cap, and returns them strictly in chunk order, each only once scrypt exited 0.

How many run at once is planned from the first chunk's stated cost
(qrecover.formats.v4.scrypt_cost.plan_here: never more than the cores, never more
than ``MemAvailable`` less headroom holds, never more than ``--jobs``); a
later chunk that alone needs more than that budget stops the run
(InsufficientMemory, exit 6).  A chunk whose scrypt header is damaged
is a failed chunk like any other: its stored file stops there.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Callable  # typing's: Planner is a runtime alias (3.8)

from qrecover.compat import removeprefix, removesuffix
from qrecover.errors import BackupError, OutputError, StoredFileError
from qrecover.formats.base import ChunkOutcome, Completed, PendingChunk
from qrecover.formats.v4.chunk_pool import ChunkJob, ChunkPool, Decrypted, Failed, Outcome
from qrecover.formats.v4.chunks import SCRYPT_OVERHEAD, ChunkKeys, ScryptChunk, failure_outcome
from qrecover.formats.v4.scrypt_cost import (
    JobPlan,
    ScryptParams,
    check_fits,
    plan_here,
    read_memory,
    read_params,
    scrypt_ceiling,
)
from qrecover.formats.v4.scrypt_tool import render_stage
from qrecover.runner import CommandLog, Stage

# How the jobs are planned from the first chunk's cost (scrypt_cost.plan_here:
# this machine's cores and memory); a test gives a machine of its own.
Planner = Callable[[ScryptParams, str, "int | None"], JobPlan]


class ScryptWorks:
    """The run's pool of ``scrypt dec``; made on the first chunk, whose cost plans it."""

    def __init__(
        self,
        keys: ChunkKeys,
        passphrase: str,
        scratch: Path,
        log: CommandLog,
        jobs: int | None,
        planner: Planner = plan_here,
    ) -> None:
        self.keys = keys
        self.passphrase = passphrase
        self.scratch = scratch
        self.log = log
        self.jobs = jobs
        self.planner = planner
        self.keep_going = False  # --other-copy: a failed chunk does not stop its stored file
        self.plan: JobPlan | None = None
        self._ceiling = 0
        self._pool: ChunkPool | None = None
        self._sizes: dict[str, int] = {}
        self._kept: dict[str, ScryptChunk] = {}  # --salvage: inputs kept for a second look

    @property
    def in_flight(self) -> int:
        """``scrypt dec`` running now (for the progress line)."""
        return self._pool.running if self._pool is not None else 0

    def admit(self) -> list[Completed]:
        if self._pool is None:
            return []
        return [self._completed(o) for o in self._pool.admit()]

    def submit(self, pending: PendingChunk, member: str, size: int) -> list[Completed]:
        if not isinstance(pending, ScryptChunk):
            raise TypeError("ScryptWorks takes format-4 chunks only")
        try:
            params = read_params(pending.src, member)
        except (BackupError, OutputError) as exc:
            # Damaged before scrypt even runs: the chunks before it still count.
            said = str(exc)
            bad = ChunkOutcome(error=StoredFileError(said), checked=True, reason=said)
            if _salvaging(pending) and not isinstance(exc, OutputError):
                bad = _zeros(pending, said)  # --salvage: zeros of its plaintext's size
            self._drop(pending)
            return [*self.drain(), Completed(member, size, bad)]
        pool = self._ready_pool(pending, params, member)
        salvage = _salvaging(pending)  # --salvage: each chunk a group, its input kept
        job = ChunkJob(
            # each chunk its own group (--salvage, or keep_going: other copies, verify),
            # so that a failure cancels no other
            group=member if salvage or self.keep_going else pending.name.stored,
            index=pending.name.index,
            name=member,
            prefix=self.keys.prefix(pending.name.data_name),
            src=pending.src,
            src_owned=pending.owned and not salvage,
            params=params,
            # qubes.xml's first chunk: the scrypt dec started with the header's
            started=pending.started,
        )
        if salvage:
            self._kept[member] = pending
        if pool.submit(job):
            self._sizes[member] = size
        return [self._completed(o) for o in pool.ready()]

    def drain(self) -> list[Completed]:
        if self._pool is None:
            return []
        return [self._completed(o) for o in self._pool.drain()]

    def close(self) -> None:
        if self._pool is not None:
            self._pool.close()
        for pending in self._kept.values():
            self._drop(pending)
        self._kept.clear()

    # -- inside --------------------------------------------------------------

    def _ready_pool(self, pending: ScryptChunk, params: ScryptParams, member: str) -> ChunkPool:
        try:
            if self._pool is None:
                self.plan = self.planner(params, member, self.jobs)
                self._ceiling = scrypt_ceiling(read_memory().total)
                self._pool = ChunkPool(
                    self.keys.tool, self.passphrase, self.scratch, self.plan,
                    on_start=self._started,
                )
            else:
                assert self.plan is not None
                check_fits(params, member, self.plan.budget, self._ceiling)
        except BaseException:
            self._drop(pending)
            raise
        return self._pool

    def _drop(self, pending: ScryptChunk) -> None:
        if pending.owned:
            with contextlib.suppress(FileNotFoundError):
                pending.src.unlink()

    def _started(self, job: ChunkJob, stage: Stage) -> None:
        """``-v``: the command as a person would replay it, named after the chunk."""
        data_name = removesuffix(job.name, ".enc")
        shown = Stage((*stage.argv[:-2], job.name, data_name), secret_env=stage.secret_env)
        self.log(render_stage(self.keys.tool, shown, job.prefix))

    def _completed(self, outcome: Outcome) -> Completed:
        member = outcome.job.name
        size = self._sizes.pop(member, 0)
        kept = self._kept.pop(member, None)
        if isinstance(outcome, Decrypted):
            if kept is not None:
                self._drop(kept)
            return Completed(member, size, ChunkOutcome(plain=outcome.plain, owned=True,
                                                        checked=True))
        assert isinstance(outcome, Failed)
        if kept is not None:
            result = outcome.result
            if result is not None and not result.output_trouble:
                return Completed(member, size, self._salvaged(kept, result.describe()))
            self._drop(kept)
        if outcome.result is None:
            error = StoredFileError(f"{member}: {outcome.error}")
            return Completed(member, size, ChunkOutcome(error=error))
        return Completed(member, size, failure_outcome(member, outcome.result))


    def _salvaged(self, pending: ScryptChunk, said: str) -> ChunkOutcome:
        """--salvage: scrypt refused the chunk.  ``scrypt dec`` writes what it
        decrypts before it checks, so it is run again on the kept input and its
        plaintext used, made up to the chunk's size with zeros (a damaged scrypt
        header: all zeros), so that what follows keeps its place."""
        plain = pending.store.scratch_file()
        try:
            self.keys.decrypt(pending.name, pending.src, plain, self.passphrase, self.log)
            return _padded(pending, plain, said)
        except OSError as exc:
            return ChunkOutcome(error=StoredFileError(f"{pending.member}: --salvage could not "
                                                      f"run scrypt again ({exc})"))
        finally:
            self._drop(pending)


def _padded(pending: ScryptChunk, plain: Path, said: str) -> ChunkOutcome:
    size = max(0, pending.src.stat().st_size - SCRYPT_OVERHEAD)
    with plain.open("ab") as f:
        if f.tell() < size:
            f.truncate(size)  # sparse: no disk
    return ChunkOutcome(plain=plain, owned=True, checked=True, reason=said, unverified=said)


def _zeros(pending: ScryptChunk, said: str) -> ChunkOutcome:
    """--salvage: a chunk scrypt cannot even start on stands as zeros of its
    plaintext's size, so that what follows keeps its place."""
    why = removeprefix(said, f"{pending.member}: ").replace("; nothing of it was used", "")
    size = max(0, pending.src.stat().st_size - SCRYPT_OVERHEAD)
    return _padded(pending, pending.store.scratch_file(), f"{why}; fed as {size} zero bytes")


def _salvaging(pending: ScryptChunk) -> bool:
    """restore --salvage for this chunk's stored file (a store that does not say: no)."""
    return bool(getattr(pending.store, "salvage", False))
