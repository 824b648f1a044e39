"""qrecover as one file (``qrecover.pyz``) that a bare system python3 runs.

shiv builds it: the zipapp holds qrecover and its dependencies, and shiv's
bootstrap extracts them (pydantic-core's compiled part included) on the
first run into its cache, ``~/.shiv/qrecover.pyz_<build id>/``, or under
``$SHIV_ROOT`` when that is set (``python3 -I`` ignores only ``PYTHON*``
variables, so SHIV_ROOT still counts; with HOME unset, ``~`` is the user's
home from the password database).

``qrecover kit`` (and ``scripts/build-pyz``, which calls the same
:func:`make_pyz`) stages qrecover's code as it is installed and its
dependencies as wheels downloaded for CPython 3.8 to 3.13 on x86_64 and
aarch64 Linux (:mod:`qrecover.pyz_wheels`); shiv zips the staging folder.
When the package index cannot be reached it packs instead the installed
distributions of qrecover and its dependencies (found with
importlib.metadata): that pyz runs on this CPython's version and
architecture only, what the installed pydantic-core was built for.  Either
way the pyz's ``__main__.py`` checks the running Python first
(:mod:`qrecover.pyz_guard`).
"""

from __future__ import annotations

import importlib.metadata as md
import importlib.util
import os
import re
import shutil
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

from qrecover.errors import MissingProgramError, OutputError, ProgramFailed
from qrecover.pyz_guard import Target, describe, install_guard, targets_of
from qrecover.pyz_wheels import (
    ALL_TARGETS,
    DownloadFailed,
    download,
    index_unreachable,
    runtime_requirements,
    unpack,
)
from qrecover.runner import control

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
    # Through the runner, as every program qrecover starts: -v logs it, and its
    # environment is ours less the passphrase variables (runner.child_env).
    try:
        control(*argv)
    except ProgramFailed as exc:
        partial.unlink(missing_ok=True)
        raise OutputError(f"{target}: shiv failed: {exc.message}") from None
    if not zipfile.is_zipfile(partial):
        partial.unlink(missing_ok=True)
        raise OutputError(f"{target}: shiv wrote no zip archive")
    os.replace(partial, target)


def running_pyz() -> Path | None:
    """The shiv pyz this process runs from, if any (a kit made by a kit's pyz copies it)."""
    candidate = Path(sys.argv[0]) if sys.argv and sys.argv[0] else None
    if candidate is None or not candidate.is_file() or not zipfile.is_zipfile(candidate):
        return None
    with zipfile.ZipFile(candidate) as archive:
        return candidate if "environment.json" in archive.namelist() else None


@dataclass(frozen=True)
class PyzMade:
    """What :func:`make_pyz` wrote: the Pythons it serves, and whether it had to
    make do with what is installed here (``offline``: why)."""

    targets: list[Target]
    offline: str | None = None
    copied_from: Path | None = None  # made by a pyz without shiv: a copy of it

    @property
    def runs_on(self) -> str:
        return describe(self.targets)


def _copy_running(existing: Path, target: Path) -> PyzMade:
    partial = target.with_name(target.name + ".partial")
    shutil.copyfile(existing, partial)
    os.replace(partial, target)
    with zipfile.ZipFile(target) as archive:
        names = [n.rsplit("/", 1)[-1] for n in archive.namelist() if n.endswith(".so")]
    tags = sorted({n.split(".")[-2] for n in names if n.count(".") >= 2})
    return PyzMade(targets_of(tags), copied_from=existing)


def _stage_downloaded(stage: Path, scratch: Path, wanted: list[Target]) -> None:
    """qrecover's dependencies as wheels for ``wanted``; DownloadFailed if any is missing."""
    wheels = download(runtime_requirements(ROOT_DIST, BUILD_ONLY), wanted, scratch / "wheels")
    unpack(wheels, stage)
    have = targets_of(compiled_tags(stage))
    missing = [t.version + " " + t.arch for t in wanted if t not in have]
    if missing:
        raise DownloadFailed("no compiled pydantic-core was downloaded for CPython "
                             + ", ".join(missing))


def make_pyz(
    target: Path, scratch: Path, wanted: list[Target] | None = None, offline: str | None = None
) -> PyzMade:
    """Write ``target``, a pyz for the ``wanted`` Pythons (default: CPython 3.8 to
    3.13 on x86_64 and aarch64) with wheels from the package index; when that
    cannot be (``offline`` says why, or the index does not answer, or pip fails)
    from what is installed here, for this Python only.  Its ``__main__.py``
    checks the Python that runs it (:mod:`qrecover.pyz_guard`)."""
    existing = running_pyz()
    if existing is not None and importlib.util.find_spec("shiv") is None:
        return _copy_running(existing, target)
    stage = scratch / "site-packages"
    stage.mkdir(parents=True)
    why = offline or index_unreachable()
    if why is None:
        try:
            _stage_downloaded(stage, scratch, wanted or ALL_TARGETS)
        except DownloadFailed as exc:
            why = str(exc)
            shutil.rmtree(stage)
            stage.mkdir()
    for dist in closure() if why is not None else [md.distribution(ROOT_DIST)]:
        stage_distribution(dist, stage)
    made = PyzMade(targets_of(compiled_tags(stage)), why)
    unguarded = target.with_name(target.name + ".unguarded")
    try:  # under its final name only once it is complete, guard included
        build_pyz(stage, unguarded)
        install_guard(unguarded, made.targets)
        os.replace(unguarded, target)
    finally:
        unguarded.unlink(missing_ok=True)
    return made
