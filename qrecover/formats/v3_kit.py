"""Format 3's by-hand recovery steps for the kit's RECOVERY.txt (qrecover kit)."""

from __future__ import annotations

from qrecover.formats.v3 import PAGE as PAGE_V3
from qrecover.header import Header
from qrecover.inventory import Entity
from qrecover.stages.decompress import decompress_stage


def by_hand(header: Header, example: Entity | None) -> list[str]:
    digest = str(getattr(header, "hmac_algorithm", "SHA512")).lower()
    cipher = str(getattr(header, "crypto_algorithm", "aes-256-cbc"))
    stage = decompress_stage(header)
    unzip = " ".join(stage.argv) if stage is not None else "cat"
    path = example.backup_path if example is not None else "vm1"
    stored = f"{path}/private.img" if example is not None and example.name != "dom0" else path
    return [
        f"The page: {PAGE_V3}",
        "It predates today's OpenSSL and globs chunk names; follow it with these",
        "corrections (they are written into the commands below):",
        "  - openssl enc needs -md md5 (OpenSSL 1.1 and later default to SHA-256,",
        "    Qubes R2-R3.2 used OpenSSL 1.0's MD5 key derivation; without it: bad decrypt).",
        "  - chunks must be joined in numeric order: find ... | sort -V, never",
        "    NAME.??? (a glob drops chunk .1000 and later of images over 100 GB).",
        "  - check the HMAC of EVERY chunk (NAME.000, NAME.001, ...) before decrypting",
        "    any of it, not only the first.",
        "",
        "  1. mkdir work && cd work && tar -i -xf /path/to/BACKUP",
        f"  2. openssl dgst -{digest} -hmac 'PASSPHRASE' backup-header ; cat backup-header.hmac",
        "     (the hex after '= ' must be the same; else stop: tampered or damaged)",
        "  3. cat backup-header   (expect:",
        *(f"        {k}={v}" for k, v in header.fields().items()),
        "     )",
        f"  4. for c in $(find {path} -name '*.[0-9][0-9][0-9]*' ! -name '*.hmac' | sort -V); do",
        f"         openssl dgst -{digest} -hmac 'PASSPHRASE' \"$c\"; cat \"$c.hmac\"; done",
        "     every pair must match (do the same for qubes.xml.000 and every VM's chunks)",
        "  5. printf 'passphrase: '; stty -echo; read -r backup_pass; stty echo",
        "     export backup_pass",
        f"     find {path} -name '{stored.rsplit('/', 1)[-1]}.[0-9]*' ! -name '*.hmac' | sort -V |",
        f"         xargs cat | openssl enc -d -md md5 -{cipher} -pass env:backup_pass \\",
        f"         > {stored}.dec",
        "     (-pass env: keeps the passphrase out of ps; the page's pass:... does not)",
        f"  6./7. {unzip} < {stored}.dec | tar -xv --sparse -C OUT",
        "  8. to read a VM's files: sudo mount -o loop,ro OUT/.../private.img /mnt",
        "",
        "Careful: the passphrase typed on a command line (-hmac 'PASSPHRASE') is seen by",
        "every user of the machine in ps; use a machine no one else is logged in to.",
    ]
