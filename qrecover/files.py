"""The stage after extraction: the user's files out of a restored ``private.img``.

The recovery page ends with ``sudo mount -o loop private.img``: root, and a
kernel mount of a file system from a backup that may come from a compromised
machine.  Instead, e2fsprogs' ``debugfs`` reads the image as a plain file, in
user space, read-only (``-c``: catastrophic mode, which opens the file
system read-only and does not even read the bitmaps):

1. the image's type is checked in Python first (ext2/3/4 superblock magic;
   a partition table or another format gets a message saying what it is);
2. the tree below each PATH is listed with ``ls -p <INODE>``, a directory
   level per ``debugfs`` run, and every name is checked: a name with ``/``,
   a second ``.`` or ``..``, a name seen twice in one folder, or a folder
   reached twice (a loop) means a damaged or crafted image, and nothing is
   copied.  These are exactly the names that could make ``rdump`` write
   outside its destination, or through a symbolic link it just made;
3. ``rdump <INODE> .`` then copies the tree into a fresh private staging
   folder inside the output folder (``debugfs`` runs there, so no path of
   the user's reaches debugfs's own command-line parser; inodes are given as
   ``<N>``, so no name from the image does either).  ``rdump`` keeps
   permissions and times, makes symbolic links as links and skips device
   nodes, FIFOs and sockets (it has no code that creates them);
4. the staged tree is compared with the listing (anything unexpected, such
   as a special file, is an error), set-uid/set-gid bits are dropped, files
   are given to the user running qrecover, and the tree is moved into place
   under its final name, or kept as ``NAME.partial`` if anything failed.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import stat
import struct
import tempfile
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Literal

from qrecover.errors import BackupError, OutputError, QrecoverError, UsageError
from qrecover.output import Output
from qrecover.runner import Pipeline, Stage, which

DEFAULT_PATH = "/home/user"
ROOT_INODE = 2  # the root folder of every ext2/3/4 file system
ROOT_NAME = "rw"  # what "/" of a private image is called in its VM (mounted at /rw)
EXT_MAGIC = b"\x53\xef"  # 0xEF53, little-endian
EXT_MAGIC_OFFSET = 1080  # superblock at 1024, s_magic at +56
SECTOR = 512
SBIN = ("/usr/sbin", "/sbin")  # debugfs lives here, often not on a user's PATH
LS_BATCH = 2000  # folders listed per debugfs run (keeps printf's argv small)
PARTIAL = ".partial"

Kind = Literal["dir", "file", "symlink", "special"]

# stderr lines of debugfs that do not mean anything went wrong.
_NOISE = (
    re.compile(rb"^debugfs [0-9.]+ \("),  # the version banner
    re.compile(rb"catastrophic mode"),
    # rdump chowns to the image's uids: only root may, and we do not want it.
    re.compile(rb"Operation not permitted while changing ownership"),
)
_OUTPUT_TROUBLE = (b"No space left", b"Disk quota", b"Read-only file system", b"Permission denied")
_LS_LINE = re.compile(rb"^/(\d+)/([0-7]{6})/(-?\d+)/(-?\d+)/(.*)/(\d*)/$", re.DOTALL)


class PathNotFound(UsageError):
    """A PATH asked for is not in the image."""


# -- what the image is ------------------------------------------------------


@dataclass(frozen=True)
class Partition:
    number: int
    offset: int  # bytes from the start of the image
    size: int
    content: str  # "ext2/3/4 file system", "unknown content", ...


def _read_at(f: BinaryIO, offset: int, size: int) -> bytes:
    f.seek(offset)
    return f.read(size)


def probe_content(f: BinaryIO, offset: int = 0) -> str | None:
    """What the bytes at ``offset`` hold, if we recognise it."""
    if _read_at(f, offset + EXT_MAGIC_OFFSET, 2) == EXT_MAGIC:
        return "ext2/3/4 file system"
    head = _read_at(f, offset, 8)
    if head[:6] == b"LUKS\xba\xbe":
        return "LUKS encrypted volume"
    if head[:4] == b"XFSB":
        return "XFS file system"
    if head[:4] == b"hsqs":
        return "squashfs file system"
    if _read_at(f, offset + 0x10040, 8) == b"_BHRfS_M":
        return "btrfs file system"
    if _read_at(f, offset + 4086, 10) in (b"SWAPSPACE2", b"SWAP-SPACE"):
        return "swap space"
    return None


def read_partitions(f: BinaryIO) -> tuple[str, list[Partition]] | None:
    """The partition table of a disk image (GPT or MBR), if it has one."""
    mbr = _read_at(f, 0, SECTOR)
    if len(mbr) < SECTOR or mbr[510:512] != b"\x55\xaa":
        return None
    gpt = _read_at(f, SECTOR, 92)
    parts: list[Partition] = []
    if gpt[:8] == b"EFI PART":
        entries_lba, count, entry_size = struct.unpack_from("<QII", gpt, 72)
        count = min(count, 128)
        if entry_size < 128 or entry_size > 4096:
            return "GPT", []
        table = _read_at(f, entries_lba * SECTOR, count * entry_size)
        for i in range(len(table) // entry_size):
            entry = table[i * entry_size : (i + 1) * entry_size]
            if entry[:16] == bytes(16):
                continue
            first, last = struct.unpack_from("<QQ", entry, 32)
            offset = first * SECTOR
            size = (last - first + 1) * SECTOR if last >= first else 0
            parts.append(
                Partition(i + 1, offset, size, probe_content(f, offset) or "unknown content")
            )
        return "GPT", parts
    for i in range(4):
        entry = mbr[446 + 16 * i : 462 + 16 * i]
        ptype = entry[4]
        start, sectors = struct.unpack_from("<II", entry, 8)
        if ptype == 0 or start == 0 or sectors == 0:
            continue
        if ptype == 0xEE:  # protective MBR of a GPT disk whose header we could not read
            return "GPT (protective MBR)", []
        offset = start * SECTOR
        parts.append(
            Partition(
                i + 1, offset, sectors * SECTOR, probe_content(f, offset) or "unknown content"
            )
        )
    if not parts:
        return None  # a boot-sector signature alone: a FAT/NTFS volume, not a table
    return "MBR", parts


def check_image(image: Path) -> None:
    """Raise a helpful :class:`BackupError` unless ``image`` is an ext2/3/4 file system."""
    try:
        with image.open("rb") as f:
            content = probe_content(f)
            if content == "ext2/3/4 file system":
                return
            table = None if content else read_partitions(f)
            size = image.stat().st_size
            head = _read_at(f, 0, 65536)
    except FileNotFoundError:
        raise UsageError(f"{image}: no such file") from None
    except IsADirectoryError:
        raise UsageError(f"{image}: is a folder, not an image file") from None
    except OSError as exc:
        raise UsageError(f"{image}: cannot read ({exc.strerror})") from None
    what = f"{image} is not an ext2/3/4 file system"
    if table is not None:
        kind, parts = table
        shown = "; ".join(
            f"partition {p.number} at byte offset {p.offset} ({p.content})" for p in parts
        )
        target = next(
            (p for p in parts if p.content.startswith("ext")), parts[0] if parts else None
        )
        hint = "qrecover files reads file-system images such as a VM's private.img"
        if target is not None:
            hint += (
                f"; to read partition {target.number}, mount it read-only: "
                f"sudo mount -o loop,ro,offset={target.offset} {image} /mnt"
            )
        raise BackupError(
            f"{what}: it is a whole disk image with an {kind} partition table "
            f"(like a template's or standalone VM's root.img)" + (f": {shown}" if shown else ""),
            hint=hint,
        )
    if content is not None:
        raise BackupError(f"{what}: it holds a {content}")
    if size == 0:
        raise BackupError(f"{what}: it is empty")
    if head.count(0) == len(head):
        raise BackupError(
            f"{what}: its first {len(head)} bytes are all zeros "
            "(an image never formatted, or damaged)"
        )
    raise BackupError(
        f"{what}: no ext superblock (magic 0xEF53 at byte {EXT_MAGIC_OFFSET}) and no "
        "partition table; it may be damaged or not an image at all"
    )


def find_debugfs() -> str:
    """The debugfs to run: by name if it is on PATH, else its full path in /usr/sbin or /sbin.

    Debian keeps debugfs in /sbin-style folders that an ordinary user's PATH
    may lack; the logged command then names the full path, so it can be
    pasted as it is.
    """
    if shutil.which("debugfs"):
        return "debugfs"
    for folder in SBIN:
        candidate = os.path.join(folder, "debugfs")
        if os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return candidate
    return which("debugfs")  # raises MissingProgramError naming e2fsprogs


# -- argv builders (pure) ---------------------------------------------------


def inode_spec(ino: int) -> str:
    """debugfs's way to name an inode: no path, so no quoting, ever."""
    return f"<{ino}>"


