"""qrecover as one file (``qrecover.pyz``) that a bare system python3 runs.

shiv builds it: the zipapp holds qrecover and its dependencies, and shiv's
bootstrap extracts them (pydantic-core's compiled part included) on the
first run into its cache, ``~/.shiv/qrecover.pyz_<build id>/``, or under
``$SHIV_ROOT`` when that is set (``python3 -I`` ignores only ``PYTHON*``
variables, so SHIV_ROOT still counts; with HOME unset, ``~`` is the user's
home from the password database).

``qrecover kit`` packs what is installed, offline: the files of the
installed distributions of qrecover and its dependencies, found with
importlib.metadata, are copied into a staging folder that shiv zips.  The
pyz so made runs on the installed CPython's version and architecture only
(that is what pydantic-core was built for); ``scripts/build-pyz`` makes one
for several.
"""

from __future__ import annotations

import importlib.metadata as md
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

from qrecover.errors import MissingProgramError, OutputError

ROOT_DIST = "qrecover"
# Needed to build a pyz, never inside one (it would bring pip and setuptools).
BUILD_ONLY = {"shiv"}
ENTRY_POINT = "qrecover.cli:main"
_NAME = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)")


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def closure(root: str = ROOT_DIST) -> list[md.Distribution]:
    """``root`` and every installed distribution it requires, recursively.

    Requirements for an extra are left out; any other requirement that is
    installed is taken, whatever its marker says (an unneeded one costs only
    room; one needed but missing would break the pyz).
    """
    seen: dict[str, md.Distribution] = {}
    todo = [root]
    while todo:
        name = _norm(todo.pop())
        if name in seen or name in BUILD_ONLY:
            continue
        try:
            dist = md.distribution(name)
        except md.PackageNotFoundError:
            continue
        seen[name] = dist
        for requirement in dist.requires or []:
            if "extra ==" in requirement.replace("extra==", "extra =="):
                continue
            match = _NAME.match(requirement)
            if match:
                todo.append(match.group(1))
    return list(seen.values())


def _skipped(rel: str) -> bool:
    parts = Path(rel).parts
    return (
        not parts
        or parts[0] == ".."
        or "__pycache__" in parts
        or rel.endswith(".pth")
        or parts[0].startswith("__editable__")
    )


def _copy(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(src, dst)


def stage_distribution(dist: md.Distribution, stage: Path) -> None:
    """Copy one installed distribution's files (its RECORD) into ``stage``.

    qrecover itself, and any editable install (``pip install -e``, which
    records only a path hook), is copied from where Python imports it: that
    is the code running now, whatever stale metadata lies about.
    """
    copied_code = False
    own = _norm(dist.metadata["Name"]) == ROOT_DIST
    for rel_path in [] if own else dist.files or []:
        rel = str(rel_path)
        if _skipped(rel):
            continue
        src = Path(str(dist.locate_file(rel_path)))
        if src.is_file():
            _copy(src, stage / rel)
            copied_code = copied_code or (rel.endswith(".py") and ".dist-info" not in rel)
    if copied_code:
        return
    top = (dist.read_text("top_level.txt") or "").split()
    for name in top or [dist.metadata["Name"].replace("-", "_")]:
        spec = importlib.util.find_spec(name)
        if spec is None or not spec.submodule_search_locations:
            continue
        package = Path(next(iter(spec.submodule_search_locations)))
        for src in package.rglob("*"):
            rel = str(src.relative_to(package.parent))
            if src.is_file() and not _skipped(rel) and not rel.endswith(".pyc"):
                _copy(src, stage / rel)


def compiled_tags(stage: Path) -> list[str]:
    """The ABI tags of the compiled modules in ``stage``: cpython-311-x86_64-linux-gnu."""
    tags = set()
    for so in stage.rglob("*.so"):
        parts = so.name.split(".")
        if len(parts) >= 3:
            tags.add(parts[-2])
    return sorted(tags)


def runs_on(tags: list[str]) -> str:
    """Which Pythons a pyz with these compiled parts runs on, for a person."""
    if not tags:
        return "any CPython 3.10 or later"
    shown = []
    for tag in tags:
        m = re.match(r"cpython-(\d)(\d+)-(\w+?)-linux-gnu", tag)
        shown.append(f"CPython {m.group(1)}.{m.group(2)} on {m.group(3)} Linux (glibc)"
                     if m else tag)
    return "; ".join(shown)


def build_pyz(stage: Path, target: Path) -> None:
    """Zip ``stage`` with shiv into ``target`` (written beside it, then moved in place)."""
    if importlib.util.find_spec("shiv") is None:
        raise MissingProgramError(
            "shiv is not installed, so no qrecover.pyz can be built",
            hint="pip install shiv, or install qrecover with pip, which brings it",
        )
    partial = target.with_name(target.name + ".partial")
    argv = [
        sys.executable, "-m", "shiv",
        "--site-packages", str(stage),
        "--entry-point", ENTRY_POINT,
        "--output-file", str(partial),
        "--python", "/usr/bin/env python3",
        "--reproducible",  # the same installed files give the same pyz
        "--compressed",
    ]
    env = {k: v for k, v in os.environ.items() if not k.startswith("QRECOVER_")}
    proc = subprocess.run(argv, capture_output=True, text=True, env=env, check=False)
    if proc.returncode != 0 or not zipfile.is_zipfile(partial):
        partial.unlink(missing_ok=True)
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        raise OutputError(f"{target}: shiv failed (exit {proc.returncode}): {tail[0]}")
    os.replace(partial, target)


def running_pyz() -> Path | None:
    """The shiv pyz this process runs from, if any (a kit made by a kit's pyz copies it)."""
    candidate = Path(sys.argv[0]) if sys.argv and sys.argv[0] else None
    if candidate is None or not candidate.is_file() or not zipfile.is_zipfile(candidate):
        return None
    with zipfile.ZipFile(candidate) as archive:
        return candidate if "environment.json" in archive.namelist() else None


def this_python() -> str:
    """The running CPython's compiled-module tag, e.g. cpython-311-x86_64-linux-gnu."""
    suffix = sysconfig.get_config_var("EXT_SUFFIX") or ""
    return suffix.split(".")[1] if suffix.count(".") >= 2 else sys.implementation.cache_tag


def make_pyz(target: Path, scratch: Path) -> list[str]:
    """Write ``target``; returns the compiled-part tags it carries."""
    existing = running_pyz()
    if existing is not None and importlib.util.find_spec("shiv") is None:
        partial = target.with_name(target.name + ".partial")
        shutil.copyfile(existing, partial)
        os.replace(partial, target)
        with zipfile.ZipFile(target) as archive:
            names = [n.rsplit("/", 1)[-1] for n in archive.namelist() if n.endswith(".so")]
        return sorted({n.split(".")[-2] for n in names if n.count(".") >= 2})
    stage = scratch / "site-packages"
    stage.mkdir(parents=True)
    for dist in closure():
        stage_distribution(dist, stage)
    build_pyz(stage, target)
    return compiled_tags(stage)
