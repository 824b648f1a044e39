"""Format 4's chunk: how its key is derived, and what becomes of it.

Each chunk ``NAME.NNN.enc`` was written by ``scrypt enc`` under the
passphrase ``BACKUPID!NAME.NNN!PASSPHRASE``.  :class:`ChunkKeys` holds what
that takes (the scrypt found, the backup id) and decrypts one chunk;
:class:`ScryptChunk` is a chunk copied off the stream, still to be checked;
:func:`failure_outcome` is what a chunk scrypt refused becomes.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from qrecover.archive.members import ChunkName
from qrecover.errors import DiskFull, OutputError, StoredFileError
from qrecover.formats.base import ChunkOutcome, ChunkStore
from qrecover.formats.v4.scrypt_tool import ScryptTool, chunk_prefix, decrypt_file, render_dec
from qrecover.runner import CommandLog, StageResult

if TYPE_CHECKING:
    from qrecover.formats.v4.head_start import HeadStart

# scrypt adds a 96-byte header and a 32-byte HMAC to what it encrypts.
SCRYPT_OVERHEAD = 128


@dataclass(frozen=True)
class ChunkKeys:
    """What deriving a chunk's key takes: the installed scrypt and the backup id."""

    tool: ScryptTool
    backup_id: str

    def prefix(self, chunk: str) -> str:
        """``BACKUPID!vm7/private.img.000!``: what precedes the passphrase."""
        return chunk_prefix(self.backup_id, chunk)

    def decrypt(
        self, chunk: ChunkName, src: Path, dst: Path, passphrase: str, log: CommandLog
    ) -> StageResult:
        """Authenticate and decrypt one chunk into ``dst`` (usable only if ok)."""
        prefix = self.prefix(chunk.data_name)
        shown = render_dec(self.tool, chunk.name, chunk.data_name, prefix)
        return decrypt_file(self.tool, src, dst, prefix + passphrase, shown, log)


@dataclass
class ScryptChunk:
    """A chunk copied off the stream, still to be authenticated and decrypted."""

    keys: ChunkKeys
    store: ChunkStore
    member: str
    name: ChunkName
    src: Path
    owned: bool
    plain: Path
    started: HeadStart | None = None  # its scrypt dec, running since before the header

    def complete(self) -> ChunkOutcome:
        """scrypt dec into a scratch file, used only if scrypt exited 0 (it may
        write plaintext before it finds the damage)."""
        store, member = self.store, self.member
        result: StageResult | None = None
        try:
            result = self.keys.decrypt(
                self.name, self.src, self.plain, store.passphrase, store.log
            )
        except OSError as exc:
            return ChunkOutcome(
                error=StoredFileError(f"{member}: could not run scrypt ({exc})")
            )
        finally:
            store.drop(self.src, self.owned)
            if result is None or not result.ok:
                store.drop(self.plain, True)
        if result.ok:
            return ChunkOutcome(plain=self.plain, owned=True, checked=True)
        return failure_outcome(member, result)


def failure_outcome(member: str, result: StageResult) -> ChunkOutcome:
    """What a chunk scrypt did not exit 0 on becomes: nothing of it is used."""
    said = result.describe()
    if result.output_trouble:
        message = f"{member}: {said}"
        error: OutputError | StoredFileError = (
            DiskFull(message) if result.disk_full else OutputError(message)
        )
    else:
        error = StoredFileError(
            f"{member}: scrypt could not authenticate the chunk: it is damaged "
            f"or was tampered with; nothing of it was used ({said})"
        )
    return ChunkOutcome(error=error, checked=True, reason=said)


