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
