"""Where a command writes, and the command line it was called with.

cli.main builds one :class:`Console` from its standard output and error and
its argv, and hands it to the command: no command prints to ``sys.stdout``
or reads ``sys.argv`` itself, so that a test can call one with streams of
its own.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TextIO

from qrecover.messages import printable


@dataclass(frozen=True)
class Console:
    """A command's output streams, its argv (after the program's name) and ``-q``."""

    out: TextIO
    err: TextIO
    argv: tuple[str, ...] = ()
    quiet: bool = False  # -q: no live line, no summary table

    def say(self, line: str = "") -> None:
        """One line of the command's own output (stdout)."""
        self.out.write(line + "\n")
        self.out.flush()

    def error(self, message: str) -> None:
        """One message on stderr, prefixed ``qrecover:`` and made printable."""
        self.err.write(f"qrecover: {printable(message)}\n")
        self.err.flush()

    def for_people(self, as_json: bool) -> Console:
        """With ``--json`` stdout holds the document alone: the lines meant for a
        person (per-file lines, summary, verdict) go to stderr instead."""
        return dataclasses.replace(self, out=self.err) if as_json else self
