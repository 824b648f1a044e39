"""``--transcript FILE``: the run as a runnable POSIX sh script, as it goes.

Replaying it takes each chunk out of the backup again (``tar -i -x``),
checks it as the format says (its HMAC, or scrypt), and feeds it into the
same pipeline qrecover ran, so it reproduces the same files in the same
output folder.  What differs between formats (the preamble, the header's
steps, a chunk's lines, the step numbers) is the format's words
(qrecover.formats); the pipelines come from the Stage objects that ran.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from qrecover import formats
from qrecover.archive.members import QUBES_XML, parse_member_name
from qrecover.errors import OutputError
from qrecover.events import (
    ChunkBorrowed,
    ChunkChecked,
    ChunkFed,
    ChunkSalvaged,
    Event,
    FileFinished,
    HeaderVerified,
    Mode,
    PipelineStarted,
    QubesXmlWritten,
    SinkKind,
    about,
)
from qrecover.formats.base import Words
from qrecover.render import shell


class PendingFile:
    """A text file written under a temporary name beside ``path`` as the run
    goes, and moved to ``path`` only by :meth:`close`: an existing file is
    replaced (with --force) only then, and never through a symbolic link."""

    def __init__(self, path: Path, force: bool) -> None:
        if os.path.lexists(path) and not force:
            raise OutputError(
                f"{path}: already exists", hint="choose another --transcript file, or use --force"
            )
        try:
            fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial",
                                       dir=path.parent)
        except OSError as exc:
            raise OutputError(f"{path}: cannot create ({exc.strerror})") from None
        umask = os.umask(0)
        os.umask(umask)
        os.fchmod(fd, 0o755 & ~umask)  # a script
        self.path, self.tmp, self.force = path, Path(tmp), force
        self._file = os.fdopen(fd, "w", encoding="utf-8")

    def write(self, text: str) -> int:
        return self._file.write(text)

    def flush(self) -> None:
        self._file.flush()

    def close(self) -> None:
        self._file.close()
        if os.path.lexists(self.path) and not self.force:
            raise OutputError(f"{self.path}: appeared while qrecover ran; the transcript is "
                              f"kept as {self.tmp}")
        os.replace(self.tmp, self.path)


def open_new(path: Path, force: bool) -> PendingFile:
    """Start a transcript at ``path``; see :class:`PendingFile`."""
    return PendingFile(path, force)


@dataclass
class _Block:
    """The lines of one stored file, written when it finishes."""

    stored: str
    chunks: list[str] = field(default_factory=list)
    started: PipelineStarted | None = None


class TranscriptWriter:
    """Writes the run as a POSIX sh script, stored file by stored file.

    Its lines are kept per stored file (``_Block``, by name), so that events
    of several stored files may interleave.
    """

    def __init__(
        self,
        file: PendingFile,
        mode: Mode,
        backup: str | None,
        output: Path | None,
        argv: Sequence[str] = (),
    ) -> None:
        self.file = file
        self.mode = mode
        self.backup = backup
        self.output = output
        self.blocks: dict[str, _Block] = {}
        self.argv = tuple(argv)
        # Known once the header is verified: the preamble (which programs the
        # replay needs) is written then.
        self.words: Words | None = None

    def _write(self, lines: Sequence[str]) -> None:
        self.file.write("".join(line + "\n" for line in lines))
        self.file.flush()

    def _start(self, event: HeaderVerified | None) -> Words:
        if self.words is None:
            self.words = formats.words(event.fmt if event is not None else None)
            self._write(
                self.words.transcript_preamble(self.mode, self.backup, self.output, self.argv)
            )
        return self.words

    def __call__(self, event: Event) -> None:
        if isinstance(event, HeaderVerified):
            self._write(self._start(event).transcript_header())
            return
        words = self._start(None)
        if isinstance(event, ChunkChecked):
            block = self._block_for(event.member)
            block.chunks += words.transcript_chunk(event.member, event.error)
        elif isinstance(event, ChunkBorrowed):
            self._block_for(event.member).chunks += borrowed_lines(words, event)
        elif isinstance(event, ChunkSalvaged):
            self._block_for(event.member).chunks += salvaged_lines(words, event)
        elif isinstance(event, ChunkFed):
            name = parse_member_name(event.member)
            fed = name.data_name if name is not None else event.member
            self._block_for(event.member).chunks.append(shell.call("feed", fed))
        elif isinstance(event, PipelineStarted):
            self._block_for_stored(event.stored).started = event
        elif isinstance(event, FileFinished):
            self._finish_file(words, event)
        elif isinstance(event, QubesXmlWritten):
            self._write(
                [
                    "# qubes.xml is kept in the output folder, as qrecover does",
                    f'place_file "$work/qubes.xml" {shell.out_path(QUBES_XML)}',
                ]
            )

    def _block_for(self, member: str) -> _Block:
        name = parse_member_name(member)
        return self._block_for_stored(name.stored if name is not None else member)

    def _block_for_stored(self, stored: str) -> _Block:
        return self.blocks.setdefault(stored, _Block(stored))

    def _finish_file(self, words: Words, event: FileFinished) -> None:
        block = self.blocks.pop(event.stored, _Block(event.stored))
        title = event.stored if not event.owner else f"{event.stored} (VM {event.owner})"
        lines = ["", f"# ---- {title}: {words.transcript_steps(event.stored)}"]
        started = block.started
        if started is None:
            lines += [line for line in block.chunks if line]
        else:
            subst: dict[str, str] = {}
            stdout: str | None = None
            if started.kind == SinkKind.EXTRACT:
                assert started.staging is not None
                subst[str(started.staging)] = shell.STAGE_DIR
            elif started.kind == SinkKind.CAPTURE:
                stdout = shell.XML_OUT
            else:
                stdout = "/dev/null"
            lines += [
                words.pipeline_intro,
                "# " + " | ".join(" ".join(s.argv[:2]) for s in started.stages),
                "fresh_stage",
            ]
            lines += shell.pipeline_block(block.chunks, started.stages, subst, stdout)
            lines.append(shell.pipeline_check(event.stored, started.stages))
            if started.kind == SinkKind.EXTRACT and event.error is None and started.placeholder:
                folder = shell.out_path(started.folder)
                lines += [
                    "# R4.3's placeholder for a qube without files: its folder, left empty",
                    '[ -f "$work/stage/empty" ] && [ ! -s "$work/stage/empty" ] || '
                    + shell.call("die", f"{event.stored}: not R4.3's empty placeholder"),
                    'rm -f -- "$work/stage/empty"',
                    f"mkdir -p -- {folder} || " + shell.call("die", "cannot create the folder"),
                ]
            elif started.kind == SinkKind.EXTRACT and event.error is None:
                lines.append(f'place "$work/stage" {shell.out_path(started.folder)}')
        if event.error is not None:
            problem = about(event.stored, event.error)
            lines.append(shell.call("die", f"qrecover could not use {problem}"))
        self._write(lines)

    def close(self, ok: bool, note: str = "") -> None:
        self._start(None)  # a run that stopped before its header was verified
        lines: list[str] = []
        for stored in self.blocks:
            lines += ["", f"# qrecover stopped while working on {stored}"]
        self.blocks.clear()
        if ok:
            what = "restored" if self.mode == Mode.RESTORE else "verified"
            lines += ["", shell.call("say", f"replay done: everything {what} as qrecover did")]
        else:
            lines += ["", shell.call("die", f"qrecover's run ended here: {note or 'it failed'}")]
        self._write(lines)
        self.file.close()


def borrowed_lines(words: Words, event: ChunkBorrowed) -> list[str]:
    """A chunk taken from another copy (--other-copy): the format's own lines for
    a good chunk, with ``take`` (from the backup) replaced by the copy's command."""
    lines = ["", f"# {shell.comment(event.member)}: bad in the backup "
             f"({shell.comment(event.problem)[:200]});",
             f"# taken from the other copy {shell.comment(event.copy)} instead"]
    for line in words.transcript_chunk(event.member, None):
        if line.startswith("take "):
            line = f"{event.command} ||\n    " + shell.call(
                "die", f"{event.member}: not taken out of the other copy {event.copy}")
        lines.append(line)
    return lines


