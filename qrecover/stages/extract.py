"""The inner archive: an extractor unpacks (or GNU tar lists) each stored file.

The inner archives are GNU tar with sparse members (GNU old sparse in format
3, PAX sparse 1.0 in format 4): holes stay holes, so a 10 GiB mostly-empty
image takes little disk.  GNU tar is required, lists archives and captures
qubes.xml; the restore's extraction is done by the fastest installed of
:data:`EXTRACTORS`.  GNU tar writes a sparse member 512 bytes at a time (two
million ``write`` calls for 1 GiB of image, seconds of kernel time); bsdtar
(libarchive) writes each data run at once and seeks over the holes, with the
same bytes and the same holes, in about a fifth of the CPU (scripts/bench,
docs/performance.md).
"""

from __future__ import annotations

import fcntl
import shutil
import struct
import subprocess
import termios
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from qrecover.archive.members import QUBES_XML
from qrecover.runner import Stage
from qrecover.stages.decompress import pick_gunzip
from qrecover.stages.guard import GuardError, TarGuard

# Programs that extract a restored stored file, fastest first; the first one
# installed runs.  GNU tar, the recovery page's tool, is always the fallback.
EXTRACTORS = ("bsdtar", "tar")

# bsdtar's protections, stated even where they are its defaults, so that the
# result is GNU tar's as qrecover runs it, as root or not (tests/test_extractors.py):
# no owners restored (GNU tar: --no-same-owner); no ACLs, extended attributes
# (file capabilities among them: as root bsdtar would restore them) or file
# flags (GNU tar restores none of these unless asked).  Without -P, bsdtar
# also strips a leading ``/``, refuses names and hard-link targets with
# ``..``, and refuses to write through any symbolic link (libarchive's
# SECURE_NODOTDOT, SECURE_NOABSOLUTEPATHS, SECURE_SYMLINKS); as root it keeps
# modes as GNU tar does, and a set-user/group-ID bit only where the archive's
# owner is the one restoring (GNU tar keeps them all).
_BSDTAR_SAFE = ("--no-same-owner", "--no-acls", "--no-xattrs", "--no-fflags", "--no-mac-metadata")


def pick_extractor() -> str:
    """The fastest extractor on PATH (``tar`` when none is: it is then
    reported missing like any other program)."""
    return next((name for name in EXTRACTORS if shutil.which(name)), "tar")


def pick_programs() -> tuple[str, str]:
    """The run's gzip decompressor and extractor, each the fastest installed;
    a run decides them once (qrecover.engine)."""
    return pick_gunzip(), pick_extractor()


def extract_stage(target: Path, strip: int, extractor: str = "tar") -> Stage:
    """Extract into ``target``, dropping the ``backup_path`` prefix.

    ``--no-same-owner``: files belong to the user restoring, never to the
    uids of the machine that wrote the backup (even when run as root).
    GNU tar also refuses member names with ``..`` and strips leading ``/``;
    ``extractor`` is the caller's :func:`pick_extractor` (``bsdtar``: see
    :data:`_BSDTAR_SAFE`).  Both count ``--strip-components`` alike for the
    names Qubes wrote (``vm7/private.img``, ``vm3/./root.img``).
    """
    if extractor == "bsdtar":
        return Stage(
            ("bsdtar", "-x", "-f", "-", "-C", str(target), f"--strip-components={strip}",
             *_BSDTAR_SAFE)
        )
    if extractor != "tar":
        raise ValueError(f"not an extractor: {extractor}")
    return Stage(
        (
            "tar",
            "-x",
            "-f",
            "-",
            "-C",
            str(target),
            f"--strip-components={strip}",
            "--no-same-owner",
        )
    )


def gnu_fallback(stage: Stage) -> Stage | None:
    """The GNU tar command that does what a bsdtar extract stage does (None
    for any other stage): a transcript replays with it where bsdtar is absent."""
    if stage.program != "bsdtar":
        return None
    target = stage.argv[stage.argv.index("-C") + 1]
    strip = next(a for a in stage.argv if a.startswith("--strip-components="))
    return extract_stage(Path(target), int(strip.partition("=")[2]))


def stop_on_cut(stage: Stage) -> bool:
    """Whether this extractor must be stopped before it sees the end of a
    stream the guard cut off (see :class:`CuttingGuard`)."""
    return stage.program == "bsdtar"


@dataclass
class CuttingGuard(TarGuard):
    """The guard, stopping the extractor (``stop``) before it closes a stream it cut.

    bsdtar, when its input ends inside a member, still finishes that member:
    libarchive extends the file to the size its header declares (a hole in
    place of the bytes that never came) and sets its mode and mtime as if it
    were complete.  GNU tar leaves what it wrote.  Stopped first, bsdtar
    leaves, as GNU tar does, only what came before the bad chunk in the
    ``.partial``.
    """

    stop: Callable[[int], None] | None = None  # given the pipe into the extractor

    def _run(self) -> None:
        try:
            super()._run()
        except GuardError:
            if self.stop is not None:
                self.stop(self.dst)  # before run() closes it
            raise


def _unread(fd: int) -> int:
    """Bytes written into the pipe ``fd`` that its reader has not read yet."""
    return int(struct.unpack("i", fcntl.ioctl(fd, termios.FIONREAD, b"\0" * 4))[0])


def _waits_on_a_pipe(pid: int) -> bool | None:
    """Whether ``pid`` sleeps reading a pipe (None: the kernel does not say)."""
    try:
        with open(f"/proc/{pid}/wchan") as f:
            wchan = f.read()
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rpartition(")")[2].split()[0]
    except OSError:
        return None
    if wchan in ("", "0"):
        return None
    return state == "S" and "pipe" in wchan


def stop_when_drained(proc: subprocess.Popen[bytes], fd: int, patience: float = 30.0) -> None:
    """Kill ``proc`` once it has written out everything it was given through
    ``fd`` and waits for more: what came before the cut is all on disk, and
    the end of the stream it never sees."""
    deadline = time.monotonic() + patience
    while proc.poll() is None and time.monotonic() < deadline:
        if _unread(fd) == 0:
            waiting = _waits_on_a_pipe(proc.pid)
            if waiting is None:
                time.sleep(0.2)  # a last block may still be being written
                break
            if waiting:
                break
        time.sleep(0.005)
    if proc.poll() is None:
        proc.kill()


def placement(backup_path: str, dest: str, stored: str) -> tuple[int, str]:
    """``(--strip-components, output-relative folder)`` for one stored file.

    A VM's files (``vm7/private.img``) lose the ``backup_path`` prefix and go
    to ``dest`` (``work``); dom0's home is stored under its own name
    (``dom0-home/user``), so it keeps its last component and goes to the
    parent of ``dest`` (``dom0-home``).
    """
    depth = len(backup_path.split("/"))
    if stored == backup_path:
        parent = dest.rsplit("/", 1)[0] if "/" in dest else ""
        return depth - 1, parent
    return depth, dest


def list_stage() -> Stage:
    return Stage(("tar", "-t", "-f", "-"))


def qubes_xml_stage() -> Stage:
    """Write qubes.xml from its inner archive to stdout."""
    return Stage(("tar", "-x", "-O", "-f", "-", QUBES_XML))
