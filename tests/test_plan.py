"""The plan is what runs: the dry run names the programs the restore runs, and
stops where the restore stops (both drifts of issue 12, kept fixed)."""

from __future__ import annotations

import os
import re
from pathlib import Path

from conftest import Backup, bin_dir, run_main

from qrecover.errors import OutputError, WouldOverwrite
from qrecover.events import Mode, SinkKind
from qrecover.formats import parse_header
from qrecover.formats.v3 import BackupHeader, Format3
from qrecover.inventory import Entity
from qrecover.plan import Plan, Sink, obstacles
from qrecover.render.plantext import plan_text

HEADER = b"version=3\nhmac-algorithm=SHA512\nencrypted=True\ncompressed=True\n"
WORK = Entity("work", "AppVM", "fedora-23", "vm7", 1 << 20, "work")
HOME = Entity("dom0", "AdminVM", None, "dom0-home/user", 1 << 10, "dom0-home/user")


def _fmt() -> Format3:
    header = parse_header(HEADER)
    assert isinstance(header, BackupHeader)
    return Format3(header)


def test_the_plan_front_is_what_runs_with_the_decompressor_it_was_given(tmp_path: Path) -> None:
    for gunzip in ("igzip", "pigz", "gzip"):
        plan = Plan(fmt=_fmt(), mode=Mode.RESTORE, selected=(WORK,), gunzip=gunzip,
                    output=tmp_path / "out")
        assert [s.program for s in plan.front()] == ["openssl", gunzip]
        stages = plan.stages(plan.sink(WORK, "vm7/private.img", tmp_path / "stage", 0))
        assert [s.program for s in stages] == ["openssl", gunzip, "tar"]
        text = plan_text(plan, "backup", [])
        assert f"| {gunzip} -d | tar -x" in text
        assert f"decompress with `{gunzip} -d`" in text


def test_the_plan_budget_and_placement() -> None:
    plan = Plan(fmt=_fmt(), mode=Mode.RESTORE, selected=(WORK, HOME), gunzip="gzip",
                output=Path("/o"))
    sink = plan.sink(WORK, "vm7/private.img", Path("/s"), spent=1000)
    assert sink == Sink(SinkKind.EXTRACT, Path("/s"), 1, "work",
                        2 * WORK.size + 64 * 2**20 - 1000)
    home = plan.sink(HOME, "dom0-home/user", Path("/s"), spent=0)
    assert (home.strip, home.folder_rel) == (1, "dom0-home")
    assert Plan(fmt=_fmt(), mode=Mode.RESTORE, selected=(WORK,), gunzip="gzip", output=Path("/o"),
                size_limit=False).sink(
        WORK, "vm7/x", Path("/s"), 0
    ).limit is None
    verify = Plan(fmt=_fmt(), mode=Mode.VERIFY, selected=(WORK,), gunzip="gzip")
    listing = verify.sink(WORK, "vm7/x", None, 0)
    assert listing.kind is SinkKind.LIST and listing.staging is None


def test_obstacles_are_the_restores_with_and_without_force(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()

    def stops(force: bool) -> list[OutputError]:
        return obstacles(Plan(fmt=_fmt(), mode=Mode.RESTORE, selected=(WORK,), gunzip="gzip",
                                    output=out, force=force))

    assert stops(False) == [] and stops(True) == []
    (out / "work").mkdir()
    assert [type(e) for e in stops(False)] == [WouldOverwrite]
    assert stops(True) == []
    (out / "work").rmdir()
    (out / "work").symlink_to(tmp_path)
    for force in (False, True):  # never through a symbolic link, even with --force
        (found,) = stops(force)
        assert "is a symbolic link" in found.message and found.exit_code == 6


def _decompressor(text: str) -> str:
    """The program between the decrypting stage and tar, as shown or logged."""
    found = re.findall(r"-pass env:backup_pass \| (\S+) -d \| tar -x", text)
    assert found, text
    assert len(set(found)) == 1, found
    return str(found[0])


def test_dry_run_names_the_decompressor_the_restore_runs(
    default_backup: Backup, tmp_path: Path
) -> None:
    programs = ["tar", "openssl", "cat", "gzip", "pigz", "igzip"]
    for n, hidden in enumerate(((), ("igzip",), ("igzip", "pigz"))):
        folder = tmp_path / str(n)
        folder.mkdir()
        bindir = bin_dir(folder, [p for p in programs if p not in hidden])
        env = {"PATH": str(bindir)}
        args = (default_backup.path, "--vm", "work", "--passphrase-file", default_backup.passfile)
        dry = run_main("restore", "-o", folder / "dry", "--dry-run", *args, env=env)
        real = run_main("-v", "restore", "-o", folder / "out", *args, env=env)
        assert dry.code == 0 and real.code == 0, (dry.text, real.text)
        expected = next(p for p in ("igzip", "pigz", "gzip") if p not in hidden)
        assert _decompressor(dry.out) == _decompressor(real.err) == expected


def test_dry_run_stops_where_the_restore_stops_on_a_symlinked_vm_folder(
    default_backup: Backup, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    out.mkdir()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    os.symlink(elsewhere, out / "work")
    args = (default_backup.path, "-o", out, "--passphrase-file", default_backup.passfile)
    for force in ((), ("--force",)):
        dry = run_main("restore", *args, "--dry-run", *force)
        real = run_main("restore", *args, *force)
        assert real.code == 6 and "is a symbolic link" in real.err, real.text
        assert dry.code == real.code, (force, dry.text)
        assert "It would stop" in dry.out and "is a symbolic link" in dry.out
    assert list(elsewhere.iterdir()) == []  # nothing written through it


def test_dry_run_exit_is_the_restores_where_a_file_stands_for_a_folder(
    default_backup: Backup, tmp_path: Path
) -> None:
    """--output a regular file, and (with --force) a VM's folder a regular file:
    the restore exits 6 in both, so the dry run must too (review finding)."""
    pf = ("--passphrase-file", default_backup.passfile)
    out = tmp_path / "out"
    out.write_text("mine\n")
    for extra in ((), ("--force",)):
        real = run_main("restore", default_backup.path, "-o", out, *pf, *extra)
        dry = run_main("restore", default_backup.path, "-o", out, *pf, "--dry-run", *extra)
        assert real.code == 6 and "exists and is not a folder" in real.err, real.text
        assert dry.code == real.code and "exists and is not a folder" in dry.out, dry.text
    assert out.read_text() == "mine\n"
    out2 = tmp_path / "out2"
    out2.mkdir()
    (out2 / "work").write_text("mine\n")
    args = (default_backup.path, "-o", out2, *pf, "--force")
    dry = run_main("restore", *args, "--dry-run")
    assert dry.code == 6 and "work: exists and is not a folder" in dry.out, dry.text
    assert "these already exist (use --force" not in dry.out  # --force was given
    real = run_main("restore", *args)
    assert real.code == dry.code, real.text
    assert (out2 / "work").read_text() == "mine\n"
