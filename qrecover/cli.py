"""The command line: thin typer functions over plain, importable code."""

from __future__ import annotations

import contextlib
import importlib
import json
import logging
import os
import signal
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Annotated

import typer

from qrecover import __version__
from qrecover.container import open_source
from qrecover.errors import (
    EXIT_BACKUP,
    EXIT_CODES,
    EXIT_INTERNAL,
    EXIT_OK,
    EXIT_OUTPUT,
    EXIT_SIGINT,
    EXIT_SIGTERM,
    EXIT_USAGE,
    Interrupted,
    QrecoverError,
    UsageError,
)
from qrecover.explain import Narrator, plan_text, plan_text_v4
from qrecover.files import DEFAULT_PATH, find_debugfs
from qrecover.files.command import files_command
from qrecover.files.command import restore_files as _restore_files
from qrecover.inventory import Entity
from qrecover.passphrase import get_passphrase
from qrecover.progress import (
    Display,
    activate,
    clear_active,
    human_bytes,
    source_size,
    summary_table,
)
from qrecover.report_json import json_output
from qrecover.restore import FileResult, Report, Request, run
from qrecover.script import render_script, render_script_v4
from qrecover.sources import replay_path
from qrecover.transcript import (
    Event,
    EventListener,
    HeaderVerified,
    HeaderVerifiedV4,
    TranscriptWriter,
    listening,
    open_new,
)

EXIT_CODE_HELP = "\n\n".join(f"{code}: {text}" for code, text in EXIT_CODES.items())

app = typer.Typer(
    name="qrecover",
    help="Recover data from Qubes OS backups without Qubes: format 3 (Qubes R2 to R3.2) "
    "and format 4 (Qubes R4), told apart automatically.\n\n"
    "Runs the official emergency recovery procedure (tar, openssl or scrypt, "
    "gzip/bzip2/xz, tar) as real pipelines, authenticating every chunk before "
    "anything of it is decrypted or decompressed.\n\n"
    "Exit codes:\n\n" + EXIT_CODE_HELP,
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)

BackupArg = Annotated[
    list[str],
    typer.Argument(
        help="The backup file; '-' to read it from standard input; a folder holding a "
        "backup already untarred by hand (tar -i -xf BACKUP); or the pieces of a split "
        "backup, in order (backup.part-*). A backup compressed as a whole (gzip, bzip2, xz, "
        "zstd) is read through its decompressor.",
        metavar="BACKUP",
    ),
]
PassFileOpt = Annotated[
    Path | None,
    typer.Option(
        "--passphrase-file",
        help="Read the passphrase from the first line of this file "
        "(else $QRECOVER_PASSPHRASE, else a prompt on the terminal).",
        metavar="FILE",
    ),
]
NoLimitOpt = Annotated[
    bool,
    typer.Option(
        "--no-size-limit",
        help="Do not stop a stored file that expands to more than twice what qubes.xml "
        "declares for its VM (the decompression-bomb check).",
    ),
]
TranscriptOpt = Annotated[
    Path | None,
    typer.Option(
        "--transcript",
        help="Write every command run, as the run proceeds, to FILE: a POSIX sh script "
        "that replays the run (verifying every HMAC, or for format 4 authenticating every "
        "chunk with scrypt, again) from any folder.",
        metavar="FILE",
    ),
]
ExplainOpt = Annotated[
    bool,
    typer.Option(
        "--explain",
        help="Narrate each step on stderr, numbered like the recovery page's steps, "
        "with the equivalent command and its result.",
    ),
]
VmOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--vm",
        help="Only this VM (repeatable); 'dom0' selects dom0's home. "
        "Default: everything in the backup.",
        metavar="NAME",
    ),
]

JsonOpt = Annotated[
    bool,
    typer.Option(
        "--json",
        help="Print one JSON document on stdout: the header, every stored file with its "
        "VM, chunks, bytes and status, and the verdict (the human output goes to stderr). "
        "Exit codes are unchanged.",
    ),
]