# The lines of a good chunk that check it: dropped for a chunk used with
# --salvage (formats 2 and 3: its HMAC); and those whose check is the
# decryption itself (format 4's scrypt_dec), kept, with what it wrote used.
_CHECKS = ("check_hmac ",)
_DECRYPTS = ("scrypt_dec ",)


def salvaged_lines(words: Words, event: ChunkSalvaged) -> list[str]:
    """restore --salvage: a chunk that failed its check, fed all the same: the
    format's lines for a good chunk without its check, so that the replay feeds
    the same bytes (a missing one: zeros of the size qrecover fed).  Format 2's
    missing volume, which qrecover fed as zeros with a rebuilt continuation
    header, the replay cannot repeat: it stops there."""
    lines = ["", f"# chunk {shell.comment(event.member)}: it FAILED its check "
             f"({shell.comment(event.reason)[:300]});",
             "# qrecover used it UNVERIFIED because of --salvage: fed here without its check"]
    name = parse_member_name(event.member)
    fed = name.data_name if name is not None else event.member
    # made as long as what qrecover fed: zeros after what was there (a hole)
    fit = f'dd if=/dev/null of="$work/"{shell.q(fed)} bs=1 seek={event.size} count=0 2>/dev/null'
    good = [line for line in words.transcript_chunk(event.member, None)
            if line and not line.startswith("#")]
    if event.zero_filled:
        if words.fmt.multi_volume:
            return [*lines, shell.call("die", f"{event.member}: missing: qrecover fed zeros "
                                       "with a rebuilt tar -M header (--salvage); the replay "
                                       "stops here")]
        return [*lines, f"# missing from the backup: {event.size} zero bytes in its place",
                f'mkdir -p -- "$(dirname -- "$work/"{shell.q(fed)})"', fit]
    out = lines
    for line in good:
        if line.startswith(_CHECKS):
            continue
        if line.startswith(_DECRYPTS):
            out += ["# scrypt writes the whole plaintext before it reports the failed check:",
                    "# kept (in a subshell where this script's rm and die do nothing), then made",
                    "# as long as what qrecover fed",
                    f"( rm() {{ :; }}; die() {{ exit 0; }}; {line} )", fit]
            continue
        out.append(line)
    return out
