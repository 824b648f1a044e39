"""``--explain``: the run narrated on stderr, for a person learning the procedure.

Steps are numbered as on the format's recovery page; what differs between
formats (the page, the header's steps, a chunk's check) is the format's
words (qrecover.formats).  Every command shown is rendered from the stage
objects that run.
"""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path
from typing import TextIO

from qrecover import formats
from qrecover.archive.members import QUBES_XML, parse_member_name
from qrecover.events import (
    ChunkBorrowed,
    ChunkChecked,
    ChunkFed,
    ChunkSalvaged,
    Event,
    FileFinished,
    HeaderVerified,
    InventoryRead,
    Mode,
    PipelineStarted,
    QubesXmlWritten,
)
from qrecover.formats.base import Words
from qrecover.render import shell


def _wrap(text: str, first: str, rest: str) -> list[str]:
    """Lines of at most 76 characters, broken only at spaces: a URL
    (``www.qubes-os.org``), a path or an option (``--ignore-zeros``) is never cut
    at a hyphen or in the middle, so it can be copied whole; a word longer than
    the line gets a line of its own."""
    return textwrap.wrap(
        text,
        76,
        initial_indent=first,
        subsequent_indent=rest,
        break_on_hyphens=False,
        break_long_words=False,
    )


class Narrator:
    """Narrates the engine's events on stderr, step by step."""

    def __init__(self, backup: str, mode: str, out: TextIO | None = None) -> None:
        self.out = out if out is not None else sys.stderr
        self.mode = mode
        self.backup = backup
        self.images: list[Path] = []
        # Step 1 is told once the header said which format (and page) this is.
        self.words: Words | None = None
        self.told_scratch = False

    def _intro(self, event: HeaderVerified | None) -> Words:
        if self.words is not None:
            return self.words
        self.words = words = formats.words(event.fmt if event is not None else None)
        backup = self.backup
        if Path(backup).is_dir():
            how = (
                f"{backup} is a backup already untarred by hand, so qrecover reads "
                "its files from there."
            )
        else:
            how = (
                "qrecover reads the backup once, as a stream, and takes each member out "
                "as it comes: nothing is untarred to disk except one chunk at a time."
            )
        own = words.first_step(backup)  # a folder: nothing untarred, no "how"
        self.say(
            words.procedure.heading(words.procedure.steps[0].key),
            words.intro if own else f"{words.intro} {how}",
            own or shell.untar_command(backup),
        )
        return words

    def say(self, title: str, text: str, command: str | None = None, result: str = "") -> None:
        lines = [f"* {title}"]
        lines += _wrap(text, "  ", "  ")
        if command:
            lines.append(f"    $ {command}")
        if result:
            lines += _wrap(result, "  -> ", "     ")
        print("\n".join(lines), file=self.out, flush=True)

    def __call__(self, event: Event) -> None:
        if isinstance(event, HeaderVerified):
            self._intro(event).explain_header(self)
            return
        words = self._intro(None)
        if isinstance(event, ChunkChecked):
            first = not self.told_scratch
            if event.error is None:
                self.told_scratch = True
            words.explain_chunk(self, event.member, event.size, event.error, first)
        elif isinstance(event, ChunkBorrowed):
            self.say(
                f"Chunk {event.member}: taken from the other copy {event.copy}",
                f"In the backup it was missing or bad ({event.problem}). The other copy's "
                "chunk went through the same check, and passed it.",
                event.command,
            )
        elif isinstance(event, ChunkSalvaged):
            self._salvaged(words, event)
        elif isinstance(event, PipelineStarted):
            words.explain_pipeline(self, event.stored, event.stages, event.kind)
        elif isinstance(event, ChunkFed):
            name = parse_member_name(event.member)
            fed = name.data_name if name is not None else event.member
            print(
                f"  (feeding {fed} into the pipeline of {event.stored})",
                file=self.out,
                flush=True,
            )
        elif isinstance(event, FileFinished):
            self._finished(event)
        elif isinstance(event, InventoryRead):
            names = ", ".join(e.name for e in event.inventory.entities) or "(none)"
            chosen = ", ".join(e.name for e in event.selected) or "(none)"
            words.explain_inventory(self, names, chosen, event.selected)
        elif isinstance(event, QubesXmlWritten):
            print(f"  -> qubes.xml kept as {event.path}", file=self.out, flush=True)

    def _salvaged(self, words: Words, event: ChunkSalvaged) -> None:
        """One line: the chunk, numbered as the format's step that checks it."""
        step = words.chunk_step(event.member)
        heading = f"Step {step}" if step else "Step"
        print(f"* {heading} - {event.member}: FAILED its check ({event.reason}); used "
              "UNVERIFIED because of --salvage", file=self.out, flush=True)

    def _finished(self, event: FileFinished) -> None:
        if event.error is not None:
            print(f"  -> FAILED: {event.error}", file=self.out, flush=True)
            return
        if event.places:
            for place in event.places:
                print(f"  -> restored {place}", file=self.out, flush=True)
                if place.name == "private.img":
                    self.images.append(place)
        elif event.stored != QUBES_XML:
            print(
                f"  -> {event.stored}: decrypted, decompressed and listed: intact",
                file=self.out,
                flush=True,
            )

    def close(self) -> None:
        if self.mode != Mode.RESTORE or not self.images or self.words is None:
            return
        image = self.images[0]
        self.say(
            self.words.procedure.heading("mount"),
            "A VM's private.img is an ext4 file system; its home folder is home/user "
            "inside it. Mount it read-only:",
            shell.render_argv(("sudo", "mount", "-o", "loop,ro", str(image), "/mnt")),
        )
