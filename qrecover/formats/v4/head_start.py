"""qubes.xml's key derivation started while the header's runs.

Every format-4 chunk costs a key derivation, and so does the header's
``.hmac``: one after the other, ``info`` would wait for two.  While the
header is authenticated, :func:`start` copies the first chunk of qubes.xml
(if small) into a private temporary folder and starts its ``scrypt dec``
under the backup id the header *claims*.  Nothing of it is used until the
header authenticated: the engine reads that chunk as always, and the pool
(qrecover.formats.v4.chunk_pool) waits for this ``scrypt dec`` instead of
starting one, only if the authenticated header's backup id is the one it
was started with (:meth:`HeadStart.claim`); otherwise it is killed, its
output removed, and the chunk decrypted as always.

It starts only when the memory model holds both derivations at once (and
``--jobs`` is not 1); otherwise they run one after the other, as before.
The chunk's bytes, read off the stream early, are read again by the engine
from :class:`Replay`, which raises what the stream raised, where it raised it.
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from qrecover.archive.members import QUBES_XML, Member, parse_member_name
from qrecover.errors import QrecoverError
from qrecover.formats.v4.chunk_pool import limited_stage
from qrecover.formats.v4.chunks import SCRYPT_OVERHEAD
from qrecover.formats.v4.scrypt_cost import HEADER_SIZE, ScryptParams, parse_params, plan_here
from qrecover.formats.v4.scrypt_tool import chunk_prefix, dec_pipeline, detect_scrypt
from qrecover.header import split_header
from qrecover.runner import Pipeline, Stage, StageResult

# qubes.xml's first chunk is a few KiB (a hundred VMs: well under 1 MiB); a
# larger one is not read ahead (it would be held in memory).
MAX_EARLY = 4 * 1024 * 1024


def _quiet(_: str) -> None:
    """Not logged when started: logged when the pool adopts it (-v keeps its order)."""


@dataclass(eq=False)
class HeadStart:
    """One ``scrypt dec`` of qubes.xml's first chunk, started before the header
    authenticated, in a private temporary folder of its own."""

    backup_id: str  # as the header claims it: not yet authenticated
    member: str
    folder: Path  # holds its input (enc) and its plaintext (plain)
    stage: Stage
    pipeline: Pipeline
    read_end: int  # the pipe that holds scrypt -P's passphrase (-1: none)
    closed: bool = False
    claimed: bool = False

    @property
    def plain(self) -> Path:
        return self.folder / "plain"

    def claim(self, member: str, backup_id: str) -> HeadStart | None:
        """Itself, for the pool to wait for, if it decrypts ``member`` under the
        authenticated ``backup_id``; else None, and it is stopped and removed."""
        if self.closed or self.claimed or member != self.member:
            return None
        if backup_id != self.backup_id:
            self.close()  # another key: decrypted again, as always
            return None
        self.claimed = True
        return self

    def wait(self) -> StageResult:
        """scrypt's result (its plaintext usable only if ok)."""
        (result,) = self.pipeline.wait()
        self._close_pipe()
        return result

    def close(self) -> None:
        """Kill it if it runs, and remove its folder: input and plaintext."""
        self.closed = True
        self.pipeline.kill()
        self._close_pipe()
        shutil.rmtree(self.folder, ignore_errors=True)

    def _close_pipe(self) -> None:
        if self.read_end >= 0:
            with contextlib.suppress(OSError):
                os.close(self.read_end)
            self.read_end = -1


class Replay(io.BytesIO):
    """A member's bytes read early, read again: then what the stream raised (if it did)."""

    def __init__(self, data: bytes, error: BaseException | None,
                 started: HeadStart | None) -> None:
        super().__init__(data)
        self.error = error
        self.started = started

    def read(self, size: int | None = -1) -> bytes:
        block = super().read(size)
        if not block and size != 0 and self.error is not None:
            raise self.error
        return block

    def close(self) -> None:
        pass  # read once more by whoever takes the member


def start(member: Member, header: bytes, header_hmac: bytes, passphrase: str,
          jobs: int | None) -> HeadStart | None:
    """Start qubes.xml's first chunk's ``scrypt dec`` if ``member`` is it, it is
    small, and the memory model holds both derivations at once; else None."""
    name = parse_member_name(member.name)
    if (jobs == 1 or name is None or name.stored != QUBES_XML or name.index != 0
            or not name.is_enc or not SCRYPT_OVERHEAD <= member.size <= MAX_EARLY):
        return None
    try:
        backup_id = split_header(header).get("backup-id", "")
        header_params = parse_params(header_hmac[:HEADER_SIZE], "backup-header.hmac")
    except QrecoverError:
        return None  # the header's own check says what is wrong
    if not backup_id or "!" in backup_id:
        return None
    data = _read_ahead(member)
    if data is None:
        return None
    started = None
    try:
        started = _started(member.name, data, backup_id, header_params, passphrase, jobs)
    finally:
        if member.stream is not None or started is not None:  # a folder's: only to carry it
            member.stream = Replay(data, None, started)
    return started


def _read_ahead(member: Member) -> bytes | None:
    """The member's bytes; a stream that breaks inside it is replayed as it broke
    (None: nothing is started)."""
    if member.stream is None:  # a folder's chunk file: read here, read again later
        try:
            with member.open() as f:
                data = f.read(member.size + 1)
        except (OSError, QrecoverError):
            return None
        return data if len(data) == member.size else None
    chunks: list[bytes] = []
    got = 0
    try:
        while got < member.size:
            block = member.stream.read(member.size - got)
            if not block:
                break
            chunks.append(block)
            got += len(block)
    except (OSError, EOFError) as exc:
        member.stream = Replay(b"".join(chunks), exc, None)
        return None
    data = b"".join(chunks)
    if got != member.size:
        member.stream = Replay(data, None, None)
        return None
    return data


def _started(chunk: str, data: bytes, backup_id: str, header_params: ScryptParams,
             passphrase: str, jobs: int | None) -> HeadStart | None:
    try:
        params = parse_params(data[:HEADER_SIZE], chunk)
        plan = plan_here(params, chunk, jobs)
        tool = detect_scrypt(_quiet)
    except QrecoverError:
        return None  # the chunk's own check says what is wrong, when it is read
    if plan.jobs < 2 or params.rss + header_params.rss > plan.budget:
        return None  # one derivation at a time, as before
    try:
        folder = Path(tempfile.mkdtemp(prefix="qrecover-early-"))
    except OSError:
        return None
    started = None
    try:
        src = folder / "enc"
        fd = os.open(src, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        stage = limited_stage(tool, params, src, folder / "plain")  # HeadStart.plain
        secret = chunk_prefix(backup_id, chunk[: -len(".enc")]) + passphrase
        pipeline, read_end = dec_pipeline(tool, stage, secret, _quiet)
        started = HeadStart(backup_id, chunk, folder, stage, pipeline, read_end)
        pipeline.start()
    except (OSError, ValueError, QrecoverError):
        _discard(started, folder)
        return None  # not started: decrypted as always, after the header
    except BaseException:
        _discard(started, folder)
        raise
    return started


def _discard(started: HeadStart | None, folder: Path) -> None:
    if started is not None:
        started.close()
    shutil.rmtree(folder, ignore_errors=True)
