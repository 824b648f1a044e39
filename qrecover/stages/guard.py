"""A guard on the inner tar stream, between the decompressor and GNU tar.

GNU tar already refuses member names with ``..``, strips leading ``/`` and
will not write through a symlink it just extracted.  Two things it would
still do with a hostile (but authenticated) archive are stopped here:

* device nodes and FIFOs: tar creates FIFOs for anyone and device nodes as
  root.  Their headers (and any long-name/pax headers that belong to them)
  are dropped from the stream, so tar never sees them;
* decompression bombs: a few KiB that expand far past what qubes.xml
  declares.  The stream is counted and cut off past a limit.

Only 512-byte headers are read into Python; member data moves from pipe to
pipe with ``os.splice``, so the guard costs next to nothing (Python 3.8 and 3.9,
which lack it, read and write: qrecover.compat.splice).
"""

from __future__ import annotations

import contextlib
import errno
import os
from dataclasses import dataclass, field

from qrecover.archive.tarheaders import (
    BLOCK,
    MAX_EXTENDED,
    ZERO_BLOCK,
    Extended,
    TarError,
    checksum_ok,
    pax_records,
    readable,
    size_of,
)
from qrecover.compat import splice
from qrecover.stages.sparse import Extent, extent

_SPLICE = 1024 * 1024

# Member types passed on to tar: files, hard and symbolic links, folders,
# GNU sparse files, contiguous files (treated as files), GNU dumpdir, volume labels.
KEPT_TYPES = frozenset(b"0\x001257SDV")
# Of those, the ones whose data follows the header; the others must say size 0,
# so that the guard and tar can never disagree on where the next header is.
TYPES_WITH_DATA = frozenset(b"0\x007SD")
# Headers that describe the member that follows them.
PREFIX_TYPES = frozenset(b"LKxX")
DESCRIBE_TYPE = {ord("3"): "character device", ord("4"): "block device", ord("6"): "FIFO"}


class GuardError(Exception):
    """The inner archive was cut off: malformed, or past its size limit."""


def header_size(header: bytes) -> int:
    """The header's size field, as GNU tar reads it (qrecover.archive.tarheaders)."""
    try:
        return size_of(header)
    except TarError:
        raise GuardError("inner archive: malformed header (size field)") from None


def extended(meta: list[bytes]) -> Extended:
    """What the extended headers kept in ``meta`` say of the member after them."""
    try:
        return Extended.of(meta)
    except TarError as exc:
        raise GuardError(f"inner archive: malformed extended header ({exc})") from None


def round_up(size: int) -> int:
    return (size + BLOCK - 1) // BLOCK * BLOCK


def pax_size(meta: list[bytes]) -> int | None:
    """A pax ``size`` record overrides the header's size field, for tar too."""
    value = extended(meta).pax.get("size")
    if value is None:
        return None
    if not (value.isascii() and value.isdigit()):
        raise GuardError("inner archive: malformed pax size record")
    return int(value)


def outside(name: str, prefix: str) -> bool:
    """Whether an inner member name escapes its stored file's prefix.

    Qubes' writer named every member PREFIX or PREFIX/...: ``vm7/private.img``,
    ``vm3/./root.img`` for a template stored as ``vm3/.``.
    """
    if name.startswith("/") or ".." in name.split("/"):
        return True
    return not (name == prefix or name.startswith(prefix + "/"))


def member_name(header: bytes, meta: list[bytes]) -> str:
    """The name tar extracts the member under (a GNU sparse 0.1/1.0 member, as
    Qubes R4 wrote, under GNU.sparse.name, not its GNUSparseFile.N/ header name)."""
    return readable(extended(meta).name(header))


