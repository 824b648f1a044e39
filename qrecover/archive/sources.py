"""Where the backup's bytes come from, before any tar is read.

BACKUP is a file, ``-`` (standard input), or several files that ``split``
made of one backup (``split -b 4G backup backup.part-``), given in order.
Its first bytes say what it is: a tar archive (what Qubes wrote), a backup
a person compressed again as a whole (gzip, bzip2, xz, zstd: read through
the decompressor, a real child process joined by an OS pipe), or something
else, which is named ("a zip archive") instead of read as a damaged tar.

Nothing is ever seeked: the first bytes of a regular file are looked at
with ``pread``, those of a pipe are read and handed on.  What comes out of
a decompressor is authenticated chunk by chunk afterwards like any backup,
so undoing the outer compression uses nothing unauthenticated.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import shlex
import stat
import sys
import threading
from collections.abc import Sequence
from dataclasses import dataclass

from qrecover import signals
from qrecover.compat import pairwise
from qrecover.damage import DamageLog
from qrecover.errors import BackupError, MissingProgramError, UsageError
from qrecover.magic import SNIFF, Compression, compression_of
from qrecover.runner import (
    F_SETPIPE_SZ,
    PIPE_SIZE,
    Pipeline,
    Stage,
    StageResult,
    first_failure,
    render_pipeline,
)
from qrecover.stages.decompress import only_bytes_after_it, pick_outer_gunzip

log = logging.getLogger("qrecover")
SECTOR = 512  # what a read error costs at least: one sector of the medium


@dataclass
class Piece:
    """One file of the input (or the pipe), and where it starts in the whole."""

    label: str
    fd: int
    size: int | None  # None: a pipe
    start: int = 0


class ByteInput:
    """The backup's bytes in order, read once and never seeked.

    Several pieces read as their concatenation; where a byte came from stays
    known (``where``), so an error can name the piece.  When the bytes come
    out of a decompressor, ``failure`` tells whether it failed.
    """

    def __init__(self, label: str, pieces: list[Piece], pipeline: Pipeline | None = None) -> None:
        self.label = label
        self.pieces = pieces
        self.pipeline = pipeline
        self.via = ""  # "gzip -d -c": the decompressor the bytes come through
        self.position = 0
        self._index = 0
        self._pushed = b""
        self._closed = False
        self._noted = False  # gzip's note on bytes after the compressed backup
        self.damage = DamageLog()  # unreadable sectors here, skipped ranges (tarstream)
        self._finished = False

    def read(self, n: int) -> bytes:
        """Up to ``n`` bytes; b"" only at the end of the last piece."""
        if self._pushed:
            data, self._pushed = self._pushed[:n], self._pushed[n:]
            self.position += len(data)
            return data
        while self._index < len(self.pieces):
            piece = self.pieces[self._index]
            try:
                if piece.fd < 0:  # pieces are opened one at a time, when reached
                    piece.fd = os.open(piece.label, os.O_RDONLY | os.O_CLOEXEC)
                if piece.size is None:  # a pipe: a wait that a signal ends
                    signals.wait_readable(piece.fd)
                data = os.read(piece.fd, n)
            except OSError as exc:
                if piece.fd < 0 or not _seekable(piece):
                    raise BackupError(f"{piece.label}: cannot read ({exc.strerror})") from None
                data = self._by_sectors(piece, n)  # unreadable sectors: stepped over
            if data:
                self.position += len(data)
                return data
            if piece.fd > 2:
                os.close(piece.fd)
            piece.fd = -2  # read to its end
            self._index += 1
            if self._index < len(self.pieces):
                self.pieces[self._index].start = self.position
        return b""

    def _by_sectors(self, piece: Piece, n: int) -> bytes:
        """A read error in a file: the same bytes again, one sector at a time;
        a sector that cannot be read comes back as zeros (as ddrescue leaves
        it) and is recorded as damage, so that the reader steps over it and
        goes on; no chunk that held it can pass its check."""
        pos = self.position - piece.start  # nothing pushed back: that is read first
        end = pos + n
        parts: list[bytes] = []
        while pos < end:
            size = min(SECTOR - pos % SECTOR, end - pos)
            try:
                data = os.pread(piece.fd, size, pos)
            except OSError as exc:
                if piece.size is not None and pos >= piece.size:
                    break
                data = bytes(size)
                whole = piece.start + pos
                self.damage.unreadable(self.label, whole, whole + size, str(exc.strerror),
                                       self.where(whole))
            if not data:
                break
            parts.append(data)
            pos += len(data)
        os.lseek(piece.fd, pos, os.SEEK_SET)  # the next read goes on after them
        return b"".join(parts)

    def read_exact(self, n: int) -> bytes:
        """``n`` bytes, fewer only at the end."""
        parts: list[bytes] = []
        want = n
        while want > 0:
            data = self.read(want)
            if not data:
                break
            parts.append(data)
            want -= len(data)
        return b"".join(parts)

    def push_back(self, data: bytes) -> None:
        """Hand ``data`` (just read) back, to be read again."""
        self._pushed = data + self._pushed
        self.position -= len(data)

    def piece_at(self, offset: int) -> int:
        """The index of the piece holding byte ``offset`` (as far as read)."""
        index = 0
        for i, piece in enumerate(self.pieces[: self._index + 1]):
            if piece.start <= offset:
                index = i
        return index

    def where(self, offset: int) -> str:
        if self.via:
            return f"byte {offset} of what {self.via} wrote"
        if len(self.pieces) > 1:
            piece = self.pieces[self.piece_at(offset)]
            return f"byte {offset - piece.start} of {piece.label}"
        return f"byte {offset}"

    def failure(self, wait: bool = False) -> str | None:
        """The decompressor's error once it has ended (``wait``: for it to end);
        None while it runs, or if it did not fail."""
        if self.pipeline is None:
            return None
        if not wait and any(p.poll() is None for p in self.pipeline.procs):
            return None
        failed = self._failed()
        return failed.describe() if failed is not None else None

    def _failed(self) -> StageResult | None:
        assert self.pipeline is not None
        results = self.pipeline.wait()
        for result in filter(only_bytes_after_it, results):
            if not self._noted:  # said once, as a note: nothing of the backup is missing
                self._noted = True
                log.warning("note: %s: %s", self.label, result.describe())
        return first_failure([r for r in results if not only_bytes_after_it(r)])

    def finish(self) -> None:
        """At the end of the bytes: a decompressor that failed makes the backup damaged
        (said once: the reader records it as a damaged range)."""
        if self.pipeline is None or self._finished:
            return
        self._finished = True
        if (failed := self._failed()) is not None:
            raise BackupError(f"{self.label}: {failed.describe()} "
                              "(the compressed backup is damaged or truncated)")

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self.pipeline is not None:
            self.pipeline.kill()
        for piece in self.pieces:
            if piece.fd > 2:
                with contextlib.suppress(OSError):
                    os.close(piece.fd)


def _seekable(piece: Piece) -> bool:
    """A regular file (also as standard input): its unreadable sectors can be stepped over."""
    if piece.size is not None:
        return True
    try:
        return stat.S_ISREG(os.fstat(piece.fd).st_mode)
    except OSError:
        return False


def _open_piece(path: str, now: bool) -> Piece:
    """A piece, checked; opened ``now`` (the first) or only when reached, so
    that any number of pieces stays within the limit of open files."""
    try:
        st = os.stat(path)
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC) if now else -1
    except FileNotFoundError:
        raise UsageError(f"{path}: no such file") from None
    except OSError as exc:
        raise UsageError(f"{path}: cannot open ({exc.strerror})") from None
    if stat.S_ISDIR(st.st_mode):
        if fd >= 0:
            os.close(fd)
        raise UsageError(f"{path}: a folder cannot be one of several pieces")
    return Piece(path, fd, st.st_size if stat.S_ISREG(st.st_mode) else None)


def _check_pieces(pieces: list[Piece]) -> None:
    """``split -b SIZE`` makes every piece but the last exactly SIZE bytes."""
    seen: dict[tuple[int, int], str] = {}
    for piece in pieces:
        st = os.stat(piece.label)
        key = (st.st_dev, st.st_ino)
        if key in seen:
            raise UsageError(f"{piece.label}: given twice (also as {seen[key]})")
        seen[key] = piece.label
    first = pieces[0]
    if first.size == 0:
        raise BackupError(f"{first.label}: empty: not a piece of a split backup")
    if first.size is not None and pieces[1].size is not None and first.size < pieces[1].size:
        raise BackupError(
            f"piece {pieces[1].label} does not continue piece {first.label}: {first.label} "
            f"({first.size} bytes) is shorter than the next piece ({pieces[1].size} bytes), "
            "so it must be the last piece (pieces out of order, or not of one backup?)"
        )
    for prev, piece in pairwise(pieces):
        if first.size is None or piece.size is None:
            continue
        if piece.size == 0:
            raise BackupError(f"{piece.label}: empty: not a piece of a split backup")
        if prev is not first and prev.size != first.size:
            raise BackupError(
                f"piece {piece.label} does not continue piece {prev.label}: {prev.label} "
                f"({prev.size} bytes) is shorter than {first.label} ({first.size} bytes), "
                "so it must be the last piece (pieces out of order, or not of one backup?)"
            )
    last = pieces[-1]
    if len(pieces) > 1 and last.size is not None and first.size is not None and (
        last.size > first.size
    ):
        raise BackupError(
            f"the last piece, {last.label}, is larger than the first, {first.label} "
            f"({last.size} > {first.size} bytes): pieces out of order, or not of one backup?"
        )


def _head(raw: ByteInput) -> bytes:
    """The first bytes, without moving a regular file's position."""
    piece = raw.pieces[0]
    if piece.size is not None and (piece.size >= SNIFF or len(raw.pieces) == 1):
        return os.pread(piece.fd, SNIFF, 0)
    head = raw.read_exact(SNIFF)
    raw.push_back(head)
    return head


