"""The inner archive: GNU tar extracts (or lists) each stored file.

GNU tar is used because the inner archives are GNU tar with sparse members:
holes stay holes, so a 10 GiB mostly-empty image takes little disk.
"""

from __future__ import annotations

from pathlib import Path

from qrecover.container import QUBES_XML
from qrecover.runner import Stage


def extract_stage(target: Path, strip: int) -> Stage:
    """Extract into ``target``, dropping the ``backup_path`` prefix.

    ``--no-same-owner``: files belong to the user restoring, never to the
    uids of the machine that wrote the backup (even when run as root).
    GNU tar also refuses member names with ``..`` and strips leading ``/``.
    """
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
