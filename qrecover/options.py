"""The options several commands share, as typer annotations (help text included)."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from qrecover.compat import Annotated

# typer evaluates these at runtime: Optional and List, as Python 3.8 has no X | None
# nor list[str] there

BackupArg = Annotated[
    List[str],
    typer.Argument(
        help="The backup file; '-' to read it from standard input; a folder holding a "
        "backup already untarred by hand (tar -i -xf BACKUP); or the pieces of a split "
        "backup, in order (backup.part-*). A backup compressed as a whole (gzip, bzip2, xz, "
        "zstd) is read through its decompressor.",
        metavar="BACKUP",
    ),
]
PassFileOpt = Annotated[
    Optional[Path],
    typer.Option(
        "--passphrase-file",
        help="Read the passphrase from the first line of this file "
        "(else $QRECOVER_PASSPHRASE, else a prompt on the terminal).",
        metavar="FILE",
    ),
]
NoLimitOpt = Annotated[
    bool,
    typer.Option(
        "--no-size-limit",
        help="Do not stop a stored file that expands to more than twice what qubes.xml "
        "declares for its VM (the decompression-bomb check).",
    ),
]
JobsOpt = Annotated[
    Optional[int],
    typer.Option(
        "--jobs",
        "-j",
        min=1,
        help="Format 4: authenticate and decrypt up to N chunks at once (scrypt dec), "
        "across stored files and VMs. Default: as many as there are cores and the memory "
        "holds (each scrypt dec is capped with -M to its share). Formats 1-3 take no "
        "jobs: their per-chunk work is an HMAC computed while the chunk is copied, and "
        "their decryption (openssl enc, its key derived at once) runs in the stored "
        "file's one stream, so there is nothing costly to run at the same time.",
        metavar="N",
    ),
]
SalvageOpt = Annotated[
    bool,
    typer.Option(
        "--salvage",
        help="Damaged backup, last resort: use chunks that FAIL authentication "
        "anyway and place their files under their final names; every such file and "
        "its unverified byte ranges are listed in DIR/SALVAGED.txt (exit stays 4). "
        "The header and qubes.xml are always authenticated.",
    ),
]
TranscriptOpt = Annotated[
    Optional[Path],
    typer.Option(
        "--transcript",
        help="Write every command run, as the run proceeds, to FILE: a POSIX sh script "
        "that replays the run (verifying every HMAC, or for format 4 authenticating every "
        "chunk with scrypt, again) from any folder.",
        metavar="FILE",
    ),
]
ExplainOpt = Annotated[
    bool,
    typer.Option(
        "--explain",
        help="Narrate each step on stderr, numbered like the recovery page's steps, "
        "with the equivalent command and its result.",
    ),
]
VmOpt = Annotated[
    Optional[List[str]],
    typer.Option(
        "--vm",
        help="Only this VM (repeatable); 'dom0' selects dom0's home. "
        "Default: everything in the backup.",
        metavar="NAME",
    ),
]
ExcludeOpt = Annotated[
    Optional[List[str]],
    typer.Option(
        "--exclude",
        help="Leave out this VM (repeatable; 'dom0': dom0's home), as qvm-backup-restore's.",
        metavar="NAME",
    ),
]
SkipDom0Opt = Annotated[
    bool, typer.Option("--skip-dom0-home", help="Leave out dom0's home folder.")
]

JsonOpt = Annotated[
    bool,
    typer.Option(
        "--json",
        help="Print one JSON document on stdout: the header, every stored file with its "
        "VM, chunks, bytes and status, and the verdict (the human output goes to stderr). "
        "Exit codes are unchanged.",
    ),
]
OtherCopyOpt = Annotated[
    Optional[List[str]],
    typer.Option(
        "--other-copy",
        help="Another copy of the same backup (repeatable): a file, a folder, or its "
        "pieces joined by commas. A chunk that is missing, unreadable or fails its check "
        "in BACKUP is taken from the first copy where it authenticates; so is BACKUP's "
        "header if it is damaged. Its header must be BACKUP's, byte for byte, and "
        "authenticate with the passphrase.",
        metavar="PATH",
    ),
]

# qrecover kit's choice of the Pythons its qrecover.pyz serves (docs/kit.md)
OfflineOpt = Annotated[
    bool,
    typer.Option(
        "--offline",
        help="Do not download: pack what is installed here (the pyz then runs on this "
        "Python and machine only). Without it, kit downloads from the package index "
        "the wheels a pyz for CPython 3.8-3.13 on x86_64 and aarch64 needs, and packs "
        "what is installed only when the index cannot be reached.",
    ),
]
PythonOpt = Annotated[
    Optional[List[str]],
    typer.Option(
        "--python",
        help="Make the pyz for this CPython version (repeatable; default 3.8 to 3.13).",
        metavar="X.Y",
    ),
]
ArchOpt = Annotated[
    Optional[List[str]],
    typer.Option(
        "--arch", help="... and this machine (repeatable: x86_64, aarch64; default both).",
        metavar="ARCH",
    ),
]