def _feed(src: ByteInput, dst: int) -> None:
    """Copy a pipe's bytes (with what was already read of them) into ``dst``."""
    try:
        while block := src.read(1024 * 1024):
            view = memoryview(block)
            while view:
                view = view[os.write(dst, view):]
    except (OSError, BackupError):
        pass  # the decompressor stopped reading; its own exit status tells why
    finally:
        os.close(dst)


def _decompress(raw: ByteInput, comp: Compression) -> ByteInput:
    """The decompressor as a child process: the file (or ``cat`` of the pieces,
    or our copy of the pipe) in, an OS pipe out."""
    argv = comp.argv
    if comp.name == "gzip":
        argv = (pick_outer_gunzip(), *argv[1:])
    stages = [Stage(argv)]
    shown_in: str | None = None
    feeder: threading.Thread | None = None
    plain = all(p.size is not None for p in raw.pieces) and not raw._pushed
    if plain and len(raw.pieces) == 1:
        stdin, owned = raw.pieces[0].fd, False
        shown_in = raw.pieces[0].label
    elif plain:
        stages.insert(0, Stage(("cat", "--", *(p.label for p in raw.pieces))))
        stdin, owned = os.open(os.devnull, os.O_RDONLY), True
    else:
        (stdin, feed_w), owned = os.pipe(), True
        feeder = threading.Thread(target=_feed, args=(raw, feed_w), daemon=True)
    out_r, out_w = os.pipe()
    with contextlib.suppress(OSError):  # 1 MiB, as between the other stages (runner.py)
        fcntl.fcntl(out_w, F_SETPIPE_SZ, PIPE_SIZE)
    # The runner logs it as it starts it, with the file it reads, as a person types it.
    pipeline = Pipeline(stages, stdin=stdin, stdout=out_w, shown=render_pipeline(stages, shown_in))
    try:
        pipeline.start()
    except MissingProgramError as exc:
        for fd in (out_r, out_w, *((stdin,) if owned else ())):
            os.close(fd)
        raw.close()
        raise MissingProgramError(
            f"{raw.label} is {comp.name}-compressed as a whole, and {exc.message}", exc.hint
        ) from None
    os.close(out_w)
    if owned:
        os.close(stdin)
    if feeder is not None:
        feeder.start()
    log.warning("note: %s is %s-compressed as a whole; reading it through %s",
                raw.label, comp.name, shlex.join(argv))
    if feeder is None:
        raw.close()  # the children hold the files; we read only what they write
    out = ByteInput(raw.label, [Piece(raw.label, out_r, None)], pipeline)
    out.via = shlex.join(argv)
    return out


