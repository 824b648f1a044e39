"""Crafted bad format-2 backups (scripts/make_bad_backups.py, cases_v2): each
ends the documented way, as the other formats' cases do (tests/test_bad_input.py):
the exit code, a message naming the file or chunk, no traceback, nothing
outside the output folder, nothing under a final name that is not complete."""

from __future__ import annotations

import re
from pathlib import Path

import make_bad_backups as bad  # scripts/ is on sys.path (conftest)
import pytest
from conftest import run_cli

pytestmark = pytest.mark.xdist_group("test_format2_bad")  # module fixtures built once

CASE_NAMES = [
    "v2-wrong-passphrase",
    "v2-beta3-wrong-passphrase",
    "v2-header-tampered",
    "v2-header-version-2",
    "v2-chunk-byte-flipped",
    "v2-chunk-missing-middle",
    "v2-chunk-last-missing",
    "v2-volume-not-continued",
    "v2-inner-device-and-fifo",
    "v2-inner-dotdot",
    "v2-inner-absolute",
    "v2-chunk-expands-past-256-mib",
    "v2-budget-outgrown-across-volumes",
]


@pytest.fixture(scope="module")
def cases(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bad.Case]:
    folder = tmp_path_factory.mktemp("bad2")
    return {c.name: c for c in bad.cases_v2(folder)}


def test_case_list_is_complete(cases: dict[str, bad.Case]) -> None:
    assert sorted(cases) == sorted(CASE_NAMES)


def _tree(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


@pytest.mark.parametrize("name", CASE_NAMES)
@pytest.mark.parametrize("command", ["restore", "verify"])
def test_bad_format2_backup(cases: dict[str, bad.Case], name: str, command: str,
                            tmp_path: Path) -> None:
    case = cases[name]
    passfile = tmp_path / "pass"
    passfile.write_text(case.passphrase + "\n")
    out = tmp_path / "out"
    out.mkdir()
    mine = out / "my-notes.txt"
    mine.write_text("mine")
    before = _tree(tmp_path)
    args = [command, case.path, "--passphrase-file", passfile]
    if command == "restore":
        args += ["--output", out]
    result = run_cli(*args, timeout=120)
    assert result.code == case.code, result.text
    assert case.message in result.err, result.err
    assert not re.search(r"(\S+): \1:", result.text), "a name said twice in a row"
    assert "Traceback" not in result.text
    assert mine.read_text() == "mine"
    after = _tree(tmp_path)
    assert {p for p in after - before if not p.startswith("out")} == set()
    assert not any(".qrecover" in p for p in after)
    assert not (Path("/tmp") / "qrecover-escape").exists()
    if case.code == bad.EXIT_AUTH:
        assert _tree(out) == {"my-notes.txt"}  # nothing written
    if command == "restore" and case.partial is not None:
        assert not (out / case.partial).exists()
        assert (out / (case.partial + ".partial")).exists()
