"""--help as people expect it, the generated command reference (docs/cli.md), and
--explain's wrapping, which never cuts a URL or a path."""

from __future__ import annotations

import html
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import MakeBackup, run_main

from qrecover.cli import app
from qrecover.formats.v4 import PAGE as PAGE_V4
from qrecover.render.explain import Narrator

ROOT = Path(__file__).resolve().parents[1]
COMMANDS = ("restore", "files", "verify", "script", "kit", "info")


def _help(*command: str, columns: int) -> str:
    result = run_main(*command, "--help", env={"COLUMNS": str(columns), "TERMINAL_WIDTH": ""})
    assert result.code == 0, result.text
    return result.out


def _flat(text: str) -> str:
    """The words of a help screen, without rich's frame and line breaks."""
    return " ".join(re.sub(r"[│╭╮╰╯─]", " ", text).split())


@pytest.mark.parametrize("columns", [60, 200])
def test_top_level_help_names_every_format_and_release(columns: int) -> None:
    flat = _flat(_help(columns=columns))
    for words in (
        "R1 to R4.3",
        "format 1 (Qubes R1, R2-Beta1 and R2-Beta2",
        "format 2 (R2-Beta3 to R2)",
        "format 3 (R2 updated, R3.0 to R3.2)",
        "format 4 (R4.0 to R4.3)",
    ):
        assert words in flat, words
    for command in ("restore", "files", "verify", "kit"):  # the five things people do
        assert f"qrecover {command} " in flat, command
    assert "--vm work # one VM" in flat
    assert "Exit codes:" in flat and "143: terminated (SIGTERM)" in flat


@pytest.mark.parametrize("command", ["", *COMMANDS])
def test_no_type_after_a_flag(command: str) -> None:
    """typer's rich help printed ``<bool>`` after every flag, --help included."""
    args = (command,) if command else ()
    for columns in (80, 200):
        text = _help(*args, columns=columns)
        assert "<bool>" not in text and "bool" not in text.replace("boolean", ""), text
        # the flags are still listed, with their help
        assert re.search(r"--help\s+-h\s+Show this message and exit\.", text), text
    if command == "restore":
        assert re.search(r"--force\s+Replace files", text), text
        assert re.search(r"--jobs\s+-j\s+N", text), text  # an option's metavar stays


def test_summaries_wrap_as_paragraphs() -> None:
    """No hard line break inside a sentence: on a wide terminal each command's summary
    is one line; on a narrow one, rich wraps it to the width."""
    wide = _help(columns=250)
    group = app.registered_commands
    assert len(group) == len(COMMANDS)
    for info in group:
        assert info.help is not None
        summary = info.help.split("\n\n")[0]
        assert "\n" not in summary, summary
        name = info.name or getattr(info.callback, "__name__", "")
        line = next(x for x in wide.splitlines() if f"│ {name} " in x)
        assert summary in line, (summary, line)
    narrow = _help("verify", columns=50)
    assert all(len(line) <= 50 for line in narrow.splitlines()), narrow
    assert "every HMAC, decryption, decompression, and a listing" in _flat(narrow)


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_examples(command: str) -> None:
    text = _help(command, columns=120)
    examples = text[text.index("Examples:") :].splitlines()[1:]
    lines = [x.strip() for x in examples if x.strip().startswith(("qrecover ", "ssh ", "sh "))]
    assert lines and any(x.startswith(f"qrecover {command} ") for x in lines), text
    for line in lines:
        assert len(line) <= 78, line  # each example fits on one line of 80 columns


def _normal(text: str) -> str:
    """docs/cli.md, regardless of what may differ between versions of Python and of
    typer's rendering: HTML entities, an argument's type label, white space."""
    text = html.unescape(text)
    text = re.sub(r"^(\* `[A-Z]+)(\.\.\.)? <[^`]*>`", r"\1`", text, flags=re.M)
    return " ".join(text.split())