# Global options that the commands need (set by the callback).
_settings: dict[str, bool] = {"quiet": False}


def _err(message: str) -> None:
    clear_active()
    print(f"qrecover: {message}", file=sys.stderr, flush=True)


def _print_version(value: bool) -> None:
    if value:
        print(f"qrecover {__version__}")
        raise typer.Exit(0)


@app.callback()
def _main(
    verbose: Annotated[
        bool,
        typer.Option(
            "--verbose",
            "-v",
            help="Log every command run, as a shell command (like set -x), on stderr.",
        ),
    ] = False,
    quiet: Annotated[
        bool,
        typer.Option(
            "--quiet",
            "-q",
            help="No live progress display and no summary table on a terminal "
            "(the per-file lines and the final verdict still print).",
        ),
    ] = False,
    version: Annotated[
        bool,
        typer.Option(
            "--version",
            help="Print the version.",
            callback=_print_version,
            is_eager=True,  # before click asks for a command
        ),
    ] = False,
) -> None:
    """Global options."""
    _settings["quiet"] = quiet
    handler = _ClearingHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger = logging.getLogger("qrecover")
    logger.handlers[:] = [handler]
    logger.setLevel(logging.INFO if verbose else logging.WARNING)
    logger.propagate = False


class _ClearingHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Log lines on stderr, each after erasing the live progress line."""

    def emit(self, record: logging.LogRecord) -> None:
        clear_active()
        super().emit(record)


class _Printer:
    """Prints a line per stored file as it completes; drives the progress display."""

    def __init__(self, mode: str, display: Display | None = None) -> None:
        self.mode = mode
        self.display = display

    def planned(self, selected: Sequence[Entity]) -> None:
        if self.display is not None:
            self.display.planned(selected)

    def file_started(self, stored: str, owner: str) -> None:
        if self.display is not None:
            self.display.file_started(stored, owner)

    def data_read(self, stored: str, nbytes: int) -> None:
        if self.display is not None:
            self.display.data_read(stored, nbytes)

    def file_done(self, result: FileResult) -> None:
        if self.display is not None:
            self.display.file_done(result)
        print(_file_line(self.mode, result), flush=True)


def _file_line(mode: str, result: FileResult) -> str:
    where = result.owner or "-"
    if result.kept:  # --resume (qrecover/resume.py)
        places = ", ".join(str(p) for p in result.places)
        return f"KEPT      {where:<16} {result.stored} -> {places} (placed by an earlier run)"
    if not result.ok:
        kept = ""
        if result.places:
            kept = " (kept as " + ", ".join(str(p) for p in result.places) + ")"
        return f"FAILED    {where:<16} {result.problem}{kept}"
    if mode == "verify":
        return (
            f"OK        {where:<16} {result.stored}  {result.chunks} chunk(s), "
            f"{human_bytes(result.stored_bytes)} stored, {result.members} member(s) listed"
        )
    places = ", ".join(str(p) for p in result.places)
    return (
        f"RESTORED  {where:<16} {result.stored} -> {places} ({human_bytes(result.restored_bytes)})"
    )


def _finish(mode: str, report: Report, elapsed: float) -> int:
    failures = [f for f in report.files if not f.ok]
    if not _settings["quiet"]:
        print(summary_table(mode, report.files, elapsed), flush=True)
    for problem in report.problems:
        _err(f"problem: {problem}")
    count = len(report.files)
    if report.ok:
        verb = "verified" if mode == "verify" else "restored"
        where = f" into {report.output}" if mode == "restore" else ""
        if kept := sum(1 for f in report.files if f.kept):  # --resume (qrecover/resume.py)
            where += f" ({kept} of them kept from an earlier run, not read again)"
        checked = (
            "every chunk authenticated by scrypt"
            if report.header is not None and report.header.version == 4
            else "all HMACs matched"
        )
        print(
            f"{verb} {count} stored file(s) of {len(report.selected)} VM(s){where}: "
            f"{checked}, every stage succeeded",
            flush=True,
        )
        return EXIT_OK
    _err(
        f"{len(failures)} of {count} stored file(s) failed"
        + (f", {len(report.problems)} other problem(s)" if report.problems else "")
        + ":"
    )
    for failure in failures:
        _err(f"  {failure.problem}")
    if any(f.output_trouble for f in failures):
        return EXIT_OUTPUT
    return EXIT_BACKUP


def _run(
    backup: Sequence[str],
    passphrase_file: Path | None,
    request: Request,
    listeners: Sequence[EventListener] = (),
) -> tuple[Report, float]:
    """Run the pass; returns the report and its time (from after the passphrase)."""
    source = open_source(backup)
    passphrase = get_passphrase(passphrase_file)
    started = time.monotonic()
    if request.mode == "info":
        with listening(*listeners):
            return run(source, passphrase, request), time.monotonic() - started
    display = None
    if not _settings["quiet"] and sys.stderr.isatty():
        display = Display(sys.stderr, source_size(source))
    activate(display)
    try:
        with listening(*listeners):
            report = run(source, passphrase, request, _Printer(request.mode, display))
        return report, time.monotonic() - started
    finally:
        clear_active()
        activate(None)


class _HeaderSeen:
    """Keeps the verified header's event: what a dry run or a script is written from
    (for format 4 it also holds how the installed scrypt takes its passphrase)."""

    def __init__(self) -> None:
        self.event: HeaderVerified | HeaderVerifiedV4 | None = None

    def __call__(self, event: Event) -> None:
        if isinstance(event, HeaderVerified | HeaderVerifiedV4):
            self.event = event

    def get(self) -> HeaderVerified | HeaderVerifiedV4:
        assert self.event is not None, "the engine reports the header before qubes.xml"
        return self.event


@dataclass
class _Showing:
    """The --transcript/--explain listeners, and how the run they show ended."""

    listeners: list[EventListener]
    ok: bool = False
    note: str = "qrecover stopped with an error"

    def finished(self, report: Report) -> None:
        self.ok = report.ok
        if not report.ok:
            failures = [f.problem for f in report.files if not f.ok]
            self.note = "qrecover reported problems: " + "; ".join(
                [*failures, *report.problems]
            )[:500]


@contextlib.contextmanager
def _showing(
    mode: str,
    backup: Sequence[str],
    output: Path | None,
    transcript: Path | None,
    explain: bool,
    force: bool = False,
) -> Iterator[_Showing]:
    """The listeners for --transcript and --explain; the transcript is closed either way,
    ending with how the run ended (the caller reports it with ``finished``)."""
    listeners: list[EventListener] = []
    writer: TranscriptWriter | None = None
    narrator: Narrator | None = None
    if transcript is not None and os.path.exists(transcript) and any(
        piece != "-" and os.path.samefile(transcript, piece) for piece in backup
    ):
        raise UsageError(f"--transcript {transcript} is the backup itself")
    if transcript is not None:
        writer = TranscriptWriter(
            open_new(transcript, force),
            "restore" if mode == "restore" else "verify",
            replay_path(backup),
            Path(os.path.abspath(output)) if output is not None else None,
            argv=sys.argv[1:],
        )
        listeners.append(writer)
    if explain:
        narrator = Narrator(replay_path(backup) or "-", mode)
        listeners.append(narrator)
    shown = _Showing(listeners)
    raised = True
    try:
        yield shown
        raised = False
    except QrecoverError as exc:
        shown.ok, shown.note = False, exc.message
        raise
    finally:
        if writer is not None:
            writer.close(shown.ok and not raised, shown.note)
        if narrator is not None and not raised:
            narrator.close()


def restore_command(
    backup: Sequence[str],
    output: Path,
    vms: Sequence[str],
    force: bool,
    passphrase_file: Path | None,
    size_limit: bool = True,
    files: bool = False,
    transcript: Path | None = None,
    explain: bool = False,
    dry_run: bool = False,
    as_json: bool = False,
    resume: bool = False,
) -> int:
    if as_json and dry_run:
        raise UsageError("--json and --dry-run do not go together")
    with json_output(as_json, "restore", backup) as as_doc:
        code, report = _restore_command(
            backup, output, vms, force, passphrase_file, size_limit, files, transcript,
            explain, dry_run, resume,
        )
        as_doc.done(report, code)
    return code


def _restore_command(
    backup: Sequence[str],
    output: Path,
    vms: Sequence[str],
    force: bool,
    passphrase_file: Path | None,
    size_limit: bool,
    files: bool,
    transcript: Path | None,
    explain: bool,
    dry_run: bool,
    resume: bool,
) -> tuple[int, Report]:
    if dry_run:
        seen = _HeaderSeen()
        report, _ = _run(backup, passphrase_file, Request("info", vms=tuple(vms)), [seen])
        event = seen.get()
        if isinstance(event, HeaderVerifiedV4):
            print(plan_text_v4(event.fmt, report.selected, replay_path(backup) or "-", output))
        else:
            print(plan_text(event.header, report.selected, replay_path(backup) or "-", output))
        # The plan says what would stop a real run; so does the exit code.
        existing = [output / "qubes.xml", *(output / e.dest for e in report.selected)]
        if not force and any(os.path.lexists(p) for p in existing):
            return EXIT_OUTPUT, report
        return EXIT_OK, report
    if files:
        find_debugfs()  # a missing debugfs stops us before the restore, not after it
    request = Request("restore", vms=tuple(vms), output=output, force=force,
                      size_limit=size_limit, resume=resume)
    with _showing("restore", backup, output, transcript, explain, force) as shown:
        report, elapsed = _run(backup, passphrase_file, request, shown.listeners)
        shown.finished(report)
    code = _finish("restore", report, elapsed)
    if files:
        files_code = _restore_files(report, output, force)
        code = code if code != EXIT_OK else files_code
    return code, report


def verify_command(
    backup: Sequence[str],
    vms: Sequence[str],
    passphrase_file: Path | None,
    size_limit: bool = True,
    transcript: Path | None = None,
    explain: bool = False,
    as_json: bool = False,
) -> int:
    request = Request("verify", vms=tuple(vms), size_limit=size_limit)
    with json_output(as_json, "verify", backup) as as_doc:
        with _showing("verify", backup, None, transcript, explain) as shown:
            report, elapsed = _run(backup, passphrase_file, request, shown.listeners)
            shown.finished(report)
        code = _finish("verify", report, elapsed)
        as_doc.done(report, code)
    return code


def script_command(
    backup: Sequence[str], output: Path, vms: Sequence[str], passphrase_file: Path | None
) -> int:
    seen = _HeaderSeen()
    report, _ = _run(backup, passphrase_file, Request("info", vms=tuple(vms)), [seen])
    event = seen.get()
    where = replay_path(backup)
    out = Path(os.path.abspath(output))
    if isinstance(event, HeaderVerifiedV4):
        text = render_script_v4(event.fmt, report.selected, where, out, argv=sys.argv[1:])
    else:
        text = render_script(event.header, report.selected, where, out, argv=sys.argv[1:])
    sys.stdout.write(text)
    sys.stdout.flush()
    return EXIT_OK


def info_command(backup: Sequence[str], as_json: bool, passphrase_file: Path | None) -> int:
    report, _elapsed = _run(backup, passphrase_file, Request("info"))
    assert report.header is not None and report.inventory is not None
    if as_json:
        data = {
            "header": report.header.fields(),
            "vms": [e.as_json() for e in report.inventory.entities],
        }
        print(json.dumps(data, indent=2))
        return EXIT_OK
    version = report.header.version
    method = "scrypt" if version == 4 else f"HMAC-{report.header.hmac_algorithm}"
    written_by = "Qubes R4" if version == 4 else "Qubes R2-R3.2"
    print(f"Backup {' '.join(backup)}: format {version}, written by {written_by}")
    print(f"  header verified with {method}")
    for key, value in report.header.fields().items():
        print(f"  {key}: {value}")
    print("VMs with data in this backup:")
    rows = [("NAME", "TYPE", "TEMPLATE", "BACKUP PATH", "SIZE")]
    rows += [
        (e.name, e.type, e.template or "-", e.backup_path, human_bytes(e.size))
        for e in report.inventory.entities
    ]
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    for row in rows:
        print("  " + "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
    return EXIT_OK


@app.command()
def restore(
    backup: BackupArg,
    output: Annotated[
        Path,
        typer.Option(
            "--output",
            "-o",
            help="Folder to restore into: DIR/<vm>/..., DIR/dom0-home/<user>/, DIR/qubes.xml.",
            metavar="DIR",
        ),
    ],
    vm: VmOpt = None,
    force: Annotated[
        bool,
        typer.Option(
            "--force",
            help="Replace files that already exist "
            "in DIR (only once their replacement is complete "
            "and verified).",
        ),
    ] = False,
    passphrase_file: PassFileOpt = None,
    files: Annotated[
        bool,
        typer.Option(
            "--files",
            help=f"Also copy each restored VM's {DEFAULT_PATH} out of its private.img "
            "into DIR/<vm>/files/ (with debugfs: no root, no mount).",
        ),
    ] = False,
    no_size_limit: NoLimitOpt = False,
    transcript: TranscriptOpt = None,
    explain: ExplainOpt = False,
    dry_run: Annotated[
        bool,
        typer.Option(
            "--dry-run",
            help="Verify the header and qubes.xml, then print what would be restored "
            "where, and with which commands, without writing anything.",
        ),
    ] = False,
    as_json: JsonOpt = False,
    resume: Annotated[
        bool,
        typer.Option(
            "--resume",
            help="Continue an interrupted restore of the same backup into DIR: skip "
            "what DIR's record says was placed, redo the rest.",
        ),
    ] = False,
) -> None:
    """Verify and restore the backup's VMs (all, or those named with --vm) into DIR."""
    raise typer.Exit(
        restore_command(
            backup,
            output,
            vm or [],
            force,
            passphrase_file,
            size_limit=not no_size_limit,
            files=files,
            transcript=transcript,
            explain=explain,
            dry_run=dry_run,
            as_json=as_json,
            resume=resume,
        )
    )


