"""What a run found damaged, and where it was (or could be) recovered from.

``verify`` says it before anything is written: which stored files are intact,
which are damaged (and which chunks), which other copy holds the damaged
chunks good (``--other-copy``), and what is left otherwise (``--salvage``, a
hint).  ``restore`` says the same of what it did: which chunks it took from
which copy.  Text for a person (stderr), and the ``damage`` part of --json.
"""

from __future__ import annotations

from dataclasses import dataclass

from qrecover.events import Mode
from qrecover.fallback import ChunkDamage
from qrecover.report import FileResult, Report

SALVAGE_HINT = (
    "no copy given has it good: give another copy with --other-copy PATH, or "
    "restore with --salvage to use its damaged chunks unauthenticated"
)
SALVAGED = "placed with --salvage, its damaged chunks used UNVERIFIED: see SALVAGED.txt"


@dataclass
class Damaged:
    """One stored file that BACKUP did not give whole and good."""

    result: FileResult
    chunks: list[ChunkDamage]

    @property
    def recovered(self) -> bool:
        return self.result.ok and all(c.copy is not None for c in self.chunks)

    @property
    def copies(self) -> list[str]:
        return list(dict.fromkeys(c.copy for c in self.chunks if c.copy is not None))

    def as_json(self) -> dict[str, object]:
        return {
            "stored": self.result.stored,
            "vm": self.result.owner or None,
            "chunks": [c.as_json() for c in self.chunks],
            "recovered": self.recovered,
            "recovered_from": self.copies,
            "error": None if self.result.ok else self.result.problem,
            "salvaged": self.result.salvage is not None,
            "hint": None if self.recovered or self.result.salvage is not None else SALVAGE_HINT,
        }


def sort_out(report: Report) -> tuple[list[FileResult], list[Damaged]]:
    """The stored files that were intact in BACKUP, and the damaged ones."""
    by_stored: dict[str, list[ChunkDamage]] = {}
    for damage in report.chunk_damage:
        by_stored.setdefault(damage.stored, []).append(damage)
    intact: list[FileResult] = []
    damaged: list[Damaged] = []
    for result in report.files:
        chunks = by_stored.get(result.stored, [])
        if result.ok and not chunks:
            intact.append(result)
        else:
            damaged.append(Damaged(result, chunks))
    return intact, damaged


def damage_json(report: Report) -> dict[str, object]:
    intact, damaged = sort_out(report)
    return {
        "intact": [r.stored for r in intact],
        "damaged": [d.as_json() for d in damaged],
        "notes": list(report.notes),
    }


def damage_lines(mode: Mode, report: Report) -> list[str]:
    """The text: nothing for a backup found whole and good."""
    intact, damaged = sort_out(report)
    if not damaged:
        return []
    lines = [f"damage: {len(intact)} stored file(s) intact, {len(damaged)} damaged in the backup:"]
    for item in damaged:
        result = item.result
        salvaged = result.salvage is not None
        state = "RECOVERED" if item.recovered else "SALVAGED" if salvaged else "DAMAGED"
        lines.append(f"  {state:<9} {result.owner or '-':<16} {result.stored}")
        for chunk in item.chunks:
            if chunk.copy is None:
                where = "in no other copy good" if chunk.tried else "no other copy given"
            elif mode is Mode.VERIFY:
                where = f"good in {chunk.copy} (restore with --other-copy {chunk.copy})"
            else:
                where = f"taken from {chunk.copy}"
            lines.append(f"      chunk {chunk.chunk}: {chunk.said}; {where}")
            lines += [f"        {tried}" for tried in chunk.tried if chunk.copy is None]
        if not item.chunks and not result.ok:
            lines.append(f"      {result.problem}")
        if not item.recovered:
            lines.append(f"      {SALVAGED if salvaged else SALVAGE_HINT}")
    return lines
