"""The wheels a qrecover.pyz needs for several Pythons, from the package index.

``pip download --only-binary=:all: --python-version 3.X --platform
manylinux2014_ARCH`` fetches qrecover's dependencies as wheels for each
target.  The versions are resolved once, for the oldest Python asked for (a
version that installs there installs on the newer ones too); the newer
targets then fetch only the compiled wheels (pydantic-core), at the same
versions.  All are unpacked into one site-packages folder: a compiled module
is named after its Python and machine (``_pydantic_core.cpython-311-x86_64-
linux-gnu.so``), so those of every target sit side by side and each Python
loads its own.  Every other file must be the same bytes in every target's
wheel, which :func:`unpack` checks.
"""

from __future__ import annotations

import hashlib
import importlib.metadata as md
import importlib.util
import json
import os
import re
import sys
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from qrecover.errors import ProgramFailed, UsageError
from qrecover.pyz_guard import GLIBC, Target
from qrecover.runner import control

PYTHONS = ("3.8", "3.9", "3.10", "3.11", "3.12", "3.13")
ARCHES = ("x86_64", "aarch64")
ALL_TARGETS = [Target.parse(version, arch) for version in PYTHONS for arch in ARCHES]
DEFAULT_INDEX = "https://pypi.org/simple/"
PARALLEL = 6  # downloads at once
TIMEOUT = 60.0  # seconds without an answer from the index
_JSON = "application/vnd.pypi.simple.v1+json"
_NAME = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)")


def parse_targets(pythons: list[str], arches: list[str]) -> list[Target] | None:
    """``--python 3.8 --arch x86_64`` as targets; None (all) when neither is given."""
    if not pythons and not arches:
        return None
    for arch in arches:
        if arch not in ARCHES:
            raise UsageError(f"--arch {arch}: qrecover.pyz is made for " + " or ".join(ARCHES))
    targets = []
    for version in pythons or PYTHONS:
        match = re.match(r"^3\.(\d+)$", version)
        if match is None or int(match.group(1)) < 8:
            raise UsageError(f"--python {version}: qrecover runs on CPython 3.8 or later "
                             "(give it as 3.8, 3.13, ...)")
        targets += [Target(int(match.group(1)), arch) for arch in arches or ARCHES]
    return targets


class DownloadFailed(Exception):
    """The wheels could not be had; the message says why, for a person."""


def norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def index_url() -> str:
    """The index pip will ask: $PIP_INDEX_URL, else PyPI."""
    return os.environ.get("PIP_INDEX_URL") or DEFAULT_INDEX


def index_unreachable(timeout: float = 10.0) -> str | None:
    """None when the package index answers; else why not, in a few words."""
    url = index_url().rstrip("/") + "/pydantic-core/"
    try:
        with urllib.request.urlopen(urllib.request.Request(url, method="HEAD"),
                                    timeout=timeout):
            return None
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", None) or exc
        return f"the package index {index_url()} could not be reached ({reason})"


def runtime_requirements(root: str, build_only: set[str]) -> list[str]:
    """``root``'s installed requirements, without extras and build-only tools."""
    kept = []
    for requirement in md.requires(root) or []:
        if "extra ==" in requirement.replace("extra==", "extra =="):
            continue
        match = _NAME.match(requirement)
        if match and norm(match.group(1)) not in build_only:
            kept.append(requirement)
    return kept


def _pip(target: Target, folder: Path, *args: str) -> None:
    """``pip download`` for ``target`` into ``folder``; DownloadFailed with pip's last
    error line (its log, beside the wheels) when it fails."""
    log = folder.with_name(folder.name + ".log")
    try:
        # 3.X.99: any 3.X (sh, for one, requires 3.8.1, not 3.8.0)
        control(sys.executable, "-m", "pip", "download", "-q", "--only-binary=:all:",
                "--implementation", "cp", "--python-version", target.version + ".99",
                "--platform", f"manylinux2014_{target.arch}", "--log", str(log),
                "-d", str(folder), *args)
    except ProgramFailed as exc:
        errors = [line.split("ERROR: ", 1)[1] for line in _lines(log) if "ERROR: " in line]
        said = errors[-1][:300] if errors else exc.message
        raise DownloadFailed(f"pip could not download the wheels for CPython "
                             f"{target.version} on {target.arch}: {said}") from None


def _lines(path: Path) -> list[str]:
    try:
        return path.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return []


def wheel_meta(wheel: Path) -> tuple[str, str]:
    """(normalised name, version) from a wheel's file name."""
    name, version = wheel.name.split("-")[:2]
    return norm(name), version


def is_pure(wheel: Path) -> bool:
    return wheel.name.endswith("-none-any.whl")