@app.command()
def files(
    image: Annotated[
        Path,
        typer.Argument(
            help="A restored private.img (an ext2/3/4 file system image).", metavar="IMAGE"
        ),
    ],
    paths: Annotated[
        list[str] | None,
        typer.Argument(
            help=f"Folders or files inside the image to copy (default: {DEFAULT_PATH}; "
            "the image's root holds home/, config/ and usrlocal/). Each is copied into DIR "
            "under its last name: /home/user -> DIR/user; / -> DIR/rw.",
            metavar="PATH",
        ),
    ] = None,
    output: Annotated[
        Path | None,
        typer.Option("--output", "-o", help="Folder to copy into.", metavar="DIR"),
    ] = None,
    list_only: Annotated[
        bool,
        typer.Option("--list", help="Print the tree below each PATH (stdout) instead of copying."),
    ] = False,
    force: Annotated[
        bool,
        typer.Option(
            "--force",
            help="Replace DIR/<name> if it exists (only once the new copy is complete).",
        ),
    ] = False,
) -> None:
    """Copy files out of a restored private.img, without root and without mounting it.

    Uses e2fsprogs' debugfs read-only (-c): permissions and times are kept,
    symbolic links are copied as links and never followed, special files
    (devices, FIFOs, sockets) are skipped with a note.
    """
    raise typer.Exit(files_command(image, output, paths or [], list_only, force))


