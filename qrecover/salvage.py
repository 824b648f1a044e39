"""``restore --salvage``: chunks used although they could not be authenticated.

Without ``--salvage`` nothing here runs.  With it, a chunk that fails its
check (format 3: its HMAC; format 4: scrypt's) is fed on anyway, and this
module keeps the account of it for one stored file:

* where each unverified chunk lies in the stream that was fed (``fed``
  offsets: ciphertext for format 3's ``openssl enc`` stream, plaintext for
  format 4), and from it the bytes of the *inner archive* it can have
  changed: the same bytes for an unencrypted stream; for ``openssl enc``
  (CBC and the other allowed modes) the 16-byte blocks it covers, plus the
  block after (CBC feeds each ciphertext block into the next block's
  plaintext), less the 16-byte ``Salted__`` header; if the header itself is
  unverified, the whole stream is (its salt makes the key);
* for a compressed stream no byte range can be told: a decompressor keeps
  state from the start of the stream, so everything from the first
  unverified chunk on is unverified.  Where that starts in the inner archive
  is counted by a second decompressor fed only the chunks before it (what
  it produces from them is what the verified chunks alone give);
* the inner archive's layout (qrecover.stages.sparse: each member's data,
  sparse maps included), so that archive ranges become ranges of the
  restored files.

The result (:class:`SalvageReport`) goes into the file's line, ``--json``
and ``SALVAGED.txt`` at the top of DIR.  The exit code stays 4.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from qrecover.archive.members import ChunkName
from qrecover.errors import OutputError
from qrecover.events import SinkKind
from qrecover.messages import err
from qrecover.output import Output
from qrecover.runner import PASS_ENV, CommandLog, Pipeline, Stage
from qrecover.stages.decompress import GUNZIPS
from qrecover.stages.sparse import Extent, file_offset, to_file

if TYPE_CHECKING:
    from qrecover.formats.base import Format
    from qrecover.plan import Sink
    from qrecover.report import FileResult, Report
    from qrecover.stored import StoredFile

SALVAGED_NAME = "SALVAGED.txt"
_SALT = 16  # openssl enc's "Salted__" and its 8-byte salt
_BLOCK = 16  # the block of every cipher format 3 allows

WARNING = (
    "WARNING: --salvage used chunks that FAILED AUTHENTICATION: the files named "
    "below may hold damaged or forged bytes; trust them only where this report "
    "says they are verified"
)


@dataclass(frozen=True)
class Geometry:
    """How the fed stream becomes the inner archive."""

    encrypted: bool  # an ``openssl enc`` stream (format 3, encrypted)
    compressed: bool


@dataclass
class Unverified:
    """One chunk used without authentication."""

    member: str  # vm7/private.img.001 (or .001.enc)
    reason: str  # why it could not be authenticated
    start: int  # where its bytes lie in the fed stream
    end: int
    zero_filled: bool = False  # its bytes were missing: zeros of its size were fed


@dataclass
class FileRanges:
    """One restored file and its unverified bytes."""

    member: str  # its name in the inner archive
    path: str  # where it was restored, relative to DIR ("" if unknown)
    ranges: list[tuple[int, int]]  # [start, end) of the file, exact
    from_byte: int | None = None  # compressed: everything from here on is unverified
    layout_unverified: bool = False  # its headers or sparse map are in an unverified range
    size: int | None = None  # its size as restored (told when the stream was cut)


@dataclass
class SalvageReport:
    """What ``--salvage`` did to one stored file."""

    stored: str
    chunks: list[Unverified]
    files: list[FileRanges]
    archive: list[tuple[int, int | None]]  # unverified ranges of the inner archive
    exact: bool  # False: compressed, only "from byte N on"
    cut: str | None = None  # why the file ends early (the decompressor, tar...), if it does

    def as_json(self) -> dict[str, object]:
        return {
            "chunks": [
                {"chunk": c.member, "reason": c.reason, "stream_bytes": [c.start, c.end],
                 "zero_filled": c.zero_filled}
                for c in self.chunks
            ],
            "archive_ranges": [list(r) for r in self.archive],
            "exact": self.exact,
            "files": [
                {"member": f.member, "path": f.path or None,
                 "ranges": [list(r) for r in f.ranges], "from_byte": f.from_byte,
                 "layout_unverified": f.layout_unverified, "size": f.size}
                for f in self.files
            ],
            "cut": self.cut,
        }

    def lines(self) -> list[str]:
        """The account in words, for SALVAGED.txt and the run's output."""
        out = [f"{self.stored}: placed under its final name with "
               f"{len(self.chunks)} UNVERIFIED chunk(s):"]
        for c in self.chunks:
            out.append(f"  chunk {c.member}: {c.reason} "
                       f"(bytes {c.start}-{c.end - 1} of the stored file's stream)")
        for f in self.files:
            where = f.path or f.member
            if f.from_byte is not None:
                out.append(f"  {where}: from byte {f.from_byte} on, UNVERIFIED (compressed "
                           "stream: nothing after the damage can be checked)")
            elif f.ranges:
                spans = ", ".join(f"{a}-{b - 1}" for a, b in f.ranges)
                out.append(f"  {where}: UNVERIFIED bytes {spans} (exact; "
                           f"{sum(b - a for a, b in f.ranges)} bytes); the rest is as stored")
            if f.layout_unverified:
                out.append(f"  {where}: its tar header or sparse map is in an unverified "
                           "range: where its bytes landed is itself unverified")
        if not self.files:
            out.append("  no restored file lies in the unverified range(s)")
        if self.cut is not None:
            out.append(f"  CUT SHORT: {self.cut}")
            out += [f"  {f.path}: {f.size} bytes as restored (cut there)" for f in self.files
                    if f.path and f.size is not None]
        return out


