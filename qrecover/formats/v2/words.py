"""Format 2's words: the v2 recovery page's steps, its sh fragments, its narration.

Steps as on https://www.qubes-os.org/doc/backup-emergency-restore-v2/,
declared once in :data:`PROCEDURE`: each chunk is verified (and, from
v2.1.39, the header), decrypted and decompressed on its own, and the
volumes are untarred with ``tar -M`` and a new-volume script.
"""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path

from qrecover import __version__
from qrecover.archive.members import HEADER, HEADER_HMAC, QUBES_XML
from qrecover.events import Mode
from qrecover.formats.base import Narration, PageWords, PlanView
from qrecover.formats.v2 import PAGE, Format2, sh
from qrecover.formats.v3 import dgst_command
from qrecover.formats.v3_words import OPENSSL_FOOTER, explain_hmac_chunk, hmac_init_line, last_stage
from qrecover.inventory import DOM0, Entity
from qrecover.procedure import Procedure, Step
from qrecover.render import scriptparts, shell
from qrecover.runner import Stage
from qrecover.stages.extract import extract_stage, qubes_xml_stage
from qrecover.units import human_bytes

PROCEDURE = Procedure(
    page=PAGE,
    check="hmac",
    steps=(
        Step("untar", "untar the backup", "backup"),
        Step("passphrase", "the passphrase in a variable", "backup"),
        Step("verify chunk", "verify each chunk's HMAC (and the header's)", "chunk"),
        Step("decrypt", "decrypt each chunk", "chunk"),
        Step("decompress", "decompress each chunk", "chunk"),
        Step("untar volumes", "untar the volumes with tar -M", "stored file"),
        Step("mount", "mount an image to read its files", "backup"),
    ),
)
UNTAR, PASSPHRASE, VERIFY_CHUNK, DECRYPT, DECOMPRESS, UNTAR_VOLUMES, MOUNT = PROCEDURE.steps
CHUNK_STEPS = PROCEDURE.span("verify chunk", "untar volumes")  # each stored file's
CHUNK_STEPS_45 = PROCEDURE.span("decrypt", "decompress")  # each chunk on its own


