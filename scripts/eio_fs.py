#!/usr/bin/env python3
"""A read-only FUSE file system whose reads fail with EIO in chosen byte ranges.

It shows the files of SOURCE (a folder, read only) at MOUNTPOINT; a read of
a file that touches one of its ranges fails with EIO, exactly as a medium's
unreadable sector does: the kernel gets the error from the file system, and
``read(2)`` returns it to the reader.  Used by the tests of damaged backups
(tests/test_damage_eio.py) to test read errors for real, not with a mocked
``read``::

    eio_fs.py SOURCE MOUNTPOINT --bad backup:4096-8192 --bad vm7/x.000:0-512

It runs in the foreground, prints ``ready`` on stdout once mounted, and ends
when unmounted (``fusermount3 -u MOUNTPOINT``) or on SIGTERM.  Direct I/O is
asked for, so that the page cache never hides a failing range and every read
reaches it with the reader's own offsets.
"""

from __future__ import annotations

import argparse
import errno
import os
import stat
import sys
from typing import Any

import mfusepy as fuse


class EioFs(fuse.Operations):  # type: ignore[misc]
    """SOURCE's files, read only; reads touching a bad range fail with EIO."""

    def __init__(self, source: str, bad: dict[str, list[tuple[int, int]]]) -> None:
        self.source = source
        self.bad = bad

    def _real(self, path: str) -> str:
        return os.path.join(self.source, path.lstrip("/"))

    def init(self, path: str) -> None:
        print("ready", flush=True)

    def getattr(self, path: str, fh: int | None = None) -> dict[str, Any]:
        try:
            st = os.lstat(self._real(path))
        except OSError as exc:
            raise fuse.FuseOSError(exc.errno) from None
        mode = st.st_mode & ~0o222  # read only
        return {"st_mode": mode, "st_size": st.st_size, "st_nlink": st.st_nlink,
                "st_mtime": st.st_mtime, "st_atime": st.st_atime, "st_ctime": st.st_ctime,
                "st_uid": st.st_uid, "st_gid": st.st_gid}

    def readdir(self, path: str, fh: int) -> list[str]:
        return [".", "..", *sorted(os.listdir(self._real(path)))]

    def open(self, path: str, flags: int | Any) -> int:
        raw = flags.flags if hasattr(flags, "flags") else flags
        if raw & (os.O_WRONLY | os.O_RDWR):
            raise fuse.FuseOSError(errno.EROFS)
        if hasattr(flags, "direct_io"):
            flags.direct_io = 1  # every read reaches us: no cache hides a bad range
        return os.open(self._real(path), os.O_RDONLY)

    def read(self, path: str, size: int, offset: int, fh: int) -> bytes:
        for start, end in self.bad.get(path.lstrip("/"), []):
            if offset < end and start < offset + size:
                raise fuse.FuseOSError(errno.EIO)
        return os.pread(fh, size, offset)

    def release(self, path: str, fh: int) -> int:
        os.close(fh)
        return 0

    def statfs(self, path: str) -> dict[str, int]:
        st = os.statvfs(self.source)
        return {key: getattr(st, key) for key in ("f_bsize", "f_blocks", "f_bavail",
                                                   "f_bfree", "f_files", "f_ffree", "f_namemax")}


def parse_bad(specs: list[str]) -> dict[str, list[tuple[int, int]]]:
    """``PATH:START-END`` (bytes, END exclusive), repeatable."""
    bad: dict[str, list[tuple[int, int]]] = {}
    for spec in specs:
        path, _, span = spec.rpartition(":")
        start, _, end = span.partition("-")
        bad.setdefault(path, []).append((int(start), int(end)))
    return bad


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source")
    parser.add_argument("mountpoint")
    parser.add_argument("--bad", action="append", default=[], metavar="PATH:START-END")
    args = parser.parse_args()
    if not stat.S_ISDIR(os.stat(args.source).st_mode):
        sys.exit(f"{args.source}: not a folder")
    fuse.FUSE(EioFs(os.path.abspath(args.source), parse_bad(args.bad)), args.mountpoint,
              foreground=True, ro=True, direct_io=True)


if __name__ == "__main__":
    main()