def download(requirements: list[str], targets: list[Target], folder: Path) -> list[Path]:
    """The wheels for every target, in ``folder``; DownloadFailed if any is missing."""
    if importlib.util.find_spec("pip") is None:
        raise DownloadFailed("pip is not installed here")
    ordered = sorted(targets, key=lambda t: (t.minor, t.arch != "x86_64", t.arch))
    _pip(ordered[0], folder / "resolved", *requirements)  # the versions, and their wheels
    resolved = sorted((folder / "resolved").glob("*.whl"))
    compiled = [wheel_meta(w) for w in resolved if not is_pure(w)]
    # The other targets need only the compiled wheels, at the same versions (so that
    # their pure files are the same bytes): fetched by name from the index's JSON
    # page (PEP 691), several at a time; pip would spend half a minute of CPU on
    # pydantic-core's 15,000 files for each.
    jobs = [(pin, t) for pin in compiled for t in ordered[1:]]
    wheels = {w.name: w for w in resolved}
    if jobs:
        pages = {pin: _index_files(pin[0]) for pin in compiled}
        with ThreadPoolExecutor(max_workers=PARALLEL) as pool:
            done = [pool.submit(_fetch, pages[pin], pin, t, folder) for pin, t in jobs]
            for future in done:
                wheel = future.result()  # the first failure, raised here
                wheels[wheel.name] = wheel
    return [wheels[name] for name in sorted(wheels)]


def _index_files(name: str) -> tuple[str, list[dict[str, Any]]]:
    """The index's page of ``name``: its address and its files (PEP 691 JSON)."""
    url = index_url().rstrip("/") + f"/{norm(name)}/"
    request = urllib.request.Request(url, headers={"Accept": _JSON})
    try:
        with urllib.request.urlopen(request, timeout=TIMEOUT) as answer:
            if _JSON not in answer.headers.get("Content-Type", ""):
                raise DownloadFailed(f"{url}: the index does not answer in JSON (PEP 691)")
            files: list[dict[str, Any]] = json.load(answer)["files"]
    except (OSError, ValueError, KeyError) as exc:
        raise DownloadFailed(f"{url}: {exc}") from None
    return url, files


def manylinux_fits(platform: str, arch: str) -> bool:
    """Whether a wheel's platform tag runs on ``arch`` Linux with glibc 2.17."""
    match = re.match(rf"^manylinux_2_(\d+)_{arch}$", platform)
    if match:
        return int(match.group(1)) <= GLIBC[1]
    return platform in (f"manylinux2014_{arch}", f"manylinux2010_{arch}", f"manylinux1_{arch}")


def wheel_fits(filename: str, name: str, version: str, target: Target) -> bool:
    """Whether the wheel ``filename`` is ``name`` ``version`` compiled for ``target``."""
    if not filename.endswith(".whl"):
        return False
    parts = filename[: -len(".whl")].split("-")
    if len(parts) not in (5, 6) or norm(parts[0]) != name or parts[1] != version:
        return False
    python, abi, platforms = parts[-3:]
    tag = f"cp3{target.minor}"
    return (tag in python.split(".") and tag in abi.split(".")
            and any(manylinux_fits(p, target.arch) for p in platforms.split(".")))


def _fetch(page: tuple[str, list[dict[str, Any]]], pin: tuple[str, str], target: Target,
           folder: Path) -> Path:
    """Download ``pin``'s wheel for ``target`` into ``folder``, checked by its sha256."""
    url, files = page
    name, version = pin
    fitting = [f for f in files if wheel_fits(str(f.get("filename", "")), name, version, target)]
    if not fitting:
        raise DownloadFailed(f"the index has no {name} {version} wheel for CPython "
                             f"{target.version} on {target.arch} Linux")
    chosen = fitting[-1]
    wheel = folder / target.version / target.arch / str(chosen["filename"])
    wheel.parent.mkdir(parents=True, exist_ok=True)
    try:
        with urllib.request.urlopen(urllib.parse.urljoin(url, str(chosen["url"])),
                                    timeout=TIMEOUT) as answer:
            data = answer.read()
    except OSError as exc:
        raise DownloadFailed(f"{chosen['filename']}: {exc}") from None
    expected = chosen.get("hashes", {}).get("sha256")
    if expected is None or hashlib.sha256(data).hexdigest() != expected:
        raise DownloadFailed(f"{chosen['filename']}: not the sha256 the index gives for it")
    wheel.write_bytes(data)
    return wheel


def unpack(wheels: list[Path], stage: Path) -> None:
    """Unpack ``wheels`` into ``stage``; DownloadFailed if two put different bytes
    under one name (only compiled modules may differ, and their names do)."""
    seen: dict[str, str] = {}
    for wheel in wheels:
        with zipfile.ZipFile(wheel) as archive:
            for info in archive.infolist():
                name = info.filename
                if info.is_dir():
                    continue
                if ".data/" in name:  # purelib/platlib go to the top; scripts are not needed
                    _head, _, rest = name.partition(".data/")
                    kind, _, rel = rest.partition("/")
                    if kind not in ("purelib", "platlib"):
                        continue
                    name = rel
                if ".dist-info/" in name and name in seen:
                    continue  # RECORD and WHEEL name each wheel's own tag
                parts = Path(name).parts
                if not parts or ".." in parts or name.startswith("/"):
                    raise DownloadFailed(f"{wheel.name}: unsafe file name {name!r}")
                data = archive.read(info)
                digest = hashlib.sha256(data).hexdigest()
                if seen.get(name, digest) != digest:
                    raise DownloadFailed(f"{name} differs between the targets' wheels "
                                         f"({wheel.name})")
                seen[name] = digest
                target = stage / name
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(data)
                if info.external_attr >> 16 & 0o111:
                    target.chmod(0o755)
