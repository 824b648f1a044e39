"""What a run asks for and what became of it: plain data for the commands."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from qrecover.errors import OutputError, QrecoverError
from qrecover.events import Mode, about
from qrecover.inventory import Entity, Inventory

if TYPE_CHECKING:
    from qrecover.damage import Damage
    from qrecover.fallback import ChunkDamage
    from qrecover.formats.base import Format
    from qrecover.header import Header
    from qrecover.plan import Plan
    from qrecover.salvage import SalvageReport


@dataclass
class Request:
    mode: Mode
    vms: Sequence[str] = ()
    output: Path | None = None
    force: bool = False
    size_limit: bool = True
    # Walk the same steps as the restore up to the plan (header, qubes.xml,
    # the plan and what would stop it), and start nothing of the stored files.
    dry_run: bool = False
    exclude: Sequence[str] = ()  # --exclude NAME...
    skip_dom0_home: bool = False
    # How many per-chunk steps may run at once (format 4's scrypt dec);
    # None: as many as the cores and the memory allow.
    jobs: int | None = None
    resume: bool = False  # --resume: skip what DIR's record says is placed
    # --salvage: use chunks that fail authentication, knowingly (qrecover.salvage)
    salvage: bool = False
    other_copies: Sequence[str] = ()  # --other-copy PATH...: where lost chunks may be found
    # Only these stored files of each selected VM (names below its folder:
    # "private.img"); empty: all of them.  ``qrecover files BACKUP --vm``.
    only: tuple[str, ...] = ()

    def wants(self, stored: str, owner: Entity) -> bool:
        """Is this stored file of a selected VM asked for?  A folder stored
        whole (an R2-R3.2 template's ``vm3/.``) holds every file of the VM."""
        if not self.only or stored in (owner.backup_path, f"{owner.backup_path}/."):
            return True
        return stored in {f"{owner.backup_path}/{name}" for name in self.only}


@dataclass
class FileResult:
    """What became of one stored file."""

    stored: str
    owner: str  # VM name, "dom0", or "" for qubes.xml
    chunks: int = 0
    stored_bytes: int = 0
    restored_bytes: int = 0
    members: int = 0
    places: list[Path] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    failure: QrecoverError | None = None
    expanded: int = 0  # bytes of inner archive the guard let through
    kept: bool = False  # placed by an earlier run; skipped by --resume
    salvage: SalvageReport | None = None  # placed with unverified chunks (--salvage)

    @property
    def ok(self) -> bool:
        return self.failure is None

    @property
    def error(self) -> str | None:
        return self.failure.message if self.failure is not None else None

    @property
    def output_trouble(self) -> bool:
        return isinstance(self.failure, OutputError)

    @property
    def problem(self) -> str:
        """``STORED: what went wrong``, naming the stored file once."""
        return about(self.stored, self.error or "ok")


@dataclass
class Report:
    fmt: Format | None = None
    inventory: Inventory | None = None
    selected: tuple[Entity, ...] = ()
    files: list[FileResult] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)  # not tied to one stored file
    output: Path | None = None
    plan: Plan | None = None
    stops: list[OutputError] = field(default_factory=list)  # what would stop a restore
    kept: tuple[str, ...] = ()  # restore --dry-run --resume: what an earlier run placed
    excused: frozenset[str] = frozenset()  # ... and the existing targets that are its work
    salvaged: Path | None = None  # --salvage: the SALVAGED.txt written
    # Chunks BACKUP lost (missing, unreadable, failing their check), each with the
    # other copy it was taken from, if any (qrecover.fallback).
    chunk_damage: list[ChunkDamage] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # said, but no failure
    damage: list[Damage] = field(default_factory=list)  # damaged ranges (qrecover.damage)
    nothing_left: bool = False  # --resume of a restore that finished (qrecover.resume)
    # --other-copy given: the damaged ranges of BACKUP are told, but a run whose every
    # stored file came out whole (its lost chunks good in a copy) is a success
    healed_by_copies: bool = False

    @property
    def header(self) -> Header | None:
        return self.fmt.header if self.fmt is not None else None

    @property
    def ok(self) -> bool:
        files_ok = all(f.ok for f in self.files)
        damage_ok = not self.damage or (self.healed_by_copies and files_ok)
        return not self.problems and damage_ok and files_ok


class Observer(Protocol):
    """How the pass tells its progress: a RunContext, which makes each call an
    event for the run's listeners (the live line, the per-file lines)."""

    def file_started(self, stored: str, owner: str) -> None: ...
    def data_read(self, stored: str, nbytes: int) -> None: ...
    def in_flight(self, chunks: int) -> None: ...
    def file_done(self, result: FileResult) -> None: ...


def missing(
    selected: Sequence[Entity], files: Sequence[FileResult], only: Sequence[str] = ()
) -> list[str]:
    """What qubes.xml says is in the backup and the pass never met.  Not asked
    with ``only`` (a few stored files were asked for: the caller checks them)."""
    if only:
        return []
    found = {f.stored for f in files}
    problems = []
    for entity in selected:
        required = entity.required_stored()
        if required is None and not any(f.owner == entity.name for f in files):
            required = f"{entity.backup_path}/*"
        if required is not None and required not in found:
            problems.append(
                f"{required}: missing from the backup, although qubes.xml says "
                f"{entity.name}'s data is in it (truncated or damaged backup?)"
            )
    return problems
