"""Format 4's by-hand recovery steps for the kit's RECOVERY.txt (qrecover kit)."""

from __future__ import annotations

from qrecover.formats.v4 import PAGE as PAGE_V4
from qrecover.header import Header
from qrecover.inventory import Entity
from qrecover.stages.decompress import decompress_stage


def by_hand(header: Header, example: Entity | None) -> list[str]:
    backup_id = str(getattr(header, "backup_id", "BACKUP-ID"))
    stage = decompress_stage(header)
    unzip = " ".join(stage.argv) if stage is not None else "cat"
    path = example.backup_path if example is not None else "vm1"
    stored = f"{path}/private.img"
    return [
        f"The page: {PAGE_V4}",
        "Format 4 has no .hmac files: scrypt both decrypts and authenticates each",
        "chunk, with its own passphrase. Corrections to the page:",
        "  - decrypt each chunk to a FILE and use it only once scrypt exited 0",
        "    (the page pipes scrypt dec into the decompressor: a bad chunk's bytes",
        "    would then be used before scrypt notices).",
        "  - chunks must be joined in numeric order: find ... | sort -V, never a glob.",
        "",
        "  1. mkdir work && cd work && tar -i -xf /path/to/BACKUP",
        "  2. scrypt dec -P backup-header.hmac header.check  (passphrase:",
        "     backup-header!PASSPHRASE), then cmp header.check backup-header",
        "  3. cat backup-header   (expect:",
        *(f"        {k}={v}" for k, v in header.fields().items()),
        "     )",
        f"  4. for c in $(find {path} -name '*.enc' | sort -V); do",
        "         n=${c%.enc}",
        f"         scrypt dec \"$c\" \"$n\" || break   # passphrase: {backup_id}!$n!PASSPHRASE",
        "     done",
        "     (each chunk has its own passphrase: the backup id, '!', the chunk's name",
        "     without .enc, '!', your passphrase; do the same for qubes.xml.000.enc)",
        f"  5. cat $(find {path} -name '{stored.rsplit('/', 1)[-1]}.[0-9]*' ! -name '*.enc' "
        "| sort -V) |",
        f"         {unzip} | tar -xv --sparse -C OUT",
        "     (one stored file at a time: each is its own stream; its members land",
        f"     in OUT/{path}/...)",
        "  6. to read a VM's files: sudo mount -o loop,ro OUT/.../private.img /mnt",
        "",
        "scrypt asks for each chunk's passphrase on the terminal; scrypt 1.2.1 and",
        "later read it from standard input with -P.",
    ]
