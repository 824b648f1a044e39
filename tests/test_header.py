"""backup-header: authentication before parsing, strict parsing, allow-lists."""

from __future__ import annotations

import hmac
import subprocess

import pytest

from qrecover.errors import AuthenticationError, BackupError
from qrecover.formats import parse_header, read_header
from qrecover.formats.v3 import authenticate_header

PASS = b"correct horse"
GOOD = (
    b"version=3\nhmac-algorithm=SHA512\ncrypto-algorithm=aes-256-cbc\n"
    b"encrypted=True\ncompressed=True\ncompression-filter=gzip\n"
)


def hmac_line(data: bytes, algo: str = "sha512", style: str = "(stdin)= ") -> bytes:
    return (style + hmac.new(PASS, data, algo).hexdigest() + "\n").encode()


def test_good_header_parses_into_model() -> None:
    header = read_header(GOOD, hmac_line(GOOD), PASS)
    assert header.version == 3
    assert header.hmac_algorithm == "SHA512"
    assert header.crypto_algorithm == "aes-256-cbc"
    assert header.encrypted and header.compressed
    assert header.filter == "gzip"


@pytest.mark.parametrize(
    "style", ["(stdin)= ", "SHA2-512(stdin)= ", "HMAC-SHA512(backup-header)= "]
)
def test_both_openssl_hmac_styles_accepted(style: str) -> None:
    assert read_header(GOOD, hmac_line(GOOD, style=style), PASS).version == 3


def test_digests_are_tried_until_one_matches() -> None:
    data = GOOD.replace(b"SHA512", b"SHA256")
    digest = authenticate_header(data, hmac_line(data, "sha256"), PASS)
    assert digest.name == "SHA256"
    assert read_header(data, hmac_line(data, "sha256"), PASS).hmac_algorithm == "SHA256"


def test_wrong_passphrase_is_authentication_error() -> None:
    with pytest.raises(AuthenticationError):
        read_header(GOOD, hmac_line(GOOD), b"wrong")


def test_tampered_header_is_authentication_error() -> None:
    with pytest.raises(AuthenticationError):
        read_header(GOOD.replace(b"gzip", b"bzip2"), hmac_line(GOOD), PASS)


def test_named_algorithm_must_be_the_one_that_matched() -> None:
    data = GOOD  # names SHA512, but authenticated with SHA256
    with pytest.raises(BackupError, match="authenticated with SHA256"):
        read_header(data, hmac_line(data, "sha256"), PASS)


def test_hmac_file_that_is_no_hmac_line() -> None:
    with pytest.raises(BackupError, match="not an HMAC line"):
        read_header(GOOD, b"garbage\n", PASS)


@pytest.mark.parametrize(
    ("text", "match"),
    [
        (GOOD.replace(b"aes-256-cbc", b"-in/etc/shadow"), "line 3"),
        (GOOD.replace(b"aes-256-cbc", b"-engine"), "crypto-algorithm"),
        (GOOD.replace(b"aes-256-cbc", b"des-ede3-cbc"), "crypto-algorithm"),
        (GOOD.replace(b"compression-filter=gzip", b"compression-filter=--help"), "filter"),
        (GOOD.replace(b"compression-filter=gzip", b"compression-filter=sh"), "compression"),
        (GOOD.replace(b"SHA512", b"whirlpool"), "hmac-algorithm"),
        (GOOD.replace(b"version=3", b"version=5"), "version 5 is not supported"),
        (GOOD.replace(b"version=3", b"version=x"), "version"),
        (GOOD.replace(b"version=3\n", b""), "no 'version'"),
        (GOOD.replace(b"encrypted=True\n", b""), "encrypted"),
        (GOOD.replace(b"encrypted=True", b"encrypted=maybe"), "encrypted"),
        (GOOD + b"version=3\n", "duplicate key"),
        (GOOD + b"a=b=c\n", "exactly one"),
        (GOOD + b"noequals\n", "exactly one"),
        (GOOD + "k=v\u00e9\n".encode(), "not ASCII"),
        (GOOD + b"k=v w\n", "A-Z"),
        (GOOD + b"k=" + b"x" * 5000 + b"\n", "larger than"),
    ],
)
def test_header_values_are_checked(text: bytes, match: str) -> None:
    with pytest.raises(BackupError, match=match):
        parse_header(text)


def test_unknown_keys_are_ignored() -> None:
    assert parse_header(GOOD + b"future-key=1\n").version == 3


def test_uncompressed_unencrypted() -> None:
    text = b"version=3\nhmac-algorithm=SHA512\nencrypted=False\ncompressed=False\n"
    header = parse_header(text)
    assert header.filter is None and not header.encrypted


def test_compressed_without_filter_defaults_to_gzip() -> None:
    text = b"version=3\nhmac-algorithm=SHA512\nencrypted=True\ncompressed=True\n"
    assert parse_header(text).filter == "gzip"


def test_hmac_over_4k_refused() -> None:
    line = hmac_line(GOOD)
    with pytest.raises(BackupError):
        read_header(GOOD, line + b" " * 5000, PASS)


def openssl_hmac_line(data: bytes, algo: str) -> bytes:
    """The line Qubes' writer stored: ``openssl dgst -ALGO -hmac PASS`` of ``data``."""
    return subprocess.run(
        ["openssl", "dgst", f"-{algo}", "-hmac", PASS.decode()],
        input=data, capture_output=True, check=True,
    ).stdout


@pytest.mark.parametrize("algo", ["sha512", "sha256", "sha384", "sha224", "sha1", "md5"])
def test_every_digest_agrees_with_openssl_dgst(algo: str) -> None:
    """The header is authenticated in-process (hashlib); what it is checked against
    was written by the openssl program, so the two must agree for every digest."""
    data = GOOD.replace(b"SHA512", algo.upper().encode())
    written = openssl_hmac_line(data, algo)
    assert read_header(data, written, PASS).hmac_algorithm == algo.upper()
    assert authenticate_header(data, written, PASS).name == algo.upper()
    assert read_header(data, hmac_line(data, algo), PASS).hmac_algorithm == algo.upper()
    with pytest.raises(AuthenticationError):  # and openssl's line for other bytes does not
        read_header(data, openssl_hmac_line(data + b"k=v\n", algo), PASS)
