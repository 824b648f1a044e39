"""What the engine did, step by step, and the shell transcript of it.

The streaming engine (restore.py) emits one event per step of the recovery
page as it happens: header verified, chunk verified, pipeline started, chunk
fed, stored file finished.  Several consumers render the same events: the
``-v`` log (``+ command`` lines), ``--explain`` (explain.py) and
``--transcript FILE`` (:class:`TranscriptWriter`, a runnable ``sh`` script).
The commands in every rendering come from the :class:`~qrecover.runner.Stage`
objects that actually ran.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import IO, Literal

from qrecover import __version__, shell
from qrecover.container import HEADER, HEADER_HMAC, QUBES_XML, parse_member_name
from qrecover.decrypt import decrypt_stage
from qrecover.errors import OutputError
from qrecover.header import BackupHeader
from qrecover.inventory import Entity, Inventory
from qrecover.runner import PASS_ENV, Stage, announce, render_pipeline
from qrecover.verify import Digest

SinkKind = Literal["capture", "list", "extract"]


def dgst_command(digest: Digest, member: str) -> str:
    """How the page computes an HMAC (qrecover computes it in-process instead)."""
    return f'openssl dgst {digest.openssl_flag} -hmac "${PASS_ENV}" < {shell.q(member)}'


@dataclass(frozen=True)
class HeaderVerified:
    """Steps 1-3: backup-header authenticated, then parsed."""

    header: BackupHeader

    def commands(self) -> list[str]:
        return [
            dgst_command(self.header.digest, HEADER) + f"  # done in-process: matches {HEADER_HMAC}"
        ]


@dataclass(frozen=True)
class InventoryRead:
    """qubes.xml read: the VMs in the backup and those selected."""

    inventory: Inventory
    selected: tuple[Entity, ...]

    def commands(self) -> list[str]:
        return []


@dataclass(frozen=True)
class ChunkVerified:
    """Step 4: a chunk's HMAC matched its .hmac."""

    member: str
    hmac_member: str
    digest: Digest
    size: int

    def commands(self) -> list[str]:
        return [
            dgst_command(self.digest, self.member)
            + f"  # done in-process: matches {self.hmac_member}"
        ]


@dataclass(frozen=True)
class ChunkRejected:
    """Step 4 failed: the chunk is not used."""

    member: str
    hmac_member: str
    reason: str

    def commands(self) -> list[str]:
        return []


@dataclass(frozen=True)
class PipelineStarted:
    """Steps 5-7: one stored file's decrypt | decompress | untar pipeline."""

    stored: str
    owner: str
    stages: tuple[Stage, ...]
    kind: SinkKind
    staging: Path | None = None  # the private folder tar extracts into
    folder: str = ""  # output-relative folder the extracted entries go to

    def commands(self) -> list[str]:
        return [f"{render_pipeline(self.stages)}  # fed the chunks of {self.stored} by cat"]


@dataclass(frozen=True)
class ChunkFed:
    """A verified chunk is being fed into its stored file's pipeline."""

    stored: str
    member: str
    path: Path

    def commands(self) -> list[str]:
        return [
            f"{shell.render_argv(('cat', str(self.path)))}  # into the pipeline of {self.stored}"
        ]


@dataclass(frozen=True)
class FileFinished:
    """A stored file is done: restored (or listed), or failed."""

    stored: str
    owner: str
    error: str | None
    places: tuple[Path, ...] = ()
    restored_bytes: int = 0

    def commands(self) -> list[str]:
        return []


@dataclass(frozen=True)
class QubesXmlWritten:
    path: Path

    def commands(self) -> list[str]:
        return []


Event = (
    HeaderVerified
    | InventoryRead
    | ChunkVerified
    | ChunkRejected
    | PipelineStarted
    | ChunkFed
    | FileFinished
    | QubesXmlWritten
)
EventListener = Callable[[Event], None]
_listeners: list[EventListener] = []


def emit(event: Event) -> None:
    """Report a step: logged with -v as its commands, then given to every listener."""
    for command in event.commands():
        announce(command)
    for listener in list(_listeners):
        listener(event)


