"""Format 1's words: no recovery page, because there is nothing to recover but files.

Qubes R1 wrote its backup as a plain folder and its restore copied the files
back (``cp -rp``).  There is no page to follow, so the steps are qrecover's
own, few and plain (:data:`PROCEDURE`): read qubes.xml from the folder, copy
each VM's files (``tar -c`` from the folder into ``tar -x``, as ``restore``
does), mount an image.  Nothing is checked against an HMAC, because there is none: every
text says so.
"""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path

from qrecover import __version__
from qrecover.archive.members import QUBES_XML
from qrecover.events import Mode
from qrecover.formats.base import Narration, PageWords, PlanView
from qrecover.formats.v1 import WARNING, WRITTEN_BY, Format1, read_stage
from qrecover.inventory import DOM0, Entity
from qrecover.procedure import Procedure, Step
from qrecover.render import scriptparts, shell
from qrecover.runner import Stage, render_pipeline
from qrecover.stages.extract import extract_stage, qubes_xml_stage
from qrecover.units import human_bytes

PAGE = "qrecover's own: R1 had no recovery page, its backup is a plain folder of copied files"
PROCEDURE = Procedure(
    page=PAGE,
    check="none",
    steps=(
        Step("read qubes.xml", "read qubes.xml from the folder", "backup"),
        Step("copy", "copy each VM's files", "stored file"),
        Step("mount", "mount an image to read its files", "backup"),
    ),
)
READ_XML, COPY, MOUNT = PROCEDURE.steps

# What transcripts and scripts of format 1 add to the prelude.  ``feed`` is
# redefined: a format-1 stored file is no chunk in scratch but a file of the
# folder, written into the pipeline by tar -c (as qrecover does).
FUNCTIONS = r"""
stored_ok() {  # stored_ok STORED: what restore checks before tar -c reads STORED
    case $1 in
        "" | /* | */ | *//* | *[!A-Za-z0-9_.+/-]*) die "refusing the stored file name '$1'" ;;
    esac
    case /$1/ in */../* | */.[!/]*) die "refusing the stored file name '$1'" ;; esac
    _path=
    _rest=${1%/.}
    while :; do  # every folder above it (and NAME of NAME/.) is a folder, never a link
        case $_rest in */*) _part=${_rest%%/*}; _rest=${_rest#*/} ;; *) break ;; esac
        _path=$_path$_part
        [ ! -h "$backup/$_path" ] && [ -d "$backup/$_path" ] ||
            die "$1: $_path is not a folder of the backup (a link is never followed)"
        _path=$_path/
    done
    case $1 in */.) [ ! -h "$backup/$_path$_rest" ] && [ -d "$backup/$_path$_rest" ] ||
        die "$1: not a folder of the backup (a link is never followed)" ;;
    esac
    # qrecover restore never creates a FIFO or a device node: this script stops instead
    _odd=$(find "$backup/$1" ! -type f ! -type d ! -type l -print 2>/dev/null | head -n 1)
    [ -z "$_odd" ] || die "${_odd#"$backup/"}: a FIFO, device node or socket; not restored"
}

feed() {  # feed STORED.000: format 1 keeps STORED as it is; tar -c reads it (links as links)
    _stored=${1%.000}
    stored_ok "$_stored"
    tar -c --sparse -f - -C "$backup" -- "$_stored" 2>"$work/stderr.feed" ||
        die "$_stored: tar -c could not read all of it: $(tail -n 1 "$work/stderr.feed")"
}
""".strip()


def _stage_names(stages: list[Stage]) -> list[str]:
    """How ``pipeline_ok`` names the stages; stage 0 is tar -c reading the folder."""
    return ["reading it from the folder (tar -c)", *shell.stage_names(stages)[1:]]


def _steps(stored: str) -> str:
    if stored == QUBES_XML:
        return f"step {READ_XML}, read it from the folder"
    return f"step {COPY}, copy it"


