"""The commands as plain, typed functions: what cli.py's typer functions call.

Each takes its options as one frozen object built once by cli.py
(:class:`Reading`, :class:`PassOptions`, :class:`RestoreOptions`, ...) and
returns the exit code; none needs typer, so each can be called and tested
in-process.  The run's state (its
listeners, settings, progress line) is a :class:`~qrecover.context.RunContext`
made here for each run, never module state.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qrecover import formats
from qrecover.archive.container import open_source
from qrecover.archive.copies import open_copy
from qrecover.archive.sources import replay_path
from qrecover.compat import zip_strict
from qrecover.console import Console
from qrecover.context import RunContext
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
from qrecover.events import EventListener, Mode
from qrecover.fallback import Copies
from qrecover.file_lines import Printer
from qrecover.files import find_debugfs
from qrecover.files.command import restore_files
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
from qrecover.units import human_bytes


@dataclass(frozen=True)
class Reading:
    """Which backup, how to authenticate it, and which of its VMs: every command's."""

    backup: tuple[str, ...]
    passphrase_file: Path | None = None
    vms: tuple[str, ...] = ()  # --vm NAME...; empty: all
    exclude: tuple[str, ...] = ()  # --exclude NAME...
    skip_dom0_home: bool = False

    def request(self, mode: Mode, **more: Any) -> Request:
        return Request(mode, self.vms, exclude=self.exclude,
                       skip_dom0_home=self.skip_dom0_home, **more)


@dataclass(frozen=True)
class PassOptions:
    """A pass that reads every selected stored file: verify's options, and restore's."""

    reading: Reading
    size_limit: bool = True  # off: --no-size-limit
    jobs: int | None = None  # --jobs N; None: as the cores and the memory allow
    transcript: Path | None = None
    explain: bool = False
    as_json: bool = False
    other_copies: tuple[str, ...] = ()  # --other-copy PATH...

    def request(self, mode: Mode, **more: Any) -> Request:
        return self.reading.request(mode, size_limit=self.size_limit, jobs=self.jobs,
                                    other_copies=self.other_copies, **more)


@dataclass(frozen=True)
class RestoreOptions:
    """qrecover restore: a pass, and where and how its files are placed."""

    checks: PassOptions
    output: Path
    force: bool = False
    files: bool = False  # --files: each VM's home out of its private.img too
    dry_run: bool = False
    resume: bool = False
    salvage: bool = False

    def request(self) -> Request:
        return self.checks.request(
            Mode.RESTORE, output=self.output, force=self.force, dry_run=self.dry_run,
            resume=self.resume, salvage=self.salvage,
        )


@dataclass(frozen=True)
class ScriptOptions:
    """qrecover script: the backup, its VMs, and the folder the script restores into."""

    reading: Reading
    output: Path


@dataclass(frozen=True)
class InfoOptions:
    """qrecover info."""

    reading: Reading
    as_json: bool = False
    other_copies: tuple[str, ...] = ()  # --other-copy PATH...: a damaged header from a copy


def _finish(console: Console, mode: Mode, report: Report, elapsed: float) -> int:
    if report.nothing_left:
        console.say(f"nothing left to do: the restore into {report.output} finished already "
                    "(its record says so, and every file it placed is still there)")
        return EXIT_OK
    failures = [f for f in report.files if not f.ok]
    if not console.quiet:
        console.say(summary_table(mode, report.files, elapsed))
    for note in formats.notes(report.fmt):
        console.error(f"note: {note}")
    for damage in report.damage:  # each damaged range once, with what it cost
        console.error(damage.line())
    for note in report.notes:
        console.error(f"note: {note}")
    for line in damage_lines(mode, report):
        console.error(line)
    for problem in report.problems:
        console.error(f"problem: {problem}")
    if report.salvaged is not None:  # --salvage (qrecover/salvage.py): said last, loudly
        console.error(f"{WARNING}: {report.salvaged}")
    if (warning := formats.unauthenticated(report.fmt)) is not None:
        console.error(f"warning: {warning}")
    count = len(report.files)
    if report.ok:
        verb = mode.done_word
        where = f" into {report.output}" if mode is Mode.RESTORE else ""
        if kept := sum(1 for f in report.files if f.kept):  # --resume (qrecover/resume.py)
            where += f" ({kept} of them kept from an earlier run, not read again)"
        checked = report.fmt.verdict if report.fmt is not None else "all HMACs matched"
        if taken := sum(1 for d in report.chunk_damage if d.copy is not None):  # --other-copy
            checked += f" ({taken} chunk(s) taken from the other copies)"
        console.say(
            f"{verb} {count} stored file(s) of {len(report.selected)} VM(s){where}: "
            f"{checked}, every stage succeeded"
        )
        return EXIT_OK
    console.error(
        f"{len(failures)} of {count} stored file(s) failed"
        + (f", {len(report.damage)} damaged range(s)" if report.damage else "")
        + (f", {len(report.problems)} other problem(s)" if report.problems else "")
        + ":"
    )
    for failure in failures:
        console.error(f"  {failure.problem}")
    if any(f.output_trouble for f in failures):
        return EXIT_OUTPUT
    return EXIT_BACKUP


