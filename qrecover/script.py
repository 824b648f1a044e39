"""``qrecover script``: a standalone POSIX sh recovery script for one backup.

The script needs no Python and no qrecover: a POSIX shell (dash or bash),
GNU tar, OpenSSL (1.0, 1.1 or 3), the decompressor and POSIX utilities.  It
follows the recovery page step by step, verifies the HMAC of every chunk
before any byte of it is decrypted, and restores into exactly the layout
``qrecover restore`` produces (``DIR/<vm>/...``, ``DIR/dom0-home/<user>/``,
``DIR/qubes.xml``).

qrecover writes it after authenticating the header and qubes.xml, so the
script knows the header's values (all allow-listed) and which VMs to
restore; the stored files of each VM and their chunks are found at run time
in the backup's listing (``tar -i -t``), so chunk 1000 and up are never
missed.  Every pipeline is built from the same stage builders that
``qrecover restore`` runs.

For a format-4 (Qubes R4) backup, :func:`render_script_v4` writes the same
kind of script following the v4 recovery page: scrypt instead of OpenSSL,
each chunk decrypted into a scratch file and used only once scrypt exited 0.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path

from qrecover import __version__, shell
from qrecover.container import HEADER, HEADER_HMAC, QUBES_XML
from qrecover.decompress import decompress_stage
from qrecover.decrypt import decrypt_stage
from qrecover.extract import extract_stage, placement, qubes_xml_stage
from qrecover.formats import Format4
from qrecover.header import BackupHeader
from qrecover.inventory import DOM0, Entity
from qrecover.progress import human_bytes
from qrecover.runner import Stage
from qrecover.scrypt import HEADER_PREFIX
from qrecover.transcript import PAGE_V4, VERIFIED_HEADER, header_checks, header_checks_v4

# Arguments written as shell expressions instead of quoted literals.
_STAGING = "/QRECOVER-STAGING-PLACEHOLDER"

# Functions only the standalone script needs (the rest is shell.PRELUDE).
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


def _front_stages(header: BackupHeader) -> list[Stage]:
    return [s for s in (decrypt_stage(header), decompress_stage(header)) if s is not None]


def _entity_title(entity: Entity) -> str:
    """How a VM is named in the script's comments (never able to end a comment)."""
    if entity.name == DOM0:
        return shell.comment(f"dom0's home folder ({entity.backup_path})")
    template = f", template {entity.template}" if entity.template else ""
    return shell.comment(f"{entity.name} ({entity.type}{template})")


def _vm_block(entity: Entity, front: list[Stage], intro: list[str], enc: bool) -> list[str]:
    """One VM's part of a script: its stored files, each through ``front`` and
    tar; format 4's shell functions take ``.enc`` chunks (``enc_`` names)."""
    p = "enc_" if enc else ""
    if entity.name == DOM0:
        pattern = _bre(entity.backup_path)
        sample = entity.backup_path
        where = f"stored as {entity.backup_path}"
    else:
        pattern = _bre(entity.backup_path) + "/.*"
        sample = entity.backup_path + "/F"
        where = f"stored under {entity.backup_path}/"
    strip, folder = placement(entity.backup_path, entity.dest, sample)
    stages = [*front, extract_stage(Path(_STAGING), strip)]
    shown = shell.out_path(folder)
    lines = [
        "",
        f"# ==== {_entity_title(entity)}, {where} -> {shown}/",
        *intro,
        f'{shell.call(p + "stored_files", pattern)} >"$work/stored"',
        '[ -s "$work/stored" ] || '
        + shell.call("die", f"{entity.name}: none of its files are in the backup"),
        "while IFS= read -r stored <&4; do",
        '    check_stored_name "$stored"',
        f'    {p}chunk_list "$stored" >"$work/chunks" || exit 1',
        f'    say "$stored: $(wc -l <"$work/chunks") chunk(s), into {folder or "."}/"',
        "    fresh_stage",
    ]
    lines += shell.pipeline_block(
        [f'feed_{p}chunks "$work/chunks"'],
        stages,
        {_STAGING: shell.STAGE_DIR},
        indent="    ",
    )
    lines += [
        '    pipeline_ok "$stored" ' + " ".join(shell.q(n) for n in shell.stage_names(stages)),
        f'    place "$work/stage" {shown}',
        'done 4<"$work/stored"',
    ]
    return lines


