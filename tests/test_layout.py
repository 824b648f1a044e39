"""The shape of qrecover/: no import cycle, deferred imports counted; every format
behind one seam."""

from __future__ import annotations

import ast
import re
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "qrecover"


def _modules() -> dict[str, Path]:
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The qrecover modules ``name`` imports, at the top or inside a function
    (a deferred import still makes a cycle), not those for type checking only."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found: set[str] = set()
    checking_only = {
        id(inner)
        for top in ast.walk(tree)
        if isinstance(top, ast.If) and "TYPE_CHECKING" in ast.unparse(top.test)
        for stmt in top.body
        for inner in ast.walk(stmt)
    }
    for node in ast.walk(tree):
        if id(node) in checking_only:
            continue
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parts, *([node.module] if node.module else [])])
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                found.add(sub if sub in known else base)
    return {m for m in found if m in known and m != name}


def test_no_import_cycle() -> None:
    modules = _modules()
    known = set(modules)
    graph = {name: _imports(name, path, known) for name, path in modules.items()}
    # A package's __init__ importing its own submodules is how packages work;
    # a cycle is a module reaching itself through the imports it makes.
    state: dict[str, int] = {}
    stack: list[str] = []

    def walk(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycle = [*stack[stack.index(nxt) :], nxt]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                walk(nxt)
        stack.pop()
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            walk(name)
    # issue 12's progress <-> restore: the engine's side no longer imports progress
    assert "qrecover.progress" not in graph["qrecover.stored"]


# What would mean a format is known outside qrecover/formats/: its classes,
# its header models, a test of the version, a `_v4` twin.
_FORMAT_KNOWLEDGE = re.compile(
    r"Format[34]\b|BackupHeader(V4)?\b|\.version\s*[=!<>]=|version\s*==|_v[34]\b|"
    r"isinstance\([^)]*Format|Words[34]\b|HeaderVerifiedV4"
)


def test_nothing_outside_formats_names_a_format_or_branches_on_the_version() -> None:
    offenders = []
    for name, path in _modules().items():
        if name == "qrecover.formats" or name.startswith("qrecover.formats."):
            continue
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if _FORMAT_KNOWLEDGE.search(line):
                offenders.append(f"{path.relative_to(PACKAGE.parent)}:{number}: {line.strip()}")
    assert not offenders, "\n".join(offenders)


def test_the_check_itself_catches_a_version_branch() -> None:
    assert _FORMAT_KNOWLEDGE.search("if fmt.version == 4:")
    assert _FORMAT_KNOWLEDGE.search("isinstance(fmt, Format4)")
    assert _FORMAT_KNOWLEDGE.search("def plan_text_v4(")
    assert not _FORMAT_KNOWLEDGE.search("print(fmt.version)")


def test_tests_share_helpers_only_through_helpers_and_conftest() -> None:
    """A test module imports shared helpers from tests/helpers.py (or fixtures'
    conftest.py), never another test module's own functions."""
    offenders = []
    for path in sorted((PACKAGE.parent / "tests").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("test_"):
                offenders.append(f"{path.name}: from {node.module} import ...")
            elif isinstance(node, ast.Import):
                offenders += [f"{path.name}: import {a.name}" for a in node.names
                              if a.name.startswith("test_")]
    assert offenders == []


def test_the_cycle_check_counts_an_import_deferred_into_a_function(tmp_path: Path) -> None:
    module = tmp_path / "a.py"
    module.write_text(
        "from typing import TYPE_CHECKING\n"
        "from qrecover import b\n"
        "if TYPE_CHECKING:\n    from qrecover.d import D\n"
        "def f() -> None:\n    from qrecover.c import C\n",
        encoding="utf-8",
    )
    known = {"qrecover.a", "qrecover.b", "qrecover.c", "qrecover.d"}
    assert _imports("qrecover.a", module, known) == {"qrecover.b", "qrecover.c"}


def test_commands_write_to_the_streams_they_are_given() -> None:
    """Only cli.main reads the process's argv and standard output (qrecover.console):
    no print() to stdout, no sys.stdout, no sys.argv, no redirect_stdout elsewhere;
    pyz.py reads sys.argv[0], the file this process runs from, and nothing else."""
    found = []
    for name, path in _modules().items():
        if name == "qrecover.cli":
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            where = f"{path.name}:{getattr(node, 'lineno', 0)}"
            to_file = isinstance(node, ast.Call) and any(k.arg == "file" for k in node.keywords)
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
                    and node.func.id == "print" and not to_file):
                found.append(f"{where} print() to stdout")
            elif (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                    and node.value.id == "sys" and node.attr in ("stdout", "argv")
                    and not (name == "qrecover.pyz" and node.attr == "argv")):
                found.append(f"{where} sys.{node.attr}")
            elif isinstance(node, ast.Attribute) and node.attr == "redirect_stdout":
                found.append(f"{where} redirect_stdout")
    assert not found, found
