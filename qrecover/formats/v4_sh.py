"""Format 4's sh fragments and its standalone script: scrypt as the scripts run it.

Shared by transcripts and standalone scripts of a format-4 backup: the
prelude without HMAC functions, ``scrypt_init``/``scrypt_dec`` (rendered
from the stages qrecover runs, qrecover.formats.v4.scrypt_tool.dec_stage), and the
functions that find and feed ``.enc`` chunks.
"""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path

from qrecover import __version__
from qrecover.container import HEADER, HEADER_HMAC, QUBES_XML
from qrecover.formats.base import PlanView
from qrecover.formats.v4 import PAGE, BackupHeaderV4, Format4
from qrecover.formats.v4.scrypt_tool import HEADER_PREFIX, ScryptTool, dec_stage
from qrecover.inventory import DOM0
from qrecover.render import scriptparts, shell
from qrecover.render.scriptparts import SCRIPT_FUNCTIONS
from qrecover.render.shell import PRELUDE, render_argv
from qrecover.runner import PASS_ENV
from qrecover.stages.decompress import decompress_stage
from qrecover.stages.extract import qubes_xml_stage
from qrecover.units import human_bytes

VERIFIED_HEADER = f"{HEADER}.verified"


def prelude() -> str:
    """:data:`PRELUDE` for format 4: no .hmac files, so no HMAC functions."""
    start = PRELUDE.index("# Steps 2 and 4 compare HMACs.")
    end = PRELUDE.index("list_members() {")
    text = PRELUDE[:start] + PRELUDE[end:]
    for old, new in (
        (
            "# The HMAC key only ever goes through the shell's own printf (see hmac_init).",
            "# The passphrase only ever goes through the shell's own printf (see scrypt_dec).",
        ),
        (
            "# Not exported: it goes into the environment of the one command that\n"
            "    # reads it (openssl enc -pass env:backup_pass), never into an argv.",
            "# Not exported: scrypt gets it in its environment or on its stdin\n"
            "    # (see scrypt_dec), never argv.",
        ),
    ):
        assert old in text
        text = text.replace(old, new)
    return text


# Placeholders for scrypt's file arguments in the rendered stages.
_SCRYPT_IN = "/QRECOVER-SCRYPT-IN"
_SCRYPT_OUT = "/QRECOVER-SCRYPT-OUT"


def scrypt_functions() -> str:
    """The sh functions of format 4: how this scrypt takes a passphrase, and
    ``scrypt_dec``, whose two ways of running scrypt are rendered from the
    stages qrecover runs (qrecover.scrypt.dec_stage)."""
    subst = {_SCRYPT_IN: '"$work/$1"', _SCRYPT_OUT: '"$work/$2"'}
    env = render_argv(dec_stage(ScryptTool("env"), _SCRYPT_IN, _SCRYPT_OUT).argv, subst)
    stdin = render_argv(dec_stage(ScryptTool("stdin"), _SCRYPT_IN, _SCRYPT_OUT).argv, subst)
    return (
        SCRYPT_FUNCTIONS.replace("@ENV_RUN@", f'{PASS_ENV}="$3${PASS_ENV}" {env}')
        .replace("@STDIN_RUN@", f"printf '%s\\n' \"$3${PASS_ENV}\" | {stdin}")
    )


# Format 4 (Qubes R4).  The v4 recovery page pipes `echo "$backup_id!$f!$backup_pass"`
# into `scrypt dec -P`; these functions do the same without echo (printf is a
# builtin: no command line holds the passphrase) and, unlike the page's step 8,
# never let a chunk's plaintext go on before scrypt has exited 0.
SCRYPT_FUNCTIONS = r"""
scrypt_init() {  # how this scrypt takes a passphrase without a terminal
    # --passphrase env:VAR since scrypt 1.3.0, -P (a line on stdin) since 1.2.1;
    # 1.2.0 and older read it only from a terminal, once per file.
    _usage=$(scrypt --help 2>&1)
    case $_usage in
        *--passphrase*) scrypt_style=env ;;
        *)
            printf '%s\n' "$_usage" | grep -q -E -e '(^|[[:space:][])-P([][:space:]]|$)' ||
                die "this scrypt is too old: scrypt 1.2.1 or newer is needed" \
                    "(older ones read the passphrase only from a terminal)"
            scrypt_style=stdin
            ;;
    esac
}

scrypt_dec() {  # scrypt_dec IN OUT PREFIX [WHY]: scrypt authenticates IN, decrypts it into OUT
    # Its passphrase is PREFIX followed by yours ('backup-header!', or
    # 'BACKUPID!NAME.NNN!'). scrypt checks IN's HMAC only at its end and may
    # already have written plaintext: OUT is used only if scrypt exited 0.
    rm -f -- "$work/$2"
    if [ "$scrypt_style" = env ]; then
        @ENV_RUN@ </dev/null 2>"$work/stderr.scrypt"
    else
        @STDIN_RUN@ 2>"$work/stderr.scrypt"
    fi
    _status=$?
    rm -f -- "$work/$1"
    if [ "$_status" != 0 ]; then
        rm -f -- "$work/$2"
        _said=$(tail -n 1 "$work/stderr.scrypt")
        die "$1: scrypt could not authenticate it (exit status $_status${_said:+: $_said}):" \
            "${4:-damaged or tampered with; nothing of it was used}"
    fi
    say "  $1: authenticated by scrypt"
}

same_file() {  # same_file FILE COPY: FILE is identical to what scrypt authenticated
    cmp -s -- "$work/$1" "$work/$2" ||
        die "$1: differs from the authenticated copy in $1.hmac:" \
            "altered or damaged; nothing was restored"
    rm -f -- "$work/$2"
    say "  $1: identical to its copy authenticated by scrypt"
}
""".strip()


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

