"""The checked tree below a PATH of the image, before anything is copied.

The tree is listed a folder level at a time (one debugfs run per level, see
:meth:`Debugfs.list_dirs`) and every name is checked: a name with ``/``, a
second ``.`` or ``..``, a name seen twice in one folder, or a folder reached
twice (a loop) means a damaged or crafted image, and is recorded as a
problem so that nothing is copied.  These are exactly the names that could
make ``rdump`` write outside its destination, or through a symbolic link it
just made.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Literal

from qrecover.errors import BackupError, UsageError
from qrecover.files.debugfs import RawEntry, Reader

DEFAULT_PATH = "/home/user"
ROOT_NAME = "rw"  # what "/" of a private image is called in its VM (mounted at /rw)

Kind = Literal["dir", "file", "symlink", "special"]


class PathNotFound(UsageError):
    """A PATH asked for is not in the image."""


def kind_of(mode: int) -> Kind:
    """What rdump makes of an inode of this mode (it makes no special files)."""
    if stat.S_ISDIR(mode):
        return "dir"
    if stat.S_ISREG(mode):
        return "file"
    if stat.S_ISLNK(mode):
        return "symlink"
    return "special"


@dataclass(frozen=True)
class Entry:
    ino: int
    mode: int
    name: str  # os.fsdecode'd: any bytes survive (surrogateescape)
    size: int
    rel: str  # path below the copied PATH ("" for PATH itself)
    image_path: str  # path inside the image, for messages and --list

    @property
    def kind(self) -> Kind:
        return kind_of(self.mode)

    def special_kind(self) -> str:
        for test, what in (
            (stat.S_ISFIFO, "FIFO"),
            (stat.S_ISSOCK, "socket"),
            (stat.S_ISCHR, "character device"),
            (stat.S_ISBLK, "block device"),
        ):
            if test(self.mode):
                return what
        return f"unknown type {self.mode:o}"


@dataclass
class Tree:
    """Everything below one PATH of the image, checked."""

    path: str
    top: Entry
    entries: list[Entry] = field(default_factory=list)  # top first
    problems: list[str] = field(default_factory=list)  # unsafe names, loops, read errors

    def copied(self) -> list[Entry]:
        return [e for e in self.entries if e.kind != "special"]

    def specials(self) -> list[Entry]:
        return [e for e in self.entries if e.kind == "special"]


def show(text: str) -> str:
    """A name from the image, printable on one line whatever bytes it holds."""
    raw = os.fsencode(text).decode("utf-8", "backslashreplace")
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in raw)


def _normalise(path: str) -> list[str]:
    if "\n" in path or "\0" in path:
        raise UsageError(f"{path!r}: a PATH cannot hold a newline")
    parts = [p for p in path.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise UsageError(f"{path}: '..' is not allowed in a PATH inside the image")
    return parts


def dest_name(path: str) -> str:
    """The name a PATH is copied to: its last part (``/`` is ``rw``)."""
    parts = _normalise(path)
    return parts[-1] if parts else ROOT_NAME


def walk(fs: Reader, path: str) -> Tree:
    """List and check everything below ``path`` (a path inside the image)."""
    parts = _normalise(path)
    top = Entry(fs.root_ino, stat.S_IFDIR | 0o755, ROOT_NAME, 0, "", "/")
    where = ""
    for i, part in enumerate(parts):
        listings, problems = fs.list_dirs([top.ino])
        if problems:
            raise BackupError(f"{fs.image}: cannot read folder {where or '/'}: {problems[0]}")
        found = [e for e in listings.get(top.ino, []) if os.fsdecode(e.name) == part]
        where = f"{where}/{part}"
        if not found:
            full = "/" + "/".join(parts)
            raise PathNotFound(
                f"{show(full)}: not found in {fs.image}"
                + (f" (there is no {show(where)})" if where != full else ""),
                hint=f"see what it holds with: qrecover files {fs.image} --list /",
            )
        raw = found[0]
        top = Entry(raw.ino, raw.mode, part, raw.size, "", where)
        if i < len(parts) - 1 and top.kind != "dir":
            raise PathNotFound(f"{show(where)}: not a folder in {fs.image}")
    tree = Tree(where or "/", top, [top])
    if top.kind == "special":
        raise PathNotFound(f"{where}: is a {top.special_kind()}, nothing to copy")
    if top.kind != "dir":
        return tree
    seen = {top.ino}
    level = [top]
    while level:
        listings, problems = fs.list_dirs([d.ino for d in level])
        tree.problems += problems
        following: list[Entry] = []
        for folder in level:
            for child in _children(folder, listings.get(folder.ino, []), tree.problems):
                tree.entries.append(child)
                if child.kind == "dir":
                    if child.ino in seen:
                        tree.problems.append(
                            f"{show(child.image_path)}: the same folder appears twice (a loop)"
                        )
                        continue
                    seen.add(child.ino)
                    following.append(child)
        level = following
    return tree


def _children(folder: Entry, raw: Iterable[RawEntry], problems: list[str]) -> list[Entry]:
    """The entries of ``folder`` but ``.`` and ``..``; unsafe names go to ``problems``."""
    dots = {b".": 0, b"..": 0}
    names: set[bytes] = set()
    children: list[Entry] = []
    base = folder.image_path.rstrip("/")
    for e in raw:
        if e.ino == 0:
            continue  # an empty slot (lost+found is full of them); rdump skips them too
        shown = f"{show(base)}/{show(os.fsdecode(e.name))}"
        if e.name in dots:
            dots[e.name] += 1
            if dots[e.name] > 1 or (e.name == b"." and e.ino != folder.ino):
                problems.append(f"{shown}: a second {e.name.decode()!r} entry in one folder")
            continue
        if not e.name or b"/" in e.name or b"\0" in e.name:
            problems.append(f"{shown}: a file name that is not a plain name")
            continue
        if e.name in names:
            problems.append(f"{shown}: the same name twice in one folder")
            continue
        names.add(e.name)
        name = os.fsdecode(e.name)
        rel = f"{folder.rel}/{name}" if folder.rel else name
        children.append(Entry(e.ino, e.mode, name, e.size, rel, f"{base}/{name}"))
    if dots[b"."] != 1 or dots[b".."] != 1:
        problems.append(f"{show(folder.image_path)}: folder without its '.' and '..' entries")
    return children
