"""The commands as plain, typed functions: what cli.py's typer functions call.

Each takes its options as arguments and returns the exit code; none needs
typer, so each can be called and tested in-process.  The run's state (its
listeners, settings, progress line) is a :class:`~qrecover.context.RunContext`
made here for each run, never module state.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from qrecover import formats
from qrecover.compat import zip_strict
from qrecover.container import open_source
from qrecover.context import RunContext
from qrecover.copies import open_copy
from qrecover.damage_report import damage_lines
from qrecover.engine import run
from qrecover.errors import (
    EXIT_BACKUP,
    EXIT_OK,
    EXIT_OUTPUT,
    Interrupted,
    QrecoverError,
    UsageError,
)
from qrecover.events import EventListener
from qrecover.fallback import Copies
from qrecover.file_lines import Printer
from qrecover.files import find_debugfs
from qrecover.files.command import restore_files
from qrecover.messages import err
from qrecover.passphrase import get_passphrase
from qrecover.progress import Display, source_size, summary_table
from qrecover.render.explain import Narrator
from qrecover.render.plantext import plan_text
from qrecover.render.shell import feed_command
from qrecover.render.transcript import TranscriptWriter, open_new
from qrecover.report import Report, Request
from qrecover.report_json import json_output
from qrecover.resume import RECORD_NAME
from qrecover.runner import log_command
from qrecover.salvage import WARNING
from qrecover.sources import replay_path
from qrecover.units import human_bytes


@dataclass(frozen=True)
class Settings:
    """The global options, kept on typer's context (``ctx.obj``) for the commands."""

    quiet: bool = False


def _finish(settings: Settings, mode: str, report: Report, elapsed: float) -> int:
    if report.nothing_left:
        print(f"nothing left to do: the restore into {report.output} finished already "
              "(its record says so, and every file it placed is still there)", flush=True)
        return EXIT_OK
    failures = [f for f in report.files if not f.ok]
    if not settings.quiet:
        print(summary_table(mode, report.files, elapsed), flush=True)
    for note in formats.notes(report.fmt):
        err(f"note: {note}")
    for damage in report.damage:  # each damaged range once, with what it cost
        err(damage.line())
    for note in report.notes:
        err(f"note: {note}")
    for line in damage_lines(mode, report):
        err(line)
    for problem in report.problems:
        err(f"problem: {problem}")
    if report.salvaged is not None:  # --salvage (qrecover/salvage.py): said last, loudly
        err(f"{WARNING}: {report.salvaged}")
    if (warning := formats.unauthenticated(report.fmt)) is not None:
        err(f"warning: {warning}")
    count = len(report.files)
    if report.ok:
        verb = "verified" if mode == "verify" else "restored"
        where = f" into {report.output}" if mode == "restore" else ""
        if kept := sum(1 for f in report.files if f.kept):  # --resume (qrecover/resume.py)
            where += f" ({kept} of them kept from an earlier run, not read again)"
        checked = report.fmt.verdict if report.fmt is not None else "all HMACs matched"
        if taken := sum(1 for d in report.chunk_damage if d.copy is not None):  # --other-copy
            checked += f" ({taken} chunk(s) taken from the other copies)"
        print(
            f"{verb} {count} stored file(s) of {len(report.selected)} VM(s){where}: "
            f"{checked}, every stage succeeded",
            flush=True,
        )
        return EXIT_OK
    err(
        f"{len(failures)} of {count} stored file(s) failed"
        + (f", {len(report.damage)} damaged range(s)" if report.damage else "")
        + (f", {len(report.problems)} other problem(s)" if report.problems else "")
        + ":"
    )
    for failure in failures:
        err(f"  {failure.problem}")
    if any(f.output_trouble for f in failures):
        return EXIT_OUTPUT
    return EXIT_BACKUP


