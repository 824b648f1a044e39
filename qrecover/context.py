"""What belongs to one run: its listeners, its settings, its progress line.

Nothing of this is module state: two runs in one process (two tests, or
later two workers) each have their own :class:`RunContext`, and see only
their own events and log lines.  Everything the run tells goes through its
one event stream (:meth:`RunContext.emit`): the live line and the per-file
lines (qrecover.file_lines), the transcript and the narration (qrecover.render)
listen to the same events.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable  # typing's: a runtime alias (3.8)

from qrecover.events import ChunksInFlight, DataRead, FileDone, FileStarted
from qrecover.runner import log_command

if TYPE_CHECKING:
    from qrecover.events import Event
    from qrecover.progress import Display
    from qrecover.report import FileResult

Listener = Callable[["Event"], None]


@dataclass
class RunContext:
    """The state of one run, passed down from the command to the engine.

    ``command`` is how everything the run starts or does in-process is
    logged (``+ COMMAND``, with ``-v``): it first erases the run's progress
    line, so that log lines and the line never mix.
    """

    quiet: bool = False
    listeners: list[Listener] = field(default_factory=list)
    display: Display | None = None

    def clear_line(self) -> None:
        if self.display is not None:
            self.display.clear()

    def command(self, text: str) -> None:
        self.clear_line()
        log_command(text)

    def emit(self, event: Event) -> None:
        """Report a step to every listener of this run."""
        for listener in list(self.listeners):
            listener(event)

    # -- the pass's progress (qrecover.report.Observer), as events ------------

    def file_started(self, stored: str, owner: str) -> None:
        self.emit(FileStarted(stored, owner))

    def data_read(self, stored: str, nbytes: int) -> None:
        self.emit(DataRead(stored, nbytes))

    def in_flight(self, chunks: int) -> None:
        self.emit(ChunksInFlight(chunks))

    def file_done(self, result: FileResult) -> None:
        self.emit(FileDone(result))

    @contextlib.contextmanager
    def listening(self, *listeners: Listener) -> Iterator[None]:
        self.listeners.extend(listeners)
        try:
            yield
        finally:
            for listener in listeners:
                if listener in self.listeners:
                    self.listeners.remove(listener)
