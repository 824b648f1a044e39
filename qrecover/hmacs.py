"""HMAC checks, done in-process.

The recovery page checks each file with ``openssl dgst -SHA512 -hmac PASS``;
that puts the passphrase on a command line where every local user can read
it, so qrecover computes the same HMAC with Python's ``hmac`` (which uses the
same OpenSSL digests) and only *shows* the openssl command.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from dataclasses import dataclass

# Qubes' reader refuses larger .hmac files; so do we.
MAX_HMAC_FILE = 4096

# Header names (as Qubes wrote them, case-insensitive) -> hashlib name.  This
# is also the allow-list for `hmac-algorithm`, and the order in which digests
# are tried on the header before it can be read (sha512 was the default).
DIGESTS: dict[str, str] = {
    "SHA512": "sha512",
    "SHA256": "sha256",
    "SHA384": "sha384",
    "SHA224": "sha224",
    "SHA1": "sha1",
    "MD5": "md5",
}


@dataclass(frozen=True)
class Digest:
    """An allow-listed HMAC digest: its header name and its hashlib name."""

    name: str  # as in the header, upper case: SHA512

    @property
    def hashlib_name(self) -> str:
        return DIGESTS[self.name]

    @property
    def openssl_flag(self) -> str:
        """The `openssl dgst` option a person would type: -sha512."""
        return "-" + self.hashlib_name

    @property
    def hex_length(self) -> int:
        return hashlib.new(self.hashlib_name).digest_size * 2

    def new(self, key: bytes) -> hmac.HMAC:
        return hmac.new(key, digestmod=self.hashlib_name)


def digest_named(name: str) -> Digest | None:
    upper = name.upper()
    return Digest(upper) if upper in DIGESTS else None


ALL_DIGESTS = tuple(Digest(name) for name in DIGESTS)

# `(stdin)= HEX` (OpenSSL 1.0), `SHA2-512(stdin)= HEX` (OpenSSL 3),
# `HMAC-SHA512(file)= HEX`: only the hex after "= " counts.
_HMAC_LINE = re.compile(rb"^[^\n=]{0,200}= ?([0-9a-fA-F]{32,128})\s*$")


def parse_hmac_text(data: bytes) -> str | None:
    """The hex digest in an ``.hmac`` file's text, lower case; None if malformed."""
    if len(data) > MAX_HMAC_FILE:
        return None
    match = _HMAC_LINE.match(data.strip())
    if match is None:
        return None
    return match.group(1).decode("ascii").lower()


def matches(computed_hex: str, expected_hex: str) -> bool:
    return hmac.compare_digest(computed_hex.lower(), expected_hex.lower())
