"""Crafted bad backups (scripts/make_bad_backups.py): each ends the documented way.

For every case: the documented exit code, a message naming the file or chunk
at fault, no traceback, nothing written outside the output folder, nothing
under a final name that is not complete and verified, and the user's own
files untouched.  Each run is ``cli.main`` in the test's process (conftest's
``run_main``, with the real programs), not the installed script: the script only
calls it, and other tests start the installed program.
"""

from __future__ import annotations

import os
import re
import stat
from pathlib import Path

import make_bad_backups as bad  # scripts/ is on sys.path (conftest)
import pytest
from conftest import built_once, run_main


@pytest.fixture(scope="module")
def cases(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bad.Case]:
    # written once per test run, for every worker (the cases are only read)
    return {c.name: c for c in built_once(tmp_path_factory, "bad cases", bad.cases)}


# Every case make_bad_backups.py writes (checked below), each its own test.
CASE_NAMES = [
    "wrong-passphrase",
    "header-tampered",
    "header-hmac-missing",
    "header-hmac-not-a-digest",
    "header-cipher-option",
    "header-cipher-path",
    "header-filter-option",
    "header-filter-program",
    "header-version-5",
    "header-missing-keys",
    "header-duplicate-key",
    "header-non-ascii",
    "header-long-line",
    "chunk-byte-flipped",
    "chunk-truncated",
    "chunk-missing-middle",
    "chunk-last-missing",
    "stored-file-missing",
    "chunk-hmac-missing",
    "chunks-out-of-order",
    "chunk-duplicated",
    "hmac-over-4k",
    "stream-cut-mid-member",
    "stream-cut-mid-hmac",
    "empty",
    "random-bytes",
    "random-bytes-odd-size",
    "zero-filled",
    "zeros-then-random",
    "zip-of-backup",
    "seven-zip",
    "cpio-archive",
    "ar-archive",
    "gzip-of-random",
    "compressed-twice",
    "compressed-backup-cut",
    "tgz-of-sources",
    "ordinary-tarball",
    "tar-symlink-first",
    "backup-cut-in-padding",
    "backup-suffix-at-member",
    "backup-suffix-mid-member",
    "random-files-folder",
    "no-qubes-xml",
    "outer-name-dotdot",
    "outer-name-absolute",
    "outer-name-control-chars",
    "qubes-xml-malformed",
    "qubes-xml-billion-laughs",
    "qubes-xml-path-dotdot",
    "qubes-xml-path-absolute",
    "qubes-xml-name-slash",
    "inner-dotdot",
    "inner-absolute",
    "inner-symlink-then-write",
    "inner-hardlink-outside",
    "inner-device-and-fifo",
    "inner-bomb",
    "gzip-stream-damaged",
    "plain-last-chunk-missing",
    "v4-wrong-passphrase",
    "v4-header-tampered",
    "v4-header-hmac-missing",
    "v4-chunk-byte-flipped",
    "v4-chunk-missing-middle",
    "v4-chunk-last-missing",
    "v4-chunk-duplicated",
    "v4-outer-name-dotdot",
    "v4-inner-device-and-fifo",
    "v4-inner-symlink-then-write",
    "v4-inner-bomb",
]


def test_case_list_is_complete(cases: dict[str, bad.Case]) -> None:
    assert sorted(cases) == sorted(CASE_NAMES)


def _tree(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


@pytest.mark.parametrize("name", CASE_NAMES)
@pytest.mark.parametrize("command", ["restore", "verify"])
def test_bad_backup(cases: dict[str, bad.Case], name: str, command: str, tmp_path: Path) -> None:
    case = cases[name]
    passfile = tmp_path / "pass"
    passfile.write_text(case.passphrase + "\n")
    out = tmp_path / "out"
    out.mkdir()
    mine = out / "my-notes.txt"  # the user's own file, already in the folder
    mine.write_text("mine")
    before = _tree(tmp_path)
    args = [command, case.path, "--passphrase-file", passfile]
    if command == "restore":
        args += ["--output", out]
    result = run_main(*args)
    assert result.code == case.code, result.text
    assert case.message in result.err, result.err
    assert not re.search(r"(\S+): \1:", result.text), "a name said twice in a row"
    assert "Traceback" not in result.text
    assert result.err.strip(), "an error must be reported"
    assert mine.read_text() == "mine"
    # nothing outside the output folder, and no scratch left behind
    after = _tree(tmp_path)
    assert {p for p in after - before if not p.startswith("out")} == set()
    assert not any(".qrecover" in p for p in after)
    assert not Path("/tmp/qrecover-escape").exists()
    for path in out.rglob("*"):
        mode = path.lstat().st_mode
        assert not (stat.S_ISCHR(mode) or stat.S_ISBLK(mode) or stat.S_ISFIFO(mode)), path
    if command == "verify":
        assert _tree(out) == {"my-notes.txt"}
    elif case.partial is not None:
        assert not (out / case.partial).exists(), "a failed file under its final name"
        assert os.path.lexists(out / (case.partial + ".partial"))
    if case.code == 3:
        assert _tree(out) == {"my-notes.txt"}, "nothing may be written after a bad passphrase"


def test_special_files_skipped_rest_restored(cases: dict[str, bad.Case], tmp_path: Path) -> None:
    case = cases["inner-device-and-fifo"]
    passfile = tmp_path / "pass"
    passfile.write_text(case.passphrase + "\n")
    result = run_main("restore", case.path, "-o", tmp_path / "out", "--passphrase-file", passfile)
    assert result.code == 4
    assert "FIFO" in result.err and "character device" in result.err
    assert (tmp_path / "out" / "work" / "apps" / "ok.desktop").read_text() == "[Desktop Entry]\n"
    assert not os.path.lexists(tmp_path / "out" / "work" / "apps" / "fifo")
    assert not os.path.lexists(tmp_path / "out" / "work" / "apps" / "null")


def test_no_size_limit_lets_a_large_expansion_through(
    cases: dict[str, bad.Case], tmp_path: Path
) -> None:
    case = cases["inner-bomb"]
    passfile = tmp_path / "pass"
    passfile.write_text(case.passphrase + "\n")
    result = run_main("verify", case.path, "--passphrase-file", passfile, "--no-size-limit")
    assert result.code == 0, result.text
