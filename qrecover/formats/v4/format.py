"""Format 4 (Qubes R4): every chunk encrypted and authenticated by scrypt on its own.

Each chunk is ``NAME.NNN.enc``, written by ``scrypt enc`` under the
passphrase ``BACKUPID!NAME.NNN!PASSPHRASE``; the decrypted chunks,
concatenated, are the compressed inner archive.  ``backup-header.hmac`` is
the header encrypted by scrypt under ``backup-header!PASSPHRASE``: a file
that starts like scrypt's output is what tells format 4 from format 3,
before anything of the header is trusted.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional

from pydantic import BaseModel, ConfigDict, field_validator

from qrecover.archive.members import HEADER, HEADER_HMAC, ChunkName, Member
from qrecover.errors import AuthenticationError, BackupError
from qrecover.formats.base import (
    ChunkStore,
    ChunkWorks,
    MemberStream,
    PendingChunk,
    Recognition,
    StreamFed,
)
from qrecover.formats.v4.chunks import SCRYPT_OVERHEAD, ChunkKeys, ScryptChunk
from qrecover.formats.v4.head_start import Replay
from qrecover.formats.v4.head_start import start as start_head
from qrecover.formats.v4.scrypt_tool import (
    HEADER_PREFIX,
    ScryptTool,
    decrypt_file,
    detect_scrypt,
    is_scrypt_file,
    render_dec,
)
from qrecover.formats.v4.works import ScryptWorks
from qrecover.header import MAX_HEADER, Header, check_filter_value, compression, parse_bool
from qrecover.runner import CommandLog, Stage
from qrecover.stages.decompress import decompress_stage

VERSION = 4
PAGE = "https://www.qubes-os.org/doc/backup-emergency-restore-v4/"
# Qubes R4 writes `%Y%m%dT%H%M%S-PID`; it only ever goes into scrypt's
# passphrase, never onto a command line, but is bounded all the same.
BACKUP_ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9-]{0,127}$")
MAX_HEADER_HMAC = MAX_HEADER + SCRYPT_OVERHEAD


class BackupHeaderV4(BaseModel):
    """A verified format-4 (Qubes R4) backup header."""

    model_config = ConfigDict(frozen=True, populate_by_name=True, extra="ignore")

    version: Literal[4]
    hmac_algorithm: Literal["scrypt"]
    # R4 always encrypts (scrypt does both); early R4.0 could write False.
    encrypted: bool = True
    compressed: bool
    compression_filter: Optional[str] = None  # pydantic evaluates it: no X | None (3.8)
    backup_id: str

    @field_validator("version", mode="before")
    @classmethod
    def _version(cls, value: object) -> int:
        if str(value) != "4":
            raise ValueError("not a format-4 header")
        return 4

    @field_validator("hmac_algorithm", mode="before")
    @classmethod
    def _hmac(cls, value: object) -> str:
        if str(value).lower() != "scrypt":
            raise ValueError("format 4 is authenticated with scrypt only")
        return "scrypt"

    @field_validator("encrypted", "compressed", mode="before")
    @classmethod
    def _bools(cls, value: object) -> bool:
        return parse_bool(value)

    @field_validator("compression_filter")
    @classmethod
    def _filter(cls, value: str | None) -> str | None:
        return check_filter_value(value)

    @field_validator("backup_id")
    @classmethod
    def _backup_id(cls, value: str) -> str:
        if not BACKUP_ID_PATTERN.match(value):
            raise ValueError("not a backup id (1-128 of A-Z a-z 0-9 -)")
        return value

    @property
    def filter(self) -> str | None:
        """The compression program, or None for an uncompressed backup."""
        return compression(self.compressed, self.compression_filter)

    def fields(self) -> dict[str, object]:
        return {
            "version": self.version,
            "hmac-algorithm": self.hmac_algorithm,
            "encrypted": self.encrypted,
            "compressed": self.compressed,
            "compression-filter": self.filter and (self.compression_filter or self.filter),
            "backup-id": self.backup_id,
        }


def claims(header_hmac: bytes) -> bool:
    """``backup-header.hmac`` written by ``scrypt enc``: format 4."""
    return is_scrypt_file(header_hmac)


def open_format(
    header: bytes,
    header_hmac: bytes,
    passphrase: str,
    log: CommandLog,
    parse: Callable[[bytes], Header],
) -> Format4:
    """scrypt authenticates ``backup-header.hmac``; its plaintext must be the header."""
    tool = detect_scrypt(log)
    verified = _scrypt_header(tool, header_hmac, passphrase, log)
    if not hmac.compare_digest(verified, header):
        raise AuthenticationError(
            f"{HEADER}: differs from the authenticated copy in {HEADER_HMAC}: the header "
            "was altered or damaged; nothing was written"
        )
    log(f"diff -qs {HEADER} {HEADER}.verified  # done in-process: identical")
    parsed = parse(header)
    if not isinstance(parsed, BackupHeaderV4):
        raise BackupError(
            f"{HEADER}: names format {parsed.version} but was authenticated with scrypt, "
            "as format 4 is"
        )
    return Format4(parsed, tool)


def _scrypt_header(tool: ScryptTool, header_hmac: bytes, passphrase: str, log: CommandLog) -> bytes:
    # The header is tiny and not secret: a private temporary folder will do,
    # before the output folder is even looked at.
    with tempfile.TemporaryDirectory(prefix="qrecover-header-") as tmp:
        src = Path(tmp) / HEADER_HMAC
        dst = Path(tmp) / f"{HEADER}.verified"
        src.write_bytes(header_hmac)
        shown = render_dec(tool, HEADER_HMAC, dst.name, HEADER_PREFIX)
        result = decrypt_file(tool, src, dst, HEADER_PREFIX + passphrase, shown, log)
        if not result.ok:
            raise AuthenticationError(
                f"{HEADER_HMAC}: scrypt could not authenticate it with this passphrase "
                f"({result.describe()}): wrong passphrase, or the header is damaged; "
                "nothing was written",
                hint="check the passphrase (it is case-sensitive); the header is verified "
                "before anything else is read",
            )
        with dst.open("rb") as f:
            return f.read(MAX_HEADER + 1)


@dataclass(frozen=True)
class Format4(StreamFed):
    """Qubes R4: every chunk is scrypt-encrypted and authenticated on its own."""

    header: BackupHeaderV4
    tool: ScryptTool
    version = VERSION
    written_by = "Qubes R4"
    verdict = "every chunk authenticated by scrypt"

    @property
    def authenticated_with(self) -> str:
        return "scrypt"

    def stream_stages(self, gunzip: str = "gzip") -> list[Stage]:
        """What the decrypted chunks of a stored file go through, before tar."""
        stage = decompress_stage(self.header, gunzip)
        return [stage] if stage is not None else []

    def programs(self, gunzip: str = "gzip") -> list[str]:
        return ["scrypt", *(s.program for s in self.stream_stages(gunzip))]

    def check_programs(self, log: CommandLog) -> None:
        pass  # scrypt was found, and how it takes a passphrase, with the header

    def owns_chunk(self, name: ChunkName) -> bool:
        return name.is_enc

    def identity(self, xml: bytes, xml_macs: Sequence[str]) -> bytes:
        """backup-header.hmac is scrypt's output with a random salt; qubes.xml is
        added as scrypt authenticated it."""
        return b"\0qubes.xml\0" + hashlib.sha256(xml).digest()

    @property
    def keys(self) -> ChunkKeys:
        """How each chunk's key is derived and the chunk decrypted."""
        return ChunkKeys(self.tool, self.header.backup_id)

    def chunk_prefix(self, chunk: str) -> str:
        """``BACKUPID!vm7/private.img.000!``: what precedes the passphrase."""
        return self.keys.prefix(chunk)

    def read_chunk(
        self, store: ChunkStore, member: Member, name: ChunkName, members: MemberStream
    ) -> PendingChunk:
        """Copy the ``.enc`` chunk off the stream (from a folder scrypt reads it in
        place: what it writes is what is fed on); raises Truncated."""
        early = member.stream.started if isinstance(member.stream, Replay) else None
        src, owned, _ = store.copy(member, None)
        started = early.claim(member.name, self.header.backup_id) if early else None
        return ScryptChunk(self.keys, store, member.name, name, src, owned, store.scratch_file(),
                           started)

    def chunk_works(
        self, passphrase: str, scratch: Path, log: CommandLog, jobs: int | None
    ) -> ChunkWorks:
        """Several ``scrypt dec`` at once (qrecover.formats.v4.works), at most
        ``jobs`` (None: as many as the cores and the memory allow)."""
        return ScryptWorks(self.keys, passphrase, scratch, log, jobs)


# Found by its header's .hmac, which scrypt enc wrote.
# While its header is authenticated, qubes.xml's first chunk's key derivation
# begins (qrecover.formats.v4.head_start), used only under the authenticated id.
RECOGNISED = Recognition(VERSION, header=lambda _header, mac: claims(mac),
                         authenticate=open_format, head_start=start_head)
