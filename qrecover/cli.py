"""The command line: typer only (options, help, one error -> exit code handler).

Each command parses its options and calls a plain function of
qrecover.commands; :func:`main` is the one place where an error becomes a
message and an exit code.

No ``from __future__ import annotations``: typer cannot evaluate string
annotations before Python 3.10, so these are as 3.8 evaluates them (Optional).
"""

import contextlib
import dataclasses
import importlib
import logging
import os
import sys
from pathlib import Path
from typing import List, Optional, Sequence, TextIO, Tuple, Type

import typer

from qrecover import __version__, messages, signals
from qrecover.commands import (
    InfoOptions,
    PassOptions,
    Reading,
    RestoreOptions,
    ScriptOptions,
    info_command,
    restore_command,
    script_command,
    verify_command,
)
from qrecover.compat import Annotated
from qrecover.console import Console
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
from qrecover.messages import OneLineFormatter
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


def _console(ctx: typer.Context) -> Console:
    console = ctx.obj
    assert isinstance(console, Console)  # made by _main, the callback before every command
    return console


def _reading(
    backup: List[str],
    passphrase_file: Optional[Path],
    vm: Optional[List[str]] = None,
    exclude: Optional[List[str]] = None,
    skip_dom0_home: bool = False,
) -> Reading:
    return Reading(
        backup=tuple(backup),
        passphrase_file=passphrase_file,
        vms=tuple(vm or ()),
        exclude=tuple(exclude or ()),
        skip_dom0_home=skip_dom0_home,
    )


def _checks(
    reading: Reading,
    *,
    no_size_limit: bool,
    jobs: Optional[int],
    transcript: Optional[Path],
    explain: bool,
    as_json: bool,
    other_copy: Optional[List[str]],
) -> PassOptions:
    """verify's options, and restore's pass."""
    return PassOptions(
        reading=reading,
        size_limit=not no_size_limit,
        jobs=jobs,
        transcript=transcript,
        explain=explain,
        as_json=as_json,
        other_copies=tuple(other_copy or ()),
    )


def _print_version(ctx: typer.Context, value: bool) -> None:
    if value:
        console = ctx.obj if isinstance(ctx.obj, Console) else _standard(())
        console.say(f"qrecover {__version__}")
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
    # From main(); from sys.std* when the app is called some other way (typer's CliRunner)
    console = ctx.obj if isinstance(ctx.obj, Console) else _standard(())
    ctx.obj = console = dataclasses.replace(console, quiet=quiet)
    handler = logging.StreamHandler(console.err)
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
    options = RestoreOptions(
        checks=_checks(
            _reading(backup, passphrase_file, vm, exclude, skip_dom0_home),
            no_size_limit=no_size_limit, jobs=jobs, transcript=transcript,
            explain=explain, as_json=as_json, other_copy=other_copy,
        ),
        output=output,
        force=force,
        files=files,
        dry_run=dry_run,
        resume=resume,
        salvage=salvage,
    )
    raise typer.Exit(restore_command(options, _console(ctx)))


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
    options = _checks(
        _reading(backup, passphrase_file, vm, exclude, skip_dom0_home),
        no_size_limit=no_size_limit, jobs=jobs, transcript=transcript,
        explain=explain, as_json=as_json, other_copy=other_copy,
    )
    raise typer.Exit(verify_command(options, _console(ctx)))


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
    options = ScriptOptions(
        reading=_reading(backup, passphrase_file, vm, exclude, skip_dom0_home), output=output
    )
    raise typer.Exit(script_command(options, _console(ctx)))


@app.command(help=SUMMARIES["kit"], epilog=EXAMPLES["kit"])
def kit(
    ctx: typer.Context,
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

    raise typer.Exit(
        kit_command(backup, output, passphrase_file, python, arch, offline, console=_console(ctx))
    )


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
    options = InfoOptions(reading=_reading(backup, passphrase_file), as_json=as_json,
                          other_copies=tuple(other_copy or ()))
    raise typer.Exit(info_command(options, _console(ctx)))


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


def _standard(argv: Sequence[str]) -> Console:
    return Console(out=sys.stdout, err=sys.stderr, argv=tuple(argv))


def main(
    argv: Optional[Sequence[str]] = None,
    stdout: Optional[TextIO] = None,
    stderr: Optional[TextIO] = None,
) -> None:
    """Entry point: the one place where errors become messages and exit codes.

    The commands write to ``stdout`` and ``stderr`` and see ``argv`` (default:
    the process's own); a test passes its own.
    """
    console = _standard(sys.argv[1:] if argv is None else argv)
    if stdout is not None or stderr is not None:
        console = dataclasses.replace(console, out=stdout or console.out,
                                      err=stderr or console.err)
    # click and typer print --help themselves, to sys.stdout: the console's while
    # the command runs (the commands write to the console they are given)
    with signals.handled(), messages.writing_to(console.err), \
            contextlib.redirect_stdout(console.out), contextlib.redirect_stderr(console.err):
        code = _run(console, prog_name=None if argv is None else "qrecover")
    sys.exit(code)


def _run(console: Console, prog_name: Optional[str]) -> int:
    err = console.error
    try:
        try:
            # Without standalone mode, click returns typer.Exit's code instead of raising it.
            returned = app(args=list(console.argv), prog_name=prog_name, standalone_mode=False,
                           obj=console)
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
        exc.show(file=console.err)  # type: ignore[attr-defined]
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