class Words2(PageWords[Format2]):
    """What the renderers say for a format-2 backup."""

    procedure = PROCEDURE
    kit_releases = "Qubes R2-Beta3 to R2 (qubes-core-admin v2.1.34 to v2.1.63)"
    intro = (  # --explain's step 1: what the backup is
        "A format-2 backup (Qubes R2-Beta3 to R2) is many small tar archives one after "
        "the other (hence tar -i): the header (none in R2-Beta3), qubes.xml, and every "
        "stored file cut in chunks NAME.000, NAME.001, ... each with its NAME.NNN.hmac. "
        "Each chunk is one volume of a GNU multi-volume tar."
    )
    pipeline_intro = (
        f"# steps {PROCEDURE.span('verify chunk', 'decompress')} per chunk (feed: decrypt or "
        f"decompress it alone), step {UNTAR_VOLUMES}: tar -M reads the volumes:"
    )

    def _per_chunk(self) -> str:
        header = self.fmt.header
        if header.encrypted is None:
            return ("as each chunk tells (R2-Beta3): openssl enc -d if it starts with "
                    "Salted__, then pigz -d -z for openssl enc -z; gzip -d for gzip data; "
                    "else the chunk is the volume")
        runs = self.fmt.chunk_stages("NAME.NNN")
        if not runs:
            return "not encrypted, not compressed: each chunk is a volume as it is"
        return " then ".join(" | ".join(s.render() for s in run) for run in runs)

    def _preamble(self, title: str, backup: str | None, output: str, argv: tuple[str, ...],
                  what: str) -> list[str]:
        when = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        shown = shell.call("qrecover", *argv) if argv else "qrecover"
        return [
            "#!/bin/sh",
            f"# {title}: {shell.comment(shown)}",
            f"# written by qrecover {__version__} on {when}.",
            "#",
            "# A format-2 backup (Qubes R2-Beta3 to R2): every chunk is HMAC-checked, then",
            "# decrypted or decompressed on its own; a stored file's chunks are the volumes",
            "# of one GNU multi-volume tar, read by tar -M with a new-volume script. It needs",
            "# room in the scratch folder for one stored file's volumes. Step numbers are",
            f"# those of the recovery page: {PAGE}",
            f"# {what}",
            "",
            "set -u",
            "",
            shell.PRELUDE,
            *sh.functions(self.fmt.header),
            *shell.backup_assignment(backup, "qrecover"),
            output,
            shell.call("need", *sh.programs(self.fmt.header)),
            *shell.passphrase_lines(),
        ]

    # -- --transcript -----------------------------------------------------------

    def transcript_preamble(
        self, mode: str, backup: str | None, output: Path | None, argv: tuple[str, ...]
    ) -> list[str]:
        where = f"out={shell.q(str(output))}  # the output folder" if output else ""
        lines = self._preamble("Transcript of", backup, where, argv,
                               "Replay it with `sh THIS-FILE`; it stops at the first failure.")
        lines += ['make_work "$out"' if mode == Mode.RESTORE and output else
                  'make_work "${TMPDIR:-/tmp}"', "next_volume_script"]
        return lines

    def _header_lines(self) -> list[str]:
        header = self.fmt.header
        if header.encrypted is None:
            return [
                "# R2-Beta3 wrote no backup-header: the first check is qubes.xml.000's",
                "# HMAC-MD5 (OpenSSL 1.0's default digest); a wrong passphrase stops there",
                hmac_init_line(self.fmt.header.digest),
            ]
        return [
            shell.call("take", HEADER, HEADER_HMAC),
            f"# step {VERIFY_CHUNK} for the header: its HMAC ({header.hmac_algorithm}) before "
            "reading it",
            hmac_init_line(self.fmt.header.digest),
            shell.call("check_hmac", HEADER, shell.HEADER_MISMATCH),
            "# the header has no version key (format 2); qrecover checked these values:",
            'cat -- "$work/backup-header" >&2',
            *(shell.call("header_is", k, v) for k, v in sh.header_checks(header)),
        ]

    def transcript_header(self) -> list[str]:
        return ["", f"# ---- step {UNTAR}: untar the backup (listed once; members taken out as "
                "needed)",
                "list_members", *self._header_lines()]

    def transcript_chunk(self, member: str, error: str | None) -> list[str]:
        lines = ["", f"# chunk {member}: step {UNTAR}, take it and its .hmac; step {VERIFY_CHUNK}, "
                 "its HMAC",
                 shell.call("take", member, member + ".hmac"), shell.call("check_hmac", member)]
        if error is not None:
            lines.insert(1, f"# qrecover found it bad ({error}); the replay stops here too")
            lines.append(shell.call("die", f"{member}: {error}"))
        return lines

    def transcript_steps(self, stored: str) -> str:
        return f"steps {CHUNK_STEPS}"

    # -- --explain --------------------------------------------------------------

    def explain_header(self, out: Narration) -> None:
        header = self.fmt.header
        if header.encrypted is None:
            out.say(
                PROCEDURE.heading("verify chunk", "no header (R2-Beta3)"),
                "R2-Beta3 wrote no backup-header. Its chunks were HMAC'd with OpenSSL 1.0's "
                "default digest, MD5, so qubes.xml.000's HMAC is the first check: a wrong "
                "passphrase stops there, before anything is written. Whether a chunk is "
                "encrypted or compressed, each authenticated chunk tells.",
                dgst_command(header.digest, QUBES_XML + ".000"),
            )
            return
        out.say(
            PROCEDURE.heading("verify chunk", "verify the header's HMAC, before reading it"),
            "The header says how everything else was written, so it must be authentic before "
            "it is read; qrecover computes the HMAC itself (the passphrase never on a command "
            "line) and compares it with backup-header.hmac.",
            dgst_command(header.digest, HEADER),
            f"HMAC-{header.hmac_algorithm} matches {HEADER_HMAC}. No version key: format 2 "
            f"({', '.join(f'{k}={v}' for k, v in header.fields().items())}).",
        )

    def explain_chunk(
        self, out: Narration, member: str, size: int, error: str | None, first: bool
    ) -> None:
        explain_hmac_chunk(out, PROCEDURE, self.fmt.header.digest, member, size, error)

    def explain_pipeline(
        self, out: Narration, stored: str, stages: tuple[Stage, ...], kind: str
    ) -> None:
        out.say(
            f"Steps {PROCEDURE.span('decrypt', 'untar volumes')} - {stored}",
            f"Steps {CHUNK_STEPS_45}, each chunk on its own once its HMAC matched: "
            f"{self._per_chunk()}. Step {UNTAR_VOLUMES}: the plaintexts are the volumes of one "
            "GNU multi-volume tar, which GNU "
            "tar -M reads in numeric order (.999 then .1000), each one fed only after tar "
            "asked for it through its new-volume script: "
            + last_stage(kind, "the archive") + ".",
            " | ".join(s.render() for s in stages),
        )

    def explain_inventory(
        self, out: Narration, names: str, chosen: str, selected: tuple[Entity, ...]
    ) -> None:
        out.say("qubes.xml read",
                f"qubes.xml (restored with steps {CHUNK_STEPS} like any stored file) lists the "
                "VMs with "
                f"data in the backup: {names}. Selected: {chosen}.")

    # -- restore --dry-run ------------------------------------------------------

    def plan_title(self, backup: str) -> str:
        return (f"Dry run: the header and qubes.xml of {backup} are authentic "
                f"({self.fmt.authenticated_with}); nothing was written.")

    def plan_header_steps(self, gunzip: str) -> list[str]:
        header = self.fmt.header
        if header.encrypted is None:
            return [f"  {VERIFY_CHUNK}    no backup-header (R2-Beta3): qubes.xml.000's HMAC-MD5 "
                    "was the first check"]
        return [f"  {VERIFY_CHUNK}    {dgst_command(header.digest, HEADER)}   (compared with "
                f"{HEADER_HMAC}; "
                "computed in-process; no version key: format 2)"]

    def plan_entity(self, entity: Entity, files: str, pipeline: str, backup: str) -> list[str]:
        head = (f"  {entity.name}: for each stored file {files} (F: private.img, icon.png, ...):"
                if entity.name != DOM0 else f"  {entity.name}: the stored file {files}:")
        return [
            head,
            f"  {VERIFY_CHUNK}    {dgst_command(self.fmt.header.digest, files + '.NNN')}   "
            "(every chunk, compared with its .hmac, before it is used)",
            f"  {CHUNK_STEPS_45}  each chunk on its own: "
            + self._per_chunk().replace("NAME", files),
            f"  {UNTAR_VOLUMES}    {pipeline.replace('-f -', '-M -f VOLUME')}   (the volumes "
            f"{files}.000, {files}.001, ... fed in turn by the new-volume script)",
        ]

    def plan_footer(self) -> str:
        return OPENSSL_FOOTER

    # -- qrecover kit (RECOVERY.txt) ---------------------------------------------

    def kit_programs(self) -> list[str]:
        return [p for p in sh.programs(self.fmt.header) if p in ("openssl", "pigz")]

    def kit_by_hand(self, example: Entity | None) -> list[str]:
        return sh.by_hand(self.fmt.header, example)

    # -- qrecover script --------------------------------------------------------

    def script(
        self, plan: PlanView, backup: str | None, output: Path, argv: tuple[str, ...]
    ) -> str:
        selected = plan.selected
        total = sum(e.size for e in selected)
        lines = self._preamble("Recovery script, written by", backup, f"out={shell.q(str(output))}",
                               argv, f"It restores about {human_bytes(total)} into out=; "
                               "run it with: sh THIS-FILE")
        lines += ["#   qubes.xml", *scriptparts.contents(selected), "",
                  scriptparts.SCRIPT_FUNCTIONS, 'make_work "$out"', "next_volume_script", "",
                  *scriptparts.STEP1, *self._header_lines(), "",
                  f"# ---- qubes.xml: steps {CHUNK_STEPS} (it lists the VMs; kept in the output "
                  "folder)",
                  'chunk_list qubes.xml >"$work/chunks" || exit 1', "fresh_stage"]
        xml_stages = [sh.replay_stage(qubes_xml_stage())]
        lines += shell.pipeline_block(['feed_chunks "$work/chunks"'], xml_stages,
                                      stdout=shell.XML_OUT)
        lines += [shell.pipeline_check(QUBES_XML, xml_stages),
                  f'place_file "$work/qubes.xml" {shell.out_path(QUBES_XML)}']
        intro = [f"# Steps {CHUNK_STEPS} for each of its stored files: each chunk verified (step "
                 f"{VERIFY_CHUNK}),",
                 f"# decrypted or decompressed ({CHUNK_STEPS_45}), the volumes read by tar -M "
                 f"({UNTAR_VOLUMES})."]
        for target in plan.entities():
            plain = shell.render_argv(extract_stage(Path(scriptparts.STAGING), 0).argv[:4])
            multi = shell.render_argv(sh.replay_stage(
                extract_stage(Path(scriptparts.STAGING), 0)).argv[:6])
            lines += [line.replace(plain, multi, 1)
                      for line in scriptparts.vm_block(target, [], intro)]
        lines += scriptparts.ending(selected, "every HMAC matched", MOUNT.number)
        return "\n".join(lines) + "\n"
