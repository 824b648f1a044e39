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


def _outside_formats() -> dict[str, Path]:
    return {name: path for name, path in _modules().items()
            if name != "qrecover.formats" and not name.startswith("qrecover.formats.")}


# What outside qrecover/formats/ may import of it: the registry and the seam's types.
_SEAM = {"qrecover.formats", "qrecover.formats.base"}


def _format_modules_imported(path: Path) -> list[str]:
    """Each format module ``path`` imports, at the top, in a function or for
    type checking only: any module of qrecover/formats/ but the seam."""
    modules = set(_modules())
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module, *(f"{node.module}.{a.name}" for a in node.names)]
        found += [f"{path.name}:{node.lineno} {name}" for name in names
                  if name in modules and name.startswith("qrecover.formats") and name not in _SEAM]
    return found


def test_nothing_outside_formats_imports_a_format_module() -> None:
    offenders = [hit for path in _outside_formats().values()
                 for hit in _format_modules_imported(path)]
    assert offenders == []


def test_the_import_check_catches_a_format_module(tmp_path: Path) -> None:
    module = tmp_path / "m.py"
    module.write_text(
        "from typing import TYPE_CHECKING\n"
        "from qrecover import formats\n"
        "from qrecover.formats.base import Format\n"
        "from qrecover.formats import Words\n"
        "from qrecover.formats.v2.volumes import VolumeTar\n"
        "from qrecover.formats import v3\n"
        "import qrecover.formats.v1\n"
        "if TYPE_CHECKING:\n    from qrecover.formats.v4.works import ScryptWorks\n"
        "def f() -> None:\n    from qrecover.formats.v4 import Format4\n",
        encoding="utf-8",
    )
    assert [hit.split(" ")[1] for hit in _format_modules_imported(module)] == [
        "qrecover.formats.v2.volumes", "qrecover.formats.v3", "qrecover.formats.v1",
        "qrecover.formats.v4.works", "qrecover.formats.v4",
    ]


def _format_traits() -> set[str]:
    """The Format protocol's plain flags (``multi_volume``): what a format is,
    which only the format itself may act on."""
    tree = ast.parse((PACKAGE / "formats" / "base.py").read_text(encoding="utf-8"))
    protocol = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "Format")
    return {stmt.target.id for stmt in protocol.body
            if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)
            and ast.unparse(stmt.annotation) == "bool"}


def _trait_branches(source: str, traits: set[str]) -> list[int]:
    """The lines where a test (if, while, a conditional expression, a boolean
    operation, an assert) reads one of ``traits`` as an attribute."""
    found = []
    for node in ast.walk(ast.parse(source)):
        tests: list[ast.AST] = []
        if isinstance(node, (ast.If, ast.While, ast.IfExp, ast.Assert)):
            tests = [node.test]
        elif isinstance(node, ast.BoolOp):
            tests = list(node.values)
        elif isinstance(node, ast.comprehension):
            tests = list(node.ifs)
        found += [inner.lineno for test in tests for inner in ast.walk(test)
                  if isinstance(inner, ast.Attribute) and inner.attr in traits]
    return sorted(set(found))


# Left to the renderers' rework (issue 24, item 1): the transcript's words of a
# zero-filled volume under --salvage.
_TRAIT_BRANCHES_LEFT = {"qrecover.render.transcript"}


def test_nothing_outside_formats_branches_on_a_format_trait() -> None:
    traits = _format_traits()
    assert "multi_volume" in traits
    offenders = [f"{path.name}:{line}" for name, path in _outside_formats().items()
                 if name not in _TRAIT_BRANCHES_LEFT
                 for line in _trait_branches(path.read_text(encoding="utf-8"), traits)]
    assert offenders == []


def test_the_trait_check_catches_a_branch() -> None:
    traits = {"multi_volume"}
    assert _trait_branches("if fmt.multi_volume:\n    pass\n", traits) == [1]
    assert _trait_branches("x = 'tar' if plan.fmt.multi_volume else y\n", traits) == [1]
    assert _trait_branches("ok = a and fmt.multi_volume\n", traits) == [1]
    assert _trait_branches("print(fmt.version)\nfeed = fmt.own_feed()\n", traits) == []