@contextlib.contextmanager
def listening(*listeners: EventListener) -> Iterator[None]:
    _listeners.extend(listeners)
    try:
        yield
    finally:
        for listener in listeners:
            if listener in _listeners:
                _listeners.remove(listener)


def open_new(path: Path, force: bool) -> IO[str]:
    """Create a file for writing; an existing one is replaced only with --force."""
    flags = os.O_WRONLY | os.O_CREAT | (os.O_TRUNC if force else os.O_EXCL)
    try:
        fd = os.open(path, flags, 0o755)
    except FileExistsError:
        raise OutputError(
            f"{path}: already exists", hint="choose another --transcript file, or use --force"
        ) from None
    except OSError as exc:
        raise OutputError(f"{path}: cannot create ({exc.strerror})") from None
    return os.fdopen(fd, "w", encoding="utf-8")


@dataclass
class _Block:
    """The lines of one stored file, written when it finishes."""

    stored: str
    chunks: list[str] = field(default_factory=list)
    started: PipelineStarted | None = None


class TranscriptWriter:
    """Writes the run as a POSIX sh script, stored file by stored file.

    Replaying it takes each chunk out of the backup again (``tar -i -x``),
    verifies its HMAC, and feeds it into the same pipeline qrecover ran, so
    it reproduces the same files in the same output folder.
    """

    def __init__(
        self,
        file: IO[str],
        mode: Literal["verify", "restore"],
        backup: str | None,
        output: Path | None,
        argv: Sequence[str] = (),
    ) -> None:
        self.file = file
        self.mode = mode
        self.backup = backup
        self.output = output
        self.block: _Block | None = None
        self.finished = False
        self._start(argv)

    def _write(self, lines: Sequence[str]) -> None:
        self.file.write("".join(line + "\n" for line in lines))
        self.file.flush()

    def _start(self, argv: Sequence[str]) -> None:
        when = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        shown = shell.call("qrecover", *argv) if argv else "qrecover"
        lines = [
            "#!/bin/sh",
            f"# Transcript of: {shell.comment(shown)}",
            f"# written by qrecover {__version__} on {when}, as the run went.",
            "#",
            "# Every command qrecover ran, as a shell script that does the same: replay it",
            "# with `sh THIS-FILE` (dash or bash; GNU tar, OpenSSL, the decompressor and",
            "# POSIX utilities only). Each chunk is taken out of the backup again with",
            "# tar -i, its HMAC is checked before any byte of it is used, and it is fed",
            "# into the stored file's pipeline, as qrecover did. Step numbers are those",
            "# of the recovery page: https://www.qubes-os.org/doc/backup-emergency-restore-v3/",
            "# The replay stops, non-zero, at the first failing check or stage.",
            "",
            "set -u",
            "",
            shell.PRELUDE,
            "",
            *shell.backup_assignment(self.backup, "qrecover"),
        ]
        if self.mode == "restore":
            assert self.output is not None
            lines += [
                f"out={shell.q(str(self.output))}  # the output folder",
                "need tar openssl od sed tr wc awk tail",
                *shell.passphrase_lines(),
                'make_work "$out"',
            ]
        else:
            lines += [
                "need tar openssl od sed tr wc awk tail",
                *shell.passphrase_lines(),
                'make_work "${TMPDIR:-/tmp}"',
            ]
        self._write(lines)

    # -- events ---------------------------------------------------------------

    def __call__(self, event: Event) -> None:
        if isinstance(event, HeaderVerified):
            self._header(event.header)
        elif isinstance(event, ChunkVerified):
            block = self._block_for(event.member)
            block.chunks += [
                "",
                f"# chunk {event.member}: step 1, take it (and its .hmac) out of the backup;",
                "# step 4, verify its HMAC; then feed it into the pipeline and delete it",
                shell.call("take", event.member, event.hmac_member),
                shell.call("check_hmac", event.member),
            ]
        elif isinstance(event, ChunkFed):
            self._block_for(event.member).chunks.append(shell.call("feed", event.member))
        elif isinstance(event, ChunkRejected):
            block = self._block_for(event.member)
            block.chunks += [
                "",
                f"# chunk {event.member}: qrecover found it bad ({event.reason});",
                "# the replay stops here too",
                shell.call("take", event.member, event.hmac_member),
                shell.call("check_hmac", event.member),
                shell.call("die", f"{event.member}: {event.reason}"),
            ]
        elif isinstance(event, PipelineStarted):
            self._block_for_stored(event.stored).started = event
        elif isinstance(event, FileFinished):
            self._finish_file(event)
        elif isinstance(event, QubesXmlWritten):
            self._write(
                [
                    "# qubes.xml is kept in the output folder, as qrecover does",
                    f'place_file "$work/qubes.xml" {shell.out_path(QUBES_XML)}',
                ]
            )

    def _header(self, header: BackupHeader) -> None:
        lines = [
            "",
            "# ---- steps 1-3: the backup header",
            "# step 1: untar the backup; it is listed once, and each member is taken",
            "# out when it is needed (and deleted once used)",
            "list_members",
            "# step 1, for the header: take backup-header and its HMAC out of the backup",
            shell.call("take", HEADER, HEADER_HMAC),
            f"# step 2: verify the header's HMAC ({header.hmac_algorithm}), before reading it",
            shell.hmac_init_line(header.digest),
            shell.call("check_hmac", HEADER, shell.HEADER_MISMATCH),
            "# step 3: read the header; qrecover checked these values:",
            'cat -- "$work/backup-header" >&2',
        ]
        for key, value in header_checks(header):
            lines.append(shell.call("header_is", key, value))
        stage = decrypt_stage(header)
        lines += shell.decrypt_note([stage] if stage is not None else [])
        self._write(lines)

    def _block_for(self, member: str) -> _Block:
        name = parse_member_name(member)
        stored = name.stored if name is not None else member
        return self._block_for_stored(stored)

    def _block_for_stored(self, stored: str) -> _Block:
        if self.block is None or self.block.stored != stored:
            self.block = _Block(stored)
        return self.block

    def _finish_file(self, event: FileFinished) -> None:
        block = self._block_for_stored(event.stored)
        self.block = None
        title = event.stored if not event.owner else f"{event.stored} (VM {event.owner})"
        lines = ["", f"# ---- {title}: steps 4-7"]
        started = block.started
        if started is None:
            lines += [line for line in block.chunks if line]
        else:
            subst: dict[str, str] = {}
            stdout: str | None = None
            if started.kind == "extract":
                assert started.staging is not None
                subst[str(started.staging)] = shell.STAGE_DIR
            elif started.kind == "capture":
                stdout = shell.XML_OUT
            else:
                stdout = "/dev/null"
            lines += [
                "# steps 5-7 in one pipeline: the verified chunks, in numeric order, through",
                "# " + " | ".join(" ".join(s.argv[:2]) for s in started.stages),
                "fresh_stage",
            ]
            lines += shell.pipeline_block(block.chunks, started.stages, subst, stdout)
            lines.append(shell.pipeline_check(event.stored, started.stages))
            if started.kind == "extract" and event.error is None:
                lines.append(f'place "$work/stage" {shell.out_path(started.folder)}')
        if event.error is not None:
            lines.append(shell.call("die", f"qrecover could not use {event.stored}: {event.error}"))
        self._write(lines)

    def close(self, ok: bool, note: str = "") -> None:
        lines: list[str] = []
        if self.block is not None:
            lines += ["", f"# qrecover stopped while working on {self.block.stored}"]
            self.block = None
        if ok:
            what = "restored" if self.mode == "restore" else "verified"
            lines += ["", shell.call("say", f"replay done: everything {what} as qrecover did")]
        else:
            lines += ["", shell.call("die", f"qrecover's run ended here: {note or 'it failed'}")]
        self._write(lines)
        self.file.close()


def header_checks(header: BackupHeader) -> list[tuple[str, str]]:
    """The header lines a script checks in step 3 (those present in the header)."""
    checks = [
        ("version", str(header.version)),
        ("hmac-algorithm", header.hmac_algorithm),
        ("encrypted", str(header.encrypted)),
        ("compressed", str(header.compressed)),
    ]
    if header.encrypted and "crypto_algorithm" in header.model_fields_set:
        checks.append(("crypto-algorithm", header.crypto_algorithm))
    if header.compressed and header.compression_filter is not None:
        checks.append(("compression-filter", header.compression_filter))
    return checks
