"""Format 4's words: the v4 recovery page's steps, its sh fragments, its narration.

Steps as on https://www.qubes-os.org/doc/backup-emergency-restore-v4/:
1 untar, 2 the passphrase, 3 verify the header with scrypt, 4 read it,
5 the backup id, 6 qubes.xml, 7 find the qube's backup-path, 8 its chunks
(each decrypted by scrypt into a scratch file, used only once scrypt
exited 0), 9 mount.
"""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path

from qrecover import __version__
from qrecover.container import HEADER, HEADER_HMAC, QUBES_XML, parse_member_name
from qrecover.formats import v4_kit, v4_sh
from qrecover.formats.base import Format, Narration, PlanView
from qrecover.formats.v4 import PAGE, BackupHeaderV4, Format4
from qrecover.formats.v4.scrypt_tool import HEADER_PREFIX, render_dec
from qrecover.formats.v4_sh import VERIFIED_HEADER, header_checks
from qrecover.inventory import DOM0, Entity
from qrecover.render import scriptparts, shell
from qrecover.runner import PASS_ENV, Stage
from qrecover.stages.decompress import decompress_stage
from qrecover.units import human_bytes


def header_meaning(header: BackupHeaderV4, gunzip: str = "gzip") -> str:
    stage = decompress_stage(header, gunzip)
    return "each chunk is authenticated and decrypted by scrypt on its own; " + (
        f"decompress with `{stage.render()}`"
        if stage is not None
        else "not compressed: nothing to decompress"
    )


def _data_name(member: str) -> str:
    name = parse_member_name(member)
    return name.data_name if name is not None else member


