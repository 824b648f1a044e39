"""The outer archive: a concatenation of small tar archives, read in one pass.

Qubes appended each chunk and each ``.hmac`` to the backup as its own
``tar -cO --posix`` archive, so the file holds many end-of-archive markers
(the recovery page's ``tar -i``).  qrecover reads it as a stream, never
seeking, so a backup can come from a pipe (``ssh host cat backup |``).  A
folder that a person already untarred by hand (the page's step 1) is read in
the same order.

Member names come from the backup and are checked before any use
(qrecover.archive.members).
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator, Sequence
from pathlib import Path

from qrecover.archive.members import HEADER, MAX_MEMBER, QUBES_XML, Member, written_order
from qrecover.archive.sources import ByteInput, open_input
from qrecover.archive.tarstream import TarReader
from qrecover.damage import DamageLog
from qrecover.errors import BackupError


class StreamSource:
    """Members of a (possibly concatenated) tar stream: a file, pieces, a pipe."""

    def __init__(self, data: ByteInput) -> None:
        self.input = data
        self.label = data.label
        # What the pass will read, for the progress display: the file's or the
        # pieces' sizes; None for a pipe or what a decompressor writes.
        sizes = [piece.size for piece in data.pieces]
        self.size = None if data.via or None in sizes else sum(s or 0 for s in sizes)
        self.damage = data.damage  # the ranges stepped over (qrecover.damage)

    @property
    def position(self) -> int:
        """How far the stream has been read."""
        return self.input.position

    def members(self) -> Iterator[Member]:
        try:
            yield from TarReader(self.input).members()
        finally:
            self.input.close()


class FolderSource:
    """A backup a person already untarred (``tar -i -xf backup`` into a folder)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.label = str(root)
        self.damage = DamageLog()  # chunk files that cannot be read, or fail their check

    def members(self) -> Iterator[Member]:
        names: list[str] = []
        for dirpath, dirnames, filenames in os.walk(self.root):
            dirnames.sort()
            rel_dir = os.path.relpath(dirpath, self.root)
            for filename in filenames:
                rel = filename if rel_dir == "." else f"{rel_dir}/{filename}"
                names.append(rel)
        beta3 = {f"{QUBES_XML}.000", f"{QUBES_XML}.000.hmac"} <= set(names)  # R2-Beta3: none
        if HEADER not in names and not beta3:
            raise BackupError(
                f"{self.root}: no backup-header in this folder (is it an untarred Qubes backup?)"
            )
        for name in sorted(names, key=written_order):
            path = self.root / name
            st = path.lstat()
            if not stat.S_ISREG(st.st_mode):
                raise BackupError(f"{path}: not a regular file")
            if st.st_size > MAX_MEMBER:  # as for a tar member: scratch stays bounded
                raise BackupError(f"{path}: {st.st_size} bytes, more than any chunk Qubes "
                                  "writes (100 MiB)")
            yield Member(name, st.st_size, path=path)


def open_source(backups: str | Sequence[str]) -> StreamSource | FolderSource:
    """BACKUP as given on the command line: a file, ``-`` for stdin, a folder,
    or the pieces of a split backup in order."""
    if isinstance(backups, str):
        backups = [backups]
    if len(backups) == 1 and backups[0] != "-" and Path(backups[0]).is_dir():
        return FolderSource(Path(backups[0]))
    return StreamSource(open_input(backups))
