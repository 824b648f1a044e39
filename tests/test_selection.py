"""Selection as qvm-backup-restore offers it: ``--exclude NAME`` and ``--skip-dom0-home``
(issue 16 item 6), beside ``--vm``, on restore, verify and script.

In-process through typer's CliRunner and ``cli.main`` (as tests/test_inprocess.py),
and one end-to-end run of the installed program.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import Backup, MakeBackup, assert_restored, run_main
from typer.testing import CliRunner

from qrecover.cli import app, main
from qrecover.errors import UsageError
from qrecover.inventory import Entity, Inventory

ALL = ["dom0", "fedora-23", "standalone", "sys-net", "untrusted", "work"]


def _args(backup: Backup, command: str, *extra: str) -> list[str]:
    return [command, str(backup.path), "--passphrase-file", str(backup.passfile), *extra]


def _inventory() -> Inventory:
    return Inventory(tuple(Entity(n, "AppVM", None, f"vm{i}", 1, n) for i, n in enumerate(ALL)))


def test_select_excludes_and_skips_dom0_home() -> None:
    inv = _inventory()
    assert [e.name for e in inv.select([], ["work", "untrusted"])] == [
        "dom0", "fedora-23", "standalone", "sys-net"
    ]
    assert "dom0" not in [e.name for e in inv.select([], skip_dom0_home=True)]
    # --vm first, then what --exclude leaves of it
    assert [e.name for e in inv.select(["work", "sys-net"], ["work"])] == ["sys-net"]


@pytest.mark.parametrize(
    ("names", "exclude", "skip", "said"),
    [
        ([], ["nosuch"], False, "--exclude: not in this backup: nosuch; available: dom0, "),
        (["work"], ["work"], False, "nothing left to restore"),
        (["dom0"], [], True, "--skip-dom0-home"),
    ],
)
def test_select_usage_errors(names: list[str], exclude: list[str], skip: bool, said: str) -> None:
    with pytest.raises(UsageError, match=said):
        _inventory().select(names, exclude, skip)


def test_verify_excludes_in_process(default_backup: Backup) -> None:
    result = CliRunner().invoke(
        app, _args(default_backup, "verify", "--exclude", "work", "--skip-dom0-home")
    )
    assert result.exit_code == 0, result.output
    assert "untrusted" in result.output and "fedora-23" in result.output
    lines = [line for line in result.output.splitlines() if line.startswith("OK ")]
    assert lines and not any(" work " in line or "dom0-home" in line for line in lines), lines


def test_restore_excludes_in_process(default_backup: Backup, tmp_path: Path) -> None:
    out = tmp_path / "out"
    args = _args(default_backup, "restore", "--output", str(out))
    result = CliRunner().invoke(
        app, [*args, "--exclude", "work", "--exclude", "untrusted", "--skip-dom0-home"]
    )
    assert result.exit_code == 0, result.output
    left = ["fedora-23", "standalone", "sys-net"]
    assert sorted(p.name for p in out.iterdir()) == sorted([*left, "qubes.xml"])
    assert_restored(out, default_backup, left)


def test_script_excludes_in_process(default_backup: Backup, tmp_path: Path) -> None:
    args = _args(default_backup, "script", "--output", str(tmp_path / "out"))
    result = CliRunner().invoke(app, [*args, "--exclude", "work", "--skip-dom0-home"])
    assert result.exit_code == 0, result.output
    blocks = [line for line in result.output.splitlines() if line.startswith("# ==== ")]
    assert len(blocks) == 4, blocks
    assert not any("work" in b or "dom0" in b for b in blocks), blocks


@pytest.mark.parametrize("command", ["restore", "verify", "script"])
def test_unknown_exclude_is_a_usage_error_listing_the_names(
    default_backup: Backup, tmp_path: Path, capsys: pytest.CaptureFixture[str], command: str
) -> None:
    out = ["--output", str(tmp_path / "out")] if command != "verify" else []
    with pytest.raises(SystemExit) as caught:
        main(_args(default_backup, command, *out, "--exclude", "nosuch"))
    assert caught.value.code == 2
    err = capsys.readouterr().err
    assert "nosuch" in err and "available: " in err and "work" in err, err
    assert "Traceback" not in err
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_excluding_everything_is_a_usage_error(
    default_backup: Backup, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as caught:
        main(_args(default_backup, "verify", "--vm", "work", "--exclude", "work"))
    assert caught.value.code == 2
    assert "nothing left to restore" in capsys.readouterr().err


def test_end_to_end_format4(make4: MakeBackup, tmp_path: Path) -> None:
    backup = make4()
    out = tmp_path / "out"
    result = run_main(
        *_args(backup, "restore", "--output", str(out)),
        "--exclude", "fedora-23", "--exclude", "standalone", "--skip-dom0-home",
    )
    assert result.code == 0, result.text
    left = ["sys-net", "untrusted", "work"]
    assert sorted(p.name for p in out.iterdir()) == sorted([*left, "qubes.xml"])
    assert_restored(out, backup, left)