placeholder() {  # placeholder STAGE FOLDER: R4.3's vmN/empty, restored as the qube's empty folder
    [ -f "$1/empty" ] && [ ! -h "$1/empty" ] && [ ! -s "$1/empty" ] &&
        [ "$(ls -A -- "$1" | wc -l)" -eq 1 ] ||
        die "$1: R4.3's placeholder for a qube without files should be one empty file"
    rm -f -- "$1/empty"
    [ ! -h "$2" ] || die "$2: is a symbolic link; refusing to write through it"
    mkdir -p -- "$2" || die "cannot create $2"
    say "  $2: a qube without files (R4.3's empty placeholder), its folder left empty"
}
""".strip().replace(
    "@CHECK_STORED_NAME@\n",
    SCRIPT_FUNCTIONS[
        SCRIPT_FUNCTIONS.index("check_stored_name() {") : SCRIPT_FUNCTIONS.index("feed_chunks() {")
    ],
)


def header_checks(header: BackupHeaderV4) -> list[tuple[str, str]]:
    """The format-4 header lines a script checks in step 4."""
    checks = [
        ("version", str(header.version)),
        ("hmac-algorithm", header.hmac_algorithm),
        ("encrypted", str(header.encrypted)),
        ("compressed", str(header.compressed)),
    ]
    if header.compressed and header.compression_filter is not None:
        checks.append(("compression-filter", header.compression_filter))
    checks.append(("backup-id", header.backup_id))
    return checks


def script(
    fmt: Format4,
    plan: PlanView,
    backup: str | None,
    output: Path,
    argv: tuple[str, ...],
) -> str:
    """The whole standalone script for a format-4 (Qubes R4) backup, as text."""
    header = fmt.header
    selected = plan.selected
    when = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    total = sum(e.size for e in selected)
    programs = ["tar", "scrypt", *(s.program for s in plan.front())]
    programs += ["cmp", "sed", "wc", "grep", "sort", "awk", "tail", "find"]
    decompressor = decompress_stage(header)
    shown = shell.call("qrecover", *argv) if argv else "qrecover script"
    xml_stages = [*plan.front(), qubes_xml_stage()]
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
        *scriptparts.contents(selected),
        "#",
        f"# Scratch space: one chunk at a time, encrypted then decrypted (at most 2 x "
        f"{shell.MAX_CHUNK_MIB} MiB),",
        "# in a private folder inside the output folder, deleted as soon as used and",
        f"# removed on exit; plus room for the restored data: about {human_bytes(total)}",
        "# (sizes from the backup's qubes.xml; VM images are restored sparse).",
        "#",
        "# It follows the emergency recovery page for format 4, step by step (the",
        f"# comments name the steps): {PAGE}",
        "# with its fixes: scrypt gets the passphrase with -P on its stdin (scrypt 1.2.1)",
        "# or from its environment (scrypt >= 1.3), never on a command line; every '!'",
        "# is single-quoted (no history expansion, the page's set +H); chunks go in",
        "# numeric order (.999 then .1000); and, unlike the page's step 8, a chunk goes",
        "# to the decompressor only once scrypt has authenticated all of it. At the",
        "# first failing check or program it stops with a message and a non-zero status.",
        "",
        "set -u",
        "",
        prelude(),
        "",
        scrypt_functions(),
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
        *scriptparts.STEP1,
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
        *(shell.call("header_is", k, v) for k, v in header_checks(header)),
        "# ---- step 5: the backup id, from the header's last line",
        f"backup_id={shell.q(header.backup_id)}",
        "",
        "# ---- step 6: qubes.xml, authenticated, decrypted, decompressed and extracted",
        "# (it lists the qubes; kept in the output folder)",
        'enc_chunk_list qubes.xml >"$work/chunks" || exit 1',
        "fresh_stage",
        *shell.pipeline_block(
            ['feed_enc_chunks "$work/chunks"'], xml_stages, stdout=shell.XML_OUT
        ),
        shell.pipeline_check(QUBES_XML, xml_stages),
        f'place_file "$work/qubes.xml" {shell.out_path(QUBES_XML)}',
    ]
    for target in plan.entities():
        entity = target.entity
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
        lines += scriptparts.vm_block(target, plan.front(), intro, enc=True)
    lines += [
        "",
        f'say "done: {len(selected)} VM(s) restored into $out, every chunk authenticated by '
        'scrypt"',
        "# ---- step 9: to read a VM's files, mount its private.img (ext4) read-only:",
        *scriptparts.mount_hint(selected, 9),
    ]
    return "\n".join(lines) + "\n"
