"""What a person sees while a backup is read: a live line, then a summary.

On a terminal (stderr is a tty, no ``--quiet``), rich's Progress draws one
line on stderr, redrawn at most ten times a second: the stored file being
read and its bytes, then the whole run's bar, bytes, rate and ETA.  The
whole is the backup's size when it is a file or a folder; read from a pipe,
it is estimated from the VM sizes in qubes.xml (marked ``~``).
Bytes count as done when their chunk has been read and its HMAC computed.
rich is imported only when the line is drawn, so that a run without it
(a pipe, ``--quiet``, ``--help``) starts no slower.

The summary table is rich's Table, rendered as plain text: what a script
reading stdout sees is the same whatever the terminal.
"""

from __future__ import annotations

import io
import os
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, TextIO

from qrecover.archive.container import FolderSource
from qrecover.events import Mode
from qrecover.units import human_bytes, human_duration, human_rate

if TYPE_CHECKING:
    from rich.progress import Progress

    from qrecover.archive.container import StreamSource
    from qrecover.inventory import Entity
    from qrecover.report import FileResult

REDRAW_EVERY = 0.1  # seconds: at most 10 redraws a second
HEADER = ("VM", "STORED FILE", "CHUNKS", "STORED", "RESTORED", "STATUS")
NUMBERS = (2, 3, 4)  # right-aligned columns (their headers stay left-aligned)


def _status(mode: Mode, result: FileResult) -> str:
    if result.kept:  # --resume (qrecover/resume.py)
        return "kept (earlier run)"
    if result.salvage is not None:  # --salvage (qrecover/salvage.py)
        return "SALVAGED (unverified)"
    if result.ok:
        return mode.done_word
    return "FAILED (partial kept)" if result.places else "FAILED"


def _plain_table(rows: Sequence[Sequence[str]]) -> str:
    """``rows`` (the first is the header) as rich lays a borderless table out:
    columns two spaces apart, no colour, no line broken, no trailing space."""
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text  # cells as Text: a name's [brackets] are no markup

    table = Table(box=None, padding=(0, 1), pad_edge=False, show_edge=False, header_style="")
    for i, name in enumerate(rows[0]):
        table.add_column(Text(name, justify="left"), no_wrap=True,
                         justify="right" if i in NUMBERS else "left")
    for row in rows[1:]:
        table.add_row(*(Text(cell) for cell in row))
    text = io.StringIO()
    Console(file=text, width=1 << 16, color_system=None, force_terminal=False, emoji=False,
            highlight=False, markup=False).print(table)
    return "\n".join(line.rstrip() for line in text.getvalue().splitlines())


def summary_table(mode: Mode, results: Sequence[FileResult], elapsed: float) -> str:
    """The table printed at the end: one row per stored file, then the totals."""
    restoring = mode is Mode.RESTORE
    rows = [HEADER] + [
        (
            result.owner or "-",
            result.stored,
            str(result.chunks),
            human_bytes(result.stored_bytes),
            human_bytes(result.restored_bytes) if restoring else "-",
            _status(mode, result),
        )
        for result in results
    ]
    stored = sum(r.stored_bytes for r in results)
    failed = sum(1 for r in results if not r.ok)
    speed = stored / elapsed if stored > 0 and elapsed > 0 else None
    total = (
        f"total: {len(results)} stored file(s), {failed} failed, "
        f"{human_bytes(stored)} read in {human_duration(elapsed)} "
        f"({elapsed:.1f} s, {human_rate(speed)})"
    )
    if restoring:
        total += f", {human_bytes(sum(r.restored_bytes for r in results))} restored"
    return _plain_table(rows) + "\n" + total


def source_size(source: StreamSource | FolderSource) -> int | None:
    """Bytes the pass will read: a file's size, a folder's files; None for a pipe."""
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