def ls_request(ino: int) -> str:
    """``ls -p``: one ``/ino/mode/uid/gid/name/size/`` line per entry, names raw."""
    return f"ls -p {inode_spec(ino)}"


def printf_argv(requests: Sequence[str]) -> list[str]:
    """Feeds debugfs its requests on stdin, one per line."""
    return ["printf", "%s\\n", *requests]


def debugfs_batch_argv(image: Path, program: str = "debugfs") -> list[str]:
    """Run the requests read from stdin (``-f -``) on ``image``, read-only (``-c``)."""
    return [program, "-c", "-f", "-", str(image)]


def debugfs_ls_argv(image: Path, ino: int, program: str = "debugfs") -> list[str]:
    """List one folder (by inode) of ``image``, read-only."""
    return [program, "-c", "-R", ls_request(ino), str(image)]


def debugfs_rdump_argv(
    image: Path, ino: int, dest: str = ".", program: str = "debugfs"
) -> list[str]:
    """Copy inode ``ino`` (and below) into ``dest``, read-only on the image.

    ``dest`` is relative to the folder debugfs runs in (the staging folder),
    so the user's output path never goes through debugfs's request parser;
    it must be a plain name.
    """
    if not dest or any(c in dest for c in ' \t\n"\\') or dest.startswith("-"):
        raise ValueError(f"unsafe rdump destination {dest!r}")
    return [program, "-c", "-R", f"rdump {inode_spec(ino)} {dest}", str(image)]


