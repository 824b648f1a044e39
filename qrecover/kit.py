"""``qrecover kit``: a recovery kit to keep beside a backup.

The kit folder holds ``qrecover.pyz`` (qrecover in one file, for a bare
python3), ``recover.sh`` (what ``qrecover script`` writes, for every VM) and
``RECOVERY.txt`` (the procedure, with this backup's details).  The
passphrase is needed to authenticate the header and read qubes.xml; it is
written into none of them.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path

from qrecover import formats
from qrecover.archive.container import open_source
from qrecover.console import Console
from qrecover.engine import run
from qrecover.errors import EXIT_OK, OutputError, UsageError
from qrecover.events import Mode
from qrecover.passphrase import get_passphrase
from qrecover.pyz import PyzMade, make_pyz
from qrecover.pyz_wheels import parse_targets
from qrecover.recovery_text import recovery_text
from qrecover.report import Report, Request

KIT_FILES = ("qrecover.pyz", "recover.sh", "RECOVERY.txt")


def _read_backup(backup: str, passphrase_file: Path | None) -> Report:
    source = open_source(backup)
    # a format-1 folder has nothing to authenticate with, so no passphrase
    passphrase = "" if formats.detect(source=source) else get_passphrase(passphrase_file)
    return run(source, passphrase, Request(Mode.KIT))


def _check_output(output: Path) -> None:
    """The kit goes into a new or existing folder, never over a file already there."""
    if output.exists() and not output.is_dir():
        raise OutputError(f"{output}: exists and is not a folder")
    taken = [name for name in KIT_FILES if os.path.lexists(output / name)]
    if taken:
        raise OutputError(
            f"{output}: already holds {', '.join(taken)}", hint="choose another --output folder"
        )


def _write_text(path: Path, text: str, mode: int = 0o644) -> None:
    partial = path.with_name(path.name + ".partial")
    with partial.open("x", encoding="utf-8") as f:
        f.write(text)
    os.chmod(partial, mode)
    os.replace(partial, path)


def runs_on_text(made: PyzMade) -> str:
    """What the kit's output and RECOVERY.txt say of the pyz."""
    if made.copied_from is not None:
        return f"{made.runs_on} (a copy of the qrecover.pyz that made this kit)"
    if made.offline is None:
        return made.runs_on
    return (f"{made.runs_on} ONLY: made offline from what was installed "
            f"({made.offline}); on any other Python use WAY 2 (recover.sh)")


def kit_command(
    backup: str,
    output: Path,
    passphrase_file: Path | None,
    pythons: Sequence[str] | None = None,
    arches: Sequence[str] | None = None,
    offline: bool = False,
    *,
    console: Console,
) -> int:
    """Write qrecover.pyz, recover.sh and RECOVERY.txt into ``output``.

    The pyz is for ``pythons`` on ``arches`` (default CPython 3.8-3.13, x86_64 and
    aarch64),
    with wheels from the package index; ``offline`` (or an index that cannot be
    reached) packs what is installed, for this Python only, and says so."""
    if backup == "-":
        raise UsageError("qrecover kit needs the backup's path, not standard input")
    wanted = parse_targets(list(pythons or []), list(arches or []))
    _check_output(output)
    report = _read_backup(backup, passphrase_file)
    assert report.fmt is not None and report.plan is not None
    output.mkdir(parents=True, exist_ok=True)
    where = os.path.abspath(backup)
    restore_to = Path(os.path.abspath(output)) / "restored"
    called = console.argv
    argv: Sequence[str] = ("kit", *called[1:]) if called[:1] == ("kit",) else ()
    # recover.sh runs on a rescue system: plain gzip -d, as `qrecover script` writes
    plan = dataclasses.replace(report.plan, gunzip="gzip", extractor="tar")
    script = formats.words(report.fmt).script(plan, where, restore_to, tuple(argv))
    with tempfile.TemporaryDirectory(prefix=".qrecover-kit-", dir=output) as scratch:
        made = make_pyz(output / "qrecover.pyz", Path(scratch), wanted,
                        "--offline given" if offline else None)
    _write_text(output / "recover.sh", script, 0o755)
    when = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    text = recovery_text(report.fmt, report.selected, os.path.basename(where),
                         runs_on_text(made), when)
    _write_text(output / "RECOVERY.txt", text)
    lines = [f"kit written to {output}: " + ", ".join(KIT_FILES),
             f"  qrecover.pyz runs on: {made.runs_on}"]
    if made.copied_from is not None:
        lines.append(f"  (a copy of {made.copied_from}, the pyz running now)")
    elif made.offline is not None:
        lines.append(f"  OFFLINE: it holds what is installed here ({made.offline}), so it runs "
                     "on that Python only; recover.sh needs no Python. Run qrecover kit again "
                     "where the package index can be reached for a pyz that runs on CPython "
                     "3.8-3.13 on x86_64 and aarch64.")
    console.err.write("".join(f"{line}\n" for line in lines))
    console.err.flush()
    return EXIT_OK
