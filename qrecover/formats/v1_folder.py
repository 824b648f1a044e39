"""Format 1's folder: what Qubes R1's ``qvm-backup`` left, read without following links.

R1 wrote no archive: a folder ``qubes-YYYY-MM-DD-HHMMSS`` mirroring
/var/lib/qubes, made with ``mkdir -p`` and one ``cp -rp`` per file
(fixtures/README.md, "Format 1"): ``qubes.xml``, ``appvms/NAME/`` and
``servicevms/NAME/`` (a VM's files, each copied on its own),
``vm-templates/NAME/`` (a template's whole folder) and ``dom0-home/USER/``.

The folder is scanned once, with ``lstat`` only: a symbolic link where a
folder of that tree must be is refused, never followed (it could make the
restore read files from anywhere on this machine).  Each thing found becomes
one stored file of the engine, named as format 3 names them (a VM's
``appvms/work/private.img``, a template's ``vm-templates/NAME/.``, dom0's
``dom0-home/USER``), whose one "chunk" is ``NAME.000``: the engine's
checks of names, order and ownership then hold for format 1 unchanged.
"""

from __future__ import annotations

import os
import re
import stat
from dataclasses import dataclass, field
from pathlib import Path

from qrecover.archive.members import QUBES_XML, validate_stored_name
from qrecover.errors import BackupError

# The folders of /var/lib/qubes R1 backed up, and how their entries are stored.
PER_FILE = ("appvms", "servicevms")  # each file of a VM on its own, as R1 copied them
WHOLE = "vm-templates"  # a template's folder whole (format 3's ``vmN/.``)
DOM0_HOME = "dom0-home"
KNOWN = (*PER_FILE, WHOLE, DOM0_HOME)
# One name of the tree, as R1's writer made them (VM names, its file names).
_COMPONENT = re.compile(r"^[A-Za-z0-9_+-][A-Za-z0-9_.+-]{0,127}$")


def _shown(name: str) -> str:
    return name.encode("ascii", "backslashreplace").decode("ascii")[:120]


# What tar -c may add per entry: its header, a long-name header and its data
# block, and a pax header; generous, so that the budget never stops a real folder.
_PER_ENTRY = 3 * 512


def tree_bytes(path: Path, sockets: list[str] | None = None) -> int:
    """What ``tar -c`` of ``path`` can hold at most, links not followed.

    Apparent sizes (tar stores no more of a file, less of a sparse one) plus
    room for every entry's headers: the guard's budget is built on it, and
    must never stop a genuine folder of many small files, whatever the file
    system (one that compresses makes block counts useless here).  Sockets,
    which tar -c leaves out with only a warning, are added to ``sockets``.
    """
    found = sockets if sockets is not None else []
    try:
        st = os.lstat(path)
    except OSError:
        return 0
    if not stat.S_ISDIR(st.st_mode):
        if stat.S_ISSOCK(st.st_mode):
            found.append(str(path))
        return _PER_ENTRY + (st.st_size if stat.S_ISREG(st.st_mode) else 0)
    total = _PER_ENTRY
    for dirpath, dirs, files in os.walk(path):  # os.walk does not follow links
        total += _PER_ENTRY * len(dirs)
        for name in files:
            total += _PER_ENTRY
            try:
                fst = os.lstat(os.path.join(dirpath, name))
            except OSError:
                continue
            if stat.S_ISREG(fst.st_mode):
                total += fst.st_size
            elif stat.S_ISSOCK(fst.st_mode):
                found.append(os.path.join(dirpath, name))
    return total


@dataclass
class Scan:
    """What the folder holds: stored files (name -> size), the VMs' folders,
    dom0's home, and what was refused (problems) or left alone (notes)."""

    stored: dict[str, int] = field(default_factory=dict)
    folders: set[str] = field(default_factory=set)  # "appvms/work", real folders only
    dom0: str | None = None  # "dom0-home/user"
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def qubes_xml_file(root: Path) -> int:
    """qubes.xml's size; it must be a regular file of the folder, never a link."""
    path = root / QUBES_XML
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        raise BackupError(
            f"{path}: missing: this folder looks like a format-1 backup (Qubes R1), whose "
            "qubes.xml says which VMs it holds; without it nothing can be restored"
        ) from None
    except OSError as exc:
        raise BackupError(f"{path}: cannot read it ({exc.strerror})") from None
    if stat.S_ISLNK(st.st_mode):
        raise BackupError(
            f"{path}: is a symbolic link (to {_shown(os.readlink(path))!r}); refusing to "
            "follow it: a format-1 backup's qubes.xml is a file in its folder"
        )
    if not stat.S_ISREG(st.st_mode):
        raise BackupError(f"{path}: not a regular file")
    return st.st_size


