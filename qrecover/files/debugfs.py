"""e2fsprogs' debugfs: finding it, its argv, reading its answers, running it.

Every request names an inode (``<N>``), never a path, so no name from the
image and no path of the user's goes through debugfs's own request parser.
Folders are listed with ``ls -p`` (one ``/ino/mode/uid/gid/name/size/`` line
per entry, the name as raw bytes), many per run: the requests go to
``debugfs -c -f -`` on stdin, fed by ``printf``, and its output is cut at the
``debugfs: REQUEST`` line it echoes before each answer.  ``-c`` opens the
image read-only.  Both programs start through :mod:`qrecover.runner`.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from qrecover.errors import BackupError, UsageError
from qrecover.runner import Pipeline, Stage, which

SBIN = ("/usr/sbin", "/sbin")  # debugfs lives here, often not on a user's PATH
LS_BATCH = 2000  # folders listed per debugfs run (keeps printf's argv small)

# stderr lines of debugfs that do not mean anything went wrong.
_NOISE = (
    re.compile(rb"^debugfs [0-9.]+ \("),  # the version banner
    re.compile(rb"catastrophic mode"),
    # rdump chowns to the image's uids: only root may, and we do not want it.
    re.compile(rb"Operation not permitted while changing ownership"),
)
_LS_LINE = re.compile(rb"^/(\d+)/([0-7]{6})/(-?\d+)/(-?\d+)/(.*)/(\d*)/$", re.DOTALL)


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


def device(image: Path, offset: int = 0) -> str:
    """The image as debugfs names it: ``IMAGE?offset=N`` for a partition at byte N.

    The ext2fs library cuts the name at its first ``?`` to read options
    from the rest, so a path holding one cannot be named at all.
    """
    if "?" in str(image):
        raise UsageError(
            f"{image}: debugfs cannot open a path holding '?'",
            hint="rename it, or make a symbolic link to it whose path has none",
        )
    return f"{image}?offset={offset}" if offset else str(image)


def debugfs_batch_argv(image: Path, program: str = "debugfs", offset: int = 0) -> list[str]:
    """Run the requests read from stdin (``-f -``) on ``image``, read-only (``-c``)."""
    return [program, "-c", "-f", "-", device(image, offset)]


def debugfs_ls_argv(image: Path, ino: int, program: str = "debugfs", offset: int = 0) -> list[str]:
    """List one folder (by inode) of ``image``, read-only."""
    return [program, "-c", "-R", ls_request(ino), device(image, offset)]


def debugfs_rdump_argv(
    image: Path, ino: int, dest: str = ".", program: str = "debugfs", offset: int = 0
) -> list[str]:
    """Copy inode ``ino`` (and below) into ``dest``, read-only on the image.

    ``dest`` is relative to the folder debugfs runs in (the staging folder),
    so the user's output path never goes through debugfs's request parser;
    it must be a plain name.
    """
    if not dest or any(c in dest for c in ' \t\n"\\') or dest.startswith("-"):
        raise ValueError(f"unsafe rdump destination {dest!r}")
    return [program, "-c", "-R", f"rdump {inode_spec(ino)} {dest}", device(image, offset)]


# -- its answers (pure) -----------------------------------------------------


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


# -- running it -------------------------------------------------------------


class Reader(Protocol):
    """What lists and copies a file system's folders: debugfs here, fls/icat for NTFS."""

    image: Path
    root_ino: int
    scratch: Path | None

    def list_dirs(self, inos: Sequence[int]) -> tuple[dict[int, list[RawEntry]], list[str]]: ...
    def rdump(self, ino: int, cwd: Path) -> list[str]: ...


class Debugfs:
    """Runs debugfs on one image, through the runner, announcing every command."""

    root_ino = 2  # the root folder of every ext2/3/4 file system

    def __init__(self, image: Path, program: str, scratch: Path | None, offset: int = 0) -> None:
        self.image = image
        self.program = program
        self.scratch = scratch
        self.offset = offset  # of the partition read, in bytes (0: the whole image)
        device(image, offset)  # a path debugfs cannot open stops us here

    def _run(self, stages: list[Stage], cwd: Path | None = None) -> tuple[bytes, bytes, int]:
        # The runner logs it as it starts it: (cd CWD && debugfs ...)
        with tempfile.TemporaryFile(dir=self.scratch) as out, open(os.devnull, "rb") as devnull:
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
                Stage(tuple(debugfs_batch_argv(self.image, self.program, self.offset))),
            ]
            out, err, code = self._run(stages)
            if code != 0:
                raise BackupError(
                    f"{self.image}: debugfs exited {code}: {' '.join(_meaningful(err))[:300]}"
                )
            problems += [f"debugfs: {line}" for line in _meaningful(err)]
            blocks, cut = split_batch(out, requests)
            problems += cut
            for ino, block in zip(batch, blocks):
                entries, bad = parse_ls(block)
                listings[ino] = entries
                problems += [f"folder <{ino}>: unreadable entry {b!r}" for b in bad]
        return listings, problems

    def answers(self, requests: Sequence[str]) -> list[bytes]:
        """What debugfs answers to each request (requests naming inodes only),
        :data:`LS_BATCH` to a run; an answer it did not give is empty."""
        found: list[bytes] = []
        for start in range(0, len(requests), LS_BATCH):
            batch = list(requests[start : start + LS_BATCH])
            stages = [
                Stage(tuple(printf_argv(batch))),
                Stage(tuple(debugfs_batch_argv(self.image, self.program))),
            ]
            out, err, code = self._run(stages)
            if code != 0:
                raise BackupError(
                    f"{self.image}: debugfs exited {code}: {' '.join(_meaningful(err))[:300]}"
                )
            blocks, _cut = split_batch(out, batch)
            found += blocks + [b""] * (len(batch) - len(blocks))
        return found

    def rdump(self, ino: int, cwd: Path) -> list[str]:
        """``rdump <ino> .`` run in ``cwd``; what went wrong, if anything."""
        argv = debugfs_rdump_argv(self.image, ino, ".", self.program, self.offset)
        stage = Stage(tuple(argv))
        _out, err, code = self._run([stage], cwd=cwd)
        problems = _meaningful(err)
        if code != 0:
            problems.append(f"debugfs exited {code}")
        return problems
