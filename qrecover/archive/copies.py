"""Other copies of the same backup (``--other-copy PATH``): where a chunk that
BACKUP lost may be found good.

A copy is a file, the pieces of a split backup (``a.part-aa,a.part-ab``: one
value, joined by commas) or a folder untarred by hand; it must be seekable:
standard input and a backup compressed as a whole are refused.  A file (or
pieces) is indexed once by its tar headers alone: each header is read with
``pread`` and the member's data is jumped over, so indexing costs a few reads
per chunk whatever the chunks' size, and the index holds only names and
offsets (at most :data:`MAX_ENTRIES` of them).  Where a block is neither a
header nor zeros (damage in the copy), the scan reads on, 1 MiB at a time,
to the next valid header; the damaged range is only noted: a chunk is taken
from a copy only once the format authenticated it exactly as in BACKUP.

Before anything else is used from a copy its header is compared with
BACKUP's authenticated header (:func:`check_header`): the same bytes of
``backup-header``, and a ``backup-header.hmac`` that authenticates it with
the same passphrase.  Formats 2 and 3 also compare qubes.xml's chunk HMACs
(:meth:`OtherCopy.check_xml_macs`): two backups made with the same settings
have byte-identical headers, and only those HMACs (over ciphertext with a
random salt) tell them apart.  A copy that fails either is refused (exit 4)
naming it.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import stat
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from qrecover.archive.container import FolderSource
from qrecover.archive.members import (
    HEADER,
    HEADER_HMAC,
    MAX_MEMBER,
    MAX_NAME,
    QUBES_XML,
    REGULAR,
    ChunkName,
    Member,
    parse_member_name,
)
from qrecover.archive.tarheaders import (
    BLOCK,
    MAX_EXTENDED,
    ZERO_BLOCK,
    Extended,
    TarError,
    is_ustar,
    kind_of,
)
from qrecover.errors import BackupError, QrecoverError, UsageError
from qrecover.hmacs import MAX_HMAC_FILE, parse_hmac_text
from qrecover.magic import SNIFF, compression_of

MAX_ENTRIES = 500_000  # members indexed per copy: 25 TiB of 100 MiB chunks, and their .hmac
WINDOW = 1024 * 1024  # what a scan over damage or zeros reads at a time


@dataclass(frozen=True)
class Entry:
    """Where a member of a copy is: its first header block, its data, its size."""

    block: int  # byte offset of its first header (PAX or plain): where tar -i starts
    offset: int  # byte offset of its data
    size: int


class _Bytes:
    """The bytes of a file, or of pieces read as their concatenation, by offset."""

    def __init__(self, paths: Sequence[str]) -> None:
        self.paths = list(paths)
        self.fds: list[int] = []
        self.starts: list[int] = []
        total = 0
        try:
            for path in self.paths:
                fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
                self.fds.append(fd)
                st = os.fstat(fd)
                if not stat.S_ISREG(st.st_mode) and not stat.S_ISBLK(st.st_mode):
                    raise UsageError(f"--other-copy {path}: not a regular file or folder "
                                     "(another copy must be seekable)")
                self.starts.append(total)
                total += st.st_size if stat.S_ISREG(st.st_mode) else os.lseek(fd, 0, os.SEEK_END)
        except OSError as exc:
            self.close()
            raise UsageError(f"--other-copy {path}: cannot open ({exc.strerror})") from None
        except BaseException:
            self.close()
            raise
        self.size = total

    def pread(self, offset: int, n: int) -> bytes:
        """Up to ``n`` bytes at ``offset``, fewer only at the end; OSError on a read error."""
        parts: list[bytes] = []
        while n > 0 and offset < self.size:
            i = max(j for j, start in enumerate(self.starts) if start <= offset)
            end = self.starts[i + 1] if i + 1 < len(self.starts) else self.size
            data = os.pread(self.fds[i], min(n, end - offset), offset - self.starts[i])
            if not data:
                break
            parts.append(data)
            offset += len(data)
            n -= len(data)
        return b"".join(parts)

    def close(self) -> None:
        for fd in self.fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        self.fds = []


class _Reader:
    """A member of a copy read by offset, as a stream (what ChunkStore.copy reads)."""

    def __init__(self, data: _Bytes, entry: Entry) -> None:
        self.data = data
        self.pos = entry.offset
        self.left = entry.size

    def read(self, n: int = -1) -> bytes:
        want = self.left if n < 0 else min(n, self.left)
        if want <= 0:
            return b""
        got = self.data.pread(self.pos, want)
        if len(got) < want:
            raise EOFError("the other copy ends inside this member")
        self.pos += len(got)
        self.left -= len(got)
        return got

    def __enter__(self) -> _Reader:
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def close(self) -> None:
        pass


@dataclass
class OtherCopy:
    """One ``--other-copy``: its index, and its members by name."""

    label: str
    paths: list[str]
    folder: Path | None = None
    data: _Bytes | None = None
    index: dict[str, Entry] = field(default_factory=dict)
    damage: list[str] = field(default_factory=list)  # ranges the scan read over

    # -- what the engine asks -----------------------------------------------

    def member(self, name: str) -> Member | None:
        """The member ``name`` of this copy, readable once; None if it has none."""
        if self.folder is not None:
            path = self.folder / name
            try:
                st = path.lstat()
            except OSError:
                return None
            if not stat.S_ISREG(st.st_mode) or st.st_size > MAX_MEMBER:
                return None
            return Member(name, st.st_size, path=path)
        entry = self.index.get(name)
        if entry is None or self.data is None:
            return None
        stream: IO[bytes] = _Reader(self.data, entry)  # type: ignore[assignment]
        return Member(name, entry.size, stream=stream)

    def read(self, name: str, limit: int) -> bytes | None:
        member = self.member(name)
        if member is None:
            return None
        try:
            return member.read_all(limit)
        except QrecoverError:
            return None

    def take_command(self, names: Sequence[str]) -> str:
        """The shell command that takes ``names`` out of this copy (for -v,
        --transcript, --explain), as ``take`` does it for BACKUP."""
        quoted = " ".join(shlex.quote(n) for n in names)
        if self.folder is not None:
            made = {f'mkdir -p -- "$work/{n.rsplit("/", 1)[0]}"' for n in names if "/" in n}
            copies = [f'cp -- {shlex.quote(str(self.folder.absolute() / n))} "$work/{n}"'
                      for n in names]
            return " && ".join([*sorted(made), *copies])
        entry = self.index[names[0]]
        start = f"tail -c +{entry.block + 1}"
        if len(self.paths) == 1:
            src = f"{start} -- {shlex.quote(os.path.abspath(self.paths[0]))}"
        else:
            pieces = " ".join(shlex.quote(os.path.abspath(p)) for p in self.paths)
            src = f"cat -- {pieces} | {start}"
        return (f'{src} | tar -i -x -f - -C "$work" --occurrence=1 --no-same-owner -- {quoted}')

    def stored_names(self) -> Iterator[str]:
        """The stored files this copy holds chunks of, in the copy's order."""
        seen: set[str] = set()
        for name in self._names():
            try:
                parsed = parse_member_name(name)
            except BackupError:
                continue
            if parsed is not None and parsed.stored not in seen:
                seen.add(parsed.stored)
                yield parsed.stored

    def _names(self) -> list[str]:
        if self.folder is None:
            return sorted(self.index, key=lambda n: self.index[n].offset)
        # a folder's order: qubes.xml, then by name
        return [m.name for m in FolderSource(self.folder).members()]

    def check_xml_macs(self, own: dict[int, str], backup: str) -> None:
        """Formats 2 and 3: qubes.xml's chunk HMACs as BACKUP's own (good) chunks had them."""
        for index, mac in sorted(own.items()):
            name = f"{ChunkName(QUBES_XML, index).name}.hmac"
            text = self.read(name, MAX_HMAC_FILE)
            got = parse_hmac_text(text) if text is not None else None
            if got is not None and got.lower() != mac.lower():
                raise BackupError(
                    f"--other-copy {self.label}: not a copy of {backup}: its {name} differs "
                    "(another backup made with the same settings and passphrase?); "
                    "nothing was used from it"
                )

    def close(self) -> None:
        if self.data is not None:
            self.data.close()

    # -- the index ----------------------------------------------------------

    def scan(self) -> None:
        """Index the copy by its tar headers (seeks over the data)."""
        data = self.data
        assert data is not None
        pos = 0
        ext = Extended()  # what the extended headers read so far say of their member
        first = 0  # the first header block of the entry being read
        while pos + BLOCK <= data.size:
            block = data.pread(pos, BLOCK)
            if len(block) < BLOCK:
                break
            if block == ZERO_BLOCK:
                pos = self._over_zeros(pos)
                continue
            if not is_ustar(block):
                pos = self._resync(pos)
                ext = Extended()
                continue
            if ext.empty:
                first = pos
            kind = kind_of(block)
            try:
                size = ext.size(block)
            except TarError:
                pos = self._resync(pos + BLOCK)
                ext = Extended()
                continue
            data_at = pos + BLOCK
            pos = data_at + size + (-size % BLOCK)
            if kind in (b"x", b"g", b"L", b"K"):
                if size > MAX_EXTENDED:
                    pos = self._resync(data_at)
                    ext = Extended()
                    continue
                if kind != b"g":
                    try:
                        ext.add(kind, data.pread(data_at, size))
                    except TarError:
                        ext.pax = {}
                continue
            name = ext.name(block)
            ext = Extended()
            if kind not in REGULAR or size > MAX_MEMBER or len(name) > MAX_NAME:
                continue
            if data_at + size > data.size:
                self.damage.append(f"{name}: cut short at the end of the copy")
                break
            if name not in self.index:  # the first one, as tar --occurrence=1 takes
                if len(self.index) >= MAX_ENTRIES:
                    raise BackupError(f"--other-copy {self.label}: more than {MAX_ENTRIES} "
                                      "members: not a Qubes backup")
                self.index[name] = Entry(first, data_at, size)

    def _over_zeros(self, pos: int) -> int:
        """Past a run of zero blocks (each small archive's end, or zero-filled damage)."""
        assert self.data is not None
        size = 16 * 1024  # past a small archive's end (a 10 KiB record) in one read
        while pos < self.data.size:
            window = self.data.pread(pos, size)
            rest = window.lstrip(b"\0")
            if rest:
                return pos + (len(window) - len(rest)) // BLOCK * BLOCK
            pos += len(window)
            size = min(size * 4, WINDOW)  # a long run: zero-filled damage
        return pos

    def _resync(self, pos: int) -> int:
        """From a block that is no header, read on to the next valid one."""
        assert self.data is not None
        start = pos
        pos += BLOCK
        while pos < self.data.size:
            window = self.data.pread(pos, WINDOW)
            for at in range(0, len(window) - BLOCK + 1, BLOCK):
                if is_ustar(window[at : at + BLOCK]):
                    self.damage.append(f"bytes {start}-{pos + at} are no tar member")
                    return pos + at
            pos += len(window) // BLOCK * BLOCK or BLOCK
        self.damage.append(f"bytes {start}-{self.data.size} are no tar member")
        return pos