def _run(
    console: Console,
    reading: Reading,
    request: Request,
    listeners: Sequence[EventListener] = (),
) -> tuple[Report, float]:
    """Run the pass; returns the report and its time (from after the passphrase)."""
    backup = reading.backup
    formats.detect(paths=backup)  # a tar of a format-1 folder: refused before any passphrase
    with contextlib.ExitStack() as stack:
        copies = Copies([], " ".join(backup), log_command)
        stack.callback(copies.close)
        for value in request.other_copies:  # indexed (seeks only) before any passphrase
            copies.copies.append(open_copy(value, backup))
        return _run_with(console, backup, reading.passphrase_file, request, listeners, copies)


def _run_with(
    console: Console,
    backup: Sequence[str],
    passphrase_file: Path | None,
    request: Request,
    listeners: Sequence[EventListener],
    copies: Copies,
) -> tuple[Report, float]:
    source = open_source(backup)
    warning = formats.unauthenticated(formats.detect(source=source))  # format 1: no passphrase
    passphrase = get_passphrase(passphrase_file) if warning is None else ""
    if warning is not None:
        console.error(f"warning: {warning}")
    started = time.monotonic()
    ctx = RunContext(quiet=console.quiet, listeners=list(listeners))
    copies.log = ctx.command
    if request.mode.plans_only:
        return run(source, passphrase, request, ctx=ctx, copies=copies), time.monotonic() - started
    if not console.quiet and console.err.isatty():
        ctx.display = Display(console.err, source_size(source))
    try:
        # the per-file lines and the live line listen to the run's events too
        ctx.listeners.append(Printer(request.mode, console.out, ctx.display))
        report = run(source, passphrase, request, ctx, copies)
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
    console: Console,
    mode: Mode,
    checks: PassOptions,
    output: Path | None,
    force: bool = False,
) -> Iterator[_Showing]:
    """The listeners for --transcript and --explain; the transcript is closed either way,
    ending with how the run ended (the caller reports it with ``finished``)."""
    backup, transcript = checks.reading.backup, checks.transcript
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
            Mode.RESTORE if mode is Mode.RESTORE else Mode.VERIFY,
            replay_path(backup),
            Path(os.path.abspath(output)) if output is not None else None,
            argv=list(console.argv),
        )
        listeners.append(writer)
    if checks.explain:
        narrator = Narrator(replay_path(backup) or "-", mode, console.err)
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


def restore_command(options: RestoreOptions, console: Console) -> int:
    """qrecover restore."""
    if options.checks.as_json and options.dry_run:
        raise UsageError("--json and --dry-run do not go together")
    checks, output = options.checks, options.output
    people = console.for_people(checks.as_json)
    try:
        with json_output(checks.as_json, Mode.RESTORE, checks.reading.backup,
                         console.out) as as_doc:
            code, report = _restore_command(options, people)
            as_doc.done(report, code)
    except (Interrupted, KeyboardInterrupt):
        if not options.dry_run and (output / RECORD_NAME).is_file():
            # What was placed before the signal stays; tell how not to redo it.
            console.error(
                f"note: the stored files already placed in {output} are kept; "
                "run the same restore again with --resume to go on from there"
            )
        raise
    return code


