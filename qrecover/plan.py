"""The plan: what goes where, through which stages, and what would stop it.

Pure: built from the authenticated format, the selected VMs and the
request, it decides every stored file's stages (the decompressor that will
really run included), where it is placed, its decompression budget, and
which files in the output folder would stop the run.  ``restore``,
``verify``, ``restore --dry-run``, ``qrecover script`` and ``--transcript``
all read the same plan, so what they show cannot drift from what runs.
:func:`obstacles` reads the file system (writing nothing), so that the dry
run and the restore stop for the same reasons.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from qrecover.archive.members import QUBES_XML
from qrecover.errors import OutputError, WouldOverwrite
from qrecover.events import Mode, SinkKind
from qrecover.formats.base import Format
from qrecover.inventory import DOM0, MAX_XML, Entity
from qrecover.runner import Stage
from qrecover.stages.extract import extract_stage, list_stage, placement, qubes_xml_stage

# How far an entity's inner archives may exceed the size qubes.xml declares
# for it (du of the VM's folder) before qrecover calls it a decompression bomb.
SIZE_FACTOR = 2
SIZE_SLACK = 64 * 1024 * 1024
# R4.3 stores a qube without any file as the zero-byte ``vmN/empty`` (its
# writer's /run/qubes/empty), only so that the qube's folder is in the
# backup; Qubes' restore drops it.  Its inner archive is a few tar blocks.
PLACEHOLDER = "empty"
PLACEHOLDER_LIMIT = 1024 * 1024


@dataclass(frozen=True)
class Sink:
    """Where a stored file's inner archive goes."""

    kind: SinkKind
    staging: Path | None = None
    strip: int = 0
    folder_rel: str = ""
    limit: int | None = None  # bytes the inner archive may expand to
    placeholder: bool = False  # R4.3's ``vmN/empty``: restored as the empty folder
    extractor: str = "tar"  # what extracts it (Plan.extractor_for)


@dataclass(frozen=True)
class EntityPlan:
    """One selected VM: its stored files (``vm7/F``, or dom0's one), where they go."""

    entity: Entity
    files: str
    strip: int
    folder: str  # output-relative


@dataclass(frozen=True)
class Plan:
    fmt: Format
    mode: Mode
    selected: tuple[Entity, ...]
    gunzip: str  # the gzip decompressor that runs (igzip, pigz or gzip)
    output: Path | None = None
    force: bool = False
    size_limit: bool = True
    extractor: str = "tar"  # what extracts a restored stored file (bsdtar or GNU tar)

    @property
    def extract_with(self) -> str:
        """The extractor that runs: the format's say (GNU tar for tar -M)."""
        return self.fmt.extract_with(self.extractor)

    def extractor_for(self, stored: str) -> str:
        """bsdtar only for a stored file that is one disk image (``vm7/private.img``):
        its speed is there, and the image's name is Qubes' own.  GNU tar, the
        page's tool, for the rest (dom0's home, a template's folder, small
        files), where a person's own names and links are: they are restored as
        the page would, and bsdtar's differences cannot reach them (it exits 1
        on a pax name it cannot convert to the locale, which GNU tar extracts
        as it is; tests/test_extractors.py)."""
        return self.extract_with if stored.endswith(".img") and "/" in stored else "tar"

    def front(self) -> list[Stage]:
        """What every stored file's fed chunks go through before tar."""
        return self.fmt.stream_stages(self.gunzip)

    def stages(self, sink: Sink) -> list[Stage]:
        stages = self.front()
        if sink.kind is SinkKind.CAPTURE:
            stages.append(qubes_xml_stage())
        elif sink.kind is SinkKind.LIST:
            stages.append(list_stage())
        else:
            assert sink.staging is not None
            stages.append(extract_stage(sink.staging, sink.strip, sink.extractor))
        return stages

    def budget(self, entity: Entity) -> int | None:
        """What an entity's inner archives may expand to; None: no limit."""
        if not self.size_limit or entity.size <= 0:
            return None
        return entity.size * SIZE_FACTOR + SIZE_SLACK

    def sink(self, entity: Entity, stored: str, staging: Path | None, spent: int) -> Sink:
        budget = self.budget(entity)
        limit = None if budget is None else max(0, budget - spent)
        placeholder = entity.r4 and stored == f"{entity.backup_path}/{PLACEHOLDER}"
        if placeholder:
            # qubes.xml gives such a qube size 0, that is no budget at all
            limit = PLACEHOLDER_LIMIT if limit is None else min(limit, PLACEHOLDER_LIMIT)
        if self.mode is not Mode.RESTORE:
            return Sink(SinkKind.LIST, limit=limit)
        assert staging is not None
        strip, folder = placement(entity.backup_path, entity.dest, stored)
        tool = self.extractor_for(stored)
        return Sink(SinkKind.EXTRACT, staging, strip, folder_rel=folder, limit=limit,
                    placeholder=placeholder, extractor=tool)

    def entities(self) -> list[EntityPlan]:
        plans = []
        for entity in self.selected:
            sample = entity.backup_path if entity.name == DOM0 else f"{entity.backup_path}/F"
            strip, folder = placement(entity.backup_path, entity.dest, sample)
            plans.append(EntityPlan(entity, sample, strip, folder))
        return plans

    def targets(self) -> list[str]:
        """Output-relative paths the restore writes (each VM's folder, qubes.xml)."""
        return [QUBES_XML, *(e.dest for e in self.selected)]


