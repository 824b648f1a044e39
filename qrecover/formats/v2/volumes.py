"""Format 2's inner archive: GNU ``tar -M`` fed one checked volume at a time.

The plaintext chunks of a stored file are the volumes of one GNU
multi-volume tar; they cannot be concatenated (each later volume may begin
with a GNU ``M`` header naming the member it continues), so GNU tar itself
does the multi-volume logic, each volume a file in private scratch:

    tar -x -M -f SCRATCH/volume-1 --new-volume-script=HANDSHAKE ...

GNU tar closes a volume at its end and runs the new-volume script (with
``sh -c``; TAR_VOLUME is the volume it wants next, TAR_FD a descriptor on
which the script may name the file that holds it).  The script writes that
number into the FIFO ``ask`` and reads the answer from its stdin; qrecover
answers once the volume is in scratch, and the script names
``SCRATCH/volume-N`` on TAR_FD.  Anything but the number (there is no next
volume, or qrecover is gone and the script reads end-of-file) makes the
script fail, and tar stops ("... command failed") instead of prompting on a
terminal.  tar only ever opens regular files, so nothing can leave it
waiting in open() for ever, even a SIGKILL of qrecover.  Only qrecover's own
scratch paths are on that command line; a volume is removed once tar asks
for the next.

Every volume goes through :class:`VolumeGuard` on its way into scratch: the
guard of the other formats (device nodes and FIFOs dropped, names kept
under the stored file, the expansion budget) carried across volumes, which
understands the ``M`` header at a volume's start.

``restore --salvage`` (qrecover.salvage) may feed a volume that failed its
check, or zeros standing for a missing one.  GNU tar reads a later volume
only if its ``M`` header names the member it was in and the offset it had
reached; a damaged one makes tar refuse that volume and every volume after
it.  So for such a volume only, a continuation header that does not check
out is rebuilt from what the guard knows (the member's header, how much of
its data is left) and tar reads on; and the guard notes where each member's
data lies in the volumes (``layout``), so that the unverified bytes can be
told as ranges of the restored files.
"""

from __future__ import annotations

import contextlib
import os
import select
import shlex
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from qrecover import signals
from qrecover.archive.tarheaders import BLOCK, MAX_EXTENDED, ZERO_BLOCK, checksum_ok, number, text
from qrecover.errors import FeedFailed, QrecoverError, StoredFileError
from qrecover.runner import CommandLog, Pipeline, Stage
from qrecover.stages.guard import (
    DESCRIBE_TYPE,
    KEPT_TYPES,
    PREFIX_TYPES,
    TYPES_WITH_DATA,
    GuardError,
    TarGuard,
    extended,
    header_size,
    member_name,
    pax_size,
    round_up,
)
from qrecover.stages.sparse import Extent, old_gnu_map

_COPY = 1024 * 1024
# How a script runs tar for format 2 (qrecover.formats.v2.sh): its new-volume
# script gives tar the next volume; sh -c runs it with the exported $work.
NEXT_VOLUME = '--new-volume-script=sh "$work/next-volume"'
_POLL = 0.05  # seconds between looks at tar while waiting for it


