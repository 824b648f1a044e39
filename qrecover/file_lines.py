"""The line printed for each stored file as it completes, and the progress
display it drives (qrecover.progress)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TextIO

from qrecover.inventory import Entity
from qrecover.plan import Mode
from qrecover.progress import Display
from qrecover.report import FileResult
from qrecover.units import human_bytes


class Printer:
    """Prints a line per stored file as it completes; drives the progress display."""

    def __init__(self, mode: Mode, out: TextIO, display: Display | None = None) -> None:
        self.mode = mode
        self.out = out
        self.display = display

    def planned(self, selected: Sequence[Entity]) -> None:
        if self.display is not None:
            self.display.planned(selected)

    def file_started(self, stored: str, owner: str) -> None:
        if self.display is not None:
            self.display.file_started(stored, owner)

    def data_read(self, stored: str, nbytes: int) -> None:
        if self.display is not None:
            self.display.data_read(stored, nbytes)

    def in_flight(self, chunks: int) -> None:
        if self.display is not None:
            self.display.in_flight(chunks)

    def file_done(self, result: FileResult) -> None:
        if self.display is not None:
            self.display.file_done(result)
        self.out.write(_file_line(self.mode, result) + "\n")
        self.out.flush()


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