# -- the listing ------------------------------------------------------------


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
        if stat.S_ISDIR(self.mode):
            return "dir"
        if stat.S_ISREG(self.mode):
            return "file"
        if stat.S_ISLNK(self.mode):
            return "symlink"
        return "special"

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


@dataclass(frozen=True)
class RawEntry:
    ino: int
    mode: int
    name: bytes
    size: int


def parse_ls(block: bytes) -> tuple[list[RawEntry], list[str]]:
    """Entries of one ``ls -p`` output, and lines that are not entries."""
    entries: list[RawEntry] = []
    bad: list[str] = []
    for line in block.split(b"\n"):
        if not line.strip():
            continue
        m = _LS_LINE.match(line)
        if m is None:
            bad.append(line.decode("utf-8", "backslashreplace")[:120])
            continue
        entries.append(RawEntry(int(m[1]), int(m[2], 8), m[5], int(m[6]) if m[6] else 0))
    return entries, bad


def split_batch(out: bytes, requests: Sequence[str]) -> tuple[list[bytes], list[str]]:
    """Cut the output of ``debugfs -f -`` at its echoed ``debugfs: REQUEST`` lines."""
    blocks: list[bytes] = []
    problems: list[str] = []
    marks = [f"debugfs: {r}".encode() for r in requests]
    for line in out.split(b"\n"):
        if line.startswith(b"debugfs: "):
            if len(blocks) >= len(marks) or line != marks[len(blocks)]:
                problems.append("debugfs output is out of order (a crafted file name?)")
                break
            blocks.append(b"")
        elif blocks:
            blocks[-1] += line + b"\n"
    if len(blocks) != len(marks) and not problems:
        problems.append(f"debugfs answered {len(blocks)} of {len(marks)} listings")
    return blocks, problems


def _noise(line: bytes) -> bool:
    return not line.strip() or any(p.search(line) for p in _NOISE)


def _meaningful(stderr: bytes) -> list[str]:
    return [
        line.decode("utf-8", "backslashreplace").strip()
        for line in stderr.splitlines()
        if not _noise(line)
    ]


def show(text: str) -> str:
    """A name from the image, printable on one line whatever bytes it holds."""
    raw = os.fsencode(text).decode("utf-8", "backslashreplace")
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in raw)


