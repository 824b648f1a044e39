"""Damaged ranges of a backup, and what each one cost.

A backup on failing media has sectors that read as zeros (what ``ddrescue``
leaves), garbage, flipped bits, or that cannot be read at all.  The outer
reader (qrecover.archive.tarstream) steps over what is not a member, as ``tar -i``
does, and goes on at the next valid member header; the bytes it stepped over,
and the sectors that could not be read (qrecover.archive.sources), are recorded here
as ranges.  The engine then charges each range with what it cost: the chunks
that were lost in it or failed their check because of it, and their stored
files.  A range is reported once, however many chunks it cost.

Nothing here decides what is used: every chunk is still authenticated
before use, and a stored file that lost a chunk fails as for a missing chunk.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Damage:
    """Bytes ``start`` to ``end`` (exclusive; None: to the end) of ``label``."""

    label: str  # the backup, a piece of it, or a chunk file of a folder
    start: int
    end: int | None
    what: list[str] = field(default_factory=list)
    where: str = ""  # ``byte N`` or ``byte N of PIECE``, as the reader names places
    chunks: list[str] = field(default_factory=list)  # chunks lost to it, or damaged by it
    stored: list[str] = field(default_factory=list)  # their stored files
    unreadable: list[list[int]] = field(default_factory=list)  # [start, end] read errors
    reason: str = ""  # the read errors' (strerror)

    def touches(self, start: int, end: int | None) -> bool:
        """Does it overlap (or border) bytes ``start`` to ``end``?"""
        mine = self.end if self.end is not None else float("inf")
        theirs = end if end is not None else float("inf")
        return self.start <= theirs and start <= mine

    def charge(self, chunk: str, stored: str) -> None:
        if chunk not in self.chunks:
            self.chunks.append(chunk)
        if stored not in self.stored:
            self.stored.append(stored)

    @property
    def span(self) -> str:
        where = self.where or f"byte {self.start}"
        if self.end is None:
            return f"{self.label}: from {where} to the end"
        return f"{self.label}: {self.end - self.start} bytes at {where}"

    @property
    def cost(self) -> str:
        if not self.chunks and any("stepped over" in w for w in self.what):
            # a member wholly inside it leaves no trace: its name was in the damage
            return ("no chunk known lost (a stored file all of whose members lay in it "
                    "would be missing from the summary, not named here)")
        if not self.chunks:
            return "no chunk lost"
        files = ", ".join(self.stored)
        return f"lost chunk(s) {', '.join(self.chunks)} (stored file(s) {files})"

    @property
    def found(self) -> list[str]:
        """What was found there: the unreadable bytes first, exactly."""
        spans = ", ".join(f"{a}-{b}" for a, b in self.unreadable)
        read = [f"unreadable bytes {spans} ({self.reason})"] if self.unreadable else []
        return read + self.what

    def line(self) -> str:
        """One line for the summary: where, what was found there, what it cost."""
        return f"damaged: {self.span} ({'; '.join(self.found)}): {self.cost}"

    def as_json(self) -> dict[str, object]:
        return {
            "file": self.label,
            "start": self.start,
            "end": self.end,
            "what": self.found,
            "unreadable": [list(u) for u in self.unreadable],
            "chunks": list(self.chunks),
            "stored_files": list(self.stored),
        }


class DamageLog:
    """Every damaged range of one pass, in the order met; ranges that touch
    (a read error inside a range the reader stepped over) become one."""

    def __init__(self) -> None:
        self.ranges: list[Damage] = []

    def add(self, label: str, start: int, end: int | None, what: str, where: str = "") -> Damage:
        """Record bytes ``start`` to ``end``; merged with the ranges it touches."""
        damage = Damage(label, start, end, [what] if what else [], where)
        kept: list[Damage] = []
        for other in self.ranges:
            if other.label != label or not other.touches(damage.start, damage.end):
                kept.append(other)
                continue
            damage = _merged(other, damage)
        kept.append(damage)
        kept.sort(key=lambda d: (d.label, d.start))
        self.ranges[:] = kept
        return damage

    def unreadable(self, label: str, start: int, end: int, reason: str, where: str) -> None:
        """Bytes that could not be read (a read error), kept exactly."""
        damage = self.add(label, start, end, "", where)
        damage.reason = damage.reason or reason
        last = damage.unreadable[-1] if damage.unreadable else None
        if last is not None and last[1] == start:
            last[1] = end
        else:
            damage.unreadable.append([start, end])

    def at(self, label: str, start: int, end: int | None) -> Damage | None:
        """The range that touches bytes ``start`` to ``end`` of ``label``, if any."""
        for damage in self.ranges:
            if damage.label == label and damage.touches(start, end):
                return damage
        return None


def _merged(first: Damage, then: Damage) -> Damage:
    """One range of two that touch: ``first`` (met earlier) keeps its identity."""
    if then.start < first.start:
        first.start, first.where = then.start, then.where
    if first.end is not None and (then.end is None or then.end > first.end):
        first.end = then.end
    first.what += [w for w in then.what if w not in first.what]
    first.unreadable = sorted(first.unreadable + then.unreadable)
    first.reason = first.reason or then.reason
    first.chunks += [c for c in then.chunks if c not in first.chunks]
    first.stored += [s for s in then.stored if s not in first.stored]
    return first
