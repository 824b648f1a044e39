"""RECOVERY.txt: the recovery procedure for one backup, as plain text.

Written by ``qrecover kit`` from the authenticated header and qubes.xml, so
it names this backup's own format, VMs, paths and sizes; it never holds the
passphrase (each command says PASSPHRASE where a person types theirs).
"""

from __future__ import annotations

import textwrap
from collections.abc import Sequence

from qrecover import __version__
from qrecover.decompress import decompress_stage
from qrecover.header import AnyHeader
from qrecover.inventory import Entity
from qrecover.progress import human_bytes

PAGE_V3 = "https://www.qubes-os.org/doc/backup-emergency-restore-v3/"
PAGE_V4 = "https://www.qubes-os.org/doc/backup-emergency-restore-v4/"

# program -> (what it is for, Debian/Ubuntu package, Fedora package, Arch package)
PACKAGES: dict[str, tuple[str, str, str, str]] = {
    "python3": ("runs qrecover.pyz (3.10 or later)", "python3", "python3", "python"),
    "sh": ("runs recover.sh (dash or bash)", "dash", "bash", "bash"),
    "tar": ("GNU tar: the outer and inner archives", "tar", "tar", "tar"),
    "openssl": ("decrypts format 3 (and checks HMACs by hand)", "openssl", "openssl",
                "openssl"),
    "scrypt": ("decrypts and authenticates format 4 chunks", "scrypt", "scrypt", "scrypt"),
    "gzip": ("decompresses gzip", "gzip", "gzip", "gzip"),
    "bzip2": ("decompresses bzip2", "bzip2", "bzip2", "bzip2"),
    "xz": ("decompresses xz", "xz-utils", "xz", "xz"),
    "zstd": ("decompresses zstd", "zstd", "zstd", "zstd"),
    "debugfs": ("optional: copies files out of a private.img without mounting",
                "e2fsprogs", "e2fsprogs", "e2fsprogs"),
}


def releases(version: int) -> str:
    if version == 4:
        return "Qubes R4.0 and later (R4.0, R4.1, R4.2, R4.3)"
    return "Qubes R2 (final) to R3.2 (R2, R3.0, R3.1, R3.2)"


def programs(header: AnyHeader) -> list[str]:
    """The programs a restore of this backup needs, in the order of the tool table."""
    needed = ["python3", "sh", "tar"]
    if header.version == 4:
        needed.append("scrypt")
    elif getattr(header, "encrypted", True):
        needed.append("openssl")
    stage = decompress_stage(header)
    if stage is not None:
        needed.append(stage.program)
    needed.append("debugfs")
    return needed


def _tool_table(header: AnyHeader) -> list[str]:
    rows = [("PROGRAM", "DEBIAN/UBUNTU", "FEDORA", "ARCH", "FOR")]
    for program in programs(header):
        why, deb, fed, arch = PACKAGES.get(program, ("", program, program, program))
        rows.append((program, deb, fed, arch, why))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    out = ["  " + "  ".join(c.ljust(w) for c, w in zip(r[:4], widths, strict=True)) + "  " + r[4]
           for r in rows]
    debs = " ".join(dict.fromkeys(PACKAGES[p][1] for p in programs(header) if p in PACKAGES))
    feds = " ".join(dict.fromkeys(PACKAGES[p][2] for p in programs(header) if p in PACKAGES))
    archs = " ".join(dict.fromkeys(PACKAGES[p][3] for p in programs(header) if p in PACKAGES))
    return [*out, "",
            f"  Debian/Ubuntu:  sudo apt-get install {debs}",
            f"  Fedora:         sudo dnf install {feds}",
            f"  Arch:           sudo pacman -S {archs}"]


def _vm_table(selected: Sequence[Entity]) -> list[str]:
    rows = [("VM", "TYPE", "BACKUP PATH", "SIZE", "RESTORED TO")]
    rows += [(e.name, e.type, e.backup_path, f"{human_bytes(e.size)} ({e.size} bytes)",
              f"OUT/{e.dest}/") for e in selected]
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    return ["  " + "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
            for r in rows]