# qubes.xml is captured whole, whatever qubes.xml says of sizes.
XML_SINK = Sink(SinkKind.CAPTURE, limit=MAX_XML + SIZE_SLACK)


def existing(root: Path, rels: Sequence[str]) -> list[Path]:
    return [root / rel for rel in rels if os.path.lexists(root / rel)]


def obstacles(
    plan: Plan, excused: Callable[[Path], bool] | None = None, resuming: bool = False
) -> list[OutputError]:
    """What in the output folder would stop the restore (writes nothing).

    Even with --force, nothing is written through a symbolic link inside
    DIR; without it, nothing that exists is replaced, except what ``excused``
    lets pass (an earlier run's own files, for --resume).
    """
    if plan.output is None:
        return []
    root = plan.output
    found: list[OutputError] = []
    # The real run's Output.prepare() refuses these before anything else.
    if root.is_symlink() and not root.is_dir():
        return [OutputError(f"{root}: is a dangling symbolic link")]
    if root.exists() and not root.is_dir():
        return [OutputError(f"{root}: exists and is not a folder")]
    for rel in plan.targets():
        path = root
        for part in Path(rel).parts:
            path = path / part
            if path.is_symlink():
                found.append(OutputError(
                    f"{path}: is a symbolic link; refusing to write through it",
                    hint="remove it or choose another --output",
                ))
                break
    if found or plan.force:
        return found
    conflicts = [p for p in existing(root, plan.targets()) if not (excused and excused(p))]
    if conflicts:
        shown = ", ".join(str(p) for p in conflicts[:5])
        found.append(WouldOverwrite(
            f"would overwrite existing files: {shown}",
            hint="choose an empty --output folder, use --force"
            + ("" if resuming else ", or --resume to continue an interrupted restore of the "
               "same backup"),
        ))
    return found


def doomed(plan: Plan) -> list[OutputError]:
    """With --force, a VM's folder that exists and is not a folder: the restore
    goes on with the other VMs, but that one fails (exit 6), so a dry run says so."""
    if plan.output is None or not plan.force:
        return []
    found: list[OutputError] = []
    for entity in plan.selected:
        path = plan.output
        for part in Path(entity.dest).parts:
            path = path / part
            if path.is_symlink():
                break  # obstacles() names it
            if path.exists() and not path.is_dir():
                found.append(OutputError(
                    f"{path}: exists and is not a folder, so {entity.name} would not be restored"
                ))
                break
    return found
