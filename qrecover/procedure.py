"""A format's recovery procedure as data: its page's steps, declared once.

Each format's words module declares its :class:`Procedure`: the recovery
page it follows, how its chunks are checked, and its steps in order (a
number, a name the renderers ask for, the page's title, and what the step is
done for: the backup once, each stored file, or each chunk).  The renderers
(--transcript, --explain, --dry-run, qrecover script, the kit's RECOVERY.txt)
take every step number from the declaration, never typed by hand, so a page
renumbered is one change.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Per = Literal["backup", "stored file", "chunk"]
Check = Literal["hmac", "scrypt", "none"]


@dataclass(frozen=True)
class Step:
    """One step of a recovery page."""

    key: str  # how the renderers ask for it: "verify chunk"
    title: str  # the page's words: "verify each chunk's HMAC"
    per: Per
    number: int = 0  # set by Procedure: its place on the page

    def __str__(self) -> str:
        return str(self.number)


@dataclass(frozen=True)
class Procedure:
    """One format's recovery page: its steps in order and its chunk check."""

    page: str
    check: Check  # how each chunk is authenticated: its .hmac file, scrypt, or not at all
    steps: tuple[Step, ...]

    def __post_init__(self) -> None:
        numbered = tuple(
            Step(s.key, s.title, s.per, n) for n, s in enumerate(self.steps, start=1)
        )
        object.__setattr__(self, "steps", numbered)
        if len({s.key for s in numbered}) != len(numbered):
            raise ValueError("a step named twice")

    def __getitem__(self, key: str) -> Step:
        return next(s for s in self.steps if s.key == key)

    def span(self, first: str, last: str) -> str:
        """``4-7``: the numbers of the steps from ``first`` to ``last``."""
        return f"{self[first].number}-{self[last].number}"

    def heading(self, key: str, what: str = "") -> str:
        """``Step 4 - verify NAME``: how the narration names a step (its
        page title, or ``what`` in its place)."""
        step = self[key]
        return f"Step {step.number} - {what or step.title}"

    @property
    def mount(self) -> Step:
        """The last step of every page: mount a restored image."""
        return self.steps[-1]