def open_copy(value: str, backup: Sequence[str]) -> OtherCopy:
    """One ``--other-copy`` value: a file, a folder, or pieces joined by commas."""
    if value == "-":
        raise UsageError("--other-copy -: another copy must be seekable (a file, pieces or "
                         "a folder), not standard input")
    paths = [value] if os.path.exists(value) or "," not in value else value.split(",")
    for path in paths:
        if not os.path.exists(path):
            raise UsageError(f"--other-copy {path}: no such file or folder")
        for piece in backup:
            if piece != "-" and os.path.exists(piece) and os.path.samefile(path, piece):
                raise UsageError(f"--other-copy {path}: that is BACKUP itself")
    if len(paths) == 1 and os.path.isdir(paths[0]):
        return OtherCopy(value, paths, folder=Path(paths[0]))
    if any(os.path.isdir(p) for p in paths):
        raise UsageError(f"--other-copy {value}: a folder cannot be one of several pieces")
    data = _Bytes(paths)
    copy = OtherCopy(value, paths, data=data)
    try:
        if compression_of(data.pread(0, SNIFF)) is not None:
            raise UsageError(f"--other-copy {value}: compressed as a whole, so not seekable; "
                             "decompress it to a file first")
        copy.scan()
    except OSError as exc:
        copy.close()
        raise BackupError(f"--other-copy {value}: cannot read it ({exc.strerror})") from None
    except BaseException:
        copy.close()
        raise
    return copy


