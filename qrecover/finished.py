"""Is DIR a restore of this backup that finished?  Asked by ``restore --resume``:
then there is nothing left to do (exit 0).  A restore that ends without error
removes its record (qrecover.resume); so: no record, DIR's qubes.xml byte for
byte this backup's (authenticated; written before any stored file), and every
selected VM's folder there."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Protocol

from qrecover.archive.members import QUBES_XML
from qrecover.output import Output
from qrecover.resume import RECORD_NAME


class Planned(Protocol):
    @property
    def folder(self) -> str: ...


def finished_before(output: Output | None, xml: bytes, vms: Sequence[Planned]) -> bool:
    """Does DIR hold a finished restore of this backup (asked without a record)?
    Its qubes.xml is this one's, byte for byte, and each selected VM's folder is there."""
    assert output is not None
    target = output.root / QUBES_XML
    if os.path.lexists(output.root / RECORD_NAME):
        return False  # an unfinished restore: --resume goes on with it
    if target.is_symlink() or not target.is_file():
        return False
    with target.open("rb") as f:
        if f.read(len(xml) + 1) != xml:
            return False
    return all(os.path.isdir(output.root / vm.folder) for vm in vms)
