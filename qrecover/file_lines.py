"""The line printed for each stored file as it completes, and the progress
display it drives (qrecover.progress): a listener of the run's events."""

from __future__ import annotations

from typing import TextIO

from qrecover.events import (
    ChunksInFlight,
    DataRead,
    Event,
    FileDone,
    FileStarted,
    InventoryRead,
    Mode,
)
from qrecover.progress import Display
from qrecover.report import FileResult
from qrecover.units import human_bytes


class Printer:
    """Prints a line per stored file as it completes; drives the progress display.
    A listener of the run's events."""

    def __init__(self, mode: Mode, out: TextIO, display: Display | None = None) -> None:
        self.mode = mode
        self.out = out
        self.display = display

    def __call__(self, event: Event) -> None:
        display = self.display
        if isinstance(event, FileDone):
            if display is not None:
                display.file_done(event.result)
            self.out.write(_file_line(self.mode, event.result) + "\n")
            self.out.flush()
        elif display is None:
            return
        elif isinstance(event, DataRead):
            display.data_read(event.stored, event.nbytes)
        elif isinstance(event, FileStarted):
            display.file_started(event.stored, event.owner)
        elif isinstance(event, ChunksInFlight):
            display.in_flight(event.chunks)
        elif isinstance(event, InventoryRead):
            display.planned(event.selected)


def _file_line(mode: Mode, result: FileResult) -> str:
    where = result.owner or "-"
    if result.kept:  # --resume (qrecover/resume.py)
        places = ", ".join(str(p) for p in result.places)
        return f"KEPT      {where:<16} {result.stored} -> {places} (placed by an earlier run)"
    if not result.ok:
        kept = ""
        if result.places:
            kept = " (kept as " + ", ".join(str(p) for p in result.places) + ")"
        return f"FAILED    {where:<16} {result.problem}{kept}"
    if result.salvage is not None:  # --salvage (qrecover/salvage.py)
        places = ", ".join(str(p) for p in result.places)
        return (f"SALVAGED  {where:<16} {result.stored} -> {places} (UNVERIFIED: "
                f"{len(result.salvage.chunks)} chunk(s) failed authentication; see SALVAGED.txt)")
    if mode is Mode.VERIFY:
        return (
            f"OK        {where:<16} {result.stored}  {result.chunks} chunk(s), "
            f"{human_bytes(result.stored_bytes)} stored, {result.members} member(s) listed"
        )
    places = ", ".join(str(p) for p in result.places)
    return (
        f"RESTORED  {where:<16} {result.stored} -> {places} ({human_bytes(result.restored_bytes)})"
    )
