"""What ``restore --dry-run`` finds in the output folder, as the restore would.

Without ``--resume`` that is :func:`qrecover.plan.obstacles` and
:func:`~qrecover.plan.doomed`.  With it, the folder's restore record is read
the way the restore reads it (same identity, same checks, same lock), so the
dry run excuses what the restore would excuse, names the stored files it
would keep, and stops where the restore would stop, with the same exit code.
Nothing is written or removed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from qrecover.errors import OutputError
from qrecover.formats.base import Format
from qrecover.output import Output
from qrecover.plan import Plan, doomed, existing, obstacles
from qrecover.resume import Resume, identity


@dataclass
class DryFindings:
    stops: list[OutputError] = field(default_factory=list)
    kept: tuple[str, ...] = ()  # stored files an earlier run placed, which --resume keeps
    excused: frozenset[str] = frozenset()  # existing targets (relative) that are its own work


def dry_findings(
    plan: Plan, resume: bool, fmt: Format, header_raw: bytes, xml: bytes, xml_macs: Sequence[str]
) -> DryFindings:
    root = plan.output
    if not resume or root is None or not root.is_dir() or root.is_symlink():
        return DryFindings(obstacles(plan) + doomed(plan))
    ident = identity(fmt, header_raw, xml, xml_macs)
    try:
        record = Resume.begin(Output(root, plan.force), True, ident, fmt.version, None,
                              plan.selected)
    except OutputError as exc:  # the restore stops here too, before anything else
        return DryFindings([exc])
    excused = frozenset(
        rel for rel in plan.targets() if existing(root, [rel]) and record.excused(root / rel)
    )
    stops = obstacles(plan, record.excused, True) + doomed(plan)
    return DryFindings(stops, tuple(sorted(record.keep)), excused)
