"""Format 3 (Qubes R2-R3.2): an HMAC per chunk, one openssl stream per stored file.

Each chunk ``NAME.NNN`` is followed by ``NAME.NNN.hmac``; the verified
chunks of a stored file, concatenated, are one ``openssl enc`` stream of the
compressed inner archive.  The header names its own HMAC algorithm, so it
cannot be read before it is verified: the allow-listed digests are tried in
turn (sha512 first), as Qubes' reader did.
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional

from pydantic import BaseModel, ConfigDict, field_validator

from qrecover.archive.members import (
    HEADER,
    HEADER_HMAC,
    ChunkName,
    Member,
    Truncated,
    parse_member_name,
)
from qrecover.errors import (
    AuthenticationError,
    BackupError,
    MissingProgramError,
    ProgramFailed,
    StoredFileError,
)
from qrecover.formats.base import (
    ChunkOutcome,
    ChunkStore,
    ChunkWorks,
    InOrder,
    MemberStream,
    PendingChunk,
    Recognition,
    StreamFed,
)
from qrecover.header import Header, check_filter_value, compression, parse_bool
from qrecover.hmacs import ALL_DIGESTS, DIGESTS, MAX_HMAC_FILE, Digest, matches, parse_hmac_text
from qrecover.runner import PASS_ENV, CommandLog, Stage, control
from qrecover.stages.decompress import decompress_stage

VERSION = 3
PAGE = "https://www.qubes-os.org/doc/backup-emergency-restore-v3/"
# `openssl enc` ciphers accepted from the header; what Qubes' --enc-algo
# could reasonably have named.  Anything else is refused, never passed on.
CIPHER_PATTERN = re.compile(r"^(aes|camellia|aria)-(128|192|256)-(cbc|cfb|cfb1|cfb8|ofb|ctr)$")


def allowed_digest(value: str) -> str:
    """A header's ``hmac-algorithm``, allow-listed (formats 2 and 3)."""
    if value.upper() not in DIGESTS:
        raise ValueError(f"not an allowed digest (allowed: {', '.join(DIGESTS)})")
    return value.upper()


def allowed_cipher(value: str) -> str:
    """A header's ``crypto-algorithm``, allow-listed (formats 2 and 3)."""
    if not CIPHER_PATTERN.match(value.lower()):
        raise ValueError("not an allowed openssl cipher")
    return value.lower()


class BackupHeader(BaseModel):
    """A verified format-3 backup header."""

    model_config = ConfigDict(frozen=True, populate_by_name=True, extra="ignore")

    version: Literal[3]
    hmac_algorithm: str
    crypto_algorithm: str = "aes-256-cbc"
    encrypted: bool
    compressed: bool
    compression_filter: Optional[str] = None  # pydantic evaluates it: no X | None (3.8)

    @field_validator("version", mode="before")
    @classmethod
    def _version(cls, value: object) -> int:
        text = str(value)
        if not text.isdigit():
            raise ValueError("must be a number")
        number = int(text)
        if number != 3:
            raise ValueError(f"format {number} is not a format-3 header")
        return number

    @field_validator("hmac_algorithm")
    @classmethod
    def _hmac(cls, value: str) -> str:
        return allowed_digest(value)

    @field_validator("crypto_algorithm")
    @classmethod
    def _cipher(cls, value: str) -> str:
        return allowed_cipher(value)

    @field_validator("encrypted", "compressed", mode="before")
    @classmethod
    def _bools(cls, value: object) -> bool:
        return parse_bool(value)

    @field_validator("compression_filter")
    @classmethod
    def _filter(cls, value: str | None) -> str | None:
        return check_filter_value(value)

    @property
    def digest(self) -> Digest:
        return Digest(self.hmac_algorithm)

    @property
    def filter(self) -> str | None:
        """The compression program, or None for an uncompressed backup."""
        return compression(self.compressed, self.compression_filter)

    def fields(self) -> dict[str, object]:
        return {
            "version": self.version,
            "hmac-algorithm": self.hmac_algorithm,
            "crypto-algorithm": self.crypto_algorithm,
            "encrypted": self.encrypted,
            "compressed": self.compressed,
            "compression-filter": self.filter and (self.compression_filter or self.filter),
        }


