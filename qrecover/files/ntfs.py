"""NTFS (a Windows qube's ``private.img``) read with The Sleuth Kit: no root, no mount.

The Sleuth Kit (Debian package ``sleuthkit``) reads a file system from an
image file in user space, for forensic work on disks nobody trusts: ``fls``
lists a folder, ``icat`` writes a file's data to its standard output, and
both take the partition's offset (``-o``, in 512-byte sectors).  ntfs-3g's
``ntfsls``/``ntfscat`` have no such option, and libguestfs boots a
virtual machine to mount the file system in; neither fits.

As with debugfs, every request names an MFT entry number (an "inode"),
never a path: a folder is listed with ``fls -l -u -z UTC [-o N] -f ntfs
IMAGE INODE`` (one line per entry: type, address, name, times, size, ids),
each name is checked by :mod:`qrecover.files.listing` like an ext one, and a
checked tree is copied in Python: folders made here, each file's data by
``icat -f ntfs IMAGE INODE`` into a file opened here (never through a
symbolic link, never over an existing file).  NTFS's own metadata files
(MFT entries 0-15: ``$MFT``, ``$Bitmap``, ...), the Sleuth Kit's virtual
``$OrphanFiles`` folder, deleted entries and alternate data streams
(``name:stream``) are not copied.  NTFS keeps no Unix permissions: folders
are made 0755 and files 0644, with the file's modification time.
"""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import stat
import tempfile
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path

from qrecover.errors import BackupError
from qrecover.files.debugfs import RawEntry, inode_spec
from qrecover.runner import Pipeline, Stage, render_pipeline, which

NTFS_ROOT = 5  # the root folder's MFT entry
FIRST_USER_ENTRY = 16  # entries below are NTFS's own metadata files
_TIME = r"(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d) \(UTC\)"
# fls -l: "r/r 64-128-2:\tNAME\tMTIME\tATIME\tCTIME\tCRTIME\tSIZE\tUID\tGID"
_FLS_LINE = re.compile(
    rb"^([-a-zA-Z])/([-a-zA-Z]) (\* )?(\d+)(?:-(\d+)-(\d+))?(?:\(realloc\))?:\t(.*)"
    + rb"\t" + _TIME.encode() + (rb"\t" + _TIME.encode()) * 3 + rb"\t(\d+)\t\d+\t\d+$",
    re.DOTALL,
)
_MODES = {b"d": stat.S_IFDIR | 0o755, b"r": stat.S_IFREG | 0o644}


def find_sleuthkit() -> str:
    """The folder of fls and icat, or exit 5 naming the package (sleuthkit)."""
    which("icat")
    return os.path.dirname(which("fls"))


def fls_argv(image: Path, ino: int, offset: int = 0) -> list[str]:
    """List folder ``ino`` (long form, no deleted entries, times in UTC)."""
    return ["fls", "-l", "-u", "-z", "UTC", *_at(offset), "-f", "ntfs", str(image), str(ino)]


def icat_argv(image: Path, ino: int, offset: int = 0) -> list[str]:
    """Write file ``ino``'s data (its unnamed $DATA stream) to standard output."""
    return ["icat", *_at(offset), "-f", "ntfs", str(image), str(ino)]