def _vm_block_v3(header: BackupHeader, entity: Entity) -> list[str]:
    intro = [
        "# Steps 4-7 for each of its stored files, found in the listing of step 1:",
        "# the chunks of each, in numeric order, each one verified (step 4) before it",
        "# goes into the pipeline; what the stored file held is moved into place",
        "# only once every stage succeeded.",
    ]
    return _vm_block(entity, _front_stages(header), intro, enc=False)


def render_script(
    header: BackupHeader,
    selected: Sequence[Entity],
    backup: str | None,
    output: Path,
    argv: Sequence[str] = (),
) -> str:
    """The whole script, as text."""
    when = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    total = sum(e.size for e in selected)
    programs = ["tar", "openssl"] if header.encrypted else ["tar"]
    decompressor = decompress_stage(header)
    if decompressor is not None:
        programs.append(decompressor.program)
    programs += ["od", "sed", "tr", "wc", "grep", "sort", "awk", "tail", "find"]
    shown = shell.call("qrecover", *argv) if argv else "qrecover script"
    width = max((len(e.dest) for e in selected), default=0) + 1
    contents = [
        f"#   {(e.dest + '/').ljust(width)}  {_entity_title(e)}, about {human_bytes(e.size)}"
        for e in selected
    ]
    xml_stages = [*_front_stages(header), qubes_xml_stage()]
    need = shell.call("need", *dict.fromkeys(programs))
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
        *contents,
        "#",
        f"# Scratch space: one chunk and its .hmac at a time (at most {shell.MAX_CHUNK_MIB} MiB),",
        "# in a private folder inside the output folder, deleted as soon as used and",
        f"# removed on exit; plus room for the restored data: about {human_bytes(total)}",
        "# (sizes from the backup's qubes.xml; VM images are restored sparse).",
        "#",
        "# It follows the emergency recovery page, step by step (the comments name",
        "# the steps): https://www.qubes-os.org/doc/backup-emergency-restore-v3/",
        "# Nothing is decrypted before its HMAC matched; at the first HMAC mismatch or",
        "# failing program it stops with a message and a non-zero exit status.",
        "",
        "set -u",
        "",
        shell.PRELUDE,
        "",
        SCRIPT_FUNCTIONS,
        "",
        "# ---- settings: change them here if the backup or the output folder moved",
        *shell.backup_assignment(backup, "qrecover"),
        f"out={shell.q(str(output))}",
        "",
        need,
        *shell.passphrase_lines(),
        'make_work "$out"',
        "",
        "# ---- step 1: untar the backup. It is many small tar archives in a row, hence",
        "# tar -i (--ignore-zeros). Its members are listed once here; each is then taken",
        "# out on its own when it is needed, and deleted once used.",
        "list_members",
        "",
        "# ---- step 1 (header members), step 2: verify the header's HMAC before reading it",
        shell.call("take", HEADER, HEADER_HMAC),
        shell.hmac_init_line(header.digest),
        shell.call("check_hmac", HEADER, shell.HEADER_MISMATCH),
        "# ---- step 3: read the header; this script was written for these values",
        'cat -- "$work/backup-header" >&2',
        *(shell.call("header_is", k, v) for k, v in header_checks(header)),
        "",
        "# ---- qubes.xml: steps 4-7 (it lists the VMs; kept in the output folder)",
        *shell.decrypt_note(xml_stages),
        'chunk_list qubes.xml >"$work/chunks" || exit 1',
        "fresh_stage",
        *shell.pipeline_block(['feed_chunks "$work/chunks"'], xml_stages, stdout=shell.XML_OUT),
        shell.pipeline_check(QUBES_XML, xml_stages),
        f'place_file "$work/qubes.xml" {shell.out_path(QUBES_XML)}',
    ]
    for entity in selected:
        lines += _vm_block_v3(header, entity)
    mount = next((e for e in selected if e.name != DOM0), None)
    lines += [
        "",
        f'say "done: {len(selected)} VM(s) restored into $out, every HMAC matched"',
        "# ---- step 8: to read a VM's files, mount its private.img (ext4) read-only:",
    ]
    if mount is not None:
        lines.append(
            f'say "step 8, to read its files: sudo mount -o loop,ro \\"$out/{mount.dest}'
            f'/private.img\\" /mnt"'
        )
    return "\n".join(lines) + "\n"


