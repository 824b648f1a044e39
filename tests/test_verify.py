""".hmac text parsing: only the hex after '= ' counts."""

from __future__ import annotations

import pytest

from qrecover.hmacs import MAX_HMAC_FILE, digest_named, matches, parse_hmac_text

HEX = "ab" * 64


@pytest.mark.parametrize(
    "text",
    [
        f"(stdin)= {HEX}\n",
        f"SHA2-512(stdin)= {HEX}\n",
        f"HMAC-SHA512(private.img.000)= {HEX}",
        f"(stdin)= {HEX.upper()}\n",
    ],
)
def test_styles(text: str) -> None:
    assert parse_hmac_text(text.encode()) == HEX


@pytest.mark.parametrize(
    "text",
    [b"", b"(stdin)= zz", b"no equals " + HEX.encode(), b"(stdin)= " + HEX.encode() + b" trailing"],
)
def test_malformed(text: bytes) -> None:
    assert parse_hmac_text(text) is None


def test_over_4k_refused() -> None:
    text = f"(stdin)= {HEX}".encode().ljust(MAX_HMAC_FILE + 1, b"\n")
    assert parse_hmac_text(text) is None


def test_digest_allow_list() -> None:
    digest = digest_named("sha512")
    assert digest is not None and digest.openssl_flag == "-sha512" and digest.hex_length == 128
    assert digest_named("whirlpool") is None
    assert digest_named("-engine") is None


def test_matches_is_case_insensitive() -> None:
    assert matches(HEX, HEX.upper())
    assert not matches(HEX, "cd" * 64)