@dataclass
class VolumeGuard(TarGuard):
    """:class:`TarGuard` over the volumes of one multi-volume archive, in turn."""

    ended: bool = False  # the end-of-archive block was seen
    _left: int = 0  # bytes of the current member's data still to come
    _member: str = ""  # the member a volume boundary fell into
    _member_raw: bytes = b""  # its name's bytes, as its header or L header holds it
    _dropped: int = 0  # bytes left out of this volume (dropped special files)
    _archived: int = 0  # the member's data in the archive (its size field)
    _in_map: bool = False  # the volume ended inside a sparse member's extension blocks
    # restore --salvage: whether this volume failed its check (its M header may
    # then be rebuilt: ``rebuilt`` says so), and what the layout needs: where
    # this volume starts in the volumes fed, the member's header, its data
    # runs (file offset, length) and how much of its data has passed
    salvaged: bool = False
    rebuilt: str | None = None
    _base: int = 0
    _next_base: int = 0
    _first: bytes = b""
    _runs: tuple[tuple[int, int], ...] = ()
    _done: int = 0

    def volume(self, src: int, dst: int, salvaged: bool = False) -> None:
        """Screen one volume from ``src`` into ``dst`` (both closed after)."""
        self.src, self.dst, self._dropped = src, dst, 0
        self.salvaged, self.rebuilt = salvaged, None
        self._base = self._next_base
        self._next_base += os.fstat(src).st_size
        self.run()

    def _at(self) -> int:
        """Where the guard is in the volumes fed, all counted one after another."""
        return self._base + os.lseek(self.src, 0, os.SEEK_CUR)

    def _piece(self, header_start: int, data_start: int) -> None:
        """restore --salvage: the member's data that this volume held (up to here)."""
        if self.layout is None:
            return
        moved = self._at() - data_start
        begin, end = self._done, self._done + moved
        self._done = end
        runs, at = [], 0
        for offset, length in self._runs:
            lo, hi = max(begin, at), min(end, at + length)
            if lo < hi:
                runs.append((offset + lo - at, hi - lo))
            at += length
        if runs:
            self.layout.append(Extent(self._member, header_start, data_start,
                                      sum(n for _, n in runs), tuple(runs)))

    def _header(self) -> bytes | None:
        header = os.read(self.src, BLOCK)
        if header and len(header) < BLOCK:
            header += self._read(BLOCK - len(header))
        return header or None

    def _data(self, size: int) -> None:
        """Pass ``size`` bytes of member data; a volume may end inside them."""
        while size:
            self._count(0)
            moved = os.sendfile(self.dst, self.src, None, min(size, _COPY))
            if moved == 0:
                self._left = size
                return
            size -= moved
            self._count(moved)
        self._left = 0

    def _rest(self) -> None:
        """What follows the end-of-archive block (padding), to the volume's end."""
        while moved := os.sendfile(self.dst, self.src, None, _COPY):
            self._count(moved)

    def _continuation(self, header: bytes | None) -> None:
        """A volume that starts inside a member must start with its ``M`` header."""
        if header is None:
            raise GuardError(f"{self.label}: an empty volume inside {self._member[:200]!r}")
        if self._in_map:  # seen in GNU tar 1.34's own output, which it cannot read back
            raise GuardError(f"{self.label}: GNU tar wrote the sparse map of "
                             f"{self._member[:200]!r} across a volume boundary, which GNU tar "
                             "cannot read back (neither could Qubes R2's restore); this stored "
                             "file cannot be restored")
        if header[156] != ord("M") or not checksum_ok(header):
            if self.salvaged:
                header = self._rebuild("is all zeros" if header == ZERO_BLOCK else "is damaged")
            else:
                raise GuardError(f"{self.label}: a volume starts inside {self._member[:200]!r} "
                                 "without its continuation (M) header; refused")
        size = header_size(header)
        # GNU tar cuts a long name to the header's 100 bytes here (no L header)
        named = text(header[:100]).encode("utf-8", "surrogateescape")
        if named != self._member_raw[:100] or round_up(size) != self._left:
            if not self.salvaged:
                raise GuardError(f"{self.label}: a volume's continuation header does not "
                                 f"continue {self._member[:200]!r} where the last volume "
                                 "ended; refused")
            header = self._rebuild("does not continue the member where the last volume ended")
        self._write(header)

    def _rebuild(self, why: str) -> bytes:
        """--salvage, a volume that failed its check: the ``M`` header GNU tar
        writes there (the member's first header, type M, its size what is left
        of its data, its offset what tar has counted), so that tar reads on."""
        first = self._first
        left = max(self._archived - self._done, 0)
        total = number(first[483:495]) if first[156] == ord("S") else self._archived
        block = bytearray(first[:100] + first[100:124] + bytes(BLOCK - 124))
        block[124:136] = _number(left)
        block[136:148] = first[136:148]  # mtime
        block[156] = ord("M")
        block[257:265] = first[257:265]  # GNU magic
        block[265:345] = first[265:345]  # user and group names
        block[369:381] = _number(max(total - left, 0))
        block[148:156] = b" " * 8
        block[148:156] = b"%06o\0 " % sum(block)
        self.rebuilt = (f"its continuation (M) header {why}: rebuilt from the first "
                        f"header of {self._member[:200]} so that tar reads on")
        return bytes(block)

    def _sparse_map(self) -> tuple[bool, bytes]:
        """Pass an old GNU sparse member's extension blocks, up to the one that
        says it is the last; True if the volume ends first, and the blocks."""
        blocks = b""
        while True:
            block = self._header()
            if block is None:
                return True, blocks
            self._write(block)
            blocks += block
            if not block[504]:
                return False, blocks

    def _run(self) -> None:
        if self.ended:
            raise GuardError(f"{self.label}: a volume after the end of the archive; refused")
        if self._left:
            self._continuation(self._header())
            data_start = self._at()
            self._data(self._left)
            self._piece(data_start, data_start)  # an M header places no byte: not layout
            if self._left:
                return  # the whole volume was this member's data
        meta: list[bytes] = []
        while True:
            header = self._header()
            if header is None:
                if meta:
                    raise GuardError(f"{self.label}: a volume ends between a name header "
                                     "and its member; refused")
                return  # a volume boundary between members: the next volume goes on
            if header == ZERO_BLOCK:
                self.ended = True
                self._write(b"".join(meta) + header)
                self._rest()
                # tar needs the zero blocks it would have read: pad what was dropped
                self._write(bytes(self._dropped))
                return
            if not checksum_ok(header):
                raise GuardError(f"{self.label}: inner archive has a damaged header "
                                 f"(after {self.passed} bytes)")
            kind, size = header[156], header_size(header)
            if kind in PREFIX_TYPES or kind == ord("g") or kind == ord("M"):
                if kind == ord("M") or size > MAX_EXTENDED or kind == ord("g"):
                    raise GuardError(f"{self.label}: inner archive has a {chr(kind)!r} header "
                                     "where a member should start; refused")
                meta.append(header + self._read(round_up(size)))
                continue
            override = pax_size(meta)
            size = override if override is not None else size
            if size and kind not in TYPES_WITH_DATA:
                name = member_name(header, meta)
                raise GuardError(f"{self.label}: inner archive member {name!r} "
                                 f"of type {chr(kind)!r} claims data; refused")
            if kind not in KEPT_TYPES:
                what = DESCRIBE_TYPE.get(kind, f"member of type {chr(kind)!r}")
                self.skipped.append(f"{member_name(header, meta)} ({what}, not restored)")
                self._dropped += len(header) + sum(len(m) for m in meta)
                meta.clear()
                self._skip(round_up(size))
                continue
            if self.prefix is not None:
                self._check_names(kind, header, meta)
            self._member, self._member_raw = member_name(header, meta), _raw_name(header, meta)
            header_start = self._at() - BLOCK - sum(map(len, meta))
            self._write(b"".join(meta) + header)
            meta.clear()
            extension = b""
            if kind == ord("S") and header[482]:
                ended, extension = self._sparse_map()
                if ended:
                    self._in_map, self._left = True, round_up(size)
                    return  # the volume ended inside the sparse map
            self._first, self._archived, self._done = header, size, 0
            self._runs = old_gnu_map(header, extension) if kind == ord("S") else ((0, size),)
            data_start = self._at()
            self._data(round_up(size))
            self._piece(header_start, data_start)
            if self._left:
                return  # the volume ended inside this member