def _run(
    settings: Settings,
    backup: Sequence[str],
    passphrase_file: Path | None,
    request: Request,
    listeners: Sequence[EventListener] = (),
) -> tuple[Report, float]:
    """Run the pass; returns the report and its time (from after the passphrase)."""
    formats.refuse_packed_folder(backup)  # a tar of a format-1 folder: before any passphrase
    with contextlib.ExitStack() as stack:
        copies = Copies([], " ".join(backup), log_command)
        stack.callback(copies.close)
        for value in request.other_copies:  # indexed (seeks only) before any passphrase
            copies.copies.append(open_copy(value, backup))
        return _run_with(settings, backup, passphrase_file, request, listeners, copies)


def _run_with(
    settings: Settings,
    backup: Sequence[str],
    passphrase_file: Path | None,
    request: Request,
    listeners: Sequence[EventListener],
    copies: Copies,
) -> tuple[Report, float]:
    source = open_source(backup)
    warning = formats.unauthenticated(formats.folder_format(source))  # format 1: no passphrase
    passphrase = get_passphrase(passphrase_file) if warning is None else ""
    if warning is not None:
        err(f"warning: {warning}")
    started = time.monotonic()
    ctx = RunContext(quiet=settings.quiet, listeners=list(listeners))
    copies.log = ctx.command
    if request.mode == "info":
        return run(source, passphrase, request, ctx=ctx, copies=copies), time.monotonic() - started
    if not settings.quiet and sys.stderr.isatty():
        ctx.display = Display(sys.stderr, source_size(source))
    try:
        printer = Printer(request.mode, ctx.display)
        report = run(source, passphrase, request, printer, ctx, copies)
        return report, time.monotonic() - started
    finally:
        ctx.clear_line()


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
                [*failures, *(d.line() for d in report.damage), *report.problems]
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
    jobs: int | None = None,
    files: bool = False,
    transcript: Path | None = None,
    explain: bool = False,
    dry_run: bool = False,
    as_json: bool = False,
    resume: bool = False,
    settings: Settings | None = None,
    exclude: Sequence[str] = (),
    skip_dom0_home: bool = False,
    salvage: bool = False,
    other_copies: Sequence[str] = (),
) -> int:
    if as_json and dry_run:
        raise UsageError("--json and --dry-run do not go together")
    request = Request(
        "restore", tuple(vms), output, force, size_limit, dry_run=dry_run, resume=resume,
        exclude=tuple(exclude), skip_dom0_home=skip_dom0_home, jobs=jobs, salvage=salvage,
        other_copies=tuple(other_copies),
    )
    try:
        with json_output(as_json, "restore", backup) as as_doc:
            code, report = _restore_command(
                backup, output, request, passphrase_file, files, transcript, explain,
                settings or Settings(),
            )
            as_doc.done(report, code)
    except (Interrupted, KeyboardInterrupt):
        if not dry_run and (output / RECORD_NAME).is_file():
            # What was placed before the signal stays; tell how not to redo it.
            err(
                f"note: the stored files already placed in {output} are kept; "
                "run the same restore again with --resume to go on from there"
            )
        raise
    return code


def _restore_command(
    backup: Sequence[str],
    output: Path,
    request: Request,
    passphrase_file: Path | None,
    files: bool,
    transcript: Path | None,
    explain: bool,
    settings: Settings,
) -> tuple[int, Report]:
    force = request.force
    if request.dry_run:
        report, _ = _run(settings, backup, passphrase_file, request)
        assert report.plan is not None
        where = replay_path(backup)
        feed = None if where else feed_command(backup)
        name = None
        if feed:
            many = f"{backup[0]} ... {backup[-1]} ({len(backup)} pieces)"
            name = " ".join(backup) if len(backup) <= 3 else many
        print(plan_text(report.plan, where or "-", report.stops, feed=feed, name=name,
                        kept=report.kept, excused=report.excused))
        for copy in request.other_copies:  # its header was checked against BACKUP's
            print(f"other copy {copy}: the same backup (its header checked); a chunk missing "
                  "or bad in the backup is taken from it (tail -c +OFFSET COPY | tar -i -x "
                  "... CHUNK), and checked the same way")
        # What would stop the restore stops the dry run, with the same exit code.
        return (EXIT_OUTPUT if report.stops else EXIT_OK), report
    if files:
        find_debugfs()  # a missing debugfs stops us before the restore, not after it
    with _showing("restore", backup, output, transcript, explain, force) as shown:
        report, elapsed = _run(settings, backup, passphrase_file, request, shown.listeners)
        shown.finished(report)
    code = _finish(settings, "restore", report, elapsed)
    if files:
        files_code = restore_files(report, output, force)
        code = code if code != EXIT_OK else files_code
    return code, report