@dataclass
class SalvageLog:
    """The account kept while one stored file is fed (StoredFile.salvage)."""

    stored: str
    geometry: Geometry
    fed: int = 0  # bytes fed so far
    first_size: int = 0  # the first chunk's
    chunks: list[Unverified] = field(default_factory=list)
    layout: list[Extent] = field(default_factory=list)  # filled by the guard
    verified_prefix: int | None = None  # compressed: archive bytes from the verified chunks
    cut: str | None = None

    def fed_chunk(self, member: str, size: int, reason: str | None, zeros: bool = False) -> None:
        if not self.fed:
            self.first_size = size  # every chunk but the last has this size
        if reason is not None:
            err(f"WARNING: {member}: {reason}: used UNVERIFIED (--salvage): its bytes may be "
                "damaged or forged")
            self.chunks.append(Unverified(member, reason, self.fed, self.fed + size, zeros))
        self.fed += size

    @property
    def used(self) -> bool:
        return bool(self.chunks)

    def archive_ranges(self) -> list[tuple[int, int | None]]:
        """Unverified ranges of the inner archive (end None: to its end)."""
        if self.geometry.compressed:
            return [(self.verified_prefix or 0, None)]
        if not self.geometry.encrypted:
            return [(c.start, c.end) for c in self.chunks]
        found: list[tuple[int, int | None]] = []
        for c in self.chunks:
            if c.start < _SALT:
                return [(0, None)]
            begin = (c.start - _SALT) // _BLOCK * _BLOCK
            end = -(-(c.end - _SALT) // _BLOCK) * _BLOCK + _BLOCK
            found.append((begin, end))
        return found

    def report(self, placed: dict[str, Path], root: Path | None, strip: int) -> SalvageReport:
        """The account, with each member's restored path (``placed``: its
        top-level name -> where it went)."""
        ranges = self.archive_ranges()
        files: list[FileRanges] = []
        by_member: dict[str, FileRanges] = {}  # format 2: a member in several volumes
        for ext in self.layout:
            path = _restored(ext.name, strip, placed, root)
            touched = by_member.get(ext.name) or FileRanges(ext.name, path, [])
            for begin, end in ranges:
                stop = end if end is not None else 1 << 62
                # (a piece continued in a later volume has no header of its own:
                # header_start == data_start, and its M header places no byte)
                if begin < ext.data_start + ext.map_bytes and stop > ext.header_start \
                        and ext.header_start < ext.data_start:
                    touched.layout_unverified = True
                if end is None and self.geometry.compressed:
                    if begin < ext.data_start + ext.size:
                        at = file_offset(ext, begin)
                        touched.from_byte = at if touched.from_byte is None else min(
                            at, touched.from_byte)
                    continue
                touched.ranges += to_file(ext, begin, stop)
            touched.ranges = _merge(touched.ranges)
            if path and root is not None and (root / path).is_file():
                touched.size = (root / path).stat().st_size
            if (touched.ranges or touched.from_byte is not None or touched.layout_unverified) \
                    and ext.name not in by_member:
                by_member[ext.name] = touched
                files.append(touched)
        return SalvageReport(self.stored, list(self.chunks), files, ranges,
                             not self.geometry.compressed, self.cut)


def _merge(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    merged: list[tuple[int, int]] = []
    for a, b in sorted(ranges):
        if merged and a <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(b, merged[-1][1]))
        else:
            merged.append((a, b))
    return merged


def _restored(member: str, strip: int, placed: dict[str, Path], root: Path | None) -> str:
    """Where a member of the inner archive was restored, relative to DIR."""
    parts = [p for p in member.split("/") if p not in ("", ".")]
    rest = parts[strip:] if strip <= len(parts) else []
    if not rest or rest[0] not in placed:
        return ""
    target = placed[rest[0]].joinpath(*rest[1:])
    if root is not None:
        try:
            return str(target.relative_to(root))
        except ValueError:
            return str(target)
    return str(target)


def write_salvaged(output: Output, reports: list[SalvageReport], path: Path | None) -> Path:
    """SALVAGED.txt at the top of DIR, or ``path`` again (this run's own, rewritten
    as each salvaged file is placed).  Never over a file of the user's: without
    --force, a free name is taken."""
    text = "\n".join([
        WARNING, "",
        "These stored files were restored with restore --salvage although some of",
        "their chunks could not be authenticated (damaged or altered). Byte ranges",
        "count from 0, both ends included; everything outside them was authenticated.",
        "",
        *(line for r in reports for line in [*r.lines(), ""]),
    ])
    if path is None:
        name, n = SALVAGED_NAME, 1
        while os.path.lexists(output.root / name) and not output.force:
            name = f"SALVAGED.{n}.txt"
            n += 1
        path = output.root / name
    fd, tmp = tempfile.mkstemp(prefix=".salvaged.", dir=output.root)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(text.encode("utf-8"))
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        if path.is_dir() and not path.is_symlink():
            raise OutputError(f"{path}: is a folder")
        os.replace(tmp, path)  # a symbolic link there is replaced, never followed
    except OSError as exc:
        raise OutputError(f"{path}: cannot write ({exc.strerror})") from None
    finally:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
    return path


class VerifiedPrefix:
    """A second ``[openssl enc -d |] DECOMPRESSOR | wc -c``, fed only the chunks
    before the first unverified one: what it counts is the inner archive's
    bytes that the verified chunks give (the decompressor writes all it can
    of a stream cut short, then fails: that failure is expected here)."""

    def __init__(
        self, front: list[Stage], scratch: Path, passphrase: str, log: CommandLog, stored: str
    ) -> None:
        read_end, self._feed = os.pipe()
        self._out = tempfile.TemporaryFile(dir=scratch)  # noqa: SIM115
        # GNU gzip, never igzip: igzip may write nothing of a stream cut short
        front = [Stage(("gzip", "-d")) if stage.program in GUNZIPS else stage
                 for stage in front]
        self.closed = False
        self._cat: Pipeline | None = None
        try:
            self.pipeline: Pipeline | None = Pipeline(
                [*front, Stage(("wc", "-c"))], stdin=read_end, stdout=self._out,
                secrets={PASS_ENV: passphrase},
                note=f"--salvage: counts what the verified chunks of {stored} give", log=log,
            ).start()
        finally:
            os.close(read_end)

    def feed(self, path: Path) -> None:
        """Feed a verified chunk (after :meth:`reap` of the one before)."""
        self._cat = Pipeline([Stage(("cat", str(path)))], stdin=subprocess.DEVNULL,
                             stdout=self._feed, note="into the --salvage count").start()

    def reap(self) -> None:
        if self._cat is not None:
            self._cat.wait()  # a failure only means the count stopped early
            self._cat = None

    def close(self) -> None:
        self.reap()
        if not self.closed:
            os.close(self._feed)
            self.closed = True

    def finish(self) -> int:
        """The count (0 if it cannot be read: nothing is then claimed verified)."""
        self.close()
        assert self.pipeline is not None
        self.pipeline.wait()
        self.pipeline = None
        self._out.seek(0)
        text = self._out.read(64).decode("ascii", "replace").strip()
        self._out.close()
        return int(text) if text.isdigit() else 0

    def kill(self) -> None:
        for running in (self._cat, self.pipeline):
            if running is not None:
                running.kill()
        self._cat = None
        if not self.closed:
            with contextlib.suppress(OSError):
                os.close(self._feed)
            self.closed = True
        if self.pipeline is not None:
            with contextlib.suppress(Exception):
                self.pipeline.wait()
            self.pipeline = None
        self._out.close()


def new_log(salvage: bool, fmt: Format, gunzip: str, stored: str, sink: Sink) -> SalvageLog | None:
    """The account for one stored file being restored, if --salvage asks for one."""
    if not salvage or sink.kind is not SinkKind.EXTRACT:
        return None
    # Format 2's front is empty: each chunk was encrypted or compressed on its
    # own, and what it gives is its volume, fed as a file of its own: the bytes
    # an unverified chunk covers are exactly its volume's, whatever the
    # compression, and the chunks after it are verified again.
    front = fmt.stream_stages(gunzip)
    encrypted = bool(front) and front[0].program == "openssl"
    return SalvageLog(stored, Geometry(encrypted, len(front) > int(encrypted)))


def record(report: Report, job: StoredFile, result: FileResult, output: Output) -> None:
    """A stored file was placed with unverified chunks: say so loudly, in the
    report and in SALVAGED.txt at the top of DIR (rewritten as each is placed)."""
    assert job.salvage is not None
    if not result.ok:  # nothing could be placed (tar found no member it could read)
        report.problems.append(f"{result.stored}: --salvage used {len(job.salvage.chunks)} "
                               "chunk(s) that FAILED authentication, but nothing of it could "
                               "be placed")
        return
    placed = {p.name: p for p in result.places}
    result.salvage = job.salvage.report(placed, output.root, job.sink.strip)
    report.problems.append(
        f"{result.stored}: restored with --salvage from {len(job.salvage.chunks)} "
        "chunk(s) that FAILED authentication: its bytes are UNVERIFIED where "
        "SALVAGED.txt says"
    )
    for line in result.salvage.lines():
        err(f"SALVAGED: {line}")
    reports = [f.salvage for f in report.files if f.salvage is not None]
    report.salvaged = write_salvaged(output, reports, report.salvaged)


def fill_gap(job: StoredFile, fmt: Format, name: ChunkName, expected: int,
             scratch_file: Callable[[], Path], flush: Callable[[], None]) -> bool:
    """--salvage, uncompressed stream: feed zeros of a chunk's size (every chunk
    but the last has the size of the first) for each chunk missing before
    ``name``, so that what follows keeps its place (``flush``: the engine feeds
    the chunks before them first); False if that cannot be."""
    log = job.salvage
    if log is None or log.geometry.compressed or name.is_hmac or name.index <= expected:
        return False
    if not fmt.owns_chunk(name):
        return False
    flush()
    if job.result.error is not None or log.first_size <= 0:
        return False
    for index in range(expected, name.index):
        missing = ChunkName(name.stored, index, False, name.is_enc).name
        zeros = scratch_file()
        with zeros.open("xb") as f:
            f.truncate(log.first_size)  # sparse: no disk
        reason = f"missing from the backup; fed as {log.first_size} zero bytes"
        job.feed(zeros, True, missing, None, reason, zeros=True)
    return True
