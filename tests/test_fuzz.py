"""A short run of scripts/fuzz: no crash, escape, hang, leftover or false success."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from conftest import ROOT


def test_short_fuzz_run(tmp_path: Path) -> None:
    report = tmp_path / "fuzz.json"
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "scripts" / "fuzz"),
            "--cases",
            "30",
            "--seed",
            "7",
            "--jobs",
            "2",
            "--timeout",
            "120",
            "--json",
            str(report),
        ],
        capture_output=True,
        text=True,
        check=False,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    data = json.loads(report.read_text())
    assert data["failures"] == []
    assert sum(data["verdicts"].values()) >= 30
    # the mutations must actually have been caught, not all passed through
    assert data["exit_codes"].get("4", 0) >= 10


def test_short_fuzz_run_of_inputs_that_are_not_backups(tmp_path: Path) -> None:
    report = tmp_path / "fuzz.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "fuzz"), "--mode", "input", "--cases", "80",
         "--seed", "11", "--jobs", "2", "--timeout", "120", "--json", str(report)],
        capture_output=True,
        text=True,
        check=False,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    data = json.loads(report.read_text())
    assert data["failures"] == []
    assert sum(data["verdicts"].values()) == 80
    # every kind came up, and most inputs were refused (exit 4), not passed
    assert {"random", "zeros", "prefix", "suffix", "archive", "compressed", "pieces",
            "folder"} <= set(data["kinds"])
    assert data["exit_codes"].get("4", 0) >= 40
    # valid backups in another wrapping (compressed whole, split in order) restored
    assert data["exit_codes"].get("0", 0) >= 1


def test_short_fuzz_run_of_damage_as_media_do_it(tmp_path: Path) -> None:
    """A few cases of ``--mode damage`` (thousands are run outside the suite:
    docs/damaged-backups.md): no crash, no wrong byte, no intact file lost."""
    report = tmp_path / "fuzz.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "fuzz"), "--mode", "damage", "--cases", "12",
         "--seed", "5", "--jobs", "2", "--timeout", "120", "--json", str(report)],
        capture_output=True, text=True, check=False, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    data = json.loads(report.read_text())
    assert data["failures"] == []
    assert data["verdicts"] == {"ok": 12}
    assert data["exit_codes"].get("4", 0) >= 6  # the damage was there, and reported
