"""What qrecover shows stays as it was: the ``-v`` log, a transcript, a script,
``--explain`` and ``--dry-run`` of the bundled sample backup, compared byte for
byte (after naming the parts that change from run to run) with files written
by the code before issue 12's restructuring (tests/golden/; dry-run.out
with issue 12's fix: it names the decompressor that runs).

To write them again after a deliberate change: ``QRECOVER_GOLDEN=write pytest
tests/test_golden.py``, then read the diff before committing it.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import ROOT, Run, run_cli

GOLDEN = ROOT / "tests" / "golden"
SAMPLE = ROOT / "fixtures" / "sample-backup"
PASSFILE = ROOT / "fixtures" / "sample-backup.passphrase"


def normalise(text: str, work: Path, backup: Path) -> str:
    """Replace what differs between runs: folders, scratch names, dates, times,
    and the gzip decompressor this machine has (igzip, pigz or gzip), and the
    extractor (bsdtar where installed, shown as the GNU tar command it replaces)."""
    text = text.replace(str(work), "WORK").replace(str(backup), "BACKUP")
    text = re.sub(r"/tmp/[A-Za-z0-9_./-]*qrecover-[a-z0-9_]{8}", "SCRATCH", text)
    text = re.sub(r"\.qrecover-[a-z0-9_]{8}", ".SCRATCH", text)
    text = re.sub(r"qrecover-header-[a-z0-9_]{8}", "HEADER-SCRATCH", text)
    text = re.sub(r"on \d{4}-\d\d-\d\d \d\d:\d\d UTC", "on DATE", text)
    text = re.sub(r"read in [0-9:]+ \([^)]*\)", "read in TIME", text)
    text = re.sub(r"\{ if command -v bsdtar >/dev/null 2>&1; then bsdtar [^;]*; "
                  r"else (tar [^;]*); fi; \}", r"\1", text)
    text = re.sub(r"\bbsdtar (-x -f - -C \S+ --strip-components=\d+ --no-same-owner) "
                  r"--no-acls --no-xattrs --no-fflags --no-mac-metadata", r"tar \1", text)
    text = re.sub(r"\n +\(bsdtar for its disk images; [^\n]*\)", "", text)  # the dry run
    text = re.sub(r"\bbsdtar\b", "tar", text)  # the transcript's comments, pipeline_ok
    return re.sub(r"\b(igzip|pigz)( -d|;| >/dev/null)", r"GUNZIP\2", text)


def outputs(run: Callable[..., Run], work: Path) -> dict[str, str]:
    """The five renderings of one sample backup, normalised."""
    work.mkdir(parents=True, exist_ok=True)
    out, transcript = work / "out", work / "t.sh"
    pf = ("--passphrase-file", PASSFILE)
    found: dict[str, str] = {}
    restore = run("-v", "restore", SAMPLE, "-o", out, "--transcript", transcript, *pf)
    found["restore.err"] = restore.err
    found["restore.out"] = restore.out
    found["transcript.sh"] = transcript.read_text(encoding="utf-8")
    shutil.rmtree(out)
    explain = run("restore", SAMPLE, "-o", out, "--explain", *pf)
    found["explain.err"] = explain.err
    shutil.rmtree(out)
    found["script.sh"] = run("script", SAMPLE, "-o", out, *pf).out
    found["dry-run.out"] = run("restore", SAMPLE, "-o", out, "--dry-run", *pf).out
    return {name: normalise(text, work, SAMPLE) for name, text in found.items()}


def test_renderings_are_unchanged(tmp_path: Path) -> None:
    got = outputs(run_cli, tmp_path)
    if os.environ.get("QRECOVER_GOLDEN") == "write":
        GOLDEN.mkdir(exist_ok=True)
        for name, text in got.items():
            (GOLDEN / name).write_text(text, encoding="utf-8")
        pytest.fail("golden files written; check `git diff tests/golden` and commit them")
    for name, text in got.items():
        expected = (GOLDEN / name).read_text(encoding="utf-8")
        assert text == expected, f"{name} differs from tests/golden/{name}"
