"""The decryption stage: ``openssl enc -d``, one per stored file."""

from __future__ import annotations

from qrecover.header import BackupHeader
from qrecover.runner import PASS_ENV, Stage


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