class Words4:
    """What the renderers say for a format-4 (Qubes R4) backup."""

    page = PAGE
    mount_step = 9
    kit_releases = "Qubes R4.0 and later (R4.0, R4.1, R4.2, R4.3)"

    def __init__(self, fmt: Format | None) -> None:
        assert isinstance(fmt, Format4)
        self.fmt = fmt

    def _passing(self) -> str:
        if self.fmt.tool.style == "env":
            return f"through its environment (scrypt >= 1.3: --passphrase env:{PASS_ENV})"
        return "on its standard input (scrypt 1.2.1: -P)"

    def _header_command(self) -> str:
        """The v4 page's step 3 for this scrypt, as a person would type it."""
        return (
            render_dec(self.fmt.tool, HEADER_HMAC, VERIFIED_HEADER, HEADER_PREFIX)
            + f" && cmp {HEADER} {VERIFIED_HEADER}"
        )

    def _dec(self, member: str) -> str:
        plain = _data_name(member)
        return render_dec(self.fmt.tool, member, plain, self.fmt.chunk_prefix(plain))

    # -- --transcript -----------------------------------------------------------

    def transcript_preamble(
        self, mode: str, backup: str | None, output: Path | None, argv: tuple[str, ...]
    ) -> list[str]:
        when = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        shown = shell.call("qrecover", *argv) if argv else "qrecover"
        lines = [
            "#!/bin/sh",
            f"# Transcript of: {shell.comment(shown)}",
            f"# written by qrecover {__version__} on {when}, as the run went.",
            "#",
            "# Every command qrecover ran, as a shell script that does the same: replay it",
            "# with `sh THIS-FILE` (dash or bash; GNU tar, scrypt >= 1.2.1, the decompressor",
            "# and POSIX utilities only). This is a format-4 (Qubes R4) backup: each chunk",
            "# NAME.NNN.enc is taken out of the backup again with tar -i; scrypt",
            "# authenticates and decrypts it into a scratch file, and only once scrypt has",
            "# exited 0 is the plaintext fed into the stored file's pipeline, as qrecover",
            "# did. Step numbers are those of the recovery page for format 4:",
            f"# {PAGE}",
            "# The replay stops, non-zero, at the first failing check or stage.",
            "",
            "set -u",
            "",
            v4_sh.prelude(),
            "",
            v4_sh.scrypt_functions(),
            "",
            *shell.backup_assignment(backup, "qrecover"),
        ]
        if mode == "restore":
            assert output is not None
            lines.append(f"out={shell.q(str(output))}  # the output folder")
        lines += [
            "need tar scrypt cmp grep sed wc awk tail",
            "# step 2: the passphrase (the page's read -r backup_pass)",
            *shell.passphrase_lines(),
            "scrypt_init",
            'make_work "$out"' if mode == "restore" else 'make_work "${TMPDIR:-/tmp}"',
        ]
        return lines

    def transcript_header(self) -> list[str]:
        header = self.fmt.header
        return [
            "",
            "# ---- steps 1-5: the backup header",
            "# step 1: untar the backup; it is listed once, and each member is taken",
            "# out when it is needed (and deleted once used)",
            "list_members",
            shell.call("take", HEADER, HEADER_HMAC),
            f"# step 3: verify the header: {HEADER_HMAC} is {HEADER} encrypted and",
            f"# authenticated by scrypt under the passphrase '{HEADER_PREFIX}' + yours",
            shell.call(
                "scrypt_dec", HEADER_HMAC, VERIFIED_HEADER, HEADER_PREFIX, shell.HEADER_MISMATCH
            ),
            shell.call("same_file", HEADER, VERIFIED_HEADER),
            "# step 4: read the header; qrecover checked these values:",
            'cat -- "$work/backup-header" >&2',
            *(shell.call("header_is", k, v) for k, v in header_checks(header)),
            f"# step 5: backup_id={header.backup_id}: each chunk's scrypt passphrase is",
            "# 'BACKUPID!NAME.NNN!' followed by yours (written out below, single-quoted)",
        ]

    def transcript_chunk(self, member: str, error: str | None) -> list[str]:
        plain = _data_name(member)
        name = parse_member_name(member)
        stored = name.stored if name is not None else member
        if error is None:
            step = "step 6" if stored == QUBES_XML else "step 8"
            lines = [
                "",
                f"# chunk {member}: {step}, take it out of the backup; scrypt decrypts",
                "# it into a scratch file; fed into the pipeline only if scrypt exited 0",
            ]
        else:
            lines = [
                "",
                f"# chunk {shell.comment(member)}: qrecover found it bad "
                f"({shell.comment(error)});",
                "# the replay stops here too",
            ]
        lines += [
            shell.call("take", member),
            shell.call("scrypt_dec", member, plain, self.fmt.chunk_prefix(plain)),
        ]
        if error is not None:
            lines.append(shell.call("die", f"{member}: scrypt could not authenticate it"))
        return lines

    def transcript_steps(self, stored: str) -> str:
        return "step 6" if stored == QUBES_XML else "steps 7-8"

    def transcript_pipeline_intro(self) -> str:
        return "# the chunks, in numeric order, each decrypted by scrypt, through"

    # -- --explain --------------------------------------------------------------

    def explain_intro(self, how: str) -> tuple[str, str]:
        return (
            "Step 1 - untar the backup",
            "This is a Qubes R4 backup (format 4; steps as on " + PAGE + "). It is "
            "many small tar archives one after the other (hence tar -i, --ignore-zeros): "
            "the header, backup-header.hmac (the header encrypted by scrypt), qubes.xml, "
            "and every stored file cut in chunks NAME.000.enc, NAME.001.enc, ... each "
            "encrypted and authenticated by scrypt on its own. " + how,
        )

    def explain_header(self, out: Narration) -> None:
        header = self.fmt.header
        out.say(
            "Step 2 - the passphrase",
            "The page keeps it in a shell variable, typed once and out of the shell's "
            "history. qrecover gives it to scrypt " + self._passing() + ", after the prefix "
            "each file needs; it is never on a command line.",
            "read -r backup_pass",
        )
        out.say(
            "Step 3 - verify the header with scrypt, before reading it",
            "In format 4, backup-header.hmac is backup-header encrypted and authenticated "
            "by scrypt under the passphrase 'backup-header!' followed by yours. If scrypt "
            "decrypts it, the passphrase is right; the decrypted copy must then be "
            "identical to backup-header. (The page runs set +H first, so that an "
            "interactive bash does not expand the '!'; qrecover's commands single-quote it.)",
            self._header_command(),
            "scrypt authenticated backup-header.hmac, and its content is identical to "
            "backup-header: the passphrase is right and the header is intact.",
        )
        fields = ", ".join(f"{k}={v}" for k, v in header.fields().items())
        out.say(
            "Step 4 - read the header",
            f"{fields}. Every value that reaches a command was checked against an allow-list.",
            f"cat {HEADER}",
            header_meaning(header) + ".",
        )
        out.say(
            "Step 5 - the backup id",
            "Each chunk's scrypt passphrase is BACKUPID!NAME.NNN! followed by yours, so no "
            "chunk can be swapped for another, or for one of another backup, unnoticed.",
            f"backup_id={shell.q(header.backup_id)}",
        )

    def explain_chunk(
        self, out: Narration, member: str, size: int, error: str | None, first: bool
    ) -> None:
        step = "Step 6" if _data_name(member).startswith(QUBES_XML + ".") else "Step 8"
        if error is None:
            why = (
                "scrypt checks a chunk's HMAC only at its end and may already have "
                "written plaintext, so the chunk is decrypted into a private scratch file "
                "and goes on only once scrypt exited 0 (the page pipes scrypt straight into "
                "the decompressor instead)."
                if first
                else "Nothing of a chunk goes on before scrypt authenticated all of it."
            )
            out.say(
                f"{step} - verify and decrypt {member}",
                f"{human_bytes(size)}. {why}",
                self._dec(member),
                "scrypt exited 0: the chunk is authentic; its plaintext goes on.",
            )
            return
        out.say(
            f"{step} - verify and decrypt {member}",
            "scrypt could not authenticate this chunk: it is damaged, or it was tampered "
            "with. Nothing of it is used; this stored file stops here, the others go on.",
            self._dec(member),
            f"{error}: {member} rejected.",
        )

    def explain_pipeline(
        self, out: Narration, stored: str, stages: tuple[Stage, ...], kind: str
    ) -> None:
        steps = []
        if stages[:-1]:
            steps.append(f"decompress ({stages[-2].program})")
        if kind == "extract":
            steps.append("untar into a private staging folder (moved into place once complete)")
        elif kind == "list":
            steps.append("list the inner archive with tar -t (verify writes nothing)")
        else:
            steps.append("take qubes.xml out of the inner archive")
        step = "Step 6" if stored == QUBES_XML else "Step 8"
        out.say(
            f"{step} - {stored}",
            "All its chunks, in numeric order (.999 then .1000), each decrypted by scrypt "
            "into a scratch file, are fed by cat, one after the other and only once scrypt "
            "authenticated them, into one pipeline: " + "; ".join(steps) + ".",
            scriptparts.cat_chunks(stored, stages),
        )

    def explain_inventory(
        self, out: Narration, names: str, chosen: str, selected: tuple[Entity, ...]
    ) -> None:
        paths = ", ".join(f"{e.name} {e.backup_path}" for e in selected)
        out.say(
            "Step 7 - find the qubes to restore in qubes.xml",
            "qubes.xml lists every qube; those with data in the backup have a "
            f"backup-path: {names}. Selected, with their backup-path: "
            f"{paths or '(none)'}. Their stored files now follow in the backup; "
            "those of qubes not selected are skipped unread.",
        )

    # -- restore --dry-run ------------------------------------------------------

    def plan_title(self, backup: str) -> str:
        return (
            f"Dry run: the header and qubes.xml of {backup} are authentic (scrypt; "
            "format 4, Qubes R4); nothing was written."
        )

    def plan_header_steps(self, gunzip: str) -> list[str]:
        header = self.fmt.header
        return [
            "  2    read -r backup_pass",
            f"  3    {self._header_command()}   (compared in-process)",
            f"  4    cat {HEADER}   ({header_meaning(header, gunzip)})",
            f"  5    backup_id={shell.q(header.backup_id)}",
            "  6    qubes.xml, as in step 8 (already done: it lists the qubes above)",
        ]

    def plan_entity(self, entity: Entity, files: str, pipeline: str, backup: str) -> list[str]:
        chunk = f"{files}.NNN"
        scrypt = render_dec(self.fmt.tool, f"{chunk}.enc", chunk, self.fmt.chunk_prefix(chunk))
        folder = (
            entity.backup_path.rsplit("/", 1)[0] + "/"
            if entity.name == DOM0
            else entity.backup_path + "/"
        )
        return [
            f"  {entity.name}: for each stored file {files} (F: private.img, root.img, ...):"
            if entity.name != DOM0
            else f"  {entity.name}: the stored file {files}:",
            f"  7    {shell.untar_command(backup, folder)}   (its chunks, {chunk}.enc)",
            f"  8    {scrypt}   (each chunk, in numeric order, into a scratch file)",
            f"       cat {files}.000 {files}.001 ... | {pipeline}   (each chunk only once "
            "scrypt exited 0)",
        ]

    def plan_footer(self) -> str:
        return (
            "($staging is a private folder inside the output folder; $backup_pass is the "
            "passphrase, given to scrypt " + self._passing() + " only, after the prefix shown.)"
        )

    # -- qrecover kit (RECOVERY.txt) ---------------------------------------------

    def kit_programs(self) -> list[str]:
        return ["scrypt"]

    def kit_by_hand(self, example: Entity | None) -> list[str]:
        return v4_kit.by_hand(self.fmt.header, example)

    # -- qrecover script --------------------------------------------------------

    def script(
        self, plan: PlanView, backup: str | None, output: Path, argv: tuple[str, ...]
    ) -> str:
        """The whole script for a format-4 (Qubes R4) backup, as text."""
        return v4_sh.script(self.fmt, plan, backup, output, argv)
