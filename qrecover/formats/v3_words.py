"""Format 3's words: the R3 recovery page's steps, its sh fragments, its narration.

Steps as on https://www.qubes-os.org/doc/backup-emergency-restore-v3/:
1 untar the backup, 2 verify the header's HMAC, 3 read the header, 4 verify
each chunk's HMAC, 5 decrypt, 6 decompress, 7 untar the stored file, 8 mount.
Every command shown is rendered from the stage objects that run.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path

from qrecover import __version__
from qrecover.container import HEADER, HEADER_HMAC, QUBES_XML
from qrecover.formats.base import Format, Narration, PlanView
from qrecover.formats.v3 import PAGE, BackupHeader, Format3, decrypt_stage, dgst_command
from qrecover.hmacs import Digest
from qrecover.inventory import DOM0, Entity
from qrecover.render import scriptparts, shell
from qrecover.runner import Stage
from qrecover.stages.decompress import decompress_stage
from qrecover.stages.extract import qubes_xml_stage
from qrecover.units import human_bytes


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
    """The header lines a script checks in step 3 (those present in the header)."""
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
        f"decrypt with `{stage.render()}`" if stage is not None else "not encrypted: no step 5"
    )
    stage = decompress_stage(header, gunzip)
    parts.append(
        f"decompress with `{stage.render()}`" if stage is not None else "not compressed: no step 6"
    )
    return "; ".join(parts)


class Words3:
    """What the renderers say for a format-3 backup."""

    page = PAGE
    mount_step = 8
    kit_releases = "Qubes R2 (final) to R3.2 (R2, R3.0, R3.1, R3.2)"

    def __init__(self, fmt: Format | None) -> None:
        assert fmt is None or isinstance(fmt, Format3)
        self._fmt = fmt

    @property
    def fmt(self) -> Format3:
        assert self._fmt is not None, "a verified header"
        return self._fmt

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
            "# with `sh THIS-FILE` (dash or bash; GNU tar, OpenSSL, the decompressor and",
            "# POSIX utilities only). Each chunk is taken out of the backup again with",
            "# tar -i, its HMAC is checked before any byte of it is used, and it is fed",
            "# into the stored file's pipeline, as qrecover did. Step numbers are those",
            f"# of the recovery page: {PAGE}",
            "# The replay stops, non-zero, at the first failing check or stage.",
            "",
            "set -u",
            "",
            shell.PRELUDE,
            "",
            *shell.backup_assignment(backup, "qrecover"),
        ]
        if mode == "restore":
            assert output is not None
            lines += [
                f"out={shell.q(str(output))}  # the output folder",
                "need tar openssl od sed tr wc awk tail",
                *shell.passphrase_lines(),
                'make_work "$out"',
            ]
        else:
            lines += [
                "need tar openssl od sed tr wc awk tail",
                *shell.passphrase_lines(),
                'make_work "${TMPDIR:-/tmp}"',
            ]
        return lines

    def transcript_header(self) -> list[str]:
        header = self.fmt.header
        lines = [
            "",
            "# ---- steps 1-3: the backup header",
            "# step 1: untar the backup; it is listed once, and each member is taken",
            "# out when it is needed (and deleted once used)",
            "list_members",
            "# step 1, for the header: take backup-header and its HMAC out of the backup",
            shell.call("take", HEADER, HEADER_HMAC),
            f"# step 2: verify the header's HMAC ({header.hmac_algorithm}), before reading it",
            hmac_init_line(header.digest),
            shell.call("check_hmac", HEADER, shell.HEADER_MISMATCH),
            "# step 3: read the header; qrecover checked these values:",
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
                f"# chunk {member}: step 1, take it (and its .hmac) out of the backup;",
                "# step 4, verify its HMAC; then feed it into the pipeline and delete it",
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
        return "steps 4-7"

    def transcript_pipeline_intro(self) -> str:
        return "# steps 5-7 in one pipeline: the verified chunks, in numeric order, through"

    # -- --explain --------------------------------------------------------------

    def explain_intro(self, how: str) -> tuple[str, str]:
        return (
            "Step 1 - untar the backup",
            "A Qubes backup is many small tar archives one after the other (hence "
            "tar -i, --ignore-zeros): the header, qubes.xml, and every stored file cut "
            "in chunks NAME.000, NAME.001, ... each with its NAME.NNN.hmac. " + how,
        )

    def explain_header(self, out: Narration) -> None:
        header = self.fmt.header
        out.say(
            "Step 2 - verify the header's HMAC, before reading it",
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
            "Step 3 - read the header",
            f"{fields}. Every value that reaches a command was checked against an allow-list.",
            f"cat {HEADER}",
            header_meaning(header) + ".",
        )

    def explain_chunk(
        self, out: Narration, member: str, size: int, error: str | None, first: bool
    ) -> None:
        if error is None:
            out.say(
                f"Step 4 - verify {member}",
                f"{human_bytes(size)}. Nothing of a chunk is decrypted before its HMAC matched.",
                dgst_command(self.fmt.header.digest, member),
                f"HMAC matches {member}.hmac: the chunk is authentic.",
            )
            return
        out.say(
            f"Step 4 - verify {member}",
            "This chunk does not match its HMAC: it is damaged, or it was tampered "
            "with. It is not decrypted; this stored file stops here, the others go on.",
            None,
            f"{error}: {member} rejected.",
        )

    def explain_pipeline(
        self, out: Narration, stored: str, stages: tuple[Stage, ...], kind: str
    ) -> None:
        steps = []
        if any(s.program == "openssl" for s in stages):
            steps.append("5 decrypt (openssl enc -d, -md md5 as OpenSSL 1.0 did)")
        if len(stages) > 1 and stages[-2].program != "openssl":
            steps.append(f"6 decompress ({stages[-2].program})")
        if kind == "extract":
            steps.append("7 untar into a private staging folder (moved into place once complete)")
        elif kind == "list":
            steps.append("7 list the inner archive with tar -t (verify writes nothing)")
        else:
            steps.append("7 take qubes.xml out of the inner archive")
        out.say(
            f"Steps 5-7 - {stored}",
            "All its chunks, in numeric order (.999 then .1000), go through one pipeline, "
            "each chunk only once its HMAC matched: " + "; ".join(steps) + ".",
            scriptparts.cat_chunks(stored, stages),
        )

    def explain_inventory(
        self, out: Narration, names: str, chosen: str, selected: tuple[Entity, ...]
    ) -> None:
        out.say(
            "qubes.xml read",
            f"qubes.xml (restored with steps 4-7 like any stored file) lists the VMs "
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
            f"  2    {dgst_command(header.digest, HEADER)}   (compared with {HEADER_HMAC}; "
            "computed in-process)",
            f"  3    cat {HEADER}   ({header_meaning(header, gunzip)})",
        ]

    def plan_entity(self, entity: Entity, files: str, pipeline: str, backup: str) -> list[str]:
        return [
            f"  {entity.name}: for each stored file {files} (F: private.img, icon.png, ...):"
            if entity.name != DOM0
            else f"  {entity.name}: the stored file {files}:",
            f"  4    {dgst_command(self.fmt.header.digest, files + '.NNN')}   (every chunk, "
            "compared with its .hmac, before it is used)",
            f"  5-7  cat {files}.000 {files}.001 ... | {pipeline}",
        ]

    def plan_footer(self) -> str:
        return (
            "($staging is a private folder inside the output folder; $backup_pass is the "
            "passphrase, given to openssl enc through its environment only.)"
        )

    # -- qrecover kit (RECOVERY.txt) ---------------------------------------------

    def kit_programs(self) -> list[str]:
        return ["openssl"] if self.fmt.header.encrypted else []

    def kit_by_hand(self, example: Entity | None) -> list[str]:
        return by_hand(self.fmt.header, example)

    # -- qrecover script --------------------------------------------------------

    def script(
        self, plan: PlanView, backup: str | None, output: Path, argv: tuple[str, ...]
    ) -> str:
        """The whole standalone recovery script, as text: the plan's VMs, through
        the plan's stages (``gzip -d``, which every rescue system has)."""
        header = self.fmt.header
        selected = plan.selected
        when = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        total = sum(e.size for e in selected)
        programs = ["tar", "openssl"] if header.encrypted else ["tar"]
        decompressor = decompress_stage(header)
        if decompressor is not None:
            programs.append(decompressor.program)
        programs += ["od", "sed", "tr", "wc", "grep", "sort", "awk", "tail", "find"]
        shown = shell.call("qrecover", *argv) if argv else "qrecover script"
        front = plan.front()
        xml_stages = [*front, qubes_xml_stage()]
        lines = [
            "#!/bin/sh",
            "# Recovery script for the Qubes backup "
            + shell.comment(backup or "(read from standard input)"),
            f"# written by qrecover {__version__} on {when}:",
            f"# {shell.comment(shown)}",
            "#",
            "# It needs no Python and no qrecover: a POSIX shell (dash or bash), GNU tar,",
            "# OpenSSL (1.0, 1.1 or 3), "
            + (decompressor.program if decompressor else "no decompressor")
            + " and POSIX utilities (od, sed, awk, ...).",
            "# Run it with:  sh THIS-FILE   (it asks for the passphrase, or takes it from",
            "# the environment variable backup_pass; it never writes it anywhere).",
            "#",
            "# It restores, into the folder out= below:",
            "#   qubes.xml",
            *scriptparts.contents(selected),
            "#",
            "# Scratch space: one chunk and its .hmac at a time "
            f"(at most {shell.MAX_CHUNK_MIB} MiB),",
            "# in a private folder inside the output folder, deleted as soon as used and",
            f"# removed on exit; plus room for the restored data: about {human_bytes(total)}",
            "# (sizes from the backup's qubes.xml; VM images are restored sparse).",
            "#",
            "# It follows the emergency recovery page, step by step (the comments name",
            f"# the steps): {PAGE}",
            "# Nothing is decrypted before its HMAC matched; at the first HMAC mismatch or",
            "# failing program it stops with a message and a non-zero exit status.",
            "",
            "set -u",
            "",
            shell.PRELUDE,
            "",
            scriptparts.SCRIPT_FUNCTIONS,
            "",
            "# ---- settings: change them here if the backup or the output folder moved",
            *shell.backup_assignment(backup, "qrecover"),
            f"out={shell.q(str(output))}",
            "",
            shell.call("need", *dict.fromkeys(programs)),
            *shell.passphrase_lines(),
            'make_work "$out"',
            "",
            *scriptparts.STEP1,
            "",
            "# ---- step 1 (header members), step 2: verify the header's HMAC before reading it",
            shell.call("take", HEADER, HEADER_HMAC),
            hmac_init_line(header.digest),
            shell.call("check_hmac", HEADER, shell.HEADER_MISMATCH),
            "# ---- step 3: read the header; this script was written for these values",
            'cat -- "$work/backup-header" >&2',
            *(shell.call("header_is", k, v) for k, v in header_checks(header)),
            "",
            "# ---- qubes.xml: steps 4-7 (it lists the VMs; kept in the output folder)",
            *decrypt_note(xml_stages),
            'chunk_list qubes.xml >"$work/chunks" || exit 1',
            "fresh_stage",
            *shell.pipeline_block(['feed_chunks "$work/chunks"'], xml_stages, stdout=shell.XML_OUT),
            shell.pipeline_check(QUBES_XML, xml_stages),
            f'place_file "$work/qubes.xml" {shell.out_path(QUBES_XML)}',
        ]
        intro = [
            "# Steps 4-7 for each of its stored files, found in the listing of step 1:",
            "# the chunks of each, in numeric order, each one verified (step 4) before it",
            "# goes into the pipeline; what the stored file held is moved into place",
            "# only once every stage succeeded.",
        ]
        for target in plan.entities():
            lines += scriptparts.vm_block(target, front, intro, enc=False)
        lines += [
            "",
            f'say "done: {len(selected)} VM(s) restored into $out, every HMAC matched"',
            "# ---- step 8: to read a VM's files, mount its private.img (ext4) read-only:",
            *scriptparts.mount_hint(selected, 8),
        ]
        return "\n".join(lines) + "\n"


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
        "  1. mkdir work && cd work && tar -i -xf /path/to/BACKUP",
        f"  2. openssl dgst -{digest} -hmac 'PASSPHRASE' backup-header ; cat backup-header.hmac",
        "     (the hex after '= ' must be the same; else stop: tampered or damaged)",
        "  3. cat backup-header   (expect:",
        *(f"        {k}={v}" for k, v in header.fields().items()),
        "     )",
        f"  4. for c in $(find {path} -name '*.[0-9][0-9][0-9]*' ! -name '*.hmac' | sort -V); do",
        f"         openssl dgst -{digest} -hmac 'PASSPHRASE' \"$c\"; cat \"$c.hmac\"; done",
        "     every pair must match (do the same for qubes.xml.000 and every VM's chunks)",
        "  5. printf 'passphrase: '; stty -echo; read -r backup_pass; stty echo",
        "     export backup_pass",
        f"     find {path} -name '{stored.rsplit('/', 1)[-1]}.[0-9]*' ! -name '*.hmac' | sort -V |",
        f"         xargs cat | openssl enc -d -md md5 -{cipher} -pass env:backup_pass \\",
        f"         > {stored}.dec",
        "     (-pass env: keeps the passphrase out of ps; the page's pass:... does not)",
        f"  6./7. {unzip} < {stored}.dec | tar -xv --sparse -C OUT",
        "  8. to read a VM's files: sudo mount -o loop,ro OUT/.../private.img /mnt",
        "",
        "Careful: the passphrase typed on a command line (-hmac 'PASSPHRASE') is seen by",
        "every user of the machine in ps; use a machine no one else is logged in to.",
    ]