def check_header(copy: OtherCopy, header: bytes, header_hmac: bytes, backup: str,
                 authenticates: object) -> None:
    """Refuse (exit 4) a copy whose header is not BACKUP's, byte for byte, or whose
    ``backup-header.hmac`` does not authenticate it with the passphrase.
    ``authenticates(data, hmac)`` raises when it does not (only called when the
    copy's .hmac differs from BACKUP's, which was authenticated)."""
    data = copy.read(HEADER, len(header))
    if data is None:
        raise BackupError(f"--other-copy {copy.label}: no readable backup-header in it: "
                          "not a copy of the backup; nothing was used from it")
    if data != header:
        raise BackupError(f"--other-copy {copy.label}: its backup-header differs from "
                          f"{backup}'s: not a copy of the same backup; nothing was used from it")
    mac = copy.read(HEADER_HMAC, max(len(header_hmac), 4096) * 4)
    if mac == header_hmac:
        return
    try:
        if mac is None:
            raise BackupError("no backup-header.hmac")
        assert callable(authenticates)
        authenticates(data, mac)
    except QrecoverError as exc:
        raise BackupError(
            f"--other-copy {copy.label}: its backup-header.hmac does not authenticate its "
            f"header with this passphrase ({exc.message}); nothing was used from it"
        ) from None
