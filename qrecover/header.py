"""The backup header: authenticated first, then parsed strictly.

The header names the HMAC algorithm that protects it, so it cannot be read
before it is verified.  As Qubes' own reader did, qrecover tries the
allow-listed digests in turn (sha512 first) until one matches, then parses
the text and checks that the algorithm it names is the one that matched.
Format 4 headers are authenticated by scrypt instead (see qrecover.formats).
Every value that reaches a command line is checked against an allow-list.
"""

from __future__ import annotations

import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, ValidationError, field_validator

from qrecover.errors import AuthenticationError, BackupError
from qrecover.verify import ALL_DIGESTS, DIGESTS, Digest, matches, parse_hmac_text

MAX_HEADER = 4096
_TOKEN = re.compile(r"^[A-Za-z0-9-]+$")

# `openssl enc` ciphers accepted from the header; what Qubes' --enc-algo
# could reasonably have named.  Anything else is refused, never passed on.
CIPHER_PATTERN = re.compile(r"^(aes|camellia|aria)-(128|192|256)-(cbc|cfb|cfb1|cfb8|ofb|ctr)$")
# Compression filters -> the argv that undoes them.
DECOMPRESSORS: dict[str, tuple[str, ...]] = {
    "gzip": ("gzip", "-d"),
    "pigz": ("pigz", "-d"),
    "bzip2": ("bzip2", "-d"),
    "pbzip2": ("bzip2", "-d"),
    "xz": ("xz", "-d"),
    "lzma": ("xz", "--format=lzma", "-d"),
    "zstd": ("zstd", "-d", "-q"),
}
SUPPORTED_VERSIONS = (3, 4)
# Qubes R4 writes `%Y%m%dT%H%M%S-PID`; it only ever goes into scrypt's
# passphrase, never onto a command line, but is bounded all the same.
BACKUP_ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9-]{0,127}$")


def _parse_bool(value: object) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).lower()
    if text == "true":
        return True
    if text == "false":
        return False
    raise ValueError("must be True or False")


def _check_filter(value: str | None) -> str | None:
    if value is None:
        return None
    if value.lower() not in DECOMPRESSORS:
        raise ValueError(f"not an allowed compression filter (allowed: {', '.join(DECOMPRESSORS)})")
    return value.lower()


def _compression(compressed: bool, compression_filter: str | None) -> str | None:
    """The filter a header means: none if not compressed; gzip if compressed
    without naming one (Qubes wrote that before the key existed)."""
    if not compressed:
        return None
    return compression_filter or "gzip"


class BackupHeader(BaseModel):
    """A verified format-3 backup header."""

    model_config = ConfigDict(frozen=True, populate_by_name=True, extra="ignore")

    version: Literal[3]
    hmac_algorithm: str
    crypto_algorithm: str = "aes-256-cbc"
    encrypted: bool
    compressed: bool
    compression_filter: str | None = None

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
        if value.upper() not in DIGESTS:
            raise ValueError(f"not an allowed digest (allowed: {', '.join(DIGESTS)})")
        return value.upper()

    @field_validator("crypto_algorithm")
    @classmethod
    def _cipher(cls, value: str) -> str:
        if not CIPHER_PATTERN.match(value.lower()):
            raise ValueError("not an allowed openssl cipher")
        return value.lower()

    @field_validator("encrypted", "compressed", mode="before")
    @classmethod
    def _bools(cls, value: object) -> bool:
        return _parse_bool(value)

    @field_validator("compression_filter")
    @classmethod
    def _filter(cls, value: str | None) -> str | None:
        return _check_filter(value)

    @property
    def digest(self) -> Digest:
        return Digest(self.hmac_algorithm)

    @property
    def filter(self) -> str | None:
        """The compression program, or None for an uncompressed backup."""
        return _compression(self.compressed, self.compression_filter)

    def fields(self) -> dict[str, object]:
        return {
            "version": self.version,
            "hmac-algorithm": self.hmac_algorithm,
            "crypto-algorithm": self.crypto_algorithm,
            "encrypted": self.encrypted,
            "compressed": self.compressed,
            "compression-filter": self.filter,
        }


class BackupHeaderV4(BaseModel):
    """A verified format-4 (Qubes R4) backup header."""

    model_config = ConfigDict(frozen=True, populate_by_name=True, extra="ignore")

    version: Literal[4]
    hmac_algorithm: Literal["scrypt"]
    # R4 always encrypts (scrypt does both); early R4.0 could write False.
    encrypted: bool = True
    compressed: bool
    compression_filter: str | None = None
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
        return _parse_bool(value)

    @field_validator("compression_filter")
    @classmethod
    def _filter(cls, value: str | None) -> str | None:
        return _check_filter(value)

    @field_validator("backup_id")
    @classmethod
    def _backup_id(cls, value: str) -> str:
        if not BACKUP_ID_PATTERN.match(value):
            raise ValueError("not a backup id (1-128 of A-Z a-z 0-9 -)")
        return value

    @property
    def filter(self) -> str | None:
        """The compression program, or None for an uncompressed backup."""
        return _compression(self.compressed, self.compression_filter)

    def fields(self) -> dict[str, object]:
        return {
            "version": self.version,
            "hmac-algorithm": self.hmac_algorithm,
            "encrypted": self.encrypted,
            "compressed": self.compressed,
            "compression-filter": self.filter,
            "backup-id": self.backup_id,
        }


# Either format's header, once verified.
AnyHeader = BackupHeader | BackupHeaderV4


def split_header(data: bytes) -> dict[str, str]:
    """Strict `key=value` parsing, as Qubes' reader did; raises BackupError."""
    if len(data) > MAX_HEADER:
        raise BackupError(f"backup-header: {len(data)} bytes, larger than any real header")
    try:
        text = data.decode("ascii")
    except UnicodeDecodeError:
        raise BackupError("backup-header: not ASCII text") from None
    values: dict[str, str] = {}
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        if line.count("=") != 1:
            raise BackupError(f"backup-header line {number}: expected exactly one '='")
        key, value = line.split("=")
        if not _TOKEN.match(key) or not _TOKEN.match(value):
            raise BackupError(
                f"backup-header line {number}: key and value may hold only A-Z a-z 0-9 -"
            )
        if key in values:
            raise BackupError(f"backup-header line {number}: duplicate key '{key}'")
        values[key] = value
    return values


def parse_header(data: bytes) -> AnyHeader:
    """Parse an authenticated header into the model of the version it names."""
    values = split_header(data)
    if "version" not in values:
        raise BackupError("backup-header: no 'version' key")
    version = values["version"]
    if not version.isdigit() or int(version) not in SUPPORTED_VERSIONS:
        raise BackupError(
            f"backup-header: format version {version} is not supported "
            "(qrecover reads format 3, written by Qubes R2 to R3.2, "
            "and format 4, written by Qubes R4)"
        )
    model: type[BackupHeader] | type[BackupHeaderV4]
    model = BackupHeaderV4 if int(version) == 4 else BackupHeader
    try:
        return model.model_validate({k.replace("-", "_"): v for k, v in values.items()})
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            key = ".".join(str(p) for p in err["loc"]).replace("_", "-")
            msg = str(err["msg"]).removeprefix("Value error, ")
            problems.append(f"{key}: {msg}")
        raise BackupError("backup-header: " + "; ".join(problems)) from None


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


def read_header(data: bytes, hmac_text: bytes, passphrase: bytes) -> BackupHeader:
    """Authenticate, then parse, then cross-check the header."""
    digest = authenticate_header(data, hmac_text, passphrase)
    header = parse_header(data)
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