def decrypt_stage(header: BackupHeader) -> Stage | None:
    """``openssl enc -d -CIPHER -md md5 -pass env:backup_pass``; None if unencrypted.

    ``-md md5``: Qubes R2-R3.2 used OpenSSL 1.0, whose key derivation
    defaulted to MD5; OpenSSL >= 1.1 defaults to SHA-256 and would fail with
    "bad decrypt".  ``-pass env:``: the passphrase never is in an argv.
    """
    if not header.encrypted:
        return None
    return Stage(
        (
            "openssl",
            "enc",
            "-d",
            f"-{header.crypto_algorithm}",
            "-md",
            "md5",
            "-pass",
            f"env:{PASS_ENV}",
        ),
        secret_env=(PASS_ENV,),
    )


def dgst_command(digest: Digest, member: str) -> str:
    """How the page computes an HMAC (qrecover computes it in-process instead)."""
    return f'openssl dgst {digest.openssl_flag} -hmac "${PASS_ENV}" < {shlex.quote(member)}'


def authenticate_header(data: bytes, hmac_text: bytes, passphrase: bytes) -> Digest:
    """Find the digest under which ``hmac_text`` authenticates ``data``.

    Raises AuthenticationError (exit 3) when none does: the passphrase is
    wrong or the header is damaged, and nothing may be read from it.
    """
    expected = parse_hmac_text(hmac_text)
    if expected is None:
        raise BackupError("backup-header.hmac: not an HMAC line (or larger than 4 KiB)")
    for digest in ALL_DIGESTS:
        if len(expected) != digest.hex_length:
            continue
        mac = digest.new(passphrase)
        mac.update(data)
        if matches(mac.hexdigest(), expected):
            return digest
    raise AuthenticationError(
        "backup-header: the passphrase does not authenticate the header "
        "(wrong passphrase, or the header is damaged); nothing was written",
        hint="check the passphrase (it is case-sensitive); the header is verified before "
        "anything else is read",
    )


def read_header(
    data: bytes, hmac_text: bytes, passphrase: bytes, parse: Callable[[bytes], Header]
) -> BackupHeader:
    """Authenticate, then parse (``parse``: the registry's, which knows every
    version), then cross-check the header."""
    digest = authenticate_header(data, hmac_text, passphrase)
    header = parse(data)
    if not isinstance(header, BackupHeader):
        raise BackupError(
            f"backup-header: names format {header.version} but was authenticated with "
            f"HMAC-{digest.name}, as format 3 is"
        )
    if header.hmac_algorithm != digest.name:
        raise BackupError(
            f"backup-header: names hmac-algorithm={header.hmac_algorithm} but was "
            f"authenticated with {digest.name}"
        )
    return header


def claims(header: bytes, header_hmac: bytes) -> bool:
    """Anything that is not another format's must be a format-3 HMAC line."""
    return True


def open_format(
    header: bytes,
    header_hmac: bytes,
    passphrase: str,
    log: CommandLog,
    parse: Callable[[bytes], Header],
) -> Format3:
    """The format-3 backup whose header ``header_hmac`` authenticates."""
    fmt = Format3(read_header(header, header_hmac, passphrase.encode("utf-8"), parse))
    log(dgst_command(fmt.header.digest, HEADER) + f"  # done in-process: matches {HEADER_HMAC}")
    return fmt


def refused(store: ChunkStore, path: Path, owned: bool, outcome: ChunkOutcome) -> _Done:
    """A chunk that failed its check: dropped, or with --salvage fed on all the
    same, marked unverified (``outcome.reason`` says why)."""
    if store.salvage:
        return _Done(ChunkOutcome(plain=path, owned=owned, checked=outcome.checked,
                                  reason=outcome.reason, unverified=outcome.reason))
    store.drop(path, owned)
    outcome.reason = outcome.reason if outcome.checked else None  # as before --salvage
    return _Done(outcome)


@dataclass(frozen=True)
class _Done:
    """Format 3's chunk needs nothing more once read: its HMAC was computed
    while it was copied, and compared with its .hmac."""

    outcome: ChunkOutcome

    def complete(self) -> ChunkOutcome:
        return self.outcome


