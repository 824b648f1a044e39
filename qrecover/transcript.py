"""What the engine did, step by step, and the shell transcript of it.

The streaming engine (restore.py) emits one event per step of the recovery
page as it happens: header verified, chunk verified, pipeline started, chunk
fed, stored file finished.  Format 4 (Qubes R4) has its own two: the header
verified by scrypt (:class:`HeaderVerifiedV4`, carrying the Format4 that runs)
and a chunk authenticated and decrypted by scrypt (:class:`ChunkDecrypted`).
Several consumers render the same events: the ``-v`` log (``+ command``
lines), ``--explain`` (explain.py) and ``--transcript FILE``
(:class:`TranscriptWriter`, a runnable ``sh`` script).  The commands in every
rendering come from the :class:`~qrecover.runner.Stage` objects that actually ran.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Literal

from qrecover import __version__, shell
from qrecover.container import HEADER, HEADER_HMAC, QUBES_XML, parse_member_name
from qrecover.decrypt import decrypt_stage
from qrecover.errors import OutputError
from qrecover.formats import Format4
from qrecover.header import BackupHeader, BackupHeaderV4
from qrecover.inventory import Entity, Inventory
from qrecover.runner import PASS_ENV, Stage
from qrecover.scrypt import HEADER_PREFIX, render_dec
from qrecover.verify import Digest

SinkKind = Literal["capture", "list", "extract"]
PAGE_V4 = "https://www.qubes-os.org/doc/backup-emergency-restore-v4/"


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
class HeaderVerifiedV4:
    """Format 4, the v4 page's steps 1-5: scrypt authenticated backup-header.hmac,
    its plaintext is identical to backup-header, which was then parsed.

    ``fmt`` is the Format4 that runs (the header, and how the installed scrypt
    takes its passphrase)."""

    fmt: Format4

    def commands(self) -> list[str]:
        return []  # Format4's authentication logged its commands as they ran

    def header_command(self) -> str:
        """The v4 page's step 3 for this scrypt, as a person would type it."""
        return (
            render_dec(self.fmt.tool, HEADER_HMAC, VERIFIED_HEADER, HEADER_PREFIX)
            + f" && cmp {HEADER} {VERIFIED_HEADER}"
        )


VERIFIED_HEADER = f"{HEADER}.verified"


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
class ChunkDecrypted:
    """Format 4, the v4 page's step 8 for one chunk: ``scrypt dec`` authenticated
    and decrypted ``member`` (``NAME.NNN.enc``) into a scratch file, or failed
    (``error``), in which case nothing of it was used."""

    member: str
    plain: str  # NAME.NNN: what the page calls the decrypted chunk
    prefix: str  # BACKUPID!NAME.NNN!, what precedes the passphrase
    fmt: Format4
    size: int
    error: str | None = None

    def commands(self) -> list[str]:
        return []  # Format4.decrypt_chunk logged the scrypt command as it ran

    def command(self) -> str:
        return render_dec(self.fmt.tool, self.member, self.plain, self.prefix)


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
        return []  # the runner logs the pipeline as it starts it


@dataclass(frozen=True)
class ChunkFed:
    """A verified chunk is being fed into its stored file's pipeline."""

    stored: str
    member: str
    path: Path

    def commands(self) -> list[str]:
        return []  # the runner logs cat as it starts it


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
    | HeaderVerifiedV4
    | InventoryRead
    | ChunkVerified
    | ChunkRejected
    | ChunkDecrypted
    | PipelineStarted
    | ChunkFed
    | FileFinished
    | QubesXmlWritten
)
EventListener = Callable[[Event], None]


