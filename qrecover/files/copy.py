"""Copying a checked tree out of the image, and the two entry points.

``rdump <INODE> .`` copies the tree into a fresh private staging folder
inside the output folder (debugfs runs there, so no path of the user's
reaches debugfs's own command-line parser; inodes are given as ``<N>``, so
no name from the image does either).  ``rdump`` keeps permissions and
times, makes symbolic links as links and skips device nodes, FIFOs and
sockets (it has no code that creates them).  The staged tree is then
compared with the listing (anything unexpected, such as a special file, is
an error), set-uid/set-gid bits are dropped, files are given to the user
running qrecover, and the tree is moved into place under its final name, or
kept as ``NAME.partial`` if anything failed.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from qrecover.errors import BackupError, OutputError, UsageError
from qrecover.files.debugfs import Debugfs, Reader, find_debugfs, inode_spec
from qrecover.files.image import NTFS, Volume, find_volume
from qrecover.files.listing import DEFAULT_PATH, Kind, Tree, dest_name, kind_of, show, walk
from qrecover.files.ntfs import Sleuth, find_sleuthkit
from qrecover.output import Output

# debugfs's words for a write that failed because of the output folder.
_OUTPUT_TROUBLE = (b"No space left", b"Disk quota", b"Read-only file system", b"Permission denied")


@dataclass
class CopyResult:
    path: str  # inside the image
    place: Path | None = None
    files: int = 0
    folders: int = 0
    links: int = 0
    bytes: int = 0
    skipped: list[str] = field(default_factory=list)  # special files, for notes
    error: str | None = None
    output_trouble: bool = False

    @property
    def ok(self) -> bool:
        return self.error is None


def _open_up(top: Path) -> dict[str, int]:
    """Give us u+rwx on every staged folder (to check and move it); remember the modes."""
    modes: dict[str, int] = {}
    if top.is_symlink() or not top.is_dir():
        return modes
    stack = [top]
    while stack:
        folder = stack.pop()
        mode = stat.S_IMODE(folder.lstat().st_mode)
        if mode & 0o700 != 0o700:
            modes[str(folder.relative_to(top))] = mode
            os.chmod(folder, mode | 0o700)
        with os.scandir(folder) as it:
            stack += [Path(d.path) for d in it if d.is_dir(follow_symlinks=False)]
    return modes


def _force_rmtree(path: Path) -> None:
    def retry(func: Callable[..., object], failed: str, _exc: object) -> None:
        with contextlib.suppress(OSError):
            os.chmod(os.path.dirname(failed), 0o700)
            func(failed)

    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, onerror=retry)
    elif os.path.lexists(path):
        path.unlink()


def _check_staged(staged: Path, tree: Tree, result: CopyResult) -> list[str]:
    """Compare the staged tree with the listing; fix owner and set-id bits."""
    problems: list[str] = []
    expected = {e.rel: e for e in tree.copied()}
    found: dict[str, tuple[Kind, int]] = {}
    as_root = os.geteuid() == 0
    uid, gid = os.geteuid(), os.getegid()
    if not os.path.lexists(staged):
        return [f"{show(tree.path)}: debugfs copied nothing"]
    todo = [staged]
    while todo:
        path = todo.pop()
        st = path.lstat()
        rel = "" if path == staged else str(path.relative_to(staged))
        kind = kind_of(st.st_mode)
        found[rel] = (kind, st.st_size)
        if kind == "special":
            # rdump never makes these; remove it whatever it is, never open it.
            path.unlink()
            problems.append(f"{show(rel)}: unexpected special file in the copy; removed")
            continue
        if as_root:
            os.lchown(path, uid, gid)  # like tar --no-same-owner: yours, not the image's uids
        if kind == "file":
            result.files += 1
            result.bytes += st.st_size
            if st.st_mode & (stat.S_ISUID | stat.S_ISGID):
                os.chmod(path, stat.S_IMODE(st.st_mode) & ~(stat.S_ISUID | stat.S_ISGID))
        elif kind == "symlink":
            result.links += 1
        else:
            result.folders += 1
            with os.scandir(path) as it:
                todo += [Path(d.path) for d in it]
    for rel, (kind, size) in found.items():
        entry = expected.get(rel)
        if entry is None:
            if kind != "special":
                problems.append(f"{show(rel)}: in the copy but not in the listing")
        elif entry.kind != kind:
            problems.append(
                f"{show(entry.image_path)}: copied as a {kind}, listed as a {entry.kind}"
            )
        elif kind == "file" and size != entry.size:
            # rdump goes on after a read or write error: a short file is how it shows.
            problems.append(f"{show(entry.image_path)}: copied {size} of its {entry.size} bytes")
    missing = [rel for rel in expected if rel not in found]
    if missing:
        problems.append(
            f"{len(missing)} listed item(s) not copied, e.g. {show(tree.path)}/{show(missing[0])}"
        )
    return problems


def _place(output: Output, staged: Path, final: str, partial: bool, modes: dict[str, int]) -> Path:
    """Move the staged tree to DIR/final (or a .partial name), then restore what we opened up."""
    top_st = staged.lstat()
    named = staged.with_name(final)
    os.rename(staged, named)
    place = output.place(named, output.root, partial=partial)
    # Deepest first, the top last: a folder made unsearchable again hides its contents.
    for rel, mode in sorted(modes.items(), key=lambda item: (item[0] == ".", -item[0].count("/"))):
        os.chmod(place / rel if rel != "." else place, mode)
    if stat.S_ISDIR(top_st.st_mode):
        # Moving a folder rewrites its '..' entry; keep the image's times.
        os.utime(place, ns=(top_st.st_atime_ns, top_st.st_mtime_ns), follow_symlinks=False)
    return place


def copy_tree(fs: Reader, tree: Tree, output: Output, staging: Path, index: int) -> CopyResult:
    """rdump one checked tree into staging, check it, and move it into place."""
    result = CopyResult(tree.path)
    result.skipped = [f"{show(e.image_path)} ({e.special_kind()})" for e in tree.specials()]
    work = staging / str(index)
    work.mkdir(mode=0o700)
    problems = fs.rdump(tree.top.ino, work)
    staged = work / inode_spec(tree.top.ino)
    modes = _open_up(staged) if os.path.lexists(staged) else {}
    problems += _check_staged(staged, tree, result)
    if problems:
        result.error = "; ".join(problems[:3]) + (
            f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        )
        result.output_trouble = any(m.decode() in p for p in problems for m in _OUTPUT_TROUBLE)
    if not os.path.lexists(staged):
        return result
    final = dest_name(tree.path)
    try:
        result.place = _place(output, staged, final, partial=not result.ok, modes=modes)
    except OutputError as exc:
        result.error = str(exc)
        result.output_trouble = True
        result.place = _place(output, work / final, final, partial=True, modes=modes)
    return result


@dataclass
class FilesRequest:
    image: Path
    paths: Sequence[str] = (DEFAULT_PATH,)
    output: Path | None = None
    force: bool = False
    partition: int | None = None  # --partition N of a whole-disk image


def reader_for(volume: Volume) -> Reader:
    """debugfs for ext2/3/4, The Sleuth Kit for NTFS: exit 5 if it is not installed."""
    image = volume.image.resolve()
    if volume.content == NTFS:
        return Sleuth(image, find_sleuthkit(), None, volume.offset)
    return Debugfs(image, find_debugfs(), None, volume.offset)


def open_image(image: Path, partition: int | None = None) -> Reader:
    """Find the file system to read and its reader: exit 2/4/5 before anything is written."""
    return reader_for(find_volume(image, partition))


def list_trees(request: FilesRequest) -> list[Tree]:
    fs = open_image(request.image, request.partition)
    return [walk(fs, path) for path in request.paths]


def copy_files(
    request: FilesRequest, on_done: Callable[[CopyResult], None] | None = None
) -> list[CopyResult]:
    """Copy each PATH of the image into ``request.output``; one result per PATH."""
    assert request.output is not None
    fs = open_image(request.image, request.partition)
    names = [dest_name(p) for p in request.paths]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise UsageError(f"two PATHs would both be copied to {dupes[0]}; copy them one at a time")
    trees = [walk(fs, path) for path in request.paths]
    for tree in trees:
        if tree.problems:
            raise BackupError(
                f"{fs.image}: {show(tree.path)} has unsafe or unreadable entries, so nothing "
                f"was copied: {tree.problems[0]}"
                + (f" (and {len(tree.problems) - 1} more)" if len(tree.problems) > 1 else ""),
                hint="the image is damaged or crafted; --list shows the tree, and a PATH "
                "below the bad folder can still be copied",
            )
    output = Output(request.output, request.force)
    output.prepare()
    if not request.force:
        existing = output.conflicts(names)
        if existing:
            raise OutputError(
                f"would overwrite {existing[0]}", hint="choose another --output, or use --force"
            )
    try:
        staging = Path(tempfile.mkdtemp(prefix=".qrecover-files-", dir=output.root))
    except OSError as exc:
        raise OutputError(
            f"{output.root}: cannot create a staging folder ({exc.strerror})"
        ) from None
    fs.scratch = staging
    results: list[CopyResult] = []
    try:
        for index, tree in enumerate(trees):
            result = copy_tree(fs, tree, output, staging, index)
            results.append(result)
            if on_done is not None:
                on_done(result)
    finally:
        _force_rmtree(staging)
        if output.created and not any(r.place for r in results):
            with contextlib.suppress(OSError):
                output.root.rmdir()
    return results
