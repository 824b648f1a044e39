"""The parts every format's standalone script shares (qrecover script).

A script follows its format's recovery page step by step; what does not
differ between formats is here: the functions that find stored files and
their chunks in the backup's listing (numeric order, gaps and duplicates
refused), one VM's block (its stored files, each through its pipeline and
placed once every stage succeeded), and the comment lines.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from qrecover.inventory import DOM0, Entity
from qrecover.render.shell import (
    STAGE_DIR,
    call,
    comment,
    out_path,
    pipeline_block,
    q,
    stage_names,
)
from qrecover.runner import Stage, render_pipeline

if TYPE_CHECKING:
    from qrecover.formats.base import PlannedVM
from qrecover.stages.extract import extract_stage
from qrecover.units import human_bytes

# Arguments written as shell expressions instead of quoted literals.
_STAGING = "/QRECOVER-STAGING-PLACEHOLDER"

# Functions only the standalone script needs (the rest is PRELUDE).
SCRIPT_FUNCTIONS = r"""
stored_files() {  # stored_files PATTERN: the stored files whose chunks are PATTERN.NNN
    sed -n "s|^[^ ]* \($1\)\.[0-9][0-9][0-9][0-9]*\$|\1|p" "$work/blocks" | sort -u
}

check_stored_name() {  # only names of the shapes Qubes wrote reach a command
    case $1 in
        "" | /* | */ | *//* | *[!A-Za-z0-9_.+/-]*) die "refusing the stored file name '$1'" ;;
    esac
    case /$1/ in */../* | */./?*) die "refusing the stored file name '$1'" ;; esac
}

chunk_list() {  # chunk_list STORED [SUFFIX]: "BLOCK NAME" of STORED.000, .001, ... in
    # numeric order (.999 then .1000: never the order of a glob); stops at a gap or a
    # duplicate. SUFFIX: .enc for format 4, whose members are NAME.enc.
    awk -v s="$1" -v x="${2:-}" '
        substr($2, 1, length(s) + 1) == s "." && substr($2, length($2) - length(x) + 1) == x {
            name = substr($2, 1, length($2) - length(x))
            i = substr(name, length(s) + 2)
            if (i !~ /^[0-9][0-9][0-9]+$/) next  # format 3: its .hmac files
            k = i + 0
            if (sprintf("%s.%03d", s, k) != name || (k in block)) { bad = $2; next }
            block[k] = $1
            n++
        }
        END {
            if (bad != "") {
                print "STOPPED: " bad ": duplicated or misnumbered chunk" > "/dev/stderr"
                exit 1
            }
            for (k = 0; k < n; k++) if (!(k in block)) {
                printf "STOPPED: %s.%03d%s: chunk missing\n", s, k, x > "/dev/stderr"; exit 1
            }
            if (n == 0) { print "STOPPED: " s ": no chunks" > "/dev/stderr"; exit 1 }
            for (k = 0; k < n; k++) printf "%s %s.%03d\n", block[k], s, k
        }' "$work/blocks"
}

feed_chunks() {  # feed_chunks LIST: steps 1 and 4 for each chunk of LIST in turn, then its bytes
    while read -r _block _chunk <&5; do
        take_from "$_block" "$_chunk" "$_chunk.hmac"
        check_hmac "$_chunk"
        feed "$_chunk"
    done 5<"$1"
}
""".strip()


def _bre(text: str) -> str:
    """A stored-name prefix as a sed BRE (names hold only [A-Za-z0-9_.+/-])."""
    return re.sub(r"([.\[\]*^$\\])", r"\\\1", text)


def entity_title(entity: Entity) -> str:
    """How a VM is named in the script's comments (never able to end a comment)."""
    if entity.name == DOM0:
        return comment(f"dom0's home folder ({entity.backup_path})")
    template = f", template {entity.template}" if entity.template else ""
    return comment(f"{entity.name} ({entity.type}{template})")


def vm_block(target: PlannedVM, front: list[Stage], intro: list[str], enc: bool) -> list[str]:
    """One VM's part of a script: its stored files, each through ``front`` and
    tar; format 4's shell functions take ``.enc`` chunks (``enc_`` names)."""
    p = "enc_" if enc else ""
    entity, strip, folder = target.entity, target.strip, target.folder
    if entity.name == DOM0:
        pattern = _bre(entity.backup_path)
        where = f"stored as {entity.backup_path}"
    else:
        pattern = _bre(entity.backup_path) + "/.*"
        where = f"stored under {entity.backup_path}/"
    stages = [*front, extract_stage(Path(_STAGING), strip)]
    shown = out_path(folder)
    lines = [
        "",
        f"# ==== {entity_title(entity)}, {where} -> {shown}/",
        *intro,
        f'{call(p + "stored_files", pattern)} >"$work/stored"',
        '[ -s "$work/stored" ] || '
        + call("die", f"{entity.name}: none of its files are in the backup"),
        "while IFS= read -r stored <&4; do",
        '    check_stored_name "$stored"',
        f'    {p}chunk_list "$stored" >"$work/chunks" || exit 1',
        f'    say "$stored: $(wc -l <"$work/chunks") chunk(s), into {folder or "."}/"',
        "    fresh_stage",
    ]
    lines += pipeline_block(
        [f'feed_{p}chunks "$work/chunks"'],
        stages,
        {_STAGING: STAGE_DIR},
        indent="    ",
    )
    lines += ['    pipeline_ok "$stored" ' + " ".join(q(n) for n in stage_names(stages))]
    if enc and entity.name != DOM0:
        # R4.3's placeholder, as restore handles it (qrecover.plan.PLACEHOLDER)
        lines += [
            f'    if [ "$stored" = {q(entity.backup_path + "/empty")} ]; then',
            f'        placeholder "$work/stage" {shown}; continue',
            "    fi",
        ]
    lines += [
        f'    place "$work/stage" {shown}',
        'done 4<"$work/stored"',
    ]
    return lines


# Step 1 of every script: the backup is listed once.
STEP1 = [
    "# ---- step 1: untar the backup. It is many small tar archives in a row, hence",
    "# tar -i (--ignore-zeros). Its members are listed once here; each is then taken",
    "# out on its own when it is needed, and deleted once used.",
    "list_members",
]


def contents(selected: Sequence[Entity]) -> list[str]:
    """The script's table of what it restores where."""
    width = max((len(e.dest) for e in selected), default=0) + 1
    return [
        f"#   {(e.dest + '/').ljust(width)}  {entity_title(e)}, about {human_bytes(e.size)}"
        for e in selected
    ]


def mount_hint(selected: Sequence[Entity], step: int) -> list[str]:
    """The last step: how to read a restored VM's files."""
    mount = next((e for e in selected if e.name != DOM0), None)
    if mount is None:
        return []
    return [
        f'say "step {step}, to read its files: sudo mount -o loop,ro \\"$out/{mount.dest}'
        f'/private.img\\" /mnt"'
    ]


def cat_chunks(stored: str, stages: Sequence[Stage]) -> str:
    """``cat NAME.000 NAME.001 ... | PIPELINE``: how a stored file's chunks go through."""
    return f"cat {q(stored + '.000')} {q(stored + '.001')} ... | " + render_pipeline(stages)
