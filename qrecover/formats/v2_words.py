"""Format 2's words (stub)."""

from __future__ import annotations

from qrecover.formats.base import Format


class Words2:
    page = "https://www.qubes-os.org/doc/backup-emergency-restore-v2/"
    mount_step = 7
    kit_releases = "Qubes R2-Beta3 to R2"

    def __init__(self, fmt: Format | None) -> None:
        self._fmt = fmt
