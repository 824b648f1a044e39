"""What qrecover tells the user on stderr: one line per message, always.

Paths in messages are the user's own (a piece of a split backup on a stick
someone else wrote, a folder name) and may hold newlines or terminal escape
sequences; printed raw, a name could forge a second line ("qrecover:
success") or drive the terminal.  Every message is made printable here.
"""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Iterator
from typing import TextIO

# Where err() writes while a command runs: the stderr cli.main was given
# (qrecover.console); sys.stderr outside a command.
_streams: list[TextIO] = []


def printable(text: str) -> str:
    """``text`` with every non-printable character shown as its escape (``\\n``, ``\\x1b``)."""
    return "".join(
        ch if ch.isprintable() else ch.encode("unicode_escape").decode("ascii") for ch in text
    )


def err(message: str) -> None:
    """One line on stderr, prefixed ``qrecover:``."""
    stream = _streams[-1] if _streams else sys.stderr
    stream.write(f"qrecover: {printable(message)}\n")
    stream.flush()


@contextlib.contextmanager
def writing_to(stream: TextIO) -> Iterator[None]:
    """err() writes to ``stream`` inside (cli.main: the command's stderr)."""
    _streams.append(stream)
    try:
        yield
    finally:
        _streams.pop()


class OneLineFormatter(logging.Formatter):
    """The log's lines (``-v`` commands, notes), made printable like :func:`err`'s."""

    def format(self, record: logging.LogRecord) -> str:
        return printable(super().format(record))
