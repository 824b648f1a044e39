"""Format 3's words: the R3 recovery page's steps, its sh fragments, its narration.

Steps as on https://www.qubes-os.org/doc/backup-emergency-restore-v3/,
declared once in :data:`PROCEDURE`.  Every command shown is rendered from
the stage objects that run.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path

from qrecover.archive.members import HEADER, HEADER_HMAC
from qrecover.events import Mode, SinkKind
from qrecover.formats.base import Narration, PageWords, PlanView
from qrecover.formats.v3 import PAGE, BackupHeader, Format3, decrypt_stage, dgst_command
from qrecover.hmacs import Digest
from qrecover.inventory import DOM0, Entity
from qrecover.procedure import Procedure, Step
from qrecover.render import scriptparts, shell
from qrecover.runner import Stage
from qrecover.stages.decompress import decompress_stage
from qrecover.stages.extract import qubes_xml_stage
from qrecover.units import human_bytes

PROCEDURE = Procedure(
    page=PAGE,
    check="hmac",
    steps=(
        Step("untar", "untar the backup", "backup"),
        Step("verify header", "verify the header's HMAC, before reading it", "backup"),
        Step("read header", "read the header", "backup"),
        Step("verify chunk", "verify each chunk's HMAC", "chunk"),
        Step("decrypt", "decrypt", "stored file"),
        Step("decompress", "decompress", "stored file"),
        Step("untar stored", "untar the stored file", "stored file"),
        Step("mount", "mount an image to read its files", "backup"),
    ),
)
UNTAR, VERIFY_HEADER, READ_HEADER, VERIFY_CHUNK, DECRYPT, DECOMPRESS, UNTAR_STORED, MOUNT = (
    PROCEDURE.steps
)
HEADER_STEPS = PROCEDURE.span("untar", "read header")
CHUNK_STEPS = PROCEDURE.span("verify chunk", "untar stored")  # each stored file's
STREAM_STEPS = PROCEDURE.span("decrypt", "untar stored")  # its verified chunks' pipeline


def block_size(digest: Digest) -> int:
    return hashlib.new(digest.hashlib_name).block_size


def hmac_init_line(digest: Digest) -> str:
    return shell.call("hmac_init", digest.hashlib_name, str(block_size(digest)))


def decrypt_note(stages: Sequence[Stage]) -> list[str]:
    if not any(stage.program == "openssl" for stage in stages):
        return []
    return [
        "# openssl enc: -md md5 because Qubes R2-R3.2 used OpenSSL 1.0, whose key",
        "# derivation was MD5 (OpenSSL >= 1.1 defaults to SHA-256: 'bad decrypt');",
        "# OpenSSL 3 warns that this key derivation is deprecated: expected.",
    ]


def header_checks(header: BackupHeader) -> list[tuple[str, str]]:
    """The header lines a script checks when it reads the header (those present)."""
    checks = [
        ("version", str(header.version)),
        ("hmac-algorithm", header.hmac_algorithm),
        ("encrypted", str(header.encrypted)),
        ("compressed", str(header.compressed)),
    ]
    if header.encrypted and "crypto_algorithm" in header.model_fields_set:
        checks.append(("crypto-algorithm", header.crypto_algorithm))
    if header.compressed and header.compression_filter is not None:
        checks.append(("compression-filter", header.compression_filter))
    return checks


def header_meaning(header: BackupHeader, gunzip: str = "gzip") -> str:
    parts = []
    stage = decrypt_stage(header)
    parts.append(
        f"decrypt with `{stage.render()}`"
        if stage is not None
        else f"not encrypted: no step {DECRYPT}"
    )
    stage = decompress_stage(header, gunzip)
    parts.append(
        f"decompress with `{stage.render()}`"
        if stage is not None
        else f"not compressed: no step {DECOMPRESS}"
    )
    return "; ".join(parts)


def last_stage(kind: str, archive: str = "the inner archive") -> str:
    """What a stored file's pipeline ends in (--explain), by the engine's ``kind``."""
    if kind == SinkKind.EXTRACT:
        return "untar into a private staging folder (moved into place once complete)"
    if kind == SinkKind.LIST:
        return f"list {archive} with tar -t (verify writes nothing)"
    return f"take qubes.xml out of {archive}"


# What the dry run says of the passphrase where openssl enc decrypts (formats 2 and 3).
OPENSSL_FOOTER = (
    "($staging is a private folder inside the output folder; $backup_pass is the "
    "passphrase, given to openssl enc through its environment only.)"
)


def explain_hmac_chunk(
    out: Narration, procedure: Procedure, digest: Digest, member: str, size: int,
    error: str | None,
) -> None:
    """--explain for a chunk checked against its .hmac (formats 2 and 3)."""
    heading = procedure.heading("verify chunk", f"verify {member}")
    if error is None:
        out.say(
            heading,
            f"{human_bytes(size)}. Nothing of a chunk is decrypted before its HMAC matched.",
            dgst_command(digest, member),
            f"HMAC matches {member}.hmac: the chunk is authentic.",
        )
    else:
        out.say(
            heading,
            "This chunk does not match its HMAC: it is damaged, or it was tampered "
            "with. It is not decrypted; this stored file stops here, the others go on.",
            None,
            f"{error}: {member} rejected.",
        )


class Words3(PageWords[Format3]):
    """What the renderers say for a format-3 backup."""

    procedure = PROCEDURE
    kit_releases = "Qubes R2 (final) to R3.2 (R2, R3.0, R3.1, R3.2)"
    intro = (  # --explain's step 1: what the backup is
        "A Qubes backup is many small tar archives one after the other (hence "
        "tar -i, --ignore-zeros): the header, qubes.xml, and every stored file cut "
        "in chunks NAME.000, NAME.001, ... each with its NAME.NNN.hmac."
    )
    pipeline_intro = (
        f"# steps {STREAM_STEPS} in one pipeline: the verified chunks, in numeric order, through"
    )

    # -- --transcript -----------------------------------------------------------

    def transcript_preamble(
        self, mode: str, backup: str | None, output: Path | None, argv: tuple[str, ...]
    ) -> list[str]:
        about = [
            "# Every command qrecover ran, as a shell script that does the same: replay it",
            "# with `sh THIS-FILE` (dash or bash; GNU tar, OpenSSL, the decompressor and",
            "# POSIX utilities only). Each chunk is taken out of the backup again with",
            "# tar -i, its HMAC is checked before any byte of it is used, and it is fed",
            "# into the stored file's pipeline, as qrecover did. Step numbers are those",
            f"# of the recovery page: {PAGE}",
        ]
        setup = ["need tar openssl od sed tr wc awk tail", *shell.passphrase_lines()]
        out = output if mode == Mode.RESTORE else None
        return shell.transcript_head(argv, about, [shell.PRELUDE], backup, out, setup)

    def transcript_header(self) -> list[str]:
        header = self.fmt.header
        lines = [
            "",
            f"# ---- steps {HEADER_STEPS}: the backup header",
            f"# step {UNTAR}: untar the backup; it is listed once, and each member is taken",
            "# out when it is needed (and deleted once used)",
            "list_members",
            f"# step {UNTAR}, for the header: take backup-header and its HMAC out of the backup",
            shell.call("take", HEADER, HEADER_HMAC),
            f"# step {VERIFY_HEADER}: verify the header's HMAC ({header.hmac_algorithm}), before "
            "reading it",
            hmac_init_line(header.digest),
            shell.call("check_hmac", HEADER, shell.HEADER_MISMATCH),
            f"# step {READ_HEADER}: read the header; qrecover checked these values:",
            'cat -- "$work/backup-header" >&2',
        ]
        for key, value in header_checks(header):
            lines.append(shell.call("header_is", key, value))
        stage = decrypt_stage(header)
        lines += decrypt_note([stage] if stage is not None else [])
        return lines

    def transcript_chunk(self, member: str, error: str | None) -> list[str]:
        hmac_member = member + ".hmac"
        if error is None:
            return [
                "",
                f"# chunk {member}: step {UNTAR}, take it (and its .hmac) out of the backup;",
                f"# step {VERIFY_CHUNK}, verify its HMAC; then feed it into the pipeline and "
                "delete it",
                shell.call("take", member, hmac_member),
                shell.call("check_hmac", member),
            ]
        return [
            "",
            f"# chunk {member}: qrecover found it bad ({error});",
            "# the replay stops here too",
            shell.call("take", member, hmac_member),
            shell.call("check_hmac", member),
            shell.call("die", f"{member}: {error}"),
        ]

    def transcript_steps(self, stored: str) -> str:
        return f"steps {CHUNK_STEPS}"

    # -- --explain --------------------------------------------------------------

    def explain_header(self, out: Narration) -> None:
        header = self.fmt.header
        out.say(
            PROCEDURE.heading("verify header"),
            "The header says how everything else was written, so it must be authentic "
            "before it is read. The page computes the HMAC with the passphrase as key "
            "(qrecover computes the same HMAC itself, so the passphrase is never on a "
            "command line) and compares it with backup-header.hmac.",
            dgst_command(header.digest, HEADER),
            f"HMAC-{header.hmac_algorithm} matches {HEADER_HMAC}: the passphrase is "
            "right and the header is intact.",
        )
        fields = ", ".join(f"{k}={v}" for k, v in header.fields().items())
        out.say(
            PROCEDURE.heading("read header"),
            f"{fields}. Every value that reaches a command was checked against an allow-list.",
            f"cat {HEADER}",
            header_meaning(header) + ".",
        )

    def explain_chunk(
        self, out: Narration, member: str, size: int, error: str | None, first: bool
    ) -> None:
        explain_hmac_chunk(out, PROCEDURE, self.fmt.header.digest, member, size, error)

    def explain_pipeline(
        self, out: Narration, stored: str, stages: tuple[Stage, ...], kind: str
    ) -> None:
        steps = []
        if any(s.program == "openssl" for s in stages):
            steps.append(f"{DECRYPT} decrypt (openssl enc -d, -md md5 as OpenSSL 1.0 did)")
        if len(stages) > 1 and stages[-2].program != "openssl":
            steps.append(f"{DECOMPRESS} decompress ({stages[-2].program})")
        steps.append(f"{UNTAR_STORED} {last_stage(kind)}")
        out.say(
            f"Steps {STREAM_STEPS} - {stored}",
            "All its chunks, in numeric order (.999 then .1000), go through one pipeline, "
            "each chunk only once its HMAC matched: " + "; ".join(steps) + ".",
            scriptparts.cat_chunks(stored, stages),
        )

    def explain_inventory(
        self, out: Narration, names: str, chosen: str, selected: tuple[Entity, ...]
    ) -> None:
        out.say(
            "qubes.xml read",
            f"qubes.xml (restored with steps {CHUNK_STEPS} like any stored file) lists the VMs "
            f"with data in the backup: {names}. Selected: {chosen}. Their stored files "
            "now follow in the backup; those of VMs not selected are skipped unread.",
        )

    # -- restore --dry-run ------------------------------------------------------

    def plan_title(self, backup: str) -> str:
        return (
            f"Dry run: the header and qubes.xml of {backup} are authentic "
            f"(HMAC-{self.fmt.header.hmac_algorithm}); nothing was written."
        )

    def plan_header_steps(self, gunzip: str) -> list[str]:
        header = self.fmt.header
        return [
            f"  {VERIFY_HEADER}    {dgst_command(header.digest, HEADER)}   (compared with "
            f"{HEADER_HMAC}; computed in-process)",
            f"  {READ_HEADER}    cat {HEADER}   ({header_meaning(header, gunzip)})",
        ]

    def plan_entity(self, entity: Entity, files: str, pipeline: str, backup: str) -> list[str]:
        return [
            f"  {entity.name}: for each stored file {files} (F: private.img, icon.png, ...):"
            if entity.name != DOM0
            else f"  {entity.name}: the stored file {files}:",
            f"  {VERIFY_CHUNK}    {dgst_command(self.fmt.header.digest, files + '.NNN')}   "
            "(every chunk, compared with its .hmac, before it is used)",
            f"  {STREAM_STEPS}  cat {files}.000 {files}.001 ... | {pipeline}",
        ]

    def plan_footer(self) -> str:
        return OPENSSL_FOOTER

    # -- qrecover kit (RECOVERY.txt) ---------------------------------------------

    def kit_programs(self) -> list[str]:
        return ["openssl"] if self.fmt.header.encrypted else []

    def kit_by_hand(self, example: Entity | None) -> list[str]:
        return by_hand(self.fmt.header, example)

    # -- qrecover script --------------------------------------------------------

    def script(
        self, plan: PlanView, backup: str | None, output: Path, argv: tuple[str, ...]
    ) -> str:
        """The whole standalone recovery script, as text."""
        header = self.fmt.header
        programs = ["tar", "openssl"] if header.encrypted else ["tar"]
        decompressor = decompress_stage(header)
        if decompressor is not None:
            programs.append(decompressor.program)
        programs += ["od", "sed", "tr", "wc", "grep", "sort", "awk", "tail", "find"]
        intro = [
            f"# Steps {CHUNK_STEPS} for each of its stored files, found "
            f"in the listing of step {UNTAR}:",
            f"# the chunks of each, in numeric order, each one verified (step {VERIFY_CHUNK}) "
            "before it",
            "# goes into the pipeline; what the stored file held is moved into place",
            "# only once every stage succeeded.",
        ]
        text = scriptparts.ScriptText(
            kind="the Qubes backup",
            tools="# OpenSSL (1.0, 1.1 or 3), "
            + (decompressor.program if decompressor else "no decompressor")
            + " and POSIX utilities (od, sed, awk, ...).",
            scratch="# Scratch space: one chunk and its .hmac at a time "
            f"(at most {shell.MAX_CHUNK_MIB} MiB),",
            page=[
                "# It follows the emergency recovery page, step by step (the comments name",
                f"# the steps): {PAGE}",
                "# Nothing is decrypted before its HMAC matched; at the first HMAC mismatch or",
                "# failing program it stops with a message and a non-zero exit status.",
            ],
            functions=[shell.PRELUDE, scriptparts.SCRIPT_FUNCTIONS],
            programs=programs,
            setup=shell.passphrase_lines(),
            header=[
                f"# ---- step {UNTAR} (header members), step {VERIFY_HEADER}: verify the "
                "header's HMAC before reading it",
                shell.call("take", HEADER, HEADER_HMAC),
                hmac_init_line(header.digest),
                shell.call("check_hmac", HEADER, shell.HEADER_MISMATCH),
                f"# ---- step {READ_HEADER}: read the header; this script was written for "
                "these values",
                'cat -- "$work/backup-header" >&2',
                *(shell.call("header_is", k, v) for k, v in header_checks(header)),
            ],
            xml=[
                f"# ---- qubes.xml: steps {CHUNK_STEPS} (it lists the VMs; kept in the output "
                "folder)",
                *decrypt_note([*plan.front(), qubes_xml_stage()]),
            ],
            chunks="",
            placeholder=False,
            intro=lambda entity: intro,
            done="every HMAC matched",
            mount_step=MOUNT.number,
        )
        return scriptparts.script(text, plan, backup, output, argv)

def by_hand(header: BackupHeader, example: Entity | None) -> list[str]:
    """WAY 3 of the kit's RECOVERY.txt: the page's steps by hand, corrected."""
    digest = header.hmac_algorithm.lower()
    cipher = header.crypto_algorithm
    stage = decompress_stage(header)
    unzip = " ".join(stage.argv) if stage is not None else "cat"
    path = example.backup_path if example is not None else "vm1"
    stored = f"{path}/private.img" if example is not None and example.name != "dom0" else path
    return [
        f"The page: {PAGE}",
        "It predates today's OpenSSL and globs chunk names; follow it with these",
        "corrections (they are written into the commands below):",
        "  - openssl enc needs -md md5 (OpenSSL 1.1 and later default to SHA-256,",
        "    Qubes R2-R3.2 used OpenSSL 1.0's MD5 key derivation; without it: bad decrypt).",
        "  - chunks must be joined in numeric order: find ... | sort -V, never",
        "    NAME.??? (a glob drops chunk .1000 and later of images over 100 GB).",
        "  - check the HMAC of EVERY chunk (NAME.000, NAME.001, ...) before decrypting",
        "    any of it, not only the first.",
        "",
        f"  {UNTAR}. mkdir work && cd work && tar -i -xf /path/to/BACKUP",
        f"  {VERIFY_HEADER}. openssl dgst -{digest} -hmac 'PASSPHRASE' backup-header ; "
        "cat backup-header.hmac",
        "     (the hex after '= ' must be the same; else stop: tampered or damaged)",
        f"  {READ_HEADER}. cat backup-header   (expect:",
        *(f"        {k}={v}" for k, v in header.fields().items()),
        "     )",
        f"  {VERIFY_CHUNK}. for c in $(find {path} -name '*.[0-9][0-9][0-9]*' ! -name '*.hmac' "
        "| sort -V); do",
        f"         openssl dgst -{digest} -hmac 'PASSPHRASE' \"$c\"; cat \"$c.hmac\"; done",
        "     every pair must match (do the same for qubes.xml.000 and every VM's chunks)",
        f"  {DECRYPT}. printf 'passphrase: '; stty -echo; read -r backup_pass; stty echo",
        "     export backup_pass",
        f"     find {path} -name '{stored.rsplit('/', 1)[-1]}.[0-9]*' ! -name '*.hmac' | sort -V |",
        f"         xargs cat | openssl enc -d -md md5 -{cipher} -pass env:backup_pass \\",
        f"         > {stored}.dec",
        "     (-pass env: keeps the passphrase out of ps; the page's pass:... does not)",
        f"  {DECOMPRESS}./{UNTAR_STORED}. {unzip} < {stored}.dec | tar -xv --sparse -C OUT",
        f"  {MOUNT}. to read a VM's files: sudo mount -o loop,ro OUT/.../private.img /mnt",
        "",
        "Careful: the passphrase typed on a command line (-hmac 'PASSPHRASE') is seen by",
        "every user of the machine in ps; use a machine no one else is logged in to.",
    ]
