"""Teaching output: ``--explain`` narration and the ``restore --dry-run`` plan.

Both are written for a person learning the recovery procedure.  Steps are
numbered as on the recovery page
(https://www.qubes-os.org/doc/backup-emergency-restore-v3/): 1 untar the
backup, 2 verify the header's HMAC, 3 read the header, 4 verify each chunk's
HMAC, 5 decrypt, 6 decompress, 7 untar the stored file, 8 mount the image.
Every command shown is rendered from the stage objects that run.  A format-4
(Qubes R4) backup is narrated with the v4 page's steps instead
(https://www.qubes-os.org/doc/backup-emergency-restore-v4/): 1 untar, 2 the
passphrase, 3 verify the header with scrypt, 4 read it, 5 the backup id,
6 qubes.xml, 7 find the qube's backup-path, 8 its chunks, 9 mount.
"""

from __future__ import annotations

import os
import sys
import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import TextIO

from qrecover import shell
from qrecover.container import HEADER, HEADER_HMAC, QUBES_XML, parse_member_name
from qrecover.decompress import decompress_stage
from qrecover.decrypt import decrypt_stage
from qrecover.extract import extract_stage, placement
from qrecover.formats import Format4
from qrecover.header import BackupHeader, BackupHeaderV4
from qrecover.inventory import DOM0, Entity
from qrecover.progress import human_bytes
from qrecover.runner import PASS_ENV, Stage, render_pipeline
from qrecover.scrypt import HEADER_PREFIX, chunk_prefix, render_dec
from qrecover.transcript import (
    PAGE_V4,
    ChunkDecrypted,
    ChunkFed,
    ChunkRejected,
    ChunkVerified,
    Event,
    FileFinished,
    HeaderVerified,
    HeaderVerifiedV4,
    InventoryRead,
    PipelineStarted,
    QubesXmlWritten,
    dgst_command,
)

PAGE = "https://www.qubes-os.org/doc/backup-emergency-restore-v3/"


def untar_command(backup: str, *members: str) -> str:
    """The page's step 1 for this backup (only ``members``, if named)."""
    if backup == "-":
        return shell.render_argv(
            ("...", "|", "tar", "-i", "-xvf", "-", *members), {"...": "...", "|": "|"}
        )
    return shell.render_argv(("tar", "-i", "-xvf", os.path.abspath(backup), *members))


def header_meaning_v4(header: BackupHeaderV4) -> str:
    stage = decompress_stage(header)
    return "each chunk is authenticated and decrypted by scrypt on its own; " + (
        f"decompress with `{stage.render()}`"
        if stage is not None
        else "not compressed: nothing to decompress"
    )


def _passing(fmt: Format4) -> str:
    if fmt.tool.style == "env":
        return f"through its environment (scrypt >= 1.3: --passphrase env:{PASS_ENV})"
    return "on its standard input (scrypt 1.2.1: -P)"


def header_meaning(header: BackupHeader) -> str:
    parts = []
    stage = decrypt_stage(header)
    parts.append(
        f"decrypt with `{stage.render()}`" if stage is not None else "not encrypted: no step 5"
    )
    stage = decompress_stage(header)
    parts.append(
        f"decompress with `{stage.render()}`" if stage is not None else "not compressed: no step 6"
    )
    return "; ".join(parts)