class _Scanner:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.scan = Scan()

    def folder(self, rel: str) -> bool:
        """Whether ``rel`` is a real folder (a link there is refused, not followed)."""
        path = self.root / rel
        try:
            st = os.lstat(path)
        except OSError as exc:
            self.scan.problems.append(f"{rel}: cannot read it ({exc.strerror}); not restored")
            return False
        if stat.S_ISLNK(st.st_mode):
            self.scan.problems.append(
                f"{rel}: is a symbolic link (to {_shown(os.readlink(path))!r}) where the "
                "backup has a folder; refused, never followed: not restored"
            )
            return False
        if not stat.S_ISDIR(st.st_mode):
            self.scan.problems.append(f"{rel}: not a folder, where R1's writer made one; "
                                      "not restored")
            return False
        return True

    def names(self, rel: str) -> list[str]:
        """The entries of folder ``rel`` whose names R1 could have written."""
        try:
            entries = sorted(os.listdir(self.root / rel))
        except OSError as exc:
            self.scan.problems.append(f"{rel}: cannot list it ({exc.strerror}); not restored")
            return []
        good = []
        for name in entries:
            if _COMPONENT.match(name):
                good.append(name)
            else:
                self.scan.problems.append(
                    f"{rel}/{_shown(name)}: a name R1's writer never gave a file there; "
                    "not restored"
                )
        return good

    def add(self, stored: str) -> None:
        validate_stored_name(stored)  # the names above always pass; kept as a last check
        sockets: list[str] = []
        self.scan.stored[stored] = tree_bytes(self.root / stored, sockets)
        for path in sockets:
            rel = _shown(os.path.relpath(path, self.root))
            self.scan.problems.append(f"{stored}: {rel} (socket, not restored)")

    def run(self) -> Scan:
        for top in self.names(""):
            if top == QUBES_XML:
                continue
            if top not in KNOWN:
                self.scan.notes.append(f"{top}: not something R1's backup writes; left alone")
                continue
            if not self.folder(top):
                continue
            names = [n for n in self.names(top) if self.folder(f"{top}/{n}")]
            if top == DOM0_HOME:
                self._dom0(names)
                continue
            for name in names:
                rel = f"{top}/{name}"
                self.scan.folders.add(rel)
                if top == WHOLE:
                    self.add(f"{rel}/.")
                else:
                    for entry in self.names(rel):
                        self.add(f"{rel}/{entry}")
        return self.scan

    def _dom0(self, names: list[str]) -> None:
        if len(names) > 1:
            self.scan.problems.append(
                f"{DOM0_HOME}: holds {len(names)} folders ({', '.join(names[:5])}), where R1 "
                "wrote one, the home of dom0's user: dom0's home not restored"
            )
            return
        if names:
            self.scan.dom0 = f"{DOM0_HOME}/{names[0]}"
            self.add(self.scan.dom0)


def scan_folder(root: Path) -> Scan:
    """Scan a format-1 backup folder; raises BackupError if it cannot be read at all."""
    try:
        os.listdir(root)
    except OSError as exc:
        raise BackupError(f"{root}: cannot list it ({exc.strerror})") from None
    return _Scanner(root).run()


def path_is_safe(root: Path, stored: str) -> str | None:
    """Checked again just before ``tar -c`` reads ``stored``: every folder above
    it must still be a real folder (a link put there since the scan would let
    tar read elsewhere).  The problem, or None."""
    parts = [p for p in stored.split("/") if p != "."]
    # ``NAME/.`` is read through NAME itself, so NAME must be a folder too.
    last = len(parts) + 1 if stored.endswith("/.") else len(parts)
    for depth in range(1, last):
        rel = "/".join(parts[:depth])
        try:
            st = os.lstat(root / rel)
        except OSError as exc:
            return f"{stored}: {rel} cannot be read ({exc.strerror})"
        if not stat.S_ISDIR(st.st_mode):
            return f"{stored}: {rel} is no longer a folder (a link?); refused, never followed"
    return None
