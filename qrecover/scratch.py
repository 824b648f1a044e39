"""Private scratch: chunks copied off the stream, and fresh names for the rest.

Scratch is a ``0700`` folder (inside the output folder for a restore) with
``0600`` files.  A chunk is copied there while its HMAC is computed, and
what is fed on is that copy: a file in an untarred folder could change
between its check and its use.  A full disk here is a :class:`DiskFull`.
"""

from __future__ import annotations

import contextlib
import errno
import hmac
import os
from pathlib import Path
from typing import IO

from qrecover.archive.members import READ_SIZE, Member, Truncated, Unreadable
from qrecover.errors import DiskFull, OutputError
from qrecover.hmacs import Digest
from qrecover.report import Observer
from qrecover.runner import CommandLog
from qrecover.stored import StoredFile


class ScratchNames:
    """Fresh names in private scratch: ``stage-1``, ``plain-1``, ``plain-2`` ..."""

    def __init__(self, scratch: Path) -> None:
        self.scratch = scratch
        self._numbers: dict[str, int] = {}

    def fresh(self, kind: str) -> Path:
        self._numbers[kind] = self._numbers.get(kind, 0) + 1
        return self.scratch / f"{kind}-{self._numbers[kind]}"


class ChunkStore:
    """What a format may use to read the chunks of one stored file
    (qrecover.formats.base.ChunkStore)."""

    def __init__(
        self,
        names: ScratchNames,
        passphrase: str,
        log: CommandLog,
        observer: Observer,
        job: StoredFile,
    ) -> None:
        self.names = names
        self.scratch = names.scratch
        self.passphrase = passphrase
        self.key = passphrase.encode("utf-8")
        self.log = log
        self.observer = observer
        self.job = job
        self.salvage = job.salvage is not None  # restore --salvage (qrecover.salvage)

    def copy(self, member: Member, digest: Digest | None) -> tuple[Path, bool, str]:
        """Compute the chunk's HMAC under ``digest`` (None: none to compute)
        while copying it to private scratch.  Without a digest, a chunk in a
        folder needs no copy (format 4: scrypt reads it once, and what it
        wrote is what is fed on)."""
        mac = digest.new(self.key) if digest is not None else None
        if member.path is not None and mac is None:
            got = member.path, False, ""
        else:
            path = self.scratch / f"chunk-{member.name.replace('/', '_')}"
            stream = member.open()
            try:
                got = self._copy(member, stream, path, mac)
            finally:
                if member.path is not None:
                    stream.close()
        self.job.result.chunks += 1
        self.job.result.stored_bytes += member.size
        return got

    def scratch_file(self) -> Path:
        return self.names.fresh("plain")

    def drop(self, path: Path, owned: bool) -> None:
        if owned:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()

    def _copy(
        self, member: Member, stream: IO[bytes], path: Path, mac: hmac.HMAC | None
    ) -> tuple[Path, bool, str]:
        stored = self.job.stored
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except OSError as exc:
            raise OutputError(f"scratch file {path}: {exc.strerror}") from None
        got = 0
        try:
            while True:
                try:
                    block = stream.read(READ_SIZE)
                except OSError as exc:
                    if member.path is not None:  # a chunk file of a folder: this chunk only
                        raise Unreadable(f"{member.path}: cannot read ({exc.strerror}): "
                                         "the chunk is lost") from None
                    raise Truncated(f"{member.name}: the backup ends inside this chunk "
                                    f"(truncated backup): {exc}") from None
                except EOFError as exc:  # tarstream: the stream ended early
                    raise Truncated(f"{member.name}: the backup ends inside this chunk "
                                     f"(truncated backup): {exc}") from None
                if not block:
                    break
                got += len(block)
                if mac is not None:
                    mac.update(block)
                self.observer.data_read(stored, len(block))
                view = memoryview(block)
                while view:
                    view = view[os.write(fd, view) :]
        except OSError as exc:
            os.close(fd)
            path.unlink()
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise DiskFull(f"no space left for scratch copy of {member.name} "
                               f"in {self.scratch}") from None
            raise OutputError(f"scratch copy of {member.name}: {exc.strerror}") from None
        except BaseException:
            os.close(fd)
            path.unlink()
            raise
        os.close(fd)
        if got != member.size:
            path.unlink()
            raise Truncated(f"{member.name}: truncated ({got} of {member.size} bytes)")
        return path, True, mac.hexdigest() if mac is not None else ""