def _at(offset: int) -> list[str]:
    return ["-o", str(offset // 512)] if offset else []


def _when(text: bytes) -> int | None:
    try:
        moment = datetime.strptime(text.decode(), "%Y-%m-%d %H:%M:%S")
    except ValueError:  # 0000-00-00 00:00:00: no time
        return None
    return int(moment.replace(tzinfo=timezone.utc).timestamp())


def parse_fls(out: bytes) -> tuple[list[tuple[RawEntry, int | None]], list[str]]:
    """The entries of one ``fls -l`` listing with their mtimes; lines it could not read.

    Metadata files, virtual entries and alternate data streams are left out.
    """
    entries: list[tuple[RawEntry, int | None]] = []
    bad: list[str] = []
    for line in out.split(b"\n"):
        if not line.strip():
            continue
        m = _FLS_LINE.match(line)
        if m is None:
            bad.append(line.decode("utf-8", "backslashreplace")[:120])
            continue
        kind, ino, attr_type, name = m[2], int(m[4]), m[5], m[7]
        if ino < FIRST_USER_ENTRY or kind == b"V" or m[3]:
            continue  # $MFT & co, $OrphanFiles, deleted
        if b":" in name and attr_type == b"128":
            continue  # NAME:STREAM, an alternate data stream of NAME
        mode = _MODES.get(kind, stat.S_IFIFO)  # anything else: not copied
        entries.append((RawEntry(ino, mode, name, int(m[12])), _when(m[8])))
    return entries, bad


class Sleuth:
    """Runs fls and icat on one NTFS file system, through the runner."""

    root_ino = NTFS_ROOT

    def __init__(self, image: Path, folder: str, scratch: Path | None, offset: int = 0) -> None:
        self.image = image
        self.folder = folder  # where fls and icat are; only logged by name
        self.scratch = scratch
        self.offset = offset
        self.children: dict[int, list[RawEntry]] = {}
        self.mtimes: dict[int, int | None] = {}

    def _run(self, argv: list[str], out: int, shown: str | None = None) -> tuple[int, str]:
        with open(os.devnull, "rb") as devnull:
            pipeline = Pipeline([Stage(tuple(argv))], stdin=devnull.fileno(), stdout=out,
                                shown=shown)
            pipeline.start()
            try:
                (result,) = pipeline.wait()
            except BaseException:
                pipeline.kill()
                raise
        return result.returncode, result.describe()

    def list_dirs(self, inos: Sequence[int]) -> tuple[dict[int, list[RawEntry]], list[str]]:
        """``fls`` of each folder, with ``.`` and ``..`` (which fls does not show) added."""
        listings: dict[int, list[RawEntry]] = {}
        problems: list[str] = []
        for ino in inos:
            with tempfile.TemporaryFile(dir=self.scratch) as out:
                code, said = self._run(fls_argv(self.image, ino, self.offset), out.fileno())
                out.seek(0)
                data = out.read()
            if code != 0:
                raise BackupError(f"{self.image}: folder {inode_spec(ino)}: {said}")
            found, bad = parse_fls(data)
            problems += [f"folder <{ino}>: unreadable entry {b!r}" for b in bad]
            dots = [RawEntry(ino, stat.S_IFDIR | 0o755, b".", 0),
                    RawEntry(ino, stat.S_IFDIR | 0o755, b"..", 0)]
            listings[ino] = dots + [entry for entry, _ in found]
            self.children[ino] = [entry for entry, _ in found]
            self.mtimes.update((entry.ino, mtime) for entry, mtime in found)
        return listings, problems

    def rdump(self, ino: int, cwd: Path) -> list[str]:
        """Copy the listed tree below ``ino`` into ``cwd/<ino>``, as debugfs's rdump would."""
        problems: list[str] = []
        top = cwd / inode_spec(ino)
        if ino in self.children or ino == self.root_ino:
            self._folder(ino, top, problems)
        else:
            self._file(ino, top, problems)
        return problems

    def _folder(self, ino: int, where: Path, problems: list[str]) -> None:
        """Make the folder tree (no recursion: a crafted image may nest deeply)."""
        made: list[tuple[int, Path]] = []
        todo = [(ino, where)]
        while todo:
            folder, place = todo.pop()
            place.mkdir(mode=0o755)
            made.append((folder, place))
            for child in self.children.get(folder, []):
                path = place / os.fsdecode(child.name)  # a name listing.walk checked
                if stat.S_ISDIR(child.mode):
                    todo.append((child.ino, path))
                elif stat.S_ISREG(child.mode):
                    self._file(child.ino, path, problems)
        for folder, place in reversed(made):  # deepest last made, first stamped
            self._stamp(folder, place)

    def _file(self, ino: int, place: Path, problems: list[str]) -> None:
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        try:
            fd = os.open(place, flags, 0o644)
        except OSError as exc:
            problems.append(f"{place.name}: cannot create ({exc.strerror})")
            return
        try:
            argv = icat_argv(self.image, ino, self.offset)
            shown = render_pipeline([Stage(tuple(argv))], stdout=place.name)
            code, said = self._run(argv, fd, f"(cd {shlex.quote(str(place.parent))} && {shown})")
        finally:
            os.close(fd)
        if code != 0:
            problems.append(said)
        self._stamp(ino, place)

    def _stamp(self, ino: int, path: Path) -> None:
        mtime = self.mtimes.get(ino)
        if mtime is not None:
            with contextlib.suppress(OSError):
                os.utime(path, (mtime, mtime), follow_symlinks=False)