def verify_command(
    backup: Sequence[str],
    vms: Sequence[str],
    passphrase_file: Path | None,
    size_limit: bool = True,
    jobs: int | None = None,
    transcript: Path | None = None,
    explain: bool = False,
    as_json: bool = False,
    settings: Settings | None = None,
    exclude: Sequence[str] = (),
    skip_dom0_home: bool = False,
    other_copies: Sequence[str] = (),
) -> int:
    settings = settings or Settings()
    request = Request(
        "verify", tuple(vms), size_limit=size_limit, exclude=tuple(exclude),
        skip_dom0_home=skip_dom0_home, jobs=jobs, other_copies=tuple(other_copies),
    )
    with json_output(as_json, "verify", backup) as as_doc:
        with _showing("verify", backup, None, transcript, explain) as shown:
            report, elapsed = _run(settings, backup, passphrase_file, request, shown.listeners)
            shown.finished(report)
        code = _finish(settings, "verify", report, elapsed)
        as_doc.done(report, code)
    return code


def script_command(
    backup: Sequence[str],
    output: Path,
    vms: Sequence[str],
    passphrase_file: Path | None,
    settings: Settings | None = None,
    exclude: Sequence[str] = (),
    skip_dom0_home: bool = False,
) -> int:
    request = Request("info", tuple(vms), exclude=tuple(exclude), skip_dom0_home=skip_dom0_home)
    report, _ = _run(settings or Settings(), backup, passphrase_file, request)
    where = replay_path(backup)
    out = Path(os.path.abspath(output))
    assert report.plan is not None
    # A script runs elsewhere: plain gzip -d and GNU tar, which every rescue system has.
    plan = dataclasses.replace(report.plan, gunzip="gzip", extractor="tar")
    text = formats.words(report.fmt).script(plan, where, out, tuple(sys.argv[1:]))
    sys.stdout.write(text)
    sys.stdout.flush()
    return EXIT_OK


def info_command(
    backup: Sequence[str],
    as_json: bool,
    passphrase_file: Path | None,
    settings: Settings | None = None,
    other_copies: Sequence[str] = (),
) -> int:
    request = Request("info", other_copies=tuple(other_copies))
    report, _elapsed = _run(settings or Settings(), backup, passphrase_file, request)
    for note in report.notes:  # a header or qubes.xml taken from another copy
        err(f"note: {note}")
    assert report.fmt is not None and report.inventory is not None
    fmt = report.fmt
    if as_json:
        data = {
            "header": fmt.header.fields(),
            "vms": [e.as_json() for e in report.inventory.entities],
        }
        print(json.dumps(data, indent=2))
        return EXIT_OK
    print(f"Backup {' '.join(backup)}: format {fmt.version}, written by {fmt.written_by}")
    warning = formats.unauthenticated(fmt)
    print(f"  NOT AUTHENTICATED: {warning}" if warning else
          f"  header verified with {fmt.authenticated_with}")
    for key, value in fmt.header.fields().items():
        print(f"  {key}: {value}")
    print("VMs with data in this backup:")
    rows = [("NAME", "TYPE", "TEMPLATE", "BACKUP PATH", "SIZE")]
    rows += [
        (e.name, e.type, e.template or "-", e.backup_path, human_bytes(e.size))
        for e in report.inventory.entities
    ]
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    for row in rows:
        print("  " + "  ".join(cell.ljust(w) for cell, w in zip_strict(row, widths)).rstrip())
    for note in formats.notes(fmt):
        print(f"  note: {note}")
    return EXIT_OK