def about(stored: str, error: str) -> str:
    """``STORED: what went wrong``, naming the stored file once (most errors
    already start with it)."""
    return error if error.startswith(f"{stored}:") else f"{stored}: {error}"


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

    Replaying it takes each chunk out of the backup again (``tar -i -x``),
    verifies its HMAC, and feeds it into the same pipeline qrecover ran, so
    it reproduces the same files in the same output folder.
    """

    def __init__(
        self,
        file: PendingFile,
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
        self.argv = tuple(argv)
        # The format is known once the header is verified: the preamble (which
        # programs the replay needs) is written then.
        self.version: int | None = None

    def _write(self, lines: Sequence[str]) -> None:
        self.file.write("".join(line + "\n" for line in lines))
        self.file.flush()

    def _start(self, version: int) -> None:
        if self.version is not None:
            return
        self.version = version
        if version == 4:
            self._start_v4()
            return
        when = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        argv = self.argv
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

    def _start_v4(self) -> None:
        when = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        shown = shell.call("qrecover", *self.argv) if self.argv else "qrecover"
        lines = [
            "#!/bin/sh",
            f"# Transcript of: {shell.comment(shown)}",
            f"# written by qrecover {__version__} on {when}, as the run went.",
            "#",
            "# Every command qrecover ran, as a shell script that does the same: replay it",
            "# with `sh THIS-FILE` (dash or bash; GNU tar, scrypt >= 1.2.1, the decompressor",
            "# and POSIX utilities only). This is a format-4 (Qubes R4) backup: each chunk",
            "# NAME.NNN.enc is taken out of the backup again with tar -i; scrypt",
            "# authenticates and decrypts it into a scratch file, and only once scrypt has",
            "# exited 0 is the plaintext fed into the stored file's pipeline, as qrecover",
            "# did. Step numbers are those of the recovery page for format 4:",
            f"# {PAGE_V4}",
            "# The replay stops, non-zero, at the first failing check or stage.",
            "",
            "set -u",
            "",
            shell.prelude_v4(),
            "",
            shell.scrypt_functions(),
            "",
            *shell.backup_assignment(self.backup, "qrecover"),
        ]
        if self.mode == "restore":
            assert self.output is not None
            lines.append(f"out={shell.q(str(self.output))}  # the output folder")
        lines += [
            "need tar scrypt cmp grep sed wc awk tail",
            "# step 2: the passphrase (the page's read -r backup_pass)",
            *shell.passphrase_lines(),
            "scrypt_init",
            'make_work "$out"' if self.mode == "restore" else 'make_work "${TMPDIR:-/tmp}"',
        ]
        self._write(lines)

    def __call__(self, event: Event) -> None:
        if isinstance(event, HeaderVerifiedV4):
            self._start(4)
            self._header_v4(event)
            return
        self._start(3)
        if isinstance(event, HeaderVerified):
            self._header(event.header)
        elif isinstance(event, ChunkDecrypted):
            block = self._block_for(event.member)
            if event.error is None:
                step = "step 6" if block.stored == QUBES_XML else "step 8"
                block.chunks += [
                    "",
                    f"# chunk {event.member}: {step}, take it out of the backup; scrypt decrypts",
                    "# it into a scratch file; fed into the pipeline only if scrypt exited 0",
                ]
            else:
                block.chunks += [
                    "",
                    f"# chunk {shell.comment(event.member)}: qrecover found it bad "
                    f"({shell.comment(event.error)});",
                    "# the replay stops here too",
                ]
            block.chunks += [
                shell.call("take", event.member),
                shell.call("scrypt_dec", event.member, event.plain, event.prefix),
            ]
            if event.error is not None:
                block.chunks.append(
                    shell.call("die", f"{event.member}: scrypt could not authenticate it")
                )
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
            name = parse_member_name(event.member)
            fed = name.data_name if name is not None else event.member
            self._block_for(event.member).chunks.append(shell.call("feed", fed))
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

    def _header_v4(self, event: HeaderVerifiedV4) -> None:
        header = event.fmt.header
        lines = [
            "",
            "# ---- steps 1-5: the backup header",
            "# step 1: untar the backup; it is listed once, and each member is taken",
            "# out when it is needed (and deleted once used)",
            "list_members",
            shell.call("take", HEADER, HEADER_HMAC),
            f"# step 3: verify the header: {HEADER_HMAC} is {HEADER} encrypted and",
            f"# authenticated by scrypt under the passphrase '{HEADER_PREFIX}' + yours",
            shell.call("scrypt_dec", HEADER_HMAC, VERIFIED_HEADER, HEADER_PREFIX,
                       shell.HEADER_MISMATCH),
            shell.call("same_file", HEADER, VERIFIED_HEADER),
            "# step 4: read the header; qrecover checked these values:",
            'cat -- "$work/backup-header" >&2',
            *(shell.call("header_is", k, v) for k, v in header_checks_v4(header)),
            f"# step 5: backup_id={header.backup_id}: each chunk's scrypt passphrase is",
            "# 'BACKUPID!NAME.NNN!' followed by yours (written out below, single-quoted)",
        ]
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
        v4 = self.version == 4
        steps = "steps 4-7"
        if v4:
            steps = "step 6" if event.stored == QUBES_XML else "steps 7-8"
        lines = ["", f"# ---- {title}: {steps}"]
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
            intro = (
                "# the chunks, in numeric order, each decrypted by scrypt, through"
                if v4
                else "# steps 5-7 in one pipeline: the verified chunks, in numeric order, through"
            )
            lines += [
                intro,
                "# " + " | ".join(" ".join(s.argv[:2]) for s in started.stages),
                "fresh_stage",
            ]
            lines += shell.pipeline_block(block.chunks, started.stages, subst, stdout)
            lines.append(shell.pipeline_check(event.stored, started.stages))
            if started.kind == "extract" and event.error is None:
                lines.append(f'place "$work/stage" {shell.out_path(started.folder)}')
        if event.error is not None:
            problem = about(event.stored, event.error)
            lines.append(shell.call("die", f"qrecover could not use {problem}"))
        self._write(lines)

    def close(self, ok: bool, note: str = "") -> None:
        self._start(3)  # a run that stopped before its header was verified
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


def header_checks_v4(header: BackupHeaderV4) -> list[tuple[str, str]]:
    """The format-4 header lines a script checks in step 4."""
    checks = [
        ("version", str(header.version)),
        ("hmac-algorithm", header.hmac_algorithm),
        ("encrypted", str(header.encrypted)),
        ("compressed", str(header.compressed)),
    ]
    if header.compressed and header.compression_filter is not None:
        checks.append(("compression-filter", header.compression_filter))
    checks.append(("backup-id", header.backup_id))
    return checks


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
