"""What a person sees while a backup is read: a live line, then a summary.

On a terminal (stderr is a tty, no ``--quiet``), one line on stderr is
redrawn at most ten times a second: the stored file being read, its bytes
and rate, and the whole run's share done, rate and ETA.  The whole is the
backup's size when it is a file or a folder; read from a pipe, it is
estimated from the VM sizes in qubes.xml (marked ``~``).  Bytes count as
done when their chunk has been read and its HMAC computed.

The formatting functions are pure so that they can be tested without a
terminal; :class:`Display` only keeps time and writes.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, TextIO

# Re-exported: the progress line and the summary are written with them.
from qrecover.compat import zip_strict
from qrecover.plan import Mode
from qrecover.units import human_bytes as human_bytes
from qrecover.units import human_duration as human_duration
from qrecover.units import human_rate as human_rate

if TYPE_CHECKING:
    from qrecover.container import FolderSource, StreamSource
    from qrecover.inventory import Entity
    from qrecover.report import FileResult

REDRAW_EVERY = 0.1  # seconds: at most 10 redraws a second
ETA_AFTER = 1.0  # seconds: before that, an average says more about start-up than speed
CLEAR = "\r\x1b[K"  # back to column 0, erase to the end of the line


def rate(done: int, elapsed: float) -> float | None:
    """Average bytes per second, or None before there is anything to average."""
    if done <= 0 or elapsed <= 0:
        return None
    return done / elapsed


def eta(done: int, total: int | None, elapsed: float) -> float | None:
    """Seconds left at the average rate so far; None when it cannot be told."""
    speed = rate(done, elapsed)
    if speed is None or total is None or elapsed < ETA_AFTER:
        return None
    return max(total - done, 0) / speed


def percent(done: int, total: int | None) -> int | None:
    if not total:
        return None
    return min(100, done * 100 // total)


@dataclass
class Snapshot:
    """Everything one progress line shows."""

    owner: str
    stored: str
    file_done: int
    file_elapsed: float
    done: int
    total: int | None
    estimated: bool
    elapsed: float
    in_flight: int = 0  # format 4: chunks whose scrypt dec runs now


def progress_line(snap: Snapshot, width: int) -> str:
    """``work vm7/private.img 312.0 MiB 104.2 MiB/s | 45% of 659.0 MiB ...``, fitted to width."""
    left = (
        f"{snap.owner or '-'} {snap.stored} {human_bytes(snap.file_done)} "
        f"{human_rate(rate(snap.file_done, snap.file_elapsed))}"
    )
    if snap.in_flight:
        left += f" ({snap.in_flight} chunk{'s' if snap.in_flight > 1 else ''} in flight)"
    share = percent(snap.done, snap.total)
    if snap.total is None or share is None:
        whole = f"{human_bytes(snap.done)} read"
    else:
        about = "~" if snap.estimated else ""
        whole = f"{share}% of {about}{human_bytes(snap.total)}"
    right = (
        f"{whole} {human_rate(rate(snap.done, snap.elapsed))} "
        f"ETA {human_duration(eta(snap.done, snap.total, snap.elapsed))}"
    )
    line = f"{left} | {right}"
    if len(line) >= width:
        line = line[: max(width - 1, 0)]
    return line


def summary_table(mode: Mode, results: Sequence[FileResult], elapsed: float) -> str:
    """The table printed at the end: one row per stored file, then the totals."""
    rows = [("VM", "STORED FILE", "CHUNKS", "STORED", "RESTORED", "STATUS")]
    done_word = mode.done_word
    for result in results:
        if result.kept:  # --resume (qrecover/resume.py)
            status = "kept (earlier run)"
        elif result.salvage is not None:  # --salvage (qrecover/salvage.py)
            status = "SALVAGED (unverified)"
        elif result.ok:
            status = done_word
        elif result.places:
            status = "FAILED (partial kept)"
        else:
            status = "FAILED"
        restored = human_bytes(result.restored_bytes) if mode is Mode.RESTORE else "-"
        rows.append(
            (
                result.owner or "-",
                result.stored,
                str(result.chunks),
                human_bytes(result.stored_bytes),
                restored,
                status,
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = []
    for row in rows:
        cells = [
            cell.rjust(w) if i in (2, 3, 4) and row is not rows[0] else cell.ljust(w)
            for i, (cell, w) in enumerate(zip_strict(row, widths))
        ]
        lines.append("  ".join(cells).rstrip())
    stored = sum(r.stored_bytes for r in results)
    failed = sum(1 for r in results if not r.ok)
    total = (
        f"total: {len(results)} stored file(s), {failed} failed, "
        f"{human_bytes(stored)} read in {human_duration(elapsed)} "
        f"({elapsed:.1f} s, {human_rate(rate(stored, elapsed))})"
    )
    if mode is Mode.RESTORE:
        total += f", {human_bytes(sum(r.restored_bytes for r in results))} restored"
    lines.append(total)
    return "\n".join(lines)


def source_size(source: StreamSource | FolderSource) -> int | None:
    """Bytes the pass will read: a file's size, a folder's files; None for a pipe."""
    from qrecover.container import FolderSource  # here: container imports nothing of ours

    if isinstance(source, FolderSource):
        total = 0
        for dirpath, _dirs, files in os.walk(source.root):
            for name in files:
                try:
                    total += os.lstat(os.path.join(dirpath, name)).st_size
                except OSError:
                    continue
        return total
    return source.size


class Display:
    """The live line on stderr; an Observer of the engine (see restore.Observer)."""

    def __init__(
        self,
        stream: TextIO,
        total: int | None,
        clock: Callable[[], float] = time.monotonic,
        width: int | None = None,
    ) -> None:
        self.stream = stream
        self.total = total
        self.estimated = False
        self.clock = clock
        self.width = width
        self.started = clock()
        self.done = 0
        self.owner = ""
        self.stored = ""
        self.file_done_bytes = 0
        self.file_started_at = self.started
        self.chunks_in_flight = 0
        self._last_draw = float("-inf")
        self._shown = False

    # -- the engine's observer calls ----------------------------------------

    def planned(self, selected: Sequence[Entity]) -> None:
        if self.total is None:
            self.total = sum(e.size for e in selected) or None
            self.estimated = True

    def file_started(self, stored: str, owner: str) -> None:
        self.stored = stored
        self.owner = owner
        self.file_done_bytes = 0
        self.file_started_at = self.clock()

    def data_read(self, stored: str, nbytes: int) -> None:
        self.done += nbytes
        if stored == self.stored:
            self.file_done_bytes += nbytes
        now = self.clock()
        if self.stored and now - self._last_draw >= REDRAW_EVERY:
            self._last_draw = now
            self.draw(now)

    def in_flight(self, chunks: int) -> None:
        self.chunks_in_flight = chunks

    def file_done(self, result: FileResult) -> None:
        self.chunks_in_flight = 0
        self.clear()

    # -- drawing ------------------------------------------------------------

    def snapshot(self, now: float) -> Snapshot:
        return Snapshot(
            self.owner,
            self.stored,
            self.file_done_bytes,
            now - self.file_started_at,
            self.done,
            self.total,
            self.estimated,
            now - self.started,
            self.chunks_in_flight,
        )

    def _width(self) -> int:
        if self.width is not None:
            return self.width
        try:
            columns = os.get_terminal_size(self.stream.fileno()).columns
        except (OSError, ValueError):
            columns = shutil.get_terminal_size().columns
        return columns if columns > 0 else 80  # a pty nobody sized says 0

    def draw(self, now: float) -> None:
        self.stream.write(CLEAR + progress_line(self.snapshot(now), self._width()))
        self.stream.flush()
        self._shown = True

    def clear(self) -> None:
        """Erase the live line, so that ordinary output starts on a clean line."""
        if self._shown:
            self.stream.write(CLEAR)
            self.stream.flush()
            self._shown = False
