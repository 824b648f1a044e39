"""The inner archive: an extractor unpacks (or GNU tar lists) each stored file.

The inner archives are GNU tar with sparse members (GNU old sparse in format
3, PAX sparse 1.0 in format 4): holes stay holes, so a 10 GiB mostly-empty
image takes little disk.  GNU tar is required, lists archives and captures
qubes.xml; the restore's extraction is done by the fastest installed of
:data:`EXTRACTORS`.  GNU tar writes a sparse member 512 bytes at a time (two
million ``write`` calls for 1 GiB of image, seconds of kernel time); bsdtar
(libarchive) writes each data run at once and seeks over the holes, with the
same bytes and the same holes, in about a fifth of the CPU (scripts/bench,
README "Speed, memory and disk").
"""

from __future__ import annotations

import shutil
from pathlib import Path

from qrecover.container import QUBES_XML
from qrecover.runner import Stage

# Programs that extract a restored stored file, fastest first; the first one
# installed runs.  GNU tar, the recovery page's tool, is always the fallback.
EXTRACTORS = ("bsdtar", "tar")

# bsdtar's protections, stated even where they are its defaults, so that the
# result is GNU tar's as qrecover runs it, as root or not (tests/test_extractors.py):
# no owners restored (GNU tar: --no-same-owner); no ACLs, extended attributes
# (file capabilities among them: as root bsdtar would restore them) or file
# flags (GNU tar restores none of these unless asked).  Without -P, bsdtar
# also strips a leading ``/``, refuses names and hard-link targets with
# ``..``, and refuses to write through any symbolic link (libarchive's
# SECURE_NODOTDOT, SECURE_NOABSOLUTEPATHS, SECURE_SYMLINKS); as root it keeps
# modes as GNU tar does, and a set-user/group-ID bit only where the archive's
# owner is the one restoring (GNU tar keeps them all).
_BSDTAR_SAFE = ("--no-same-owner", "--no-acls", "--no-xattrs", "--no-fflags", "--no-mac-metadata")


def pick_extractor() -> str:
    """The fastest extractor on PATH (``tar`` when none is: it is then
    reported missing like any other program)."""
    return next((name for name in EXTRACTORS if shutil.which(name)), "tar")


def extract_stage(target: Path, strip: int, extractor: str = "tar") -> Stage:
    """Extract into ``target``, dropping the ``backup_path`` prefix.

    ``--no-same-owner``: files belong to the user restoring, never to the
    uids of the machine that wrote the backup (even when run as root).
    GNU tar also refuses member names with ``..`` and strips leading ``/``;
    ``extractor`` is the caller's :func:`pick_extractor` (``bsdtar``: see
    :data:`_BSDTAR_SAFE`).  Both count ``--strip-components`` alike for the
    names Qubes wrote (``vm7/private.img``, ``vm3/./root.img``).
    """
    if extractor == "bsdtar":
        return Stage(
            ("bsdtar", "-x", "-f", "-", "-C", str(target), f"--strip-components={strip}",
             *_BSDTAR_SAFE)
        )
    if extractor != "tar":
        raise ValueError(f"not an extractor: {extractor}")
    return Stage(
        (
            "tar",
            "-x",
            "-f",
            "-",
            "-C",
            str(target),
            f"--strip-components={strip}",
            "--no-same-owner",
        )
    )


def gnu_fallback(stage: Stage) -> Stage | None:
    """The GNU tar command that does what a bsdtar extract stage does (None
    for any other stage): a transcript replays with it where bsdtar is absent."""
    if stage.program != "bsdtar":
        return None
    target = stage.argv[stage.argv.index("-C") + 1]
    strip = next(a for a in stage.argv if a.startswith("--strip-components="))
    return extract_stage(Path(target), int(strip.partition("=")[2]))


def placement(backup_path: str, dest: str, stored: str) -> tuple[int, str]:
    """``(--strip-components, output-relative folder)`` for one stored file.

    A VM's files (``vm7/private.img``) lose the ``backup_path`` prefix and go
    to ``dest`` (``work``); dom0's home is stored under its own name
    (``dom0-home/user``), so it keeps its last component and goes to the
    parent of ``dest`` (``dom0-home``).
    """
    depth = len(backup_path.split("/"))
    if stored == backup_path:
        parent = dest.rsplit("/", 1)[0] if "/" in dest else ""
        return depth - 1, parent
    return depth, dest


def list_stage() -> Stage:
    return Stage(("tar", "-t", "-f", "-"))


def qubes_xml_stage() -> Stage:
    """Write qubes.xml from its inner archive to stdout."""
    return Stage(("tar", "-x", "-O", "-f", "-", QUBES_XML))
