"""The command line: typer only (options, help, one error -> exit code handler).

Each command parses its options and calls a plain function of
qrecover.commands; :func:`main` is the one place where an error becomes a
message and an exit code.

No ``from __future__ import annotations``: typer cannot evaluate string
annotations before Python 3.10, so these are as 3.8 evaluates them (Optional).
"""

import importlib
import logging
import os
import sys
from pathlib import Path
from typing import List, Optional, Sequence, Tuple, Type

import typer

from qrecover import __version__, signals
from qrecover.commands import (
    Settings,
    info_command,
    restore_command,
    script_command,
    verify_command,
)
from qrecover.compat import Annotated
from qrecover.errors import (
    EXIT_INTERNAL,
    EXIT_OK,
    EXIT_SIGINT,
    EXIT_USAGE,
    Interrupted,
    QrecoverError,
)
from qrecover.files import DEFAULT_PATH
from qrecover.files.cli import files
from qrecover.help_text import EXAMPLES, SUMMARIES, TOP_HELP, Group
from qrecover.messages import OneLineFormatter, err
from qrecover.options import (
    ArchOpt,
    BackupArg,
    ExcludeOpt,
    ExplainOpt,
    JobsOpt,
    JsonOpt,
    NoLimitOpt,
    OfflineOpt,
    OtherCopyOpt,
    PassFileOpt,
    PythonOpt,
    SalvageOpt,
    SkipDom0Opt,
    TranscriptOpt,
    VmOpt,
)