class Debugfs:
    """Runs debugfs on one image, through the runner, announcing every command."""

    def __init__(self, image: Path, program: str, scratch: Path | None) -> None:
        self.image = image
        self.program = program
        self.scratch = scratch

    def _run(self, stages: list[Stage], cwd: Path | None = None) -> tuple[bytes, bytes, int]:
        with (
            tempfile.TemporaryFile(dir=self.scratch) as out,
            open(os.devnull, "rb") as devnull,
        ):
            pipeline = Pipeline(
                stages, stdin=devnull.fileno(), stdout=out, cwd=cwd
            )
            pipeline.start()
            try:
                results = pipeline.wait()
            except BaseException:
                pipeline.kill()  # interrupted: stop debugfs before its staging is removed
                raise
            out.seek(0)
            data = out.read()
        last = results[-1]
        for result in results[:-1]:
            if not result.ok:
                raise BackupError(f"{self.image}: {result.describe()}")
        return data, last.stderr.encode("utf-8"), last.returncode

    def list_dirs(self, inos: Sequence[int]) -> tuple[dict[int, list[RawEntry]], list[str]]:
        """``ls -p`` of each folder; a debugfs run per :data:`LS_BATCH` folders."""
        listings: dict[int, list[RawEntry]] = {}
        problems: list[str] = []
        for start in range(0, len(inos), LS_BATCH):
            batch = list(inos[start : start + LS_BATCH])
            requests = [ls_request(ino) for ino in batch]
            stages = [
                Stage(tuple(printf_argv(requests))),
                Stage(tuple(debugfs_batch_argv(self.image, self.program))),
            ]
            out, err, code = self._run(stages)
            if code != 0:
                raise BackupError(
                    f"{self.image}: debugfs exited {code}: {' '.join(_meaningful(err))[:300]}"
                )
            problems += [f"debugfs: {line}" for line in _meaningful(err)]
            blocks, cut = split_batch(out, requests)
            problems += cut
            for ino, block in zip(batch, blocks, strict=False):
                entries, bad = parse_ls(block)
                listings[ino] = entries
                problems += [f"folder <{ino}>: unreadable entry {b!r}" for b in bad]
        return listings, problems

    def rdump(self, ino: int, cwd: Path) -> list[str]:
        stage = Stage(tuple(debugfs_rdump_argv(self.image, ino, ".", self.program)))
        _out, err, code = self._run([stage], cwd=cwd)
        problems = _meaningful(err)
        if code != 0:
            problems.append(f"debugfs exited {code}")
        return problems


def _normalise(path: str) -> list[str]:
    if "\n" in path or "\0" in path:
        raise UsageError(f"{path!r}: a PATH cannot hold a newline")
    parts = [p for p in path.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise UsageError(f"{path}: '..' is not allowed in a PATH inside the image")
    return parts


def walk(fs: Debugfs, path: str) -> Tree:
    """List and check everything below ``path`` (a path inside the image)."""
    parts = _normalise(path)
    top = Entry(ROOT_INODE, stat.S_IFDIR | 0o755, ROOT_NAME, 0, "", "/")
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


# -- copying ----------------------------------------------------------------


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


def dest_name(path: str) -> str:
    parts = _normalise(path)
    return parts[-1] if parts else ROOT_NAME


def _kind_of(mode: int) -> Kind:
    if stat.S_ISDIR(mode):
        return "dir"
    if stat.S_ISREG(mode):
        return "file"
    if stat.S_ISLNK(mode):
        return "symlink"
    return "special"


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
        kind = _kind_of(st.st_mode)
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


def copy_tree(fs: Debugfs, tree: Tree, output: Output, staging: Path, index: int) -> CopyResult:
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


def open_image(image: Path) -> Debugfs:
    """Check the image and find debugfs: exit 2/4/5 before anything is written."""
    check_image(image)
    return Debugfs(image.resolve(), find_debugfs(), None)


def list_trees(request: FilesRequest) -> list[Tree]:
    fs = open_image(request.image)
    return [walk(fs, path) for path in request.paths]


def copy_files(
    request: FilesRequest, on_done: Callable[[CopyResult], None] | None = None
) -> list[CopyResult]:
    """Copy each PATH of the image into ``request.output``; one result per PATH."""
    assert request.output is not None
    fs = open_image(request.image)
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


__all__ = [
    "DEFAULT_PATH",
    "CopyResult",
    "Entry",
    "FilesRequest",
    "PathNotFound",
    "QrecoverError",
    "Tree",
    "check_image",
    "copy_files",
    "debugfs_ls_argv",
    "debugfs_rdump_argv",
    "list_trees",
    "parse_ls",
    "read_partitions",
]