class Words1(PageWords[Format1]):
    """What the renderers say for a format-1 backup."""

    procedure = PROCEDURE
    kit_releases = WRITTEN_BY
    intro = (  # --explain's step 1: what the backup is
        f"A format-1 backup, written by {WRITTEN_BY}, is a plain folder mirroring "
        "/var/lib/qubes: qubes.xml, appvms/NAME/, servicevms/NAME/, "
        "vm-templates/NAME/ and dom0-home/USER/, each file copied by cp -rp. "
        "There is no recovery page: restoring is copying. qrecover reads each "
        "stored file with tar -c (it never follows a link) into the same guard and "
        "tar -x as for the other formats."
    )
    pipeline_intro = "# tar -c reads it from the folder (links as links, holes kept), through"

    def first_step(self, backup: str) -> str:
        """Step 1: qubes.xml read from the folder (nothing to untar)."""
        stages = [read_stage(Path(backup), QUBES_XML), qubes_xml_stage()]
        return render_pipeline(stages)

    # -- --transcript -----------------------------------------------------------

    def transcript_preamble(
        self, mode: str, backup: str | None, output: Path | None, argv: tuple[str, ...]
    ) -> list[str]:
        about = [
            f"# A format-1 backup, written by {WRITTEN_BY}, is a plain folder. There is no",
            "# recovery page: its files are copied. Replay with `sh THIS-FILE` (dash or",
            "# bash, GNU tar and POSIX utilities): each stored file is read again by",
            "# tar -c from the folder and extracted as qrecover did.",
            "# WARNING: " + WARNING + ".",
        ]
        out = output if mode == Mode.RESTORE else None
        return shell.transcript_head(
            argv, about, [shell.PRELUDE, FUNCTIONS], backup, out, ["need tar find"]
        )

    def transcript_header(self) -> list[str]:
        return [
            "",
            "# ---- no backup-header, no HMAC, no encryption: nothing to verify",
            shell.call("say", "WARNING: " + WARNING),
        ]

    def transcript_steps(self, stored: str) -> str:
        return _steps(stored)

    # -- --explain --------------------------------------------------------------

    def explain_header(self, out: Narration) -> None:
        out.say("No header to verify", WARNING + ".")

    def explain_pipeline(
        self, out: Narration, stored: str, stages: tuple[Stage, ...], kind: str
    ) -> None:
        what = {
            "extract": "tar -x into a private staging folder, moved into place once complete",
            "list": "tar -t lists it (verify writes nothing)",
        }.get(kind, "qubes.xml taken out of it")
        title = (PROCEDURE.heading("read qubes.xml", "qubes.xml") if stored == QUBES_XML
                 else PROCEDURE.heading("copy", f"copy {stored}"))
        out.say(
            title,
            "tar -c reads it from the folder (a link stays a link; holes are kept); the "
            "guard drops FIFOs and device nodes and refuses names outside it; then "
            f"{what}. Nothing of it can be authenticated.",
            render_pipeline([read_stage(self.fmt.root, stored), *stages]),
        )

    def explain_inventory(
        self, out: Narration, names: str, chosen: str, selected: tuple[Entity, ...]
    ) -> None:
        absent = ", ".join(self.fmt.absent)
        out.say(
            "qubes.xml read",
            f"The VMs whose folders are in the backup: {names}. Selected: {chosen}."
            + (f" In qubes.xml but not in the folder (R1 backed up only some VMs): "
               f"{absent}." if absent else ""),
        )

    # -- restore --dry-run ------------------------------------------------------

    def plan_title(self, backup: str) -> str:
        return (
            f"Dry run: {backup} is a format-1 backup, written by {WRITTEN_BY}; NOTHING in it "
            "can be authenticated (no HMAC, no encryption); nothing was written."
        )

    def plan_entity(self, entity: Entity, files: str, pipeline: str, backup: str) -> list[str]:
        if entity.name == DOM0:
            head, stored = f"  {entity.name}: the folder {files}:", files
        elif "Template" in entity.type:
            stored = entity.backup_path + "/."
            head = f"  {entity.name}: its whole folder {stored}:"
        else:
            stored = files
            head = f"  {entity.name}: for each file F of {entity.backup_path}/ (private.img, ...):"
        read = render_pipeline([read_stage(Path(backup), stored)])
        return [head, f"  {COPY}    {read} | {pipeline}"]

    def plan_footer(self) -> str:
        return (
            "($staging is a private folder inside the output folder. No passphrase: "
            "format 1 is neither encrypted nor authenticated.)"
        )

    # -- qrecover kit (RECOVERY.txt) ---------------------------------------------

    def kit_by_hand(self, example: Entity | None) -> list[str]:
        return [
            "A format-1 backup is a plain folder: copy the files of each VM's folder",
            "(appvms/NAME/, servicevms/NAME/, vm-templates/NAME/) and dom0-home/USER/",
            "with `cp -rp` or `tar -c --sparse -C BACKUP -f - PATH | tar -x -C OUT`.",
            "WARNING: " + WARNING + ".",
        ]

    # -- qrecover script --------------------------------------------------------

    def script(
        self, plan: PlanView, backup: str | None, output: Path, argv: tuple[str, ...]
    ) -> str:
        """A standalone sh script that copies the plan's VMs as restore does."""
        selected = plan.selected
        when = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        shown = shell.call("qrecover", *argv) if argv else "qrecover script"
        xml_stages = [qubes_xml_stage()]
        lines = [
            "#!/bin/sh",
            "# Recovery script for the Qubes backup folder "
            + shell.comment(backup or "(unknown)"),
            f"# written by qrecover {__version__} on {when}:",
            f"# {shell.comment(shown)}",
            "#",
            f"# A format-1 backup, written by {WRITTEN_BY}, is a plain folder; there is no",
            "# recovery page: restoring it is copying its files. This script does it as",
            "# qrecover restore does: tar -c reads each stored file from the folder (it",
            "# never follows a link; holes are kept), tar -x extracts it into a private",
            "# folder, and it is moved into place once complete, never over a file.",
            "# It needs a POSIX shell (dash or bash), GNU tar and find. No passphrase.",
            "# WARNING: " + WARNING + ".",
            "#",
            "# It restores, into the folder out= below:",
            "#   qubes.xml",
            *scriptparts.contents(selected),
            f"# Room needed: about {human_bytes(sum(e.size for e in selected))} "
            "(VM images stay sparse).",
            "",
            "set -u",
            "",
            shell.PRELUDE,
            "",
            FUNCTIONS,
            "",
            "# ---- settings: change them here if the backup or the output folder moved",
            *shell.backup_assignment(backup, "qrecover"),
            f"out={shell.q(str(output))}",
            "",
            "need tar find",
            shell.call("say", "WARNING: " + WARNING),
            'make_work "$out"',
            "",
            f"# ---- step {READ_XML}: qubes.xml (it lists the VMs; kept in the output folder)",
            '[ ! -h "$backup/qubes.xml" ] && [ -f "$backup/qubes.xml" ] || '
            + shell.call("die", "qubes.xml: not a file of the backup folder"),
            "fresh_stage",
            *shell.pipeline_block(["feed qubes.xml.000"], xml_stages, stdout=shell.XML_OUT),
            shell.call("pipeline_ok", QUBES_XML, *_stage_names(xml_stages)),
            f'place_file "$work/qubes.xml" {shell.out_path(QUBES_XML)}',
        ]
        for target in plan.entities():
            lines += _vm_block(target.entity, target.strip, target.folder)
        lines += [
            "",
            shell.call("say", f"done: {len(selected)} VM(s) copied into the output folder; nothing "
                       "could be authenticated (format 1)"),
            f"# ---- step {MOUNT}: to read a VM's files, mount its private.img (ext4) read-only:",
            *scriptparts.mount_hint(selected, MOUNT.number),
        ]
        return "\n".join(lines) + "\n"