def _number(value: int) -> bytes:
    """A 12-byte numeric field as GNU tar writes it: octal, or base-256 from 8 GiB on."""
    if value < 8**11:
        return b"%011o\0" % value
    return bytes([0x80]) + value.to_bytes(11, "big")


def _raw_name(header: bytes, meta: list[bytes]) -> bytes:
    """A GNU member's name as bytes: its L header's, else the header's name field."""
    long_name = extended(meta).long_name
    name = long_name if long_name is not None else text(header[:100])
    return name.encode("utf-8", "surrogateescape")


class VolumeTar:
    """One ``tar -M`` given the volumes of one stored file, in order, as files."""

    def __init__(self, tar: Stage, work: Path, guard: VolumeGuard, stdout: IO[bytes] | None,
                 log: CommandLog, stored: str) -> None:
        self.work, self.guard, self.stored = work, guard, stored
        ask = work / "ask"
        os.mkfifo(ask, 0o600)
        # Held open for reading and writing, and opened so by the script (<>):
        # neither open blocks, even once qrecover is gone.
        self._ask = os.open(ask, os.O_RDWR | os.O_NONBLOCK)
        # The answers go into tar's stdin, which its script inherits (tar reads
        # no stdin itself with -f FILE): if qrecover dies, the script reads
        # end-of-file, fails, and tar stops instead of waiting for ever.
        self._answer_r, self._answer = os.pipe()
        script = (f'printf "%s\\n" "$TAR_VOLUME" 1<>{shlex.quote(str(ask))} && read -r answer '
                  '&& [ "$answer" = "$TAR_VOLUME" ] '
                  f'&& printf "%s" {shlex.quote(str(work))}/volume-"$answer" >&"$TAR_FD"')
        argv = list(tar.argv)
        at = argv.index("-f")
        # --force-local: a colon in a scratch path never makes tar look for a host
        argv[at:at + 2] = ["-M", "--force-local", "-f", str(self._volume(1)),
                           f"--new-volume-script={script}"]
        self.pipeline = Pipeline([Stage(tuple(argv))], stdin=self._answer_r, stdout=stdout,
                                 note=f"given the volumes of {stored} one by one", log=log)
        self.pipeline.guarded = guard
        self.shown: tuple[Stage, ...] = (replay_stage(tar),)  # what a --transcript replays instead
        # What went wrong feeding; a consequence (FeedFailed) when tar, which
        # stopped first, may say why itself (GNU tar cannot read some volumes).
        self.error: QrecoverError | None = None
        self._fed = 0
        self._pending = b""

    @classmethod
    def start(cls, tar: Stage, scratch: Path, limit: int | None, stored: str,
              stdout: IO[bytes] | None, log: CommandLog,
              layout: list[Extent] | None) -> VolumeTar:
        """The ``tar -M`` of one stored file, its volumes screened by a
        :class:`VolumeGuard` (``layout``: --salvage's record of where each
        member's bytes lie) in a private folder of ``scratch``."""
        guard = VolumeGuard(-1, -1, limit, stored, prefix=stored)
        work = Path(tempfile.mkdtemp(prefix="volumes-", dir=scratch))
        if layout is not None:
            guard.layout = layout
        return cls(tar, work, guard, stdout, log, stored)

    @property
    def rebuilt(self) -> str | None:
        return self.guard.rebuilt

    def _volume(self, number: int) -> Path:
        return self.work / f"volume-{number}"

    def _alive(self) -> bool:
        return any(proc.poll() is None for proc in self.pipeline.procs)

    def _asked(self) -> int | None:
        """The volume tar asks for next; None once tar has exited without asking."""
        while b"\n" not in self._pending:
            signals.check()
            ready, _, _ = select.select([self._ask], [], [], _POLL)
            if ready:
                with contextlib.suppress(BlockingIOError):
                    self._pending += os.read(self._ask, 64)
            elif not self._alive():
                return None
        line, _, self._pending = self._pending.partition(b"\n")
        return int(line) if line.isdigit() else -1

    def _answer_with(self, text: str) -> None:
        with contextlib.suppress(BrokenPipeError):  # tar is gone: nothing to answer
            os.write(self._answer, text.encode() + b"\n")

    def feed(self, path: Path, owned: bool, member: str, salvaged: bool = False) -> bool:
        """Screen the next volume into scratch and give it to tar (started with
        the first: True then).  A volume the guard stopped in is given as far as
        it passed, as a stream cut there would be; nothing after it is
        (``salvaged``: the volume failed its check, see the module's text)."""
        if self.error is not None or self.guard.error is not None:
            _drop(path, owned)
            return False
        self._fed += 1
        number = self._fed
        try:
            src = os.open(path, os.O_RDONLY)
        except OSError as exc:
            self.error = StoredFileError(f"{member}: cannot read its plaintext ({exc.strerror})")
            return False
        finally:
            _drop(path, owned)  # open or not: the name is no longer needed
        dst = os.open(self._volume(number), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        self.guard.volume(src, dst, salvaged)  # closes both; a problem is the guard's error
        if number == 1:
            try:
                self.pipeline.start()
            finally:
                os.close(self._answer_r)  # tar has its copy
                self._answer_r = -1
            return True
        asked = self._asked()
        if asked != number:
            if asked is not None:
                self._answer_with("no")
            self.error = FeedFailed(f"{member}: tar did not ask for this volume (the "
                                    f"archive of {self.stored} ended before it, or tar "
                                    "refused the one before)")
            return False
        _drop(self._volume(number - 1), True)  # tar closed it before asking
        self._answer_with(str(number))
        return False

    def close(self) -> QrecoverError | None:
        """The last volume is in: tar must end now.  Returns what went wrong, if
        tar wants another volume, which the backup does not hold."""
        problem = self.error
        asked = self._asked() if self.pipeline.procs else None
        if asked is not None:
            self._answer_with("no")
            if problem is None and self.guard.error is None:
                missing = f"{self.stored}.{max(asked - 1, 0):03d}"
                problem = StoredFileError(
                    f"{self.stored}: its multi-volume archive continues in {missing}, which "
                    "is not in the backup (its last chunk is missing)")
        elif problem is None and self.guard.error is None and not self.guard.ended \
                and self._fed:
            problem = StoredFileError(f"{self.stored}: the multi-volume archive ends without "
                                      "its end-of-archive marker (truncated)")
        self._cleanup()
        return problem

    def kill(self) -> None:
        # The new-volume script that tar may be running goes too (it is in tar's
        # process group): it could be waiting for an answer that will never come.
        self.pipeline.kill()
        self._cleanup()

    def _cleanup(self) -> None:
        for fd in (self._ask, self._answer, self._answer_r):
            if fd >= 0:
                os.close(fd)
        self._ask = self._answer = self._answer_r = -1
        shutil.rmtree(self.work, ignore_errors=True)


def replay_stage(tar: Stage) -> Stage:
    """The stored file's tar (``tar -x -f - ...``) as a script runs it: ``-M``."""
    argv = list(tar.argv)
    at = argv.index("-f")
    argv[at:at] = ["-M", NEXT_VOLUME]
    return Stage(tuple(argv))


def _drop(path: Path, owned: bool) -> None:
    if owned:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


__all__ = ["NEXT_VOLUME", "VolumeGuard", "VolumeTar", "replay_stage"]
