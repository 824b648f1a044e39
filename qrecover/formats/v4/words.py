"""Format 4's words: the v4 recovery page's steps, its sh fragments, its narration.

Steps as on https://www.qubes-os.org/doc/backup-emergency-restore-v4/,
declared once in :data:`PROCEDURE`; each chunk is decrypted by scrypt into a
scratch file and used only once scrypt exited 0.
"""

from __future__ import annotations

from pathlib import Path

from qrecover.archive.members import HEADER, HEADER_HMAC, QUBES_XML, parse_member_name
from qrecover.events import Mode
from qrecover.formats.base import Narration, PageWords, PlanView
from qrecover.formats.v3_words import last_stage
from qrecover.formats.v4 import PAGE, BackupHeaderV4, Format4, sh
from qrecover.formats.v4.scrypt_tool import HEADER_PREFIX, render_dec
from qrecover.formats.v4.sh import VERIFIED_HEADER, header_checks
from qrecover.inventory import DOM0, Entity
from qrecover.procedure import Procedure, Step
from qrecover.render import scriptparts, shell
from qrecover.runner import PASS_ENV, Stage
from qrecover.stages.decompress import decompress_stage
from qrecover.units import human_bytes

PROCEDURE = Procedure(
    page=PAGE,
    check="scrypt",
    steps=(
        Step("untar", "untar the backup", "backup"),
        Step("passphrase", "the passphrase", "backup"),
        Step("verify header", "verify the header with scrypt, before reading it", "backup"),
        Step("read header", "read the header", "backup"),
        Step("backup id", "the backup id", "backup"),
        Step("qubes.xml", "qubes.xml", "backup"),
        Step("find", "find the qubes to restore in qubes.xml", "backup"),
        Step("chunks", "verify and decrypt each chunk", "chunk"),
        Step("mount", "mount an image to read its files", "backup"),
    ),
)
UNTAR, PASSPHRASE, VERIFY_HEADER, READ_HEADER, BACKUP_ID, XML, FIND, CHUNKS, MOUNT = (
    PROCEDURE.steps
)


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