# ---- format 4 (Qubes R4) ---------------------------------------------------

# Functions only the format-4 script needs (besides shell.prelude_v4 and
# shell.scrypt_functions): its chunks are NAME.NNN.enc, and there are no .hmac.
SCRIPT_FUNCTIONS_V4 = r"""
enc_stored_files() {  # enc_stored_files PATTERN: the stored files whose chunks are PATTERN.NNN.enc
    sed -n "s|^[^ ]* \($1\)\.[0-9][0-9][0-9][0-9]*\.enc\$|\1|p" "$work/blocks" | sort -u
}

@CHECK_STORED_NAME@
enc_chunk_list() {  # enc_chunk_list STORED: chunk_list of format 4's NAME.NNN.enc members
    chunk_list "$1" .enc
}

feed_enc_chunks() {  # feed_enc_chunks LIST: each chunk of LIST in turn, decrypted, then its bytes
    while read -r _block _chunk <&5; do
        take_from "$_block" "$_chunk.enc"
        # The page's step 8 pipes `scrypt dec` straight into the decompressor;
        # scrypt_dec instead stops here, before any byte of a bad chunk goes on.
        # Its passphrase: BACKUPID!NAME.NNN! then yours ('!' single-quoted).
        scrypt_dec "$_chunk.enc" "$_chunk" "$backup_id"'!'"$_chunk"'!'
        feed "$_chunk"
    done 5<"$1"
}
""".strip().replace(
    "@CHECK_STORED_NAME@\n",
    SCRIPT_FUNCTIONS[
        SCRIPT_FUNCTIONS.index("check_stored_name() {") : SCRIPT_FUNCTIONS.index("feed_chunks() {")
    ],
)


def _vm_block_v4(fmt: Format4, entity: Entity) -> list[str]:
    found = (
        f"its backup-path in qubes.xml is {entity.backup_path}/"
        if entity.name != DOM0
        else f"dom0's home is stored as {entity.backup_path}"
    )
    intro = [
        f"# Step 7: {found}; its stored files",
        "# are found in the listing of step 1. Step 8 for each: the chunks, in numeric",
        "# order, each taken out, authenticated and decrypted by scrypt into a scratch",
        "# file, and fed on only once scrypt exited 0; what the stored file held is",
        "# moved into place only once every stage succeeded.",
    ]
    return _vm_block(entity, fmt.stream_stages(), intro, enc=True)


