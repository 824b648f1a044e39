"""``verify --json`` and ``restore --json``: one JSON document on stdout.

While the pass runs, everything meant for a person (the per-file lines, the
summary table, the verdict) goes to stderr (the command writes them there:
``Console.for_people``), so that stdout holds nothing but the document: a
scheduled check can parse it whatever the run printed.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import TextIO

from qrecover.damage_report import damage_json
from qrecover.errors import EXIT_OK, QrecoverError
from qrecover.events import Mode
from qrecover.report import FileResult, Report


def file_json(result: FileResult) -> dict[str, object]:
    """One stored file: its VM, chunks, bytes and status (with the failure, if any)."""
    return {
        "stored": result.stored,
        "vm": result.owner or None,  # None: qubes.xml, which belongs to no VM
        "chunks": result.chunks,
        "stored_bytes": result.stored_bytes,
        "restored_bytes": result.restored_bytes,
        "members": result.members,
        "places": [str(p) for p in result.places],
        "status": "salvaged" if result.salvage is not None else "ok" if result.ok else "failed",
        "error": None if result.ok else result.problem,
        # --salvage: the chunks used unverified and the bytes they cover
        **({"salvage": result.salvage.as_json()} if result.salvage is not None else {}),
    }


def report_json(
    mode: Mode, backup: str | list[str], report: Report, exit_code: int
) -> dict[str, object]:
    """The whole document for a pass that ran to its end (good or bad)."""
    header = report.header
    return {
        "command": mode.value,
        "backup": backup,
        "header": header.fields() if header is not None else None,
        "vms": [e.as_json() for e in report.selected],
        "files": [file_json(f) for f in report.files],
        "problems": list(report.problems),
        **({"salvaged": str(report.salvaged)} if report.salvaged is not None else {}),
        # each damaged range of BACKUP once, with what it cost (qrecover.damage)
        "damage": [d.as_json() for d in report.damage],
        # which stored files are intact, which lost chunks, and which other copy gave
        # them (--other-copy; verify tells it before anything is written)
        "integrity": damage_json(report),
        "verdict": "ok" if exit_code == EXIT_OK else "failed",
        "exit_code": exit_code,
    }


def error_json(mode: Mode, backup: str | list[str], error: QrecoverError) -> dict[str, object]:
    """The document for a pass stopped by an error before its end (wrong passphrase,
    missing program, ...): no files, the message, the same exit code as without --json."""
    return {
        "command": mode.value,
        "backup": backup,
        "header": None,
        "vms": [],
        "files": [],
        "problems": [error.message],
        "damage": [],
        "verdict": "error",
        "exit_code": error.exit_code,
    }


@dataclass
class JsonRun:
    """Collects what the document says; ``done`` is called once the verdict is known."""

    mode: Mode
    backup: str | list[str]
    document: dict[str, object] | None = field(default=None)

    def done(self, report: Report, exit_code: int) -> None:
        self.document = report_json(self.mode, self.backup, report, exit_code)


@contextlib.contextmanager
def json_output(
    enabled: bool, mode: Mode, pieces: Sequence[str], stdout: TextIO
) -> Iterator[JsonRun]:
    """With ``enabled``: the document on ``stdout`` after the pass (also when a
    QrecoverError stops it; it is raised on unchanged)."""
    # One path as a string; the pieces of a split backup as a list, in order.
    backup: str | list[str] = pieces[0] if len(pieces) == 1 else list(pieces)
    run = JsonRun(mode, backup)
    if not enabled:
        yield run
        return
    try:
        yield run
    except QrecoverError as exc:
        _emit(stdout, error_json(mode, backup, exc))
        raise
    if run.document is not None:
        _emit(stdout, run.document)


def _emit(stdout: TextIO, document: dict[str, object]) -> None:
    stdout.write(json.dumps(document, indent=2) + "\n")
    stdout.flush()