class Words4(PageWords[Format4]):
    """What the renderers say for a format-4 (Qubes R4) backup."""

    procedure = PROCEDURE
    kit_releases = "Qubes R4.0 and later (R4.0, R4.1, R4.2, R4.3)"
    intro = (  # --explain's step 1: what the backup is
        "This is a Qubes R4 backup (format 4; steps as on " + PAGE + "). It is "
        "many small tar archives one after the other (hence tar -i, --ignore-zeros): "
        "the header, backup-header.hmac (the header encrypted by scrypt), qubes.xml, "
        "and every stored file cut in chunks NAME.000.enc, NAME.001.enc, ... each "
        "encrypted and authenticated by scrypt on its own."
    )
    pipeline_intro = "# the chunks, in numeric order, each decrypted by scrypt, through"

    def _passing(self) -> str:
        if self.fmt.tool.style == "env":
            return f"through its environment (scrypt >= 1.3: --passphrase env:{PASS_ENV})"
        return "on its standard input (scrypt 1.2.1: -P)"

    def _header_command(self) -> str:
        """The v4 page's header check (PROCEDURE's verify header) for this scrypt, as typed."""
        return (
            render_dec(self.fmt.tool, HEADER_HMAC, VERIFIED_HEADER, HEADER_PREFIX)
            + f" && cmp {HEADER} {VERIFIED_HEADER}"
        )

    def _dec(self, member: str) -> str:
        plain = _data_name(member)
        return render_dec(self.fmt.tool, member, plain, self.fmt.chunk_prefix(plain))

    def chunk_step(self, member: str) -> Step:
        return XML if _data_name(member).startswith(QUBES_XML + ".") else CHUNKS

    # -- --transcript -----------------------------------------------------------

    def transcript_preamble(
        self, mode: str, backup: str | None, output: Path | None, argv: tuple[str, ...]
    ) -> list[str]:
        about = [
            "# Every command qrecover ran, as a shell script that does the same: replay it",
            "# with `sh THIS-FILE` (dash or bash; GNU tar, scrypt >= 1.2.1, the decompressor",
            "# and POSIX utilities only). This is a format-4 (Qubes R4) backup: each chunk",
            "# NAME.NNN.enc is taken out of the backup again with tar -i; scrypt",
            "# authenticates and decrypts it into a scratch file, and only once scrypt has",
            "# exited 0 is the plaintext fed into the stored file's pipeline, as qrecover",
            "# did. Step numbers are those of the recovery page for format 4:",
            f"# {PAGE}",
        ]
        setup = [
            "need tar scrypt cmp grep sed wc awk tail",
            f"# step {PASSPHRASE}: the passphrase (the page's read -r backup_pass)",
            *shell.passphrase_lines(),
            "scrypt_init",
        ]
        out = output if mode == Mode.RESTORE else None
        functions = [shell.prelude(hmac=False), sh.scrypt_functions()]
        return shell.transcript_head(argv, about, functions, backup, out, setup)

    def transcript_header(self) -> list[str]:
        header = self.fmt.header
        return [
            "",
            f"# ---- steps {PROCEDURE.span('untar', 'backup id')}: the backup header",
            f"# step {UNTAR}: untar the backup; it is listed once, and each member is taken",
            "# out when it is needed (and deleted once used)",
            "list_members",
            shell.call("take", HEADER, HEADER_HMAC),
            f"# step {VERIFY_HEADER}: verify the header: {HEADER_HMAC} is {HEADER} encrypted and",
            f"# authenticated by scrypt under the passphrase '{HEADER_PREFIX}' + yours",
            shell.call(
                "scrypt_dec", HEADER_HMAC, VERIFIED_HEADER, HEADER_PREFIX, shell.HEADER_MISMATCH
            ),
            shell.call("same_file", HEADER, VERIFIED_HEADER),
            f"# step {READ_HEADER}: read the header; qrecover checked these values:",
            'cat -- "$work/backup-header" >&2',
            *(shell.call("header_is", k, v) for k, v in header_checks(header)),
            f"# step {BACKUP_ID}: backup_id={header.backup_id}: each chunk's scrypt passphrase is",
            "# 'BACKUPID!NAME.NNN!' followed by yours (written out below, single-quoted)",
        ]

    def transcript_chunk(self, member: str, error: str | None) -> list[str]:
        plain = _data_name(member)
        name = parse_member_name(member)
        stored = name.stored if name is not None else member
        if error is None:
            step = f"step {XML if stored == QUBES_XML else CHUNKS}"
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
        return f"step {XML}" if stored == QUBES_XML else f"steps {PROCEDURE.span('find', 'chunks')}"

    # -- --explain --------------------------------------------------------------

    def explain_header(self, out: Narration) -> None:
        header = self.fmt.header
        out.say(
            PROCEDURE.heading("passphrase"),
            "The page keeps it in a shell variable, typed once and out of the shell's "
            "history. qrecover gives it to scrypt " + self._passing() + ", after the prefix "
            "each file needs; it is never on a command line.",
            "read -r backup_pass",
        )
        out.say(
            PROCEDURE.heading("verify header"),
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
            PROCEDURE.heading("read header"),
            f"{fields}. Every value that reaches a command was checked against an allow-list.",
            f"cat {HEADER}",
            header_meaning(header) + ".",
        )
        out.say(
            PROCEDURE.heading("backup id"),
            "Each chunk's scrypt passphrase is BACKUPID!NAME.NNN! followed by yours, so no "
            "chunk can be swapped for another, or for one of another backup, unnoticed.",
            f"backup_id={shell.q(header.backup_id)}",
        )

    def explain_chunk(
        self, out: Narration, member: str, size: int, error: str | None, first: bool
    ) -> None:
        step = self.chunk_step(member).key
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
                PROCEDURE.heading(step, f"verify and decrypt {member}"),
                f"{human_bytes(size)}. {why}",
                self._dec(member),
                "scrypt exited 0: the chunk is authentic; its plaintext goes on.",
            )
            return
        out.say(
            PROCEDURE.heading(step, f"verify and decrypt {member}"),
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
        steps.append(last_stage(kind))
        step = "qubes.xml" if stored == QUBES_XML else "chunks"
        out.say(
            PROCEDURE.heading(step, stored),
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
            PROCEDURE.heading("find"),
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
            f"  {PASSPHRASE}    read -r backup_pass",
            f"  {VERIFY_HEADER}    {self._header_command()}   (compared in-process)",
            f"  {READ_HEADER}    cat {HEADER}   ({header_meaning(header, gunzip)})",
            f"  {BACKUP_ID}    backup_id={shell.q(header.backup_id)}",
            f"  {XML}    qubes.xml, as in step {CHUNKS} (already done: it lists the qubes above)",
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
            f"  {FIND}    {shell.untar_command(backup, folder)}   (its chunks, {chunk}.enc)",
            f"  {CHUNKS}    {scrypt}   (each chunk, in numeric order, into a scratch file)",
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
        return by_hand(self.fmt.header, example)

    # -- qrecover script --------------------------------------------------------

    def script(
        self, plan: PlanView, backup: str | None, output: Path, argv: tuple[str, ...]
    ) -> str:
        """The whole standalone script for a format-4 (Qubes R4) backup, as text."""
        header = self.fmt.header
        programs = ["tar", "scrypt", *(s.program for s in plan.front())]
        programs += ["cmp", "sed", "wc", "grep", "sort", "awk", "tail", "find"]
        decompressor = decompress_stage(header)

        def intro(entity: Entity) -> list[str]:
            found = (
                f"its backup-path in qubes.xml is {entity.backup_path}/"
                if entity.name != DOM0
                else f"dom0's home is stored as {entity.backup_path}"
            )
            return [
                f"# Step {FIND}: {found}; its stored files",
                f"# are found in the listing of step {UNTAR}. Step {CHUNKS} for each: the chunks, "
                "in numeric",
                "# order, each taken out, authenticated and decrypted by scrypt into a scratch",
                "# file, and fed on only once scrypt exited 0; what the stored file held is",
                "# moved into place only once every stage succeeded.",
            ]

        text = scriptparts.ScriptText(
            kind="the Qubes R4 (format 4) backup",
            tools="# scrypt (1.2.1 or newer), "
            + (decompressor.program if decompressor else "no decompressor")
            + " and POSIX utilities (sed, awk, cmp, ...).",
            scratch="# Scratch space: one chunk at a time, encrypted then decrypted (at most 2 x "
            f"{shell.MAX_CHUNK_MIB} MiB),",
            page=[
                "# It follows the emergency recovery page for format 4, step by step (the",
                f"# comments name the steps): {PAGE}",
                "# with its fixes: scrypt gets the passphrase with -P on its stdin (scrypt 1.2.1)",
                "# or from its environment (scrypt >= 1.3), never on a command line; every '!'",
                "# is single-quoted (no history expansion, the page's set +H); chunks go in",
                f"# numeric order (.999 then .1000); and, unlike the page's step {CHUNKS}, a chunk "
                "goes",
                "# to the decompressor only once scrypt has authenticated all of it. At the",
                "# first failing check or program it stops with a message and a non-zero status.",
            ],
            functions=[
                shell.prelude(hmac=False), sh.scrypt_functions(), sh.SCRIPT_FUNCTIONS_V4
            ],
            programs=programs,
            setup=[
                f"# ---- step {PASSPHRASE}: the passphrase (the page's read -r backup_pass)",
                *shell.passphrase_lines(),
                "scrypt_init",
            ],
            header=[
                f"# ---- step {UNTAR} (header members), step {VERIFY_HEADER}: verify backup-header "
                "with scrypt before",
                f"# reading it: {HEADER_HMAC} is {HEADER} encrypted and authenticated under the",
                f"# passphrase '{HEADER_PREFIX}' followed by yours (the page compares with diff "
                "-qs)",
                shell.call("take", HEADER, HEADER_HMAC),
                shell.call(
                    "scrypt_dec", HEADER_HMAC, VERIFIED_HEADER, HEADER_PREFIX,
                    shell.HEADER_MISMATCH,
                ),
                shell.call("same_file", HEADER, VERIFIED_HEADER),
                f"# ---- step {READ_HEADER}: read the header; this script was written for these "
                "values",
                'cat -- "$work/backup-header" >&2',
                *(shell.call("header_is", k, v) for k, v in header_checks(header)),
                f"# ---- step {BACKUP_ID}: the backup id, from the header's last line",
                f"backup_id={shell.q(header.backup_id)}",
            ],
            xml=[
                f"# ---- step {XML}: qubes.xml, authenticated, decrypted, decompressed and "
                "extracted",
                "# (it lists the qubes; kept in the output folder)",
            ],
            chunks="enc_",
            placeholder=True,
            intro=intro,
            done="every chunk authenticated by scrypt",
            mount_step=MOUNT.number,
        )
        return scriptparts.script(text, plan, backup, output, argv)

def by_hand(header: BackupHeaderV4, example: Entity | None) -> list[str]:
    """WAY 3 of the kit's RECOVERY.txt: the page's steps by hand, corrected."""
    backup_id = header.backup_id
    stage = decompress_stage(header)
    unzip = " ".join(stage.argv) if stage is not None else "cat"
    path = example.backup_path if example is not None else "vm1"
    stored = f"{path}/private.img"
    return [
        f"The page: {PAGE}",
        "Format 4 has no .hmac files: scrypt both decrypts and authenticates each",
        "chunk, with its own passphrase. Corrections to the page:",
        "  - decrypt each chunk to a FILE and use it only once scrypt exited 0",
        "    (the page pipes scrypt dec into the decompressor: a bad chunk's bytes",
        "    would then be used before scrypt notices).",
        "  - chunks must be joined in numeric order: find ... | sort -V, never a glob.",
        "",
        "  1. mkdir work && cd work && tar -i -xf /path/to/BACKUP",
        "  2. scrypt dec -P backup-header.hmac header.check  (passphrase:",
        "     backup-header!PASSPHRASE), then cmp header.check backup-header",
        "  3. cat backup-header   (expect:",
        *(f"        {k}={v}" for k, v in header.fields().items()),
        "     )",
        f"  4. for c in $(find {path} -name '*.enc' | sort -V); do",
        "         n=${c%.enc}",
        f"         scrypt dec \"$c\" \"$n\" || break   # passphrase: {backup_id}!$n!PASSPHRASE",
        "     done",
        "     (each chunk has its own passphrase: the backup id, '!', the chunk's name",
        "     without .enc, '!', your passphrase; do the same for qubes.xml.000.enc)",
        f"  5. cat $(find {path} -name '{stored.rsplit('/', 1)[-1]}.[0-9]*' ! -name '*.enc' "
        "| sort -V) |",
        f"         {unzip} | tar -xv --sparse -C OUT",
        "     (one stored file at a time: each is its own stream; its members land",
        f"     in OUT/{path}/...)",
        "  6. to read a VM's files: sudo mount -o loop,ro OUT/.../private.img /mnt",
        "",
        "scrypt asks for each chunk's passphrase on the terminal; scrypt 1.2.1 and",
        "later read it from standard input with -P.",
    ]