@dataclass
class TarGuard:
    """Copy a tar stream from ``src`` to ``dst`` (fds it owns), screening members."""

    src: int
    dst: int
    limit: int | None
    label: str
    prefix: str | None = None  # every member must be this, or under it
    passed: int = 0
    skipped: list[str] = field(default_factory=list)
    error: str | None = None
    # Paths of the members that are not folders (files, links): nothing may
    # later be written beneath one, as it would go through a symlink.
    _leaves: set[str] = field(default_factory=set)
    # restore --salvage only: each member's extent (None: not recorded), and
    # the bytes of dropped members, so that offsets count the archive as read
    layout: list[Extent] | None = None
    dropped_in: int = 0

    def run(self) -> None:
        try:
            self._run()
        except GuardError as exc:
            self.error = str(exc)
        except OSError as exc:
            # EPIPE: tar stopped reading (it failed, or the archive ended);
            # tar's own status says which.
            if exc.errno != errno.EPIPE:
                self.error = f"inner archive guard: {exc.strerror}"
        finally:
            for fd in (self.src, self.dst):
                with contextlib.suppress(OSError):
                    os.close(fd)

    def _check_names(self, kind: int, header: bytes, meta: list[bytes]) -> None:
        assert self.prefix is not None
        name = member_name(header, meta)
        if outside(name, self.prefix):
            raise GuardError(f"{self.label}: inner archive member {name[:200]!r} lies "
                             f"outside {self.prefix!r}; refused")
        parts = [p for p in name.split("/") if p not in ("", ".")]
        for depth in range(1, len(parts)):
            above = "/".join(parts[:depth])
            if above in self._leaves:
                raise GuardError(f"{self.label}: inner archive member {name[:200]!r} "
                                 f"would be written through {above!r}, which is not a "
                                 "folder (a symlink trick?); refused")
        key = "/".join(parts)
        if kind == ord("5"):
            if key in self._leaves:
                raise GuardError(f"{self.label}: inner archive folder {name[:200]!r} "
                                 "replaces a file or link of the same name; refused")
        else:
            self._leaves.add(key)
        if kind == ord("1"):
            target = readable(extended(meta).linkname(header))
            if outside(target, self.prefix):
                raise GuardError(f"{self.label}: inner archive hard link {name[:200]!r} "
                                 f"points outside {self.prefix!r} ({target[:200]!r}); "
                                 "refused")

    def _read(self, size: int) -> bytes:
        parts = []
        while size:
            block = os.read(self.src, min(size, _SPLICE))
            if not block:
                raise GuardError(f"{self.label}: inner archive ends inside a member "
                                 "(truncated)")
            parts.append(block)
            size -= len(block)
        return b"".join(parts)

    def _write(self, data: bytes) -> None:
        self._count(len(data))
        view = memoryview(data)
        while view:
            view = view[os.write(self.dst, view):]

    def _count(self, size: int) -> None:
        self.passed += size
        if self.limit is not None and self.passed > self.limit:
            raise GuardError(
                f"{self.label}: expands past {self.limit} bytes, far more than qubes.xml "
                "declares for it (a decompression bomb?); stopped (--no-size-limit "
                "lifts this check)")

    def _splice(self, size: int) -> None:
        while size:
            self._count(0)
            moved = splice(self.src, self.dst, min(size, _SPLICE))
            if moved == 0:
                raise GuardError(f"{self.label}: inner archive ends inside a member "
                                 "(truncated)")
            size -= moved
            self._count(moved)

    def _skip(self, size: int) -> None:
        while size:
            block = os.read(self.src, min(size, _SPLICE))
            if not block:
                raise GuardError(f"{self.label}: inner archive ends inside a member "
                                 "(truncated)")
            size -= len(block)

    def _rest(self) -> None:
        # After the end-of-archive block: pass what follows (padding) until
        # EOF; tar may already have stopped reading, which is fine.
        with contextlib.suppress(BrokenPipeError):
            while True:
                moved = splice(self.src, self.dst, _SPLICE)
                if moved == 0:
                    return
                self._count(moved)

    def _run(self) -> None:
        meta: list[bytes] = []
        while True:
            header = os.read(self.src, BLOCK)
            if not header:
                # GNU tar and Qubes R4's writer both end an archive with zero
                # blocks; GNU tar silently accepts an archive cut at a member
                # boundary, so a lost last chunk would go unnoticed.
                raise GuardError(f"{self.label}: inner archive ends without its end-of-archive "
                                 "marker (truncated: its last chunk missing?)")
            if len(header) < BLOCK:
                header += self._read(BLOCK - len(header))
            if header == ZERO_BLOCK:
                self._write(b"".join(meta) + header)
                self._rest()
                return
            if not checksum_ok(header):
                raise GuardError(f"{self.label}: inner archive has a damaged header "
                                 f"(after {self.passed} bytes)")
            kind = header[156]
            size = header_size(header)
            if kind in PREFIX_TYPES:
                if size > MAX_EXTENDED:
                    raise GuardError(f"{self.label}: inner archive has a {size}-byte "
                                     "name/pax header; refused")
                meta.append(header + self._read(round_up(size)))
                continue
            if kind == ord("g"):
                data = self._read(round_up(size))
                try:
                    records = pax_records(data[:size])
                except TarError as exc:
                    raise GuardError(f"{self.label}: inner archive has a malformed global "
                                     f"header ({exc}); refused") from None
                if "size" in records:
                    raise GuardError(f"{self.label}: inner archive has a global size "
                                     "record; refused")
                self._write(header + data)
                continue
            override = pax_size(meta)
            if override is not None:
                size = override
            extension = b""
            if kind == ord("S") and header[482]:
                block = self._read(BLOCK)
                extension = block
                while block[504]:
                    block = self._read(BLOCK)
                    extension += block
            if size and kind not in TYPES_WITH_DATA:
                raise GuardError(f"{self.label}: inner archive member "
                                 f"{member_name(header, meta)!r} of type {chr(kind)!r} claims "
                                 "data; refused")
            if self.prefix is not None and kind in KEPT_TYPES:
                self._check_names(kind, header, meta)
            if kind not in KEPT_TYPES:
                what = DESCRIBE_TYPE.get(kind, f"member of type {chr(kind)!r}")
                self.skipped.append(f"{member_name(header, meta)} ({what}, not restored)")
                self.dropped_in += sum(map(len, meta)) + len(header) + round_up(size)
                meta.clear()
                self._skip(round_up(size))
                continue
            start = self.passed + self.dropped_in
            self._write(b"".join(meta) + header + extension)
            taken = 0
            if self.layout is not None and kind in TYPES_WITH_DATA:
                taken = self._record(header, meta, extension, start, size)
            meta.clear()
            self._splice(round_up(size) - taken)

    def _record(self, header: bytes, meta: list[bytes], extension: bytes, start: int,
                size: int) -> int:
        """restore --salvage: note the member's extent (reading and passing on a
        PAX 1.0 sparse map first); returns the data bytes already passed."""
        assert self.layout is not None
        try:
            found, prefix = extent(header, meta, extension, start, size, self._read)
        except TarError as exc:
            raise GuardError(str(exc)) from None
        self._write(prefix)
        self.layout.append(found)
        return len(prefix)