@dataclass(frozen=True)
class Format3(StreamFed):
    """Qubes R2-R3.2: HMAC per chunk, one openssl stream per stored file."""

    header: BackupHeader
    version = VERSION
    written_by = "Qubes R2-R3.2"
    verdict = "all HMACs matched"

    @property
    def authenticated_with(self) -> str:
        return f"HMAC-{self.header.hmac_algorithm}"

    def stream_stages(self, gunzip: str = "gzip") -> list[Stage]:
        """What the verified chunks of a stored file go through, before tar."""
        stages = (decrypt_stage(self.header), decompress_stage(self.header, gunzip))
        return [s for s in stages if s is not None]

    def programs(self, gunzip: str = "gzip") -> list[str]:
        return [s.program for s in self.stream_stages(gunzip)]

    def check_programs(self, log: CommandLog) -> None:
        """Is the backup's (allow-listed) cipher in this OpenSSL? Say so now,
        not as a 'bad decrypt' later.  ``openssl enc -list`` exists since 1.1;
        from an OpenSSL that cannot list, nothing is concluded."""
        stage = decrypt_stage(self.header)
        if stage is None:
            return
        flag = stage.argv[3]
        try:
            listed = control("openssl", "enc", "-list", log=log).split()
        except ProgramFailed:  # OpenSSL 1.0 has no -list
            return
        if listed and flag not in listed:
            raise MissingProgramError(
                f"this OpenSSL cannot decrypt {flag[1:]}, the cipher the backup names",
                hint="use an OpenSSL build that has it (openssl enc -list shows what it has)",
            )

    def owns_chunk(self, name: ChunkName) -> bool:
        return not name.is_enc

    def chunk_works(
        self, passphrase: str, scratch: Path, log: CommandLog, jobs: int | None
    ) -> ChunkWorks:
        """The HMAC is computed while the chunk is read: nothing is left to run
        alongside, so each chunk completes in order (--jobs has nothing to do)."""
        return InOrder()

    def identity(self, xml: bytes, xml_macs: Sequence[str]) -> bytes:
        """The header and its HMAC can be byte-identical in two backups; the HMACs
        of qubes.xml's chunks cover ciphertext with a random salt, so they differ
        between any two encrypted backups."""
        return b"\0qubes.xml hmacs\0" + "\0".join(xml_macs).encode()

    def read_chunk(
        self, store: ChunkStore, member: Member, name: ChunkName, members: MemberStream
    ) -> PendingChunk:
        """Copy the chunk to scratch while computing its HMAC, then read its
        ``.hmac`` (the next member) and compare; raises Truncated."""
        digest = self.header.digest
        path, owned, digest_hex = store.copy(member, digest)
        nxt = members.peek()
        nxt_name = parse_member_name(nxt.name) if nxt is not None else None
        if nxt is None or nxt_name != ChunkName(name.stored, name.index, True):
            return refused(store, path, owned, ChunkOutcome(error=StoredFileError(
                f"{member.name}.hmac is missing: the chunk cannot be verified"
            ), reason="its .hmac is missing"))
        members.take()
        try:
            expected_hex = (
                parse_hmac_text(nxt.read_all(MAX_HMAC_FILE)) if nxt.size <= MAX_HMAC_FILE else None
            )
        except Truncated:
            store.drop(path, owned)
            raise
        if expected_hex is None:
            return refused(store, path, owned, ChunkOutcome(error=StoredFileError(
                f"{nxt.name}: not an HMAC line (or larger than 4 KiB)"
            ), reason="its .hmac is not an HMAC line"))
        if not matches(digest_hex, expected_hex):
            return refused(store, path, owned, ChunkOutcome(
                error=StoredFileError(
                    f"{member.name}: HMAC mismatch: the chunk is damaged or was "
                    "tampered with; nothing of it was used"
                ),
                checked=True,
                reason="HMAC mismatch",
            ))
        store.log(dgst_command(digest, member.name) + f"  # done in-process: matches {nxt.name}")
        return _Done(ChunkOutcome(plain=path, owned=owned, checked=True, mac=digest_hex))


# Found by its header: the last the registry tries, it claims whatever is left.
RECOGNISED = Recognition(VERSION, header=claims, authenticate=open_format)
