"""RECOVERY.txt: the recovery procedure for one backup, as plain text.

Written by ``qrecover kit`` from the authenticated header and qubes.xml, so
it names this backup's own format, VMs, paths and sizes; it never holds the
passphrase (each command says PASSPHRASE where a person types theirs).
"""

from __future__ import annotations

import textwrap
from collections.abc import Sequence

from qrecover import __version__, formats
from qrecover.compat import zip_strict
from qrecover.formats.base import Format
from qrecover.inventory import Entity
from qrecover.stages.decompress import decompress_stage
from qrecover.units import human_bytes

# program -> (what it is for, Debian/Ubuntu package, Fedora package, Arch package)
PACKAGES: dict[str, tuple[str, str, str, str]] = {
    "python3": ("runs qrecover.pyz (3.8 or later)", "python3", "python3", "python"),
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


def programs(fmt: Format) -> list[str]:
    """The programs a restore of this backup needs, in the order of the tool table."""
    header = fmt.header
    needed = ["python3", "sh", "tar", *formats.words(fmt).kit_programs()]
    stage = decompress_stage(header)
    if stage is not None:
        needed.append(stage.program)
    needed.append("debugfs")
    return needed


def _tool_table(fmt: Format) -> list[str]:
    rows = [("PROGRAM", "DEBIAN/UBUNTU", "FEDORA", "ARCH", "FOR")]
    for program in programs(fmt):
        why, deb, fed, arch = PACKAGES.get(program, ("", program, program, program))
        rows.append((program, deb, fed, arch, why))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    out = ["  " + "  ".join(c.ljust(w) for c, w in zip_strict(r[:4], widths)) + "  " + r[4]
           for r in rows]
    debs = " ".join(dict.fromkeys(PACKAGES[p][1] for p in programs(fmt) if p in PACKAGES))
    feds = " ".join(dict.fromkeys(PACKAGES[p][2] for p in programs(fmt) if p in PACKAGES))
    archs = " ".join(dict.fromkeys(PACKAGES[p][3] for p in programs(fmt) if p in PACKAGES))
    return [*out, "",
            f"  Debian/Ubuntu:  sudo apt-get install {debs}",
            f"  Fedora:         sudo dnf install {feds}",
            f"  Arch:           sudo pacman -S {archs}"]


def _vm_table(selected: Sequence[Entity]) -> list[str]:
    rows = [("VM", "TYPE", "BACKUP PATH", "SIZE", "RESTORED TO")]
    rows += [(e.name, e.type, e.backup_path, f"{human_bytes(e.size)} ({e.size} bytes)",
              f"OUT/{e.dest}/") for e in selected]
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    return ["  " + "  ".join(c.ljust(w) for c, w in zip_strict(r, widths)).rstrip()
            for r in rows]


def recovery_text(
    fmt: Format,
    selected: Sequence[Entity],
    backup_name: str,
    runs_on: str,
    when: str,
) -> str:
    """The whole of RECOVERY.txt."""
    header, words = fmt.header, formats.words(fmt)
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
        f"  format {fmt.version}, written by {words.kit_releases}",
        *(f"  {k}: {v}" for k, v in header.fields().items()),
        "",
        f"VMs in the backup ({len(selected)}, about {human_bytes(total)} restored):",
        *_vm_table(selected),
        "",
        "TOOLS NEEDED (package names)",
        *_tool_table(fmt),
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
        "  On any other Python it says so in one line and exits 5: use WAY 2, which",
        "  needs no Python.",
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
            words.kit_by_hand(example)
        ), "  ").splitlines(),
        "",
        "Each VM's data lands in OUT/<vm>/ (dom0's home in OUT/dom0-home/<user>/);",
        "a VM's files are inside its private.img, an ext4 image: mount it read-only",
        "(sudo mount -o loop,ro OUT/work/private.img /mnt) or copy them out without",
        "root: python3 -S -I qrecover.pyz files OUT/work/private.img --output FILES",
        "",
    ]
    return "\n".join(line.rstrip() for line in lines)