def _vm_block(entity: Entity, strip: int, folder: str) -> list[str]:
    """The copy step for one VM: each of its stored files, as restore names them."""
    stages = [extract_stage(Path(scriptparts.STAGING), strip)]
    shown = shell.out_path(folder)
    head = [
        "",
        f"# ==== step {COPY}: {scriptparts.entity_title(entity)} -> {shown}/",
    ]
    if entity.name == DOM0 or "Template" in entity.type:
        stored = entity.backup_path if entity.name == DOM0 else entity.backup_path + "/."
        return [
            *head,
            "fresh_stage",
            *shell.pipeline_block([shell.call("feed", stored + ".000")], stages,
                                  {scriptparts.STAGING: shell.STAGE_DIR}),
            shell.call("pipeline_ok", stored, *_stage_names(stages)),
            f'place "$work/stage" {shown}',
        ]
    folder_path = shell.q(entity.backup_path)
    lines = [
        *head,
        "# each file of its folder on its own, as R1 copied them (a link stays a link)",
        f"stored_ok {folder_path}/.",
        f'for entry in "$backup"/{folder_path}/* "$backup"/{folder_path}/.[!.]* '
        f'"$backup"/{folder_path}/..?*; do',
        '    [ -e "$entry" ] || [ -h "$entry" ] || continue',
        f'    stored={folder_path}/"${{entry##*/}}"',
        "    fresh_stage",
    ]
    lines += shell.pipeline_block(['feed "$stored.000"'], stages,
                                  {scriptparts.STAGING: shell.STAGE_DIR}, indent="    ")
    lines += [
        '    pipeline_ok "$stored" ' + " ".join(shell.q(n) for n in _stage_names(stages)),
        f'    place "$work/stage" {shown}',
        "done",
    ]
    required = entity.required_stored()
    if required is not None:
        lines.append(f'[ -e "$backup"/{shell.q(required)} ] || '
                     + shell.call("die", f"{required}: missing from the backup"))
    return lines
