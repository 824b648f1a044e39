"""The two backup formats, told apart without trusting the header.

Format 3 (Qubes R2-R3.2): each chunk is followed by a ``.hmac`` member; one
``openssl enc -d`` decrypts all of a stored file's chunks as one stream.
Format 4 (Qubes R4): each chunk is a ``.enc`` file that ``scrypt`` both
authenticates and decrypts on its own; the decrypted chunks, concatenated,
are the compressed inner archive.

The header cannot be trusted before it is authenticated, and the two formats
authenticate it differently, so the format is decided by the *shape* of
``backup-header.hmac``: a file written by ``scrypt enc`` is format 4,
anything else must be a format-3 HMAC line.  Only after authentication is
the header parsed, and the version it names must agree.

Each format is an object with the steps that differ; the engine
(qrecover.restore) calls them and does everything else the same way.
"""

from __future__ import annotations

import hmac
import tempfile
from dataclasses import dataclass
from pathlib import Path

from qrecover.container import HEADER, HEADER_HMAC, ChunkName
from qrecover.decompress import decompress_stage
from qrecover.decrypt import decrypt_stage
from qrecover.errors import AuthenticationError, BackupError
from qrecover.header import MAX_HEADER, BackupHeader, BackupHeaderV4, parse_header, read_header
from qrecover.runner import CommandLog, Stage, StageResult, log_command
from qrecover.scrypt import (
    HEADER_PREFIX,
    ScryptTool,
    chunk_prefix,
    decrypt_file,
    detect_scrypt,
    is_scrypt_file,
    render_dec,
)

# scrypt adds a 96-byte header and a 32-byte HMAC to what it encrypts.
SCRYPT_OVERHEAD = 128
# The largest backup-header.hmac either format can have.
MAX_HEADER_HMAC = MAX_HEADER + SCRYPT_OVERHEAD


@dataclass(frozen=True)
class Format3:
    """Qubes R2-R3.2: HMAC per chunk, one openssl stream per stored file."""

    header: BackupHeader
    version = 3

    @property
    def authenticated_with(self) -> str:
        return f"HMAC-{self.header.hmac_algorithm}"

    def stream_stages(self, gunzip: str = "gzip") -> list[Stage]:
        """What the verified chunks of a stored file go through, before tar."""
        stages = (decrypt_stage(self.header), decompress_stage(self.header, gunzip))
        return [s for s in stages if s is not None]

    def programs(self, gunzip: str = "gzip") -> list[str]:
        return [s.program for s in self.stream_stages(gunzip)]


@dataclass(frozen=True)
class Format4:
    """Qubes R4: every chunk is scrypt-encrypted and authenticated on its own."""

    header: BackupHeaderV4
    tool: ScryptTool
    version = 4

    @property
    def authenticated_with(self) -> str:
        return "scrypt"

    def stream_stages(self, gunzip: str = "gzip") -> list[Stage]:
        """What the decrypted chunks of a stored file go through, before tar."""
        stage = decompress_stage(self.header, gunzip)
        return [stage] if stage is not None else []

    def programs(self, gunzip: str = "gzip") -> list[str]:
        return ["scrypt", *(s.program for s in self.stream_stages(gunzip))]

    def chunk_prefix(self, chunk: ChunkName) -> str:
        """``BACKUPID!vm7/private.img.000!``: what precedes the passphrase."""
        return chunk_prefix(self.header.backup_id, chunk.data_name)

    def decrypt_chunk(
        self,
        chunk: ChunkName,
        src: Path,
        dst: Path,
        passphrase: str,
        log: CommandLog = log_command,
    ) -> StageResult:
        """Authenticate and decrypt one chunk into ``dst`` (usable only if ok)."""
        prefix = self.chunk_prefix(chunk)
        shown = render_dec(self.tool, chunk.name, chunk.data_name, prefix)
        return decrypt_file(self.tool, src, dst, prefix + passphrase, shown, log)


Format = Format3 | Format4


def authenticate(
    header: bytes, header_hmac: bytes, passphrase: str, log: CommandLog = log_command
) -> Format:
    """Authenticate ``backup-header`` with ``backup-header.hmac``, then parse it.

    Raises AuthenticationError (exit 3) when the passphrase does not
    authenticate the header, BackupError (exit 4) for a malformed header or
    one naming a version that is not the one it was authenticated as.
    """
    if not is_scrypt_file(header_hmac):
        return Format3(read_header(header, header_hmac, passphrase.encode("utf-8")))
    tool = detect_scrypt(log)
    verified = _scrypt_header(tool, header_hmac, passphrase, log)
    if not hmac.compare_digest(verified, header):
        raise AuthenticationError(
            f"{HEADER}: differs from the authenticated copy in {HEADER_HMAC}: the header "
            "was altered or damaged; nothing was written"
        )
    log(f"diff -qs {HEADER} {HEADER}.verified  # done in-process: identical")
    parsed = parse_header(header)
    if not isinstance(parsed, BackupHeaderV4):
        raise BackupError(
            f"{HEADER}: names format {parsed.version} but was authenticated with scrypt, "
            "as format 4 is"
        )
    return Format4(parsed, tool)


def _scrypt_header(
    tool: ScryptTool, header_hmac: bytes, passphrase: str, log: CommandLog
) -> bytes:
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