@app.command()
def verify(
    backup: BackupArg,
    vm: VmOpt = None,
    passphrase_file: PassFileOpt = None,
    no_size_limit: NoLimitOpt = False,
    transcript: TranscriptOpt = None,
    explain: ExplainOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Check everything restore would, writing nothing: every HMAC, decryption,
    decompression, and a listing of each inner archive."""
    raise typer.Exit(
        verify_command(
            backup,
            vm or [],
            passphrase_file,
            size_limit=not no_size_limit,
            transcript=transcript,
            explain=explain,
            as_json=as_json,
        )
    )


@app.command()
def script(
    backup: BackupArg,
    output: Annotated[
        Path,
        typer.Option(
            "--output",
            "-o",
            help="The folder the script restores into (same layout as restore).",
            metavar="DIR",
        ),
    ],
    vm: VmOpt = None,
    passphrase_file: PassFileOpt = None,
) -> None:
    """Print a standalone POSIX sh recovery script (no Python, no qrecover needed) for
    the VMs named with --vm (all without it), after verifying the header and qubes.xml."""
    raise typer.Exit(script_command(backup, output, vm or [], passphrase_file))


@app.command()
def kit(
    backup: Annotated[
        str,
        typer.Argument(
            help="The backup file, or a folder holding a backup already untarred by hand.",
            metavar="BACKUP",
        ),
    ],
    output: Annotated[
        Path,
        typer.Option(
            "--output",
            "-o",
            help="Folder to write the kit into (made if missing; never over its files).",
            metavar="DIR",
        ),
    ],
    passphrase_file: PassFileOpt = None,
) -> None:
    """Write a recovery kit to keep beside the backup: qrecover.pyz (runs with only
    python3), recover.sh (no Python) and RECOVERY.txt (the procedure for this backup).
    The passphrase is asked for to read qubes.xml; no file of the kit holds it."""
    from qrecover.kit import kit_command  # only this command needs shiv's machinery

    raise typer.Exit(kit_command(backup, output, passphrase_file))


@app.command()
def info(
    backup: BackupArg,
    as_json: Annotated[
        bool, typer.Option("--json", help='Print JSON: {"header": {...}, "vms": [...]}.')
    ] = False,
    passphrase_file: PassFileOpt = None,
) -> None:
    """Verify the header and qubes.xml, then show the header and the VMs in the backup."""
    raise typer.Exit(info_command(backup, as_json, passphrase_file))


def _usage_errors() -> tuple[type[Exception], ...]:
    """typer's usage-error classes: its own since typer 0.29 (which vendors
    click), click's before; imported by name so that either works."""
    found: list[type[Exception]] = []
    typer_base = getattr(typer, "TyperException", None)
    if isinstance(typer_base, type) and issubclass(typer_base, Exception):
        found.append(typer_base)
    try:
        click = importlib.import_module("click")
    except ImportError:
        pass
    else:
        found.append(click.ClickException)
    return tuple(found)


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise Interrupted(signum, EXIT_SIGTERM)


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point: the one place where errors become messages and exit codes."""
    signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        # Without standalone mode, click returns typer.Exit's code instead of raising it.
        returned = app(args=list(argv) if argv is not None else None, standalone_mode=False)
        code = returned if isinstance(returned, int) else EXIT_OK
    except typer.Exit as exc:
        code = exc.exit_code
    except (typer.Abort, KeyboardInterrupt):
        _err("interrupted; scratch files removed, nothing left under a final name")
        code = EXIT_SIGINT
    except Interrupted as exc:
        _err("terminated; scratch files removed, nothing left under a final name")
        code = exc.exit_code
    except QrecoverError as exc:
        hint = f" ({exc.hint})" if exc.hint else ""
        _err(f"error: {exc.message}{hint}")
        code = exc.exit_code
    except _usage_errors() as exc:
        exc.show()  # type: ignore[attr-defined]
        code = getattr(exc, "exit_code", EXIT_USAGE)
    except Exception as exc:  # a bug: say so, without a traceback unless asked
        _err(
            f"internal error: {type(exc).__name__}: {exc}; please report this "
            "(set QRECOVER_DEBUG=1 for a traceback)"
        )
        if os.environ.get("QRECOVER_DEBUG"):
            raise
        code = EXIT_INTERNAL
    sys.exit(code)