app = typer.Typer(
    name="qrecover",
    cls=Group,
    help=TOP_HELP,
    epilog=EXAMPLES["qrecover"],
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _settings(ctx: typer.Context) -> Settings:
    return ctx.obj if isinstance(ctx.obj, Settings) else Settings()


def _print_version(value: bool) -> None:
    if value:
        print(f"qrecover {__version__}")
        raise typer.Exit(0)


@app.callback()
def _main(
    ctx: typer.Context,
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
    ctx.obj = Settings(quiet=quiet)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(OneLineFormatter("%(message)s"))
    logger = logging.getLogger("qrecover")
    logger.handlers[:] = [handler]
    logger.setLevel(logging.INFO if verbose else logging.WARNING)
    logger.propagate = False


@app.command(help=SUMMARIES["restore"], epilog=EXAMPLES["restore"])
def restore(
    ctx: typer.Context,
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
    exclude: ExcludeOpt = None,
    skip_dom0_home: SkipDom0Opt = False,
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
    jobs: JobsOpt = None,
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
    other_copy: OtherCopyOpt = None,
    resume: Annotated[
        bool,
        typer.Option(
            "--resume",
            help="Continue an interrupted restore of the same backup into DIR: skip "
            "what DIR's record says was placed, redo the rest.",
        ),
    ] = False,
    salvage: SalvageOpt = False,
) -> None:
    """qrecover restore (its help and examples: qrecover.help_text)."""
    raise typer.Exit(
        restore_command(
            backup,
            output,
            vm or [],
            force,
            passphrase_file,
            size_limit=not no_size_limit,
            jobs=jobs,
            files=files,
            transcript=transcript,
            explain=explain,
            dry_run=dry_run,
            as_json=as_json,
            resume=resume,
            settings=_settings(ctx),
            exclude=exclude or [],
            skip_dom0_home=skip_dom0_home,
            salvage=salvage,
            other_copies=other_copy or [],
        )
    )


app.command(help=SUMMARIES["files"], epilog=EXAMPLES["files"])(files)  # files/cli.py


@app.command(help=SUMMARIES["verify"], epilog=EXAMPLES["verify"])
def verify(
    ctx: typer.Context,
    backup: BackupArg,
    vm: VmOpt = None,
    exclude: ExcludeOpt = None,
    skip_dom0_home: SkipDom0Opt = False,
    passphrase_file: PassFileOpt = None,
    no_size_limit: NoLimitOpt = False,
    jobs: JobsOpt = None,
    transcript: TranscriptOpt = None,
    explain: ExplainOpt = False,
    as_json: JsonOpt = False,
    other_copy: OtherCopyOpt = None,
) -> None:
    """qrecover verify (its help and examples: qrecover.help_text)."""
    raise typer.Exit(
        verify_command(
            backup,
            vm or [],
            passphrase_file,
            size_limit=not no_size_limit,
            jobs=jobs,
            transcript=transcript,
            explain=explain,
            as_json=as_json,
            settings=_settings(ctx),
            exclude=exclude or [],
            skip_dom0_home=skip_dom0_home,
            other_copies=other_copy or [],
        )
    )


@app.command(help=SUMMARIES["script"], epilog=EXAMPLES["script"])
def script(
    ctx: typer.Context,
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
    exclude: ExcludeOpt = None,
    skip_dom0_home: SkipDom0Opt = False,
    passphrase_file: PassFileOpt = None,
) -> None:
    """qrecover script (its help and examples: qrecover.help_text)."""
    code = script_command(
        backup, output, vm or [], passphrase_file, _settings(ctx), exclude or [], skip_dom0_home
    )
    raise typer.Exit(code)


@app.command(help=SUMMARIES["kit"], epilog=EXAMPLES["kit"])
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
    offline: OfflineOpt = False,
    python: PythonOpt = None,
    arch: ArchOpt = None,
) -> None:
    """qrecover kit (its help and examples: qrecover.help_text)."""
    from qrecover.kit import kit_command  # only this command needs shiv's machinery

    raise typer.Exit(kit_command(backup, output, passphrase_file, python, arch, offline))


@app.command(help=SUMMARIES["info"], epilog=EXAMPLES["info"])
def info(
    ctx: typer.Context,
    backup: BackupArg,
    as_json: Annotated[
        bool, typer.Option("--json", help='Print JSON: {"header": {...}, "vms": [...]}.')
    ] = False,
    passphrase_file: PassFileOpt = None,
    other_copy: OtherCopyOpt = None,
) -> None:
    """qrecover info (its help and examples: qrecover.help_text)."""
    raise typer.Exit(info_command(backup, as_json, passphrase_file, _settings(ctx),
                                  other_copy or []))


def _usage_errors() -> Tuple[Type[Exception], ...]:
    """typer's usage-error classes: its own since typer 0.29 (which vendors
    click), click's before; imported by name so that either works."""
    found: List[Type[Exception]] = []
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


def main(argv: Optional[Sequence[str]] = None) -> None:
    """Entry point: the one place where errors become messages and exit codes."""
    with signals.handled():
        code = _run(argv)
    sys.exit(code)


def _run(argv: Optional[Sequence[str]]) -> int:
    try:
        try:
            # Without standalone mode, click returns typer.Exit's code instead of raising it.
            returned = app(args=list(argv) if argv is not None else None, standalone_mode=False)
            code = returned if isinstance(returned, int) else EXIT_OK
        except typer.Exit as exc:
            code = exc.exit_code
        signals.check(again=True)  # a signal stops the command with its code, always
    except (typer.Abort, KeyboardInterrupt):
        signals.kill_all()
        err("interrupted; scratch files removed, nothing left under a final name")
        code = EXIT_SIGINT
    except Interrupted as exc:
        signals.kill_all()
        err("terminated; scratch files removed, nothing left under a final name")
        code = exc.exit_code
    except QrecoverError as exc:
        hint = f" ({exc.hint})" if exc.hint else ""
        err(f"error: {exc.message}{hint}")
        code = exc.exit_code
    except _usage_errors() as exc:
        exc.show()  # type: ignore[attr-defined]
        code = getattr(exc, "exit_code", EXIT_USAGE)
    except Exception as exc:  # a bug: say so, without a traceback unless asked
        err(
            f"internal error: {type(exc).__name__}: {exc}; please report this "
            "(set QRECOVER_DEBUG=1 for a traceback)"
        )
        if os.environ.get("QRECOVER_DEBUG"):
            raise
        code = EXIT_INTERNAL
    return code
