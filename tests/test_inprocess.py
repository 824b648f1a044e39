"""The commands, the engine and the plan, tested in-process.

Commands through typer's CliRunner and ``cli.main``; the engine by direct
calls, with its events; two runs in one process (one after the other, and
at the same time in two threads) that must not see each other's listeners,
settings or log.  End-to-end runs of the installed program stay where only
they can show something (signals, /proc command lines, programs on PATH).
"""

from __future__ import annotations

import gc
import io
import os
import threading
import warnings
from pathlib import Path

import pytest
from conftest import PASSPHRASE, Backup, MakeBackup, assert_restored, run_main
from typer.testing import CliRunner

from qrecover.archive.container import open_source
from qrecover.cli import app, main
from qrecover.commands import PassOptions, Reading, RestoreOptions, restore_command
from qrecover.console import Console
from qrecover.context import RunContext
from qrecover.engine import run
from qrecover.events import ChunkChecked, Event, FileFinished, HeaderVerified, InventoryRead, Mode
from qrecover.render.transcript import TranscriptWriter, open_new
from qrecover.report import Request


def test_info_through_clirunner(default_backup: Backup) -> None:
    result = CliRunner().invoke(
        app, ["info", str(default_backup.path), "--passphrase-file", str(default_backup.passfile)]
    )
    assert result.exit_code == 0, result.output
    assert "format 3, written by Qubes R2-R3.2" in result.output
    assert "header verified with HMAC-SHA512" in result.output


def test_quiet_does_not_leak_into_the_next_command(default_backup: Backup) -> None:
    runner = CliRunner()
    args = ["verify", str(default_backup.path), "--passphrase-file", str(default_backup.passfile)]
    quiet = runner.invoke(app, ["-q", *args])
    loud = runner.invoke(app, args)
    assert quiet.exit_code == 0 and loud.exit_code == 0, (quiet.output, loud.output)
    assert "total:" not in quiet.output  # -q: no summary table
    assert "total:" in loud.output  # the next run has its own settings


def test_main_turns_errors_into_exit_codes(
    default_backup: Backup, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    wrong = tmp_path / "wrong"
    wrong.write_text("not it\n")
    with pytest.raises(SystemExit) as caught:
        main(["verify", str(default_backup.path), "--passphrase-file", str(wrong)])
    assert caught.value.code == 3
    err = capsys.readouterr().err
    assert "does not authenticate the header" in err and "Traceback" not in err
    with pytest.raises(SystemExit) as caught:
        main(["verify", str(tmp_path / "missing"), "--passphrase-file", str(wrong)])
    assert caught.value.code == 2


def _verify(backup: Backup, events: list[Event]) -> bool:
    ctx = RunContext(listeners=[events.append])
    report = run(open_source(str(backup.path)), PASSPHRASE, Request(Mode.VERIFY), ctx=ctx)
    return report.ok


def test_the_engine_by_a_direct_call_tells_every_step(default_backup: Backup) -> None:
    events: list[Event] = []
    assert _verify(default_backup, events)
    assert isinstance(events[0], HeaderVerified)
    assert events[0].fmt.version == 3
    assert any(isinstance(e, InventoryRead) for e in events)
    checked = [e for e in events if isinstance(e, ChunkChecked)]
    finished = [e for e in events if isinstance(e, FileFinished)]
    assert checked and all(e.error is None for e in checked)
    assert {e.stored for e in finished} >= {"qubes.xml", "vm7/private.img"}
    assert all(e.error is None for e in finished)


def test_the_engine_restores_by_a_direct_call_with_a_transcript(
    default_backup: Backup, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    script = tmp_path / "t.sh"
    writer = TranscriptWriter(open_new(script, False), "restore", None, out)
    ctx = RunContext(listeners=[writer])
    request = Request(Mode.RESTORE, output=out)
    report = run(open_source(str(default_backup.path)), PASSPHRASE, request, ctx=ctx)
    writer.close(report.ok)
    assert report.ok
    assert_restored(out, default_backup)
    text = script.read_text()
    assert "check_hmac vm7/private.img.000" in text and "replay done" in text


def test_two_runs_at_once_do_not_see_each_other(
    default_backup: Backup, make4: MakeBackup
) -> None:
    r4 = make4()
    seen: dict[str, list[Event]] = {"r3": [], "r4": []}
    ok: dict[str, bool] = {}

    def go(name: str, backup: Backup) -> None:
        ok[name] = _verify(backup, seen[name])

    threads = [
        threading.Thread(target=go, args=("r3", default_backup)),
        threading.Thread(target=go, args=("r4", r4)),
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert ok == {"r3": True, "r4": True}
    versions = {
        name: {e.fmt.version for e in events if isinstance(e, HeaderVerified)}
        for name, events in seen.items()
    }
    assert versions == {"r3": {3}, "r4": {4}}
    members = {
        name: {e.member for e in events if isinstance(e, ChunkChecked)}
        for name, events in seen.items()
    }
    assert all(m.endswith(".enc") for m in members["r4"])
    assert not any(m.endswith(".enc") for m in members["r3"])


def test_dry_run_and_restore_stop_alike_in_process(default_backup: Backup, tmp_path: Path) -> None:
    out = tmp_path / "out"
    (out / "work").mkdir(parents=True)
    reading = Reading(
        backup=(str(default_backup.path),), passphrase_file=default_backup.passfile, vms=("work",)
    )
    checks = PassOptions(reading=reading)
    stdout = io.StringIO()
    said = Console(out=stdout, err=io.StringIO())
    code = restore_command(RestoreOptions(checks=checks, output=out, dry_run=True), said)
    assert code == 6
    assert "It would stop" in stdout.getvalue()
    forced = RestoreOptions(checks=checks, output=out, force=True, dry_run=True)
    assert restore_command(forced, said) == 0
    assert list((out / "work").iterdir()) == []  # the dry run wrote nothing


def test_restores_one_after_another_in_one_process(
    default_backup: Backup, tmp_path: Path
) -> None:
    """DIR's lock belongs to the run, not the process: a restore that ended (or
    was refused) lets the next one in, even in the same process."""
    out = tmp_path / "out"
    args = ("restore", default_backup.path, "-o", out, "--passphrase-file",
            default_backup.passfile)
    first = run_main(*args, "--resume")  # nothing to resume in a new DIR: it runs
    assert first.code == 0, first.text
    again = run_main(*args, "--resume")  # the first one finished: nothing left to do
    assert again.code == 0 and "nothing left to do" in again.out, again.text
    forced = run_main(*args, "--force")
    assert forced.code == 0, forced.text
    assert "another qrecover is restoring" not in forced.text
    assert_restored(out, default_backup)


@pytest.mark.parametrize("command", ["verify", "restore", "info"])
def test_a_run_leaves_no_file_open(default_backup: Backup, command: str, tmp_path: Path) -> None:
    """Every file a run opens (scratch files of a listing, pipes) is closed when it
    ends, not left for the garbage collector: none is found open afterwards."""
    gc.collect()
    before = set(os.listdir("/proc/self/fd"))
    args = [command, default_backup.path, "--passphrase-file", default_backup.passfile]
    if command == "restore":
        args += ["--output", tmp_path / "out"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ResourceWarning)
        result = run_main(*args)
        gc.collect()
    assert result.code == 0, result.text
    assert [w for w in caught if issubclass(w.category, ResourceWarning)] == []
    assert set(os.listdir("/proc/self/fd")) <= before