class Narrator:
    """Narrates the engine's events on stderr, step by step."""

    def __init__(self, backup: str, mode: str, out: TextIO | None = None) -> None:
        self.out = out if out is not None else sys.stderr
        self.mode = mode
        self.backup = backup
        self.images: list[Path] = []
        # Step 1 is told once the header said which format (and page) this is.
        self.version: int | None = None
        self.told_scratch = False

    def _intro(self, version: int) -> None:
        if self.version is not None:
            return
        self.version = version
        backup = self.backup
        if Path(backup).is_dir():
            how = (
                f"{backup} is a backup already untarred by hand, so qrecover reads "
                "its files from there."
            )
        else:
            how = (
                "qrecover reads the backup once, as a stream, and takes each member out "
                "as it comes: nothing is untarred to disk except one chunk at a time."
            )
        if version == 4:
            self.say(
                "Step 1 - untar the backup",
                "This is a Qubes R4 backup (format 4; steps as on " + PAGE_V4 + "). It is "
                "many small tar archives one after the other (hence tar -i, --ignore-zeros): "
                "the header, backup-header.hmac (the header encrypted by scrypt), qubes.xml, "
                "and every stored file cut in chunks NAME.000.enc, NAME.001.enc, ... each "
                "encrypted and authenticated by scrypt on its own. " + how,
                untar_command(backup),
            )
            return
        self.say(
            "Step 1 - untar the backup",
            "A Qubes backup is many small tar archives one after the other (hence "
            "tar -i, --ignore-zeros): the header, qubes.xml, and every stored file cut "
            "in chunks NAME.000, NAME.001, ... each with its NAME.NNN.hmac. " + how,
            untar_command(backup),
        )

    def say(self, title: str, text: str, command: str | None = None, result: str = "") -> None:
        lines = [f"* {title}"]
        lines += textwrap.wrap(text, 76, initial_indent="  ", subsequent_indent="  ")
        if command:
            lines.append(f"    $ {command}")
        if result:
            lines += textwrap.wrap(result, 76, initial_indent="  -> ", subsequent_indent="     ")
        print("\n".join(lines), file=self.out, flush=True)

    def __call__(self, event: Event) -> None:
        if isinstance(event, HeaderVerifiedV4):
            self._intro(4)
            self._header_v4(event)
            return
        self._intro(3)
        if isinstance(event, ChunkDecrypted):
            self._chunk_v4(event)
        elif isinstance(event, HeaderVerified):
            header = event.header
            self.say(
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
            self.say(
                "Step 3 - read the header",
                f"{fields}. Every value that reaches a command was checked against an allow-list.",
                f"cat {HEADER}",
                header_meaning(header) + ".",
            )
        elif isinstance(event, ChunkVerified):
            self.say(
                f"Step 4 - verify {event.member}",
                f"{human_bytes(event.size)}. Nothing of a chunk is decrypted "
                "before its HMAC matched.",
                dgst_command(event.digest, event.member),
                f"HMAC matches {event.hmac_member}: the chunk is authentic.",
            )
        elif isinstance(event, ChunkRejected):
            self.say(
                f"Step 4 - verify {event.member}",
                "This chunk does not match its HMAC: it is damaged, or it was tampered "
                "with. It is not decrypted; this stored file stops here, the others go on.",
                None,
                f"{event.reason}: {event.member} rejected.",
            )
        elif isinstance(event, PipelineStarted):
            self._pipeline(event)
        elif isinstance(event, ChunkFed):
            name = parse_member_name(event.member)
            fed = name.data_name if name is not None else event.member
            print(
                f"  (feeding {fed} into the pipeline of {event.stored})",
                file=self.out,
                flush=True,
            )
        elif isinstance(event, FileFinished):
            self._finished(event)
        elif isinstance(event, InventoryRead):
            names = ", ".join(e.name for e in event.inventory.entities) or "(none)"
            chosen = ", ".join(e.name for e in event.selected) or "(none)"
            if self.version == 4:
                paths = ", ".join(f"{e.name} {e.backup_path}" for e in event.selected)
                self.say(
                    "Step 7 - find the qubes to restore in qubes.xml",
                    "qubes.xml lists every qube; those with data in the backup have a "
                    f"backup-path: {names}. Selected, with their backup-path: "
                    f"{paths or '(none)'}. Their stored files now follow in the backup; "
                    "those of qubes not selected are skipped unread.",
                )
                return
            self.say(
                "qubes.xml read",
                f"qubes.xml (restored with steps 4-7 like any stored file) lists the VMs "
                f"with data in the backup: {names}. Selected: {chosen}. Their stored files "
                "now follow in the backup; those of VMs not selected are skipped unread.",
            )
        elif isinstance(event, QubesXmlWritten):
            print(f"  -> qubes.xml kept as {event.path}", file=self.out, flush=True)

    def _header_v4(self, event: HeaderVerifiedV4) -> None:
        fmt = event.fmt
        header = fmt.header
        self.say(
            "Step 2 - the passphrase",
            "The page keeps it in a shell variable, typed once and out of the shell's "
            "history. qrecover gives it to scrypt " + _passing(fmt) + ", after the prefix "
            "each file needs; it is never on a command line.",
            "read -r backup_pass",
        )
        self.say(
            "Step 3 - verify the header with scrypt, before reading it",
            "In format 4, backup-header.hmac is backup-header encrypted and authenticated "
            "by scrypt under the passphrase 'backup-header!' followed by yours. If scrypt "
            "decrypts it, the passphrase is right; the decrypted copy must then be "
            "identical to backup-header. (The page runs set +H first, so that an "
            "interactive bash does not expand the '!'; qrecover's commands single-quote it.)",
            event.header_command(),
            "scrypt authenticated backup-header.hmac, and its content is identical to "
            "backup-header: the passphrase is right and the header is intact.",
        )
        fields = ", ".join(f"{k}={v}" for k, v in header.fields().items())
        self.say(
            "Step 4 - read the header",
            f"{fields}. Every value that reaches a command was checked against an allow-list.",
            f"cat {HEADER}",
            header_meaning_v4(header) + ".",
        )
        self.say(
            "Step 5 - the backup id",
            "Each chunk's scrypt passphrase is BACKUPID!NAME.NNN! followed by yours, so no "
            "chunk can be swapped for another, or for one of another backup, unnoticed.",
            f"backup_id={shell.q(header.backup_id)}",
        )

    def _chunk_v4(self, event: ChunkDecrypted) -> None:
        step = "Step 6" if event.plain.startswith(QUBES_XML + ".") else "Step 8"
        if event.error is None:
            why = (
                "Nothing of a chunk goes on before scrypt authenticated all of it."
                if self.told_scratch
                else "scrypt checks a chunk's HMAC only at its end and may already have "
                "written plaintext, so the chunk is decrypted into a private scratch file "
                "and goes on only once scrypt exited 0 (the page pipes scrypt straight into "
                "the decompressor instead)."
            )
            self.told_scratch = True
            self.say(
                f"{step} - verify and decrypt {event.member}",
                f"{human_bytes(event.size)}. {why}",
                event.command(),
                "scrypt exited 0: the chunk is authentic; its plaintext goes on.",
            )
            return
        self.say(
            f"{step} - verify and decrypt {event.member}",
            "scrypt could not authenticate this chunk: it is damaged, or it was tampered "
            "with. Nothing of it is used; this stored file stops here, the others go on.",
            event.command(),
            f"{event.error}: {event.member} rejected.",
        )

    def _pipeline_v4(self, event: PipelineStarted) -> None:
        steps = []
        if event.stages[:-1]:
            steps.append(f"decompress ({event.stages[-2].program})")
        if event.kind == "extract":
            steps.append("untar into a private staging folder (moved into place once complete)")
        elif event.kind == "list":
            steps.append("list the inner archive with tar -t (verify writes nothing)")
        else:
            steps.append("take qubes.xml out of the inner archive")
        step = "Step 6" if event.stored == QUBES_XML else "Step 8"
        self.say(
            f"{step} - {event.stored}",
            "All its chunks, in numeric order (.999 then .1000), each decrypted by scrypt "
            "into a scratch file, are fed by cat, one after the other and only once scrypt "
            "authenticated them, into one pipeline: " + "; ".join(steps) + ".",
            f"cat {shell.q(event.stored + '.000')} {shell.q(event.stored + '.001')} ... | "
            + render_pipeline(event.stages),
        )

    def _pipeline(self, event: PipelineStarted) -> None:
        if self.version == 4:
            self._pipeline_v4(event)
            return
        steps = []
        if any(s.program == "openssl" for s in event.stages):
            steps.append("5 decrypt (openssl enc -d, -md md5 as OpenSSL 1.0 did)")
        if len(event.stages) > 1 and event.stages[-2].program != "openssl":
            steps.append(f"6 decompress ({event.stages[-2].program})")
        if event.kind == "extract":
            steps.append("7 untar into a private staging folder (moved into place once complete)")
        elif event.kind == "list":
            steps.append("7 list the inner archive with tar -t (verify writes nothing)")
        else:
            steps.append("7 take qubes.xml out of the inner archive")
        self.say(
            f"Steps 5-7 - {event.stored}",
            "All its chunks, in numeric order (.999 then .1000), go through one pipeline, "
            "each chunk only once its HMAC matched: " + "; ".join(steps) + ".",
            f"cat {shell.q(event.stored + '.000')} {shell.q(event.stored + '.001')} ... | "
            + render_pipeline(event.stages),
        )

    def _finished(self, event: FileFinished) -> None:
        if event.error is not None:
            print(f"  -> FAILED: {event.error}", file=self.out, flush=True)
            return
        if event.places:
            for place in event.places:
                print(f"  -> restored {place}", file=self.out, flush=True)
                if place.name == "private.img":
                    self.images.append(place)
        elif event.stored != QUBES_XML:
            print(
                f"  -> {event.stored}: decrypted, decompressed and listed: intact",
                file=self.out,
                flush=True,
            )

    def close(self) -> None:
        if self.mode != "restore" or not self.images:
            return
        image = self.images[0]
        self.say(
            f"Step {9 if self.version == 4 else 8} - mount an image to read its files",
            "A VM's private.img is an ext4 file system; its home folder is home/user "
            "inside it. Mount it read-only:",
            shell.render_argv(("sudo", "mount", "-o", "loop,ro", str(image), "/mnt")),
        )


def plan_text(
    header: BackupHeader,
    selected: Sequence[Entity],
    backup: str,
    output: Path,
) -> str:
    """What ``restore`` would do, and with which commands; nothing is written."""
    root = Path(os.path.abspath(output))
    lines = [
        f"Dry run: the header and qubes.xml of {backup} are authentic "
        f"(HMAC-{header.hmac_algorithm}); nothing was written.",
        *_targets(selected, root),
    ]
    lines += [
        "",
        "Commands (steps of " + PAGE + "):",
        f"  1    {untar_command(backup)}   (qrecover streams instead, one chunk at a time)",
        f"  2    {dgst_command(header.digest, HEADER)}   (compared with {HEADER_HMAC}; "
        "computed in-process)",
        f"  3    cat {HEADER}   ({header_meaning(header)})",
    ]
    front = [s for s in (decrypt_stage(header), decompress_stage(header)) if s is not None]
    for entity in selected:
        files, folder, pipeline = _entity_plan(entity, front)
        lines += [
            f"  {entity.name}: for each stored file {files} (F: private.img, icon.png, ...):"
            if entity.name != DOM0
            else f"  {entity.name}: the stored file {files}:",
            f"  4    {dgst_command(header.digest, files + '.NNN')}   (every chunk, "
            "compared with its .hmac, before it is used)",
            f"  5-7  cat {files}.000 {files}.001 ... | {pipeline}",
            f"       then what $staging holds is moved into {root / folder}/",
        ]
    lines.append(
        "($staging is a private folder inside the output folder; $backup_pass is the "
        "passphrase, given to openssl enc through its environment only.)"
    )
    return "\n".join(lines)


def plan_text_v4(
    fmt: Format4,
    selected: Sequence[Entity],
    backup: str,
    output: Path,
) -> str:
    """The same plan for a format-4 backup, with the v4 page's steps."""
    root = Path(os.path.abspath(output))
    header = fmt.header
    header_cmd = (
        render_dec(fmt.tool, HEADER_HMAC, f"{HEADER}.verified", HEADER_PREFIX)
        + f" && cmp {HEADER} {HEADER}.verified"
    )
    lines = [
        f"Dry run: the header and qubes.xml of {backup} are authentic (scrypt; "
        "format 4, Qubes R4); nothing was written.",
        *_targets(selected, root),
        "",
        "Commands (steps of " + PAGE_V4 + "):",
        f"  1    {untar_command(backup)}   (qrecover streams instead, one chunk at a time)",
        "  2    read -r backup_pass",
        f"  3    {header_cmd}   (compared in-process)",
        f"  4    cat {HEADER}   ({header_meaning_v4(header)})",
        f"  5    backup_id={shell.q(header.backup_id)}",
        "  6    qubes.xml, as in step 8 (already done: it lists the qubes above)",
    ]
    front = fmt.stream_stages()
    for entity in selected:
        files, folder, pipeline = _entity_plan(entity, front)
        chunk = f"{files}.NNN"
        scrypt = render_dec(fmt.tool, f"{chunk}.enc", chunk, chunk_prefix(header.backup_id, chunk))
        lines += [
            f"  {entity.name}: for each stored file {files} (F: private.img, root.img, ...):"
            if entity.name != DOM0
            else f"  {entity.name}: the stored file {files}:",
            f"  7    {untar_command(backup, _folder_of(entity))}   (its chunks, {chunk}.enc)",
            f"  8    {scrypt}   (each chunk, in numeric order, into a scratch file)",
            f"       cat {files}.000 {files}.001 ... | {pipeline}   (each chunk only once "
            "scrypt exited 0)",
            f"       then what $staging holds is moved into {root / folder}/",
        ]
    lines.append(
        "($staging is a private folder inside the output folder; $backup_pass is the "
        "passphrase, given to scrypt " + _passing(fmt) + " only, after the prefix shown.)"
    )
    return "\n".join(lines)


def _folder_of(entity: Entity) -> str:
    """The backup folder holding an entity's chunks (dom0's home is a file in one)."""
    if entity.name == DOM0:
        return entity.backup_path.rsplit("/", 1)[0] + "/"
    return entity.backup_path + "/"


def _targets(selected: Sequence[Entity], root: Path) -> list[str]:
    """Where restore would write, and what would stop it."""
    lines = [
        f"restore would write into {root}"
        + ("" if root.exists() else " (it does not exist yet; it would be created)")
        + ":",
    ]
    conflicts = []
    rows = [(str(root / QUBES_XML), "the backup's qubes.xml", "")]
    for entity in selected:
        kind = entity.type + (f", template {entity.template}" if entity.template else "")
        rows.append(
            (str(root / entity.dest) + "/", f"{entity.name} ({kind})", human_bytes(entity.size))
        )
    for path in [root / QUBES_XML, *(root / e.dest for e in selected)]:
        if os.path.lexists(path):
            conflicts.append(path)
    width = max(len(r[0]) for r in rows)
    for target, what, size in rows:
        lines.append(f"  {target.ljust(width)}  {what}" + (f", about {size}" if size else ""))
    if conflicts:
        lines.append(
            "It would stop: these already exist (use --force to replace them once their "
            "replacement is complete and verified): " + ", ".join(map(str, conflicts))
        )
    return lines


def _entity_plan(entity: Entity, front: Sequence[Stage]) -> tuple[str, str, str]:
    """(stored files, output folder, rendered pipeline) of one entity's plan."""
    placeholder = "/STAGING"
    if entity.name == DOM0:
        files, sample = entity.backup_path, entity.backup_path
    else:
        files, sample = f"{entity.backup_path}/F", f"{entity.backup_path}/F"
    strip, folder = placement(entity.backup_path, entity.dest, sample)
    stages = [*front, extract_stage(Path(placeholder), strip)]
    pipeline = " | ".join(shell.render_argv(s.argv, {placeholder: '"$staging"'}) for s in stages)
    return files, folder, pipeline
