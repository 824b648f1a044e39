"""The one runner: every start logged, control commands' failures are errors,
"not found" told apart; the run's state belongs to the run."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest
from conftest import Backup, bin_dir, run_cli

from qrecover.context import RunContext
from qrecover.errors import MissingProgramError, ProgramFailed
from qrecover.events import QubesXmlWritten
from qrecover.runner import Pipeline, Stage, control


def test_control_returns_stdout_and_logs_its_command() -> None:
    logged: list[str] = []
    out = control("tar", "--version", log=logged.append)
    assert "GNU tar" in out
    assert logged == ["tar --version"]


def test_control_non_zero_exit_is_an_error_not_ignored() -> None:
    with pytest.raises(ProgramFailed) as caught:
        control("tar", "--no-such-option-at-all", log=lambda _: None)
    assert caught.value.returncode != 0
    assert caught.value.exit_code == 5
    assert "tar --no-such-option-at-all" in caught.value.message


def test_control_accepts_the_exit_codes_it_is_told_are_fine() -> None:
    # scrypt --help prints its usage on stderr and exits 1.
    usage = control("scrypt", "--help", with_stderr=True, log=lambda _: None, ok_codes=(0, 1))
    assert "dec" in usage


def test_missing_program_is_told_apart_before_anything_starts() -> None:
    logged: list[str] = []
    with pytest.raises(MissingProgramError) as caught:
        Pipeline([Stage(("no-such-program-qrecover",))], stdin=0, log=logged.append).start()
    assert "not found" in caught.value.message
    assert logged == []  # nothing started, nothing logged


def test_status_127_is_named_as_not_found(tmp_path: Path) -> None:
    wrapper = tmp_path / "wrapper"
    wrapper.write_text("#!/bin/sh\nexit 127\n")
    wrapper.chmod(0o755)
    env_path = os.environ["PATH"]
    os.environ["PATH"] = f"{tmp_path}:{env_path}"
    try:
        with pytest.raises(MissingProgramError) as caught:
            control("wrapper", log=lambda _: None)
    finally:
        os.environ["PATH"] = env_path
    assert "not found" in caught.value.message


def test_pipeline_logs_what_it_starts_with_its_note_and_folder(tmp_path: Path) -> None:
    logged: list[str] = []
    with open(os.devnull, "rb") as devnull:
        pipeline = Pipeline(
            [Stage(("cat",)), Stage(("tar", "-t", "-f", "-"))],
            stdin=devnull.fileno(),
            cwd=tmp_path / "a b",
            note="why",
            log=logged.append,
        )
        (tmp_path / "a b").mkdir()
        pipeline.start().wait()
    assert logged == [f"(cd '{tmp_path}/a b' && cat | tar -t -f -)  # why"]


def test_two_runs_do_not_see_each_others_listeners_or_log() -> None:
    first: list[object] = []
    second: list[object] = []
    one, two = RunContext(), RunContext(quiet=True)
    with one.listening(first.append), two.listening(second.append):
        one.emit(QubesXmlWritten(Path("a")))
        assert first and not second
        two.emit(QubesXmlWritten(Path("b")))
    assert len(first) == 1 and len(second) == 1
    assert one.listeners == [] and two.listeners == []
    assert not one.quiet and two.quiet
    seen: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            seen.append(record.getMessage())

    logger = logging.getLogger("qrecover")
    handler, level = Keep(), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        one.command("echo step")
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    assert seen == ["+ echo step"]


def test_a_tar_without_version_is_not_gnu_tar(default_backup: Backup, tmp_path: Path) -> None:
    bindir = bin_dir(tmp_path, ["openssl", "cat", "gzip"])
    fake = bindir / "tar"  # as busybox's tar: no --version, exit status 1
    fake.write_text("#!/bin/sh\necho \"tar: unrecognized option '--version'\" >&2\nexit 1\n")
    fake.chmod(0o755)
    result = run_cli(
        "verify", default_backup.path, "--passphrase-file", default_backup.passfile,
        env={"PATH": str(bindir)},
    )
    assert result.code == 5, result.text
    assert "tar is not GNU tar" in result.err