def test_cli_reference_is_generated_from_the_app(tmp_path: Path) -> None:
    """docs/cli.md is what `typer qrecover.cli utils docs --name qrecover --output
    docs/cli.md` writes: regenerated here (at two terminal widths, which must not
    matter) and compared with the committed file."""
    committed = (ROOT / "docs" / "cli.md").read_text(encoding="utf-8")
    for columns in ("40", "300"):
        out = tmp_path / f"cli-{columns}.md"
        env = {**os.environ, "COLUMNS": columns}
        subprocess.run(
            [sys.executable, "-m", "typer", "qrecover.cli", "utils", "docs",
             "--name", "qrecover", "--output", str(out)],
            check=True, env=env, cwd=ROOT, capture_output=True,
        )
        fresh = out.read_text(encoding="utf-8")
        assert _normal(fresh) == _normal(committed), (
            "docs/cli.md is stale: run `.venv/bin/python -m typer qrecover.cli utils docs "
            "--name qrecover --output docs/cli.md`"
        )
    for command in COMMANDS:
        assert f"## `qrecover {command}`" in committed, command
    assert "R1 to R4.3" in committed and "<bool>" not in committed
    # the list of commands has whole summaries, not cut at 45 characters
    assert (
        "* `verify`: Check everything restore would, writing nothing: every HMAC, "
        "decryption, decompression, and a listing of each inner archive.\n"
    ) in committed


def _unbroken(text: str, *words: str) -> None:
    for word in words:
        assert any(word in line for line in text.splitlines()), (word, text)


class _Out:
    def __init__(self) -> None:
        self.text = ""

    def write(self, s: str) -> int:
        self.text += s
        return len(s)

    def flush(self) -> None:
        pass


def test_explain_never_cuts_a_url_or_a_path() -> None:
    path = "/media/user/backup-disk-2016/qubes-backups/qubes-backup-2016-08-04T123456-untarred"
    text = (
        "This is a Qubes R4 backup (format 4; steps as on " + PAGE_V4 + "). It is "
        "many small tar archives one after the other (hence tar -i, --ignore-zeros): "
        f"{path} is a backup already untarred by hand, so qrecover reads its files."
    )
    out = _Out()
    narrator = Narrator("-", "verify", out)  # type: ignore[arg-type]
    narrator.say("Step 1 - untar the backup", text, result=f"restored {path}/work")
    _unbroken(out.text, PAGE_V4, path, f"{path}/work", "--ignore-zeros")
    for line in out.text.splitlines():
        # over 76 columns only for a word that cannot be cut
        assert len(line) <= 76 or len(line.split()) <= 2, line


def test_explain_of_a_format4_folder_keeps_the_page_and_the_path_whole(
    make4: MakeBackup, tmp_path: Path
) -> None:
    backup = make4(chunk_size=16 * 1024)
    folder = tmp_path / "a-folder-with-a-long-name" / "qubes-backup-2016-08-04T123456-by-hand"
    folder.mkdir(parents=True)
    subprocess.run(["tar", "-i", "-xf", str(backup.path), "-C", str(folder)], check=True)
    result = run_main(
        "verify", folder, "--vm", "work", "--explain", "--passphrase-file", backup.passfile
    )
    assert result.code == 0, result.text
    _unbroken(result.err, PAGE_V4, str(folder))


def test_readme_is_short_and_its_test_command_is_what_ci_runs() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert len(readme.splitlines()) <= 250
    blocks = re.findall(r"```sh\n(.*?)```", readme, flags=re.S)
    setup, test = blocks[0].strip(), blocks[1].strip()
    assert setup.startswith("apt-get update && ")
    assert "qrecover restore fixtures/sample-backup" in setup
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8").strip().splitlines()
    assert ci[-1] == test == "scripts/test-all"
    for page in ("usage", "cli", "formats", "guarantees", "showing-the-work", "automation",
                 "performance", "development"):
        assert f"(docs/{page}.md" in readme and (ROOT / "docs" / f"{page}.md").is_file(), page