def _live_line(stream: TextIO, clock: Callable[[], float], width: int | None) -> Progress:
    """rich's Progress on ``stream`` (a terminal), drawn only when told."""
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        ProgressColumn,
        Task,
        TextColumn,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )
    from rich.table import Column
    from rich.text import Text

    class FileColumn(ProgressColumn):
        """VM and stored file: the one column that gives way on a narrow terminal,
        its text cut short (…) rather than wrapped onto a second line."""

        def render(self, task: Task) -> Text:
            return Text(task.fields["file"], no_wrap=True, overflow="ellipsis")

    def fixed() -> Column:
        return Column(no_wrap=True)

    console = Console(file=stream, force_terminal=True, width=width, highlight=False)
    # a bar only where there is room for it beside the file's name (not at 80 columns)
    bar = [BarColumn(bar_width=10, table_column=fixed())] if console.width >= 100 else []
    return Progress(
        FileColumn(),
        TextColumn("{task.fields[file_bytes]} |", markup=False, table_column=fixed()),
        *bar,
        TextColumn("{task.fields[about]}", markup=False, table_column=fixed()),
        DownloadColumn(binary_units=True, table_column=fixed()),
        TransferSpeedColumn(table_column=fixed()),
        TextColumn("ETA", table_column=fixed()),
        TimeRemainingColumn(table_column=fixed()),
        console=console,
        auto_refresh=False,  # drawn on data_read, at most every REDRAW_EVERY
        transient=True,  # erased when stopped: what follows starts on a clean line
        get_time=clock,
        redirect_stdout=False,
        redirect_stderr=False,
    )


class Display:
    """The live line on stderr, driven by the run's events (qrecover.file_lines.Printer)."""

    def __init__(
        self,
        stream: TextIO,
        total: int | None,
        clock: Callable[[], float] = time.monotonic,
        width: int | None = None,
    ) -> None:
        self.total = total
        self.estimated = False
        self.clock = clock
        self.owner = ""
        self.stored = ""
        self.file_done_bytes = 0
        self.chunks_in_flight = 0
        self._last_draw = float("-inf")
        self._shown = False
        self.progress = _live_line(stream, clock, width)
        self._task = self.progress.add_task("", total=total, file="", file_bytes="", about="")

    # -- what the run's events tell ------------------------------------------

    def planned(self, selected: Sequence[Entity]) -> None:
        if self.total is None:
            self.total = sum(e.size for e in selected) or None
            self.estimated = True
            self.progress.update(self._task, total=self.total, about="~")

    def file_started(self, stored: str, owner: str) -> None:
        self.stored = stored
        self.owner = owner
        self.file_done_bytes = 0

    def data_read(self, stored: str, nbytes: int) -> None:
        self.progress.advance(self._task, nbytes)
        if stored == self.stored:
            self.file_done_bytes += nbytes
        now = self.clock()
        if self.stored and now - self._last_draw >= REDRAW_EVERY:
            self._last_draw = now
            self.draw()

    def in_flight(self, chunks: int) -> None:
        self.chunks_in_flight = chunks

    def file_done(self, result: FileResult) -> None:
        self.chunks_in_flight = 0
        self.clear()

    # -- drawing ------------------------------------------------------------

    def file_bytes(self) -> str:
        """``312.0 MiB (2 in flight)``: the stored file's bytes so far, and for
        format 4 how many chunks' scrypt dec run now."""
        text = human_bytes(self.file_done_bytes)
        if self.chunks_in_flight:
            text += f" ({self.chunks_in_flight} in flight)"
        return text

    def draw(self) -> None:
        file = f"{self.owner or '-'} {self.stored}"
        self.progress.update(self._task, file=file, file_bytes=self.file_bytes())
        if self._shown:
            self.progress.refresh()
        else:
            self.progress.start()  # draws it
            self._shown = True

    def clear(self) -> None:
        """Erase the live line, so that ordinary output starts on a clean line."""
        if self._shown:
            self.progress.stop()
            self._shown = False