def render_script_v4(
    fmt: Format4,
    selected: Sequence[Entity],
    backup: str | None,
    output: Path,
    argv: Sequence[str] = (),
) -> str:
    """The whole script for a format-4 (Qubes R4) backup, as text."""
    header = fmt.header
    when = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    total = sum(e.size for e in selected)
    programs = ["tar", "scrypt", *(s.program for s in fmt.stream_stages())]
    programs += ["cmp", "sed", "wc", "grep", "sort", "awk", "tail", "find"]
    decompressor = decompress_stage(header)
    shown = shell.call("qrecover", *argv) if argv else "qrecover script"
    width = max((len(e.dest) for e in selected), default=0) + 1
    contents = [
        f"#   {(e.dest + '/').ljust(width)}  {_entity_title(e)}, about {human_bytes(e.size)}"
        for e in selected
    ]
    xml_stages = [*fmt.stream_stages(), qubes_xml_stage()]
    lines = [
        "#!/bin/sh",
        "# Recovery script for the Qubes R4 (format 4) backup "
        + shell.comment(backup or "(read from standard input)"),
        f"# written by qrecover {__version__} on {when}:",
        f"# {shell.comment(shown)}",
        "#",
        "# It needs no Python and no qrecover: a POSIX shell (dash or bash), GNU tar,",
        "# scrypt (1.2.1 or newer), "
        + (decompressor.program if decompressor else "no decompressor")
        + " and POSIX utilities (sed, awk, cmp, ...).",
        "# Run it with:  sh THIS-FILE   (it asks for the passphrase, or takes it from",
        "# the environment variable backup_pass; it never writes it anywhere).",
        "#",
        "# It restores, into the folder out= below:",
        "#   qubes.xml",
        *contents,
        "#",
        f"# Scratch space: one chunk at a time, encrypted then decrypted (at most 2 x "
        f"{shell.MAX_CHUNK_MIB} MiB),",
        "# in a private folder inside the output folder, deleted as soon as used and",
        f"# removed on exit; plus room for the restored data: about {human_bytes(total)}",
        "# (sizes from the backup's qubes.xml; VM images are restored sparse).",
        "#",
        "# It follows the emergency recovery page for format 4, step by step (the",
        f"# comments name the steps): {PAGE_V4}",
        "# with its fixes: scrypt gets the passphrase with -P on its stdin (scrypt 1.2.1)",
        "# or from its environment (scrypt >= 1.3), never on a command line; every '!'",
        "# is single-quoted (no history expansion, the page's set +H); chunks go in",
        "# numeric order (.999 then .1000); and, unlike the page's step 8, a chunk goes",
        "# to the decompressor only once scrypt has authenticated all of it. At the",
        "# first failing check or program it stops with a message and a non-zero status.",
        "",
        "set -u",
        "",
        shell.prelude_v4(),
        "",
        shell.scrypt_functions(),
        "",
        SCRIPT_FUNCTIONS_V4,
        "",
        "# ---- settings: change them here if the backup or the output folder moved",
        *shell.backup_assignment(backup, "qrecover"),
        f"out={shell.q(str(output))}",
        "",
        shell.call("need", *dict.fromkeys(programs)),
        "# ---- step 2: the passphrase (the page's read -r backup_pass)",
        *shell.passphrase_lines(),
        "scrypt_init",
        'make_work "$out"',
        "",
        "# ---- step 1: untar the backup. It is many small tar archives in a row, hence",
        "# tar -i (--ignore-zeros). Its members are listed once here; each is then taken",
        "# out on its own when it is needed, and deleted once used.",
        "list_members",
        "",
        "# ---- step 1 (header members), step 3: verify backup-header with scrypt before",
        f"# reading it: {HEADER_HMAC} is {HEADER} encrypted and authenticated under the",
        f"# passphrase '{HEADER_PREFIX}' followed by yours (the page compares with diff -qs)",
        shell.call("take", HEADER, HEADER_HMAC),
        shell.call(
            "scrypt_dec", HEADER_HMAC, VERIFIED_HEADER, HEADER_PREFIX, shell.HEADER_MISMATCH
        ),
        shell.call("same_file", HEADER, VERIFIED_HEADER),
        "# ---- step 4: read the header; this script was written for these values",
        'cat -- "$work/backup-header" >&2',
        *(shell.call("header_is", k, v) for k, v in header_checks_v4(header)),
        "# ---- step 5: the backup id, from the header's last line",
        f"backup_id={shell.q(header.backup_id)}",
        "",
        "# ---- step 6: qubes.xml, authenticated, decrypted, decompressed and extracted",
        "# (it lists the qubes; kept in the output folder)",
        'enc_chunk_list qubes.xml >"$work/chunks" || exit 1',
        "fresh_stage",
        *shell.pipeline_block(['feed_enc_chunks "$work/chunks"'], xml_stages, stdout=shell.XML_OUT),
        shell.pipeline_check(QUBES_XML, xml_stages),
        f'place_file "$work/qubes.xml" {shell.out_path(QUBES_XML)}',
    ]
    for entity in selected:
        lines += _vm_block_v4(fmt, entity)
    mount = next((e for e in selected if e.name != DOM0), None)
    lines += [
        "",
        f'say "done: {len(selected)} VM(s) restored into $out, every chunk authenticated by '
        'scrypt"',
        "# ---- step 9: to read a VM's files, mount its private.img (ext4) read-only:",
    ]
    if mount is not None:
        lines.append(
            f'say "step 9, to read its files: sudo mount -o loop,ro \\"$out/{mount.dest}'
            f'/private.img\\" /mnt"'
        )
    return "\n".join(lines) + "\n"
