"""The parts every format's standalone script shares (qrecover script).

A script follows its format's recovery page step by step; what does not
differ between formats is here: the functions that find stored files and
their chunks in the backup's listing (numeric order, gaps and duplicates
refused), one VM's block (its stored files, each through its pipeline and
placed once every stage succeeded), and the comment lines.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING

from qrecover import __version__
from qrecover.archive.members import QUBES_XML
from qrecover.inventory import DOM0, Entity
from qrecover.render.shell import (
    STAGE_DIR,
    XML_OUT,
    backup_assignment,
    call,
    comment,
    out_path,
    pipeline_block,
    pipeline_check,
    q,
    stage_names,
)
from qrecover.runner import Stage, render_pipeline
from qrecover.stages.extract import extract_stage, qubes_xml_stage
from qrecover.units import human_bytes

if TYPE_CHECKING:
    from qrecover.formats.base import PlannedVM, PlanView

# Arguments written as shell expressions instead of quoted literals.
STAGING = "/QRECOVER-STAGING-PLACEHOLDER"

# Functions only the standalone script needs (the rest is the prelude): the
# stored files of a format-3 backup and their chunks, in order and checked.
_STORED_FILES = r"""
stored_files() {  # stored_files PATTERN: the stored files whose chunks are PATTERN.NNN
    sed -n "s|^[^ ]* \($1\)\.[0-9][0-9][0-9][0-9]*\$|\1|p" "$work/blocks" | sort -u
}

""".strip()

# How every format but 1 finds one stored file's chunks (format 4 with SUFFIX .enc).
CHUNK_FUNCTIONS = r"""
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

""".strip()

_FEED_CHUNKS = r"""
feed_chunks() {  # feed_chunks LIST: steps 1 and 4 for each chunk of LIST in turn, then its bytes
    while read -r _block _chunk <&5; do
        take_from "$_block" "$_chunk" "$_chunk.hmac"
        check_hmac "$_chunk"
        feed "$_chunk"
    done 5<"$1"
}
""".strip()

SCRIPT_FUNCTIONS = "\n\n".join([_STORED_FILES, CHUNK_FUNCTIONS, _FEED_CHUNKS])


def _bre(text: str) -> str:
    """A stored-name prefix as a sed BRE (names hold only [A-Za-z0-9_.+/-])."""
    return re.sub(r"([.\[\]*^$\\])", r"\\\1", text)


def entity_title(entity: Entity) -> str:
    """How a VM is named in the script's comments (never able to end a comment)."""
    if entity.name == DOM0:
        return comment(f"dom0's home folder ({entity.backup_path})")
    template = f", template {entity.template}" if entity.template else ""
    return comment(f"{entity.name} ({entity.type}{template})")


def vm_block(
    target: PlannedVM, front: list[Stage], intro: list[str], chunks: str = "",
    placeholder: bool = False,
) -> list[str]:
    """One VM's part of a script: its stored files, each through ``front`` and
    tar.  ``chunks``: the prefix of the shell functions that find and feed this
    format's chunks (``enc_`` for NAME.NNN.enc); ``placeholder``: a stored
    file VM/empty is R4.3's placeholder of a qube without files."""
    p = chunks
    entity, strip, folder = target.entity, target.strip, target.folder
    if entity.name == DOM0:
        pattern = _bre(entity.backup_path)
        where = f"stored as {entity.backup_path}"
    else:
        pattern = _bre(entity.backup_path) + "/.*"
        where = f"stored under {entity.backup_path}/"
    stages = [*front, extract_stage(Path(STAGING), strip)]
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
        {STAGING: STAGE_DIR},
        indent="    ",
    )
    lines += ['    pipeline_ok "$stored" ' + " ".join(q(n) for n in stage_names(stages))]
    if placeholder and entity.name != DOM0:
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


@dataclass(frozen=True)
class ScriptText:
    """What a format's standalone script says and runs beside what every such
    script does (list the backup, qubes.xml, each VM's stored files, mount)."""

    kind: str  # "the Qubes backup"
    tools: str  # what it needs besides sh and GNU tar, one comment line
    scratch: str  # the scratch one chunk takes, one comment line
    page: Sequence[str]  # comment lines: the page it follows (and its fixes)
    functions: Sequence[str]  # the prelude and the format's sh functions
    programs: Sequence[str]  # what ``need`` checks
    setup: Sequence[str]  # the passphrase's lines
    header: Sequence[str]  # the header's steps
    xml: Sequence[str]  # the comment lines before qubes.xml
    chunks: str  # see :func:`vm_block`
    placeholder: bool  # see :func:`vm_block`
    intro: Callable[[Entity], list[str]]  # the comment lines of one VM's block
    done: str  # what the last line says was checked
    mount_step: int


def script(
    text: ScriptText, plan: PlanView, backup: str | None, output: Path, argv: tuple[str, ...]
) -> str:
    """The whole standalone recovery script, as text: the plan's VMs through
    the plan's stages (``gzip -d``, which every rescue system has)."""
    selected = plan.selected
    when = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    shown = call("qrecover", *argv) if argv else "qrecover script"
    front = plan.front()
    xml_stages = [*front, qubes_xml_stage()]
    p = text.chunks
    lines = [
        "#!/bin/sh",
        f"# Recovery script for {text.kind} " + comment(backup or "(read from standard input)"),
        f"# written by qrecover {__version__} on {when}:",
        f"# {comment(shown)}",
        "#",
        "# It needs no Python and no qrecover: a POSIX shell (dash or bash), GNU tar,",
        text.tools,
        "# Run it with:  sh THIS-FILE   (it asks for the passphrase, or takes it from",
        "# the environment variable backup_pass; it never writes it anywhere).",
        "#",
        "# It restores, into the folder out= below:",
        "#   qubes.xml",
        *contents(selected),
        "#",
        text.scratch,
        "# in a private folder inside the output folder, deleted as soon as used and",
        "# removed on exit; plus room for the restored data: about "
        + human_bytes(sum(e.size for e in selected)),
        "# (sizes from the backup's qubes.xml; VM images are restored sparse).",
        "#",
        *text.page,
        "",
        "set -u",
        "",
        *(line for part in text.functions for line in (part, "")),
        "# ---- settings: change them here if the backup or the output folder moved",
        *backup_assignment(backup, "qrecover"),
        f"out={q(str(output))}",
        "",
        call("need", *dict.fromkeys(text.programs)),
        *text.setup,
        'make_work "$out"',
        "",
        *STEP1,
        "",
        *text.header,
        "",
        *text.xml,
        f'{p}chunk_list qubes.xml >"$work/chunks" || exit 1',
        "fresh_stage",
        *pipeline_block([f'feed_{p}chunks "$work/chunks"'], xml_stages, stdout=XML_OUT),
        pipeline_check(QUBES_XML, xml_stages),
        f'place_file "$work/qubes.xml" {out_path(QUBES_XML)}',
    ]
    for target in plan.entities():
        lines += vm_block(target, front, text.intro(target.entity), p, text.placeholder)
    return "\n".join(lines + ending(selected, text.done, text.mount_step)) + "\n"


def ending(selected: Sequence[Entity], done: str, step: int) -> list[str]:
    """A script's last lines: what was restored and checked, and the mount step."""
    return [
        "",
        f'say "done: {len(selected)} VM(s) restored into $out, {done}"',
        f"# ---- step {step}: to read a VM's files, mount its private.img (ext4) read-only:",
        *mount_hint(selected, step),
    ]


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
