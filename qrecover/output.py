"""The output folder: checked before anything is written, and the only place
where finished (or failed) stored files are moved into their final names.

Every stored file is extracted into private staging inside the folder first;
:meth:`Output.place` then moves it to ``DIR/<vm>/NAME`` only when it is
complete and verified, and otherwise to ``NAME.partial`` (never over
anything).  No symbolic link inside the folder is ever written through.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

from qrecover.errors import OutputError

PARTIAL = ".partial"


def tree_size(path: Path) -> int:
    st = path.lstat()
    if not path.is_dir() or path.is_symlink():
        return st.st_size
    total = 0
    for dirpath, _dirs, files in os.walk(path):
        for name in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(dirpath, name)).st_size
    return total


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink()


def first_symlink(root: Path, rel: Path) -> Path | None:
    """The first of ``root/rel``'s components below ``root`` that is a symbolic link."""
    path = root
    for part in rel.parts:
        path = path / part
        if path.is_symlink():
            return path
    return None


class Output:
    """The output folder: checks before writing, and placing finished files."""

    def __init__(self, root: Path, force: bool) -> None:
        self.root = root
        self.force = force
        self.created = False

    def free_space(self) -> int | None:
        """Bytes free for us in the folder's file system (None if unknown)."""
        try:
            return shutil.disk_usage(self.root).free
        except OSError:
            return None

    def prepare(self) -> None:
        if self.root.is_symlink() and not self.root.is_dir():
            raise OutputError(f"{self.root}: is a dangling symbolic link")
        if self.root.exists() and not self.root.is_dir():
            raise OutputError(f"{self.root}: exists and is not a folder")
        if not self.root.exists():
            try:
                self.root.mkdir(parents=True)
            except OSError as exc:
                raise OutputError(f"{self.root}: cannot create ({exc.strerror})") from None
            self.created = True
        if not os.access(self.root, os.W_OK | os.X_OK):
            raise OutputError(f"{self.root}: not writable")

    def dest(self, rel: str) -> Path:
        return self.root / rel

    def conflicts(self, rels: Sequence[str]) -> list[Path]:
        return [self.root / rel for rel in rels if os.path.lexists(self.root / rel)]

    def ensure_dir(self, rel: str) -> Path:
        """Create DIR/rel, refusing any component that is not a plain folder."""
        path = self.root
        for part in Path(rel).parts:
            path = path / part
            if path.is_symlink():
                raise OutputError(f"{path}: is a symbolic link; refusing to write through it")
            if not path.exists():
                try:
                    path.mkdir()
                except OSError as exc:
                    raise OutputError(f"{path}: cannot create ({exc.strerror})") from None
            elif not path.is_dir():
                raise OutputError(f"{path}: exists and is not a folder")
        return path

    def place(self, entry: Path, folder: Path, partial: bool) -> Path:
        """Move a finished (or, with ``partial``, failed) entry to its place."""
        target = folder / (entry.name + (PARTIAL if partial else ""))
        if partial:
            n = 1
            while os.path.lexists(target):
                target = folder / f"{entry.name}{PARTIAL}.{n}"
                n += 1
        elif os.path.lexists(target):
            if not self.force:
                raise OutputError(f"{target}: already exists (use --force to replace it)")
            _remove(target)
        os.rename(entry, target)
        return target

    def write_file(self, rel: str, data: bytes) -> Path:
        """Write a small file completely under a temporary name, then rename."""
        target = self.root / rel
        if os.path.lexists(target) and not self.force:
            raise OutputError(f"{target}: already exists (use --force to replace it)")
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", dir=self.root)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(tmp, 0o666 & ~umask)
            if target.is_dir() and not target.is_symlink():
                raise OutputError(f"{target}: is a folder")
            os.replace(tmp, target)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        return target


def fsync_path(path: Path) -> None:
    flags = os.O_RDONLY | (os.O_DIRECTORY if path.is_dir() else 0) | os.O_NOFOLLOW
    try:
        fd = os.open(path, flags)
    except PermissionError:
        # A file or folder the backup made unreadable to its owner (mode 0004,
        # 0000): it cannot be opened to be flushed alone, so flush everything.
        os.sync()
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(path: Path) -> None:
    """Make a placed file (or folder of files) durable before recording it."""
    if path.is_dir() and not path.is_symlink():
        # A folder that cannot be listed (mode 0000 in the backup): flush everything.
        for dirpath, _dirs, files in os.walk(path, onerror=lambda _exc: os.sync()):
            for name in files:
                if not os.path.islink(os.path.join(dirpath, name)):
                    fsync_path(Path(dirpath, name))
            fsync_path(Path(dirpath))
    elif not path.is_symlink():
        fsync_path(path)