def _restore_command(options: RestoreOptions, console: Console) -> tuple[int, Report]:
    request = options.request()
    reading, output = options.checks.reading, options.output
    backup = reading.backup
    if request.dry_run:
        report, _ = _run(console, reading, request)
        assert report.plan is not None
        where = replay_path(backup)
        feed = None if where else feed_command(backup)
        name = None
        if feed:
            many = f"{backup[0]} ... {backup[-1]} ({len(backup)} pieces)"
            name = " ".join(backup) if len(backup) <= 3 else many
        console.say(plan_text(report.plan, where or "-", report.stops, feed=feed, name=name,
                              kept=report.kept, excused=report.excused))
        for copy in request.other_copies:  # its header was checked against BACKUP's
            console.say(f"other copy {copy}: the same backup (its header checked); a chunk "
                        "missing or bad in the backup is taken from it (tail -c +OFFSET COPY | "
                        "tar -i -x ... CHUNK), and checked the same way")
        # What would stop the restore stops the dry run, with the same exit code.
        return (EXIT_OUTPUT if report.stops else EXIT_OK), report
    if options.files:
        find_debugfs()  # a missing debugfs stops us before the restore, not after it
    with _showing(console, Mode.RESTORE, options.checks, output, options.force) as shown:
        report, elapsed = _run(console, reading, request, shown.listeners)
        shown.finished(report)
    code = _finish(console, Mode.RESTORE, report, elapsed)
    if options.files:
        files_code = restore_files(report, output, options.force, out=console.out)
        code = code if code != EXIT_OK else files_code
    return code, report


def verify_command(options: PassOptions, console: Console) -> int:
    """qrecover verify."""
    request = options.request(Mode.VERIFY)
    people = console.for_people(options.as_json)
    with json_output(options.as_json, Mode.VERIFY, options.reading.backup,
                     console.out) as as_doc:
        with _showing(people, Mode.VERIFY, options, None) as shown:
            report, elapsed = _run(people, options.reading, request, shown.listeners)
            shown.finished(report)
        code = _finish(people, Mode.VERIFY, report, elapsed)
        as_doc.done(report, code)
    return code


def script_command(options: ScriptOptions, console: Console) -> int:
    """qrecover script."""
    reading = options.reading
    report, _ = _run(console, reading, reading.request(Mode.SCRIPT))
    where = replay_path(reading.backup)
    out = Path(os.path.abspath(options.output))
    assert report.plan is not None
    # A script runs elsewhere: plain gzip -d and GNU tar, which every rescue system has.
    plan = dataclasses.replace(report.plan, gunzip="gzip", extractor="tar")
    text = formats.words(report.fmt).script(plan, where, out, console.argv)
    console.out.write(text)
    console.out.flush()
    return EXIT_OK


def info_command(options: InfoOptions, console: Console) -> int:
    """qrecover info."""
    reading = options.reading
    backup = reading.backup
    request = Request(Mode.INFO, other_copies=options.other_copies)
    report, _elapsed = _run(console, reading, request)
    for note in report.notes:  # a header or qubes.xml taken from another copy
        console.error(f"note: {note}")
    assert report.fmt is not None and report.inventory is not None
    fmt = report.fmt
    if options.as_json:
        data = {
            "header": fmt.header.fields(),
            "vms": [e.as_json() for e in report.inventory.entities],
        }
        console.say(json.dumps(data, indent=2))
        return EXIT_OK
    console.say(f"Backup {' '.join(backup)}: format {fmt.version}, written by {fmt.written_by}")
    warning = formats.unauthenticated(fmt)
    console.say(f"  NOT AUTHENTICATED: {warning}" if warning else
                f"  header verified with {fmt.authenticated_with}")
    for key, value in fmt.header.fields().items():
        console.say(f"  {key}: {value}")
    console.say("VMs with data in this backup:")
    rows = [("NAME", "TYPE", "TEMPLATE", "BACKUP PATH", "SIZE")]
    rows += [
        (e.name, e.type, e.template or "-", e.backup_path, human_bytes(e.size))
        for e in report.inventory.entities
    ]
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    for row in rows:
        console.say("  " + "  ".join(cell.ljust(w) for cell, w in zip_strict(row, widths)).rstrip())
    for note in formats.notes(fmt):
        console.say(f"  note: {note}")
    return EXIT_OK