def open_input(backups: Sequence[str]) -> ByteInput:
    """The bytes of BACKUP: a file, ``-``, or pieces in order; through a
    decompressor when its first bytes are one's magic."""
    if not backups:
        raise UsageError("no BACKUP given")
    if "-" in backups:
        if len(backups) > 1:
            raise UsageError("'-' (standard input) cannot be one of several pieces")
        stdin = Piece("standard input", sys.stdin.buffer.fileno(), None)
        raw = ByteInput("standard input", [stdin])
    else:
        pieces: list[Piece] = []
        try:
            for path in backups:
                pieces.append(_open_piece(path, now=not pieces))
            if len(pieces) > 1:
                _check_pieces(pieces)
        except BaseException:
            for piece in pieces:
                if piece.fd > 2:
                    os.close(piece.fd)
            raise
        label = backups[0] if len(backups) == 1 else f"{backups[0]} (+{len(backups) - 1} pieces)"
        raw = ByteInput(label, pieces)
    comp = compression_of(_head(raw))
    if comp is None:
        return raw
    return _decompress(raw, comp)


def replay_path(backups: Sequence[str]) -> str | None:
    """The absolute path a script or transcript can read the backup from again
    (``tar -i``, ``tail -c``): one plain file or folder; None for standard
    input, pieces, or a file compressed as a whole (the user fills it in)."""
    if len(backups) != 1 or backups[0] == "-":
        return None
    path = backups[0]
    if not os.path.isdir(path):
        try:
            with open(path, "rb") as f:
                if compression_of(os.pread(f.fileno(), SNIFF, 0)) is not None:
                    return None
        except OSError:
            pass
    return os.path.abspath(path)