def _by_hand_v3(header: AnyHeader, example: Entity | None) -> list[str]:
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


def _by_hand_v4(header: AnyHeader, example: Entity | None) -> list[str]:
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


def recovery_text(
    header: AnyHeader,
    selected: Sequence[Entity],
    backup_name: str,
    runs_on: str,
    when: str,
) -> str:
    """The whole of RECOVERY.txt."""
    version = header.version
    # the by-hand commands show a VM whose private.img is a stored file of its own
    # (R2-R3.2 stored a template as one archive of its whole folder)
    example = next((e for e in selected if e.name != "dom0" and "Template" not in e.type), None)
    total = sum(e.size for e in selected)
    lines = [
        f"RECOVERY KIT for the Qubes backup {backup_name}",
        f"written by qrecover {__version__} on {when}",
        "=" * 72,
        "",
        "Keep this folder beside the backup. It holds:",
        "  qrecover.pyz   qrecover in one file (needs only python3)",
        "  recover.sh     a POSIX sh recovery script (needs no Python)",
        "  RECOVERY.txt   this text",
        "None of them holds your passphrase: you type it when you restore.",
        "",
        "THE BACKUP",
        f"  format {version}, written by {releases(version)}",
        *(f"  {k}: {v}" for k, v in header.fields().items()),
        "",
        f"VMs in the backup ({len(selected)}, about {human_bytes(total)} restored):",
        *_vm_table(selected),
        "",
        "TOOLS NEEDED (package names)",
        *_tool_table(header),
        "",
        "WAY 1: qrecover.pyz (verifies everything, restores all or some VMs)",
        f"  Runs on: {runs_on}.",
        "  python3 -S -I qrecover.pyz verify /path/to/BACKUP",
        "  python3 -S -I qrecover.pyz restore /path/to/BACKUP --output OUT",
        "  python3 -S -I qrecover.pyz restore /path/to/BACKUP --output OUT --vm NAME",
        "  python3 -S -I qrecover.pyz restore /path/to/BACKUP --dry-run --output OUT",
        "  It asks for the passphrase (or reads --passphrase-file FILE, or",
        "  $QRECOVER_PASSPHRASE). No pip, venv or network is needed: on the first run",
        "  it unpacks its Python packages into ~/.shiv/ (the user's home, even with",
        "  HOME unset); where the home is read-only, give it another folder:",
        "  SHIV_ROOT=/tmp/qrecover-cache python3 -S -I qrecover.pyz ...",
        "  On another CPython version or architecture, use WAY 2 (or a pyz made by",
        "  qrecover's scripts/build-pyz, which runs on CPython 3.10-3.13, x86_64 and aarch64).",
        "",
        "WAY 2: recover.sh (no Python: sh, tar and the tools above)",
        "  Edit the two settings near its top if the backup or the output moved:",
        "    backup='...'   the backup file (or the folder it was untarred into)",
        "    out='...'      the folder to restore into",
        "  then:  sh recover.sh    (it asks for the passphrase, or reads $backup_pass)",
        "  It checks every chunk before any byte of it is decrypted and stops at the",
        "  first problem with a message and a non-zero exit status.",
        "",
        "WAY 3: by hand, following the recovery page",
        *textwrap.indent("\n".join(
            _by_hand_v4(header, example) if version == 4 else _by_hand_v3(header, example)
        ), "  ").splitlines(),
        "",
        "Each VM's data lands in OUT/<vm>/ (dom0's home in OUT/dom0-home/<user>/);",
        "a VM's files are inside its private.img, an ext4 image: mount it read-only",
        "(sudo mount -o loop,ro OUT/work/private.img /mnt) or copy them out without",
        "root: python3 -S -I qrecover.pyz files OUT/work/private.img --output FILES",
        "",
    ]
    return "\n".join(line.rstrip() for line in lines)
