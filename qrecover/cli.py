"""The command line: thin typer functions over plain, importable code."""

from __future__ import annotations

import json
import logging
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from types import FrameType
from typing import Annotated

import click
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
    Interrupted,
    QrecoverError,
)
from qrecover.inventory import Entity
from qrecover.passphrase import get_passphrase
from qrecover.progress import Display, activate, clear_active, source_size, summary_table
from qrecover.restore import FileResult, Report, Request, run

EXIT_CODE_HELP = "\n\n".join(f"{code}: {text}" for code, text in EXIT_CODES.items())

app = typer.Typer(
    name="qrecover",
    help="Recover data from Qubes OS backups (format 3: Qubes R2 to R3.2) without Qubes.\n\n"
    "Runs the official emergency recovery procedure (tar, openssl, gzip/bzip2/xz, tar) "
    "as real pipelines, verifying every HMAC before anything is decrypted.\n\n"
    "Exit codes:\n\n" + EXIT_CODE_HELP,
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)

BackupArg = Annotated[
    str,
    typer.Argument(
        help="The backup file; '-' to read it from standard input; or a folder holding a "
        "backup already untarred by hand (tar -i -xf BACKUP).",
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
VmOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--vm",
        help="Only this VM (repeatable); 'dom0' selects dom0's home. "
        "Default: everything in the backup.",
        metavar="NAME",
    ),
]


def _human(size: int) -> str:
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{size} B"


# Global options that the commands need (set by the callback).
_settings: dict[str, bool] = {"quiet": False}


def _err(message: str) -> None:
    clear_active()
    print(f"qrecover: {message}", file=sys.stderr, flush=True)


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
    version: Annotated[bool, typer.Option("--version", help="Print the version.")] = False,
) -> None:
    """Global options."""
    _settings["quiet"] = quiet
    if version:
        print(f"qrecover {__version__}")
        raise typer.Exit(0)
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
    if not result.ok:
        kept = ""
        if result.places:
            kept = " (kept as " + ", ".join(str(p) for p in result.places) + ")"
        return f"FAILED    {where:<16} {result.stored}: {result.error}{kept}"
    if mode == "verify":
        return (
            f"OK        {where:<16} {result.stored}  {result.chunks} chunk(s), "
            f"{_human(result.stored_bytes)} stored, {result.members} member(s) listed"
        )
    places = ", ".join(str(p) for p in result.places)
    return f"RESTORED  {where:<16} {result.stored} -> {places} ({_human(result.restored_bytes)})"


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
        print(
            f"{verb} {count} stored file(s) of {len(report.selected)} VM(s){where}: "
            "all HMACs matched, every stage succeeded",
            flush=True,
        )
        return EXIT_OK
    _err(
        f"{len(failures)} of {count} stored file(s) failed"
        + (f", {len(report.problems)} other problem(s)" if report.problems else "")
        + ":"
    )
    for failure in failures:
        _err(f"  {failure.stored}: {failure.error}")
    if any(f.output_trouble for f in failures):
        return EXIT_OUTPUT
    return EXIT_BACKUP


def _run(backup: str, passphrase_file: Path | None, request: Request) -> tuple[Report, float]:
    """Run the pass; returns the report and its time (from after the passphrase)."""
    source = open_source(backup)
    passphrase = get_passphrase(passphrase_file)
    started = time.monotonic()
    if request.mode == "info":
        return run(source, passphrase, request), time.monotonic() - started
    display = None
    if not _settings["quiet"] and sys.stderr.isatty():
        display = Display(sys.stderr, source_size(source))
    activate(display)
    try:
        report = run(source, passphrase, request, _Printer(request.mode, display))
        return report, time.monotonic() - started
    finally:
        clear_active()
        activate(None)


def restore_command(
    backup: str, output: Path, vms: Sequence[str], force: bool, passphrase_file: Path | None
) -> int:
    report, elapsed = _run(
        backup, passphrase_file, Request("restore", vms=tuple(vms), output=output, force=force)
    )
    return _finish("restore", report, elapsed)


def verify_command(backup: str, vms: Sequence[str], passphrase_file: Path | None) -> int:
    report, elapsed = _run(backup, passphrase_file, Request("verify", vms=tuple(vms)))
    return _finish("verify", report, elapsed)


def info_command(backup: str, as_json: bool, passphrase_file: Path | None) -> int:
    report, _elapsed = _run(backup, passphrase_file, Request("info"))
    assert report.header is not None and report.inventory is not None
    if as_json:
        data = {
            "header": report.header.fields(),
            "vms": [e.as_json() for e in report.inventory.entities],
        }
        print(json.dumps(data, indent=2))
        return EXIT_OK
    print(
        f"Backup {backup}: format {report.header.version} (header verified with HMAC-"
        f"{report.header.hmac_algorithm})"
    )
    for key, value in report.header.fields().items():
        print(f"  {key}: {value}")
    print("VMs with data in this backup:")
    rows = [("NAME", "TYPE", "TEMPLATE", "BACKUP PATH", "SIZE")]
    rows += [
        (e.name, e.type, e.template or "-", e.backup_path, _human(e.size))
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
) -> None:
    """Verify and restore the backup's VMs (all, or those named with --vm) into DIR."""
    raise typer.Exit(restore_command(backup, output, vm or [], force, passphrase_file))


@app.command()
def verify(backup: BackupArg, vm: VmOpt = None, passphrase_file: PassFileOpt = None) -> None:
    """Check everything restore would, writing nothing: every HMAC, decryption,
    decompression, and a listing of each inner archive."""
    raise typer.Exit(verify_command(backup, vm or [], passphrase_file))


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
    except click.exceptions.Exit as exc:
        code = exc.exit_code
    except click.ClickException as exc:
        exc.show()
        code = exc.exit_code
    except (click.exceptions.Abort, KeyboardInterrupt):
        _err("interrupted; scratch files removed, nothing left under a final name")
        code = EXIT_SIGINT
    except Interrupted as exc:
        _err("terminated; scratch files removed, nothing left under a final name")
        code = exc.exit_code
    except QrecoverError as exc:
        hint = f" ({exc.hint})" if exc.hint else ""
        _err(f"error: {exc.message}{hint}")
        code = exc.exit_code
    except Exception as exc:  # a bug: say so, without a traceback unless asked
        _err(
            f"internal error: {type(exc).__name__}: {exc}; please report this "
            "(set QRECOVER_DEBUG=1 for a traceback)"
        )
        import os

        if os.environ.get("QRECOVER_DEBUG"):
            raise
        code = EXIT_INTERNAL
    sys.exit(code)
