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


def list_stage() -> Stage:
    return Stage(("tar", "-t", "-f", "-"))


def qubes_xml_stage() -> Stage:
    """Write qubes.xml from its inner archive to stdout."""
    return Stage(("tar", "-x", "-O", "-f", "-", QUBES_XML))
