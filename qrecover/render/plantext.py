"""``restore --dry-run``: the plan, as a person reads it; nothing is written.

What would be restored where (sizes from qubes.xml), what would stop it,
and the command of each step, numbered as on the format's recovery page.
The pipelines are the plan's own stages, so the dry run names the programs
the restore runs (``igzip -d`` where that is what runs).
"""

from __future__ import annotations

import os
from pathlib import Path

from qrecover import formats
from qrecover.archive.members import QUBES_XML
from qrecover.errors import OutputError, WouldOverwrite
from qrecover.plan import Plan
from qrecover.render import shell
from qrecover.stages.extract import extract_stage
from qrecover.units import human_bytes


def plan_text(
    plan: Plan, backup: str, stops: list[OutputError], feed: str | None = None,
    name: str | None = None, kept: tuple[str, ...] = (), excused: frozenset[str] = frozenset(),
) -> str:
    """What ``restore`` would do, and with which commands (``feed``: what
    writes a backup of pieces or compressed as a whole to standard input;
    ``name``: how to call the backup, when not ``backup``)."""
    assert plan.output is not None
    root = Path(os.path.abspath(plan.output))
    words = formats.words(plan.fmt)
    own = words.first_step(backup)
    lines = [
        words.plan_title(name or backup),
        *_targets(plan, root, stops, excused),
        *_kept(kept),
        "",
        "Commands (steps of " + words.procedure.page + "):",
        f"  1    {own}" if own else f"  1    {shell.untar_command(backup, feed=feed)}"
        "   (qrecover streams instead, one chunk at a time)",
        *words.plan_header_steps(plan.gunzip),
    ]
    placeholder = "/STAGING"
    for target in plan.entities():
        image = f"{target.entity.backup_path}/private.img"  # the tool its images get
        tool = plan.extractor_for(image) if target.files != target.entity.backup_path else "tar"
        stages = [*plan.front(), extract_stage(Path(placeholder), target.strip, tool)]
        pipeline = " | ".join(
            shell.render_argv(s.argv, {placeholder: '"$staging"'}) for s in stages
        )
        lines += [
            *words.plan_entity(target.entity, target.files, pipeline, backup),
            f"       then what $staging holds is moved into {root / target.folder}/",
            *(["       (bsdtar for its disk images; GNU tar, tar -x, for its other files)"]
              if tool == "bsdtar" else []),
        ]
    lines.append(words.plan_footer())
    return "\n".join(lines)


def _kept(kept: tuple[str, ...]) -> list[str]:
    if not kept:
        return []
    return [
        "With --resume it would keep, as an earlier run placed them (read through, "
        "not restored again): " + ", ".join(kept)
    ]


def _targets(
    plan: Plan, root: Path, stops: list[OutputError], excused: frozenset[str]
) -> list[str]:
    """Where restore would write, and what would stop it."""
    lines = [
        f"restore would write into {root}"
        + ("" if root.exists() else " (it does not exist yet; it would be created)")
        + ":",
    ]
    rows = [(str(root / QUBES_XML), "the backup's qubes.xml", "")]
    for entity in plan.selected:
        kind = entity.type + (f", template {entity.template}" if entity.template else "")
        rows.append(
            (str(root / entity.dest) + "/", f"{entity.name} ({kind})", human_bytes(entity.size))
        )
    width = max(len(r[0]) for r in rows)
    for target, what, size in rows:
        lines.append(f"  {target.ljust(width)}  {what}" + (f", about {size}" if size else ""))
    conflicts = [
        root / rel
        for rel in plan.targets()
        if os.path.lexists(root / rel) and rel not in excused
    ]
    if conflicts and not plan.force:  # with --force they are replaced, not a stop
        lines.append(
            "It would stop: these already exist (use --force to replace them once their "
            "replacement is complete and verified): " + ", ".join(map(str, conflicts))
        )
    for stop in stops:
        if not isinstance(stop, WouldOverwrite):  # listed above
            lines.append(f"It would stop: {stop.message}")
    return lines
