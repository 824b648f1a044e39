"""Which Pythons a qrecover.pyz serves, and the check it makes before anything else.

A pyz carries pydantic-core, compiled once per CPython version and machine;
it names each compiled module after them (``cpython-311-x86_64-linux-gnu``).
Those names say which Pythons the pyz serves.  Its ``__main__.py``, the first
code any Python runs from it, is replaced by :func:`guard_source`: it checks
the running Python and machine against that list, and on one it cannot serve
prints one line and exits 5 (:data:`~qrecover.errors.EXIT_MISSING_PROGRAM`)
before shiv's bootstrap or qrecover is imported.  It is written in Python
that any version parses, Python 2 included, so that the line is never a
traceback or a syntax error.
"""

from __future__ import annotations

import os
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path

from qrecover.errors import EXIT_MISSING_PROGRAM, OutputError

# The manylinux2014 wheels pip downloads need glibc 2.17 or later.
GLIBC = (2, 17)
_TAG = re.compile(r"^cpython-3(\d+)-(\w+?)-linux-gnu$")


@dataclass(frozen=True, order=True)
class Target:
    """CPython 3.``minor`` on ``arch`` Linux with glibc."""

    minor: int
    arch: str

    @property
    def version(self) -> str:
        return f"3.{self.minor}"

    @property
    def tag(self) -> str:
        return f"cpython-3{self.minor}-{self.arch}-linux-gnu"

    @classmethod
    def parse(cls, version: str, arch: str) -> Target:
        match = re.match(r"^3\.(\d+)$", version)
        if match is None:
            raise ValueError(f"{version}: not a CPython 3 version (3.8, 3.13, ...)")
        return cls(int(match.group(1)), arch)


def targets_of(tags: list[str]) -> list[Target]:
    """The targets that compiled-module tags name; other tags are left out."""
    found = set()
    for tag in tags:
        match = _TAG.match(tag)
        if match:
            found.add(Target(int(match.group(1)), match.group(2)))
    return sorted(found)


def _versions(minors: list[int]) -> str:
    """3.8, 3.9, 3.10 -> '3.8-3.10'; 3.8, 3.13 -> '3.8 and 3.13'."""
    minors = sorted(set(minors))
    if len(minors) > 2 and minors == list(range(minors[0], minors[-1] + 1)):
        return f"3.{minors[0]}-3.{minors[-1]}"
    shown = [f"3.{m}" for m in minors]
    return shown[0] if len(shown) == 1 else ", ".join(shown[:-1]) + " and " + shown[-1]


def describe(targets: list[Target]) -> str:
    """For a person: 'CPython 3.8-3.13 on x86_64 or aarch64 Linux (glibc 2.17 or later)'."""
    if not targets:
        return "any CPython 3.8 or later"
    by_arch: dict[str, list[int]] = {}
    for target in targets:
        by_arch.setdefault(target.arch, []).append(target.minor)
    groups: dict[str, list[str]] = {}
    for arch in sorted(by_arch, key=lambda a: (a != "x86_64", a)):
        groups.setdefault(_versions(by_arch[arch]), []).append(arch)
    parts = [f"CPython {versions} on {' or '.join(arches)}"
             for versions, arches in groups.items()]
    return "; ".join(parts) + f" Linux (glibc {GLIBC[0]}.{GLIBC[1]} or later)"


_GUARD = '''\
# -*- coding: utf-8 -*-
# qrecover.pyz starts here.  Before anything else is imported (shiv's bootstrap,
# qrecover), check that this Python and machine are ones the compiled parts the
# pyz carries were built for; if not, say so in one line and exit %(code)d.
# Written for any Python, 2 included (no f-strings, no print function).
import os
import sys

SERVES = %(serves)r
NEEDS = %(needs)r
GLIBC = %(glibc)r


def _glibc():
    try:
        name, version = os.confstr("CS_GNU_LIBC_VERSION").split()
        return tuple(int(part) for part in version.split(".")[:2]) if name == "glibc" else None
    except Exception:
        return None


def _refusal():
    machine = os.uname()[4]
    impl = getattr(getattr(sys, "implementation", None), "name", "cpython")
    version = ".".join(str(part) for part in sys.version_info[:3])
    glibc = _glibc()
    here = "%%s %%s on %%s %%s" %% (
        "CPython" if impl == "cpython" else impl, version, machine,
        "Linux" if sys.platform.startswith("linux") else sys.platform)
    if sys.platform.startswith("linux"):
        here += " (glibc %%d.%%d)" %% glibc if glibc else " (no glibc found)"
    served = (
        sys.platform.startswith("linux") and impl == "cpython"
        and sys.version_info[0] == 3 and glibc is not None and glibc >= GLIBC
        and (sys.version_info[1] in SERVES.get(machine, ()) if SERVES is not None
             else sys.version_info[1] >= 8)
    )
    if served:
        return None
    return ("qrecover.pyz needs " + NEEDS + "; this is " + here
            + ": use recover.sh beside it, which needs no Python (see RECOVERY.txt)")


_WHY = _refusal()
if _WHY:
    sys.stderr.write(_WHY + "\\n")
    sys.exit(%(code)d)

import _bootstrap  # noqa: E402  (shiv's, as its own __main__.py does)

_bootstrap.bootstrap()
'''


def guard_source(targets: list[Target]) -> str:
    """The ``__main__.py`` that checks the running Python against ``targets``."""
    serves: dict[str, list[int]] | None = None
    if targets:
        serves = {}
        for target in targets:
            serves.setdefault(target.arch, []).append(target.minor)
    return _GUARD % {"serves": serves, "needs": describe(targets), "glibc": GLIBC,
                     "code": EXIT_MISSING_PROGRAM}


def install_guard(pyz: Path, targets: list[Target]) -> None:
    """Rewrite ``pyz`` (shiv's) with :func:`guard_source` as its ``__main__.py``.

    Every other entry is copied as it is (name, time, mode, compression), so
    a reproducible pyz stays reproducible; the new file replaces ``pyz`` only
    once complete.
    """
    partial = pyz.with_name(pyz.name + ".guarded")
    with pyz.open("rb") as original:
        shebang = original.readline() if original.read(2) == b"#!" else b""
    if shebang:
        shebang = b"#!" + shebang
    source = guard_source(targets).encode("utf-8")
    try:
        with zipfile.ZipFile(pyz) as src, partial.open("xb") as out:
            out.write(shebang)
            with zipfile.ZipFile(out, "w") as dst:
                names = [info.filename for info in src.infolist()]
                if "__main__.py" not in names or "_bootstrap/__init__.py" not in names:
                    raise OutputError(f"{pyz}: not a pyz shiv wrote (no __main__.py)")
                for info in src.infolist():
                    data = source if info.filename == "__main__.py" else src.read(info)
                    dst.writestr(info, data)
        os.chmod(partial, pyz.stat().st_mode & 0o7777)
        os.replace(partial, pyz)
    finally:
        if partial.exists():
            partial.unlink()
