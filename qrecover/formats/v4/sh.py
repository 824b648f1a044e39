"""Format 4's sh fragments and its standalone script: scrypt as the scripts run it.

Shared by transcripts and standalone scripts of a format-4 backup: the
prelude without HMAC functions, ``scrypt_init``/``scrypt_dec`` (rendered
from the stages qrecover runs, qrecover.formats.v4.scrypt_tool.dec_stage), and the
functions that find and feed ``.enc`` chunks.
"""

from __future__ import annotations

from qrecover.archive.members import HEADER
from qrecover.formats.v4 import BackupHeaderV4
from qrecover.formats.v4.scrypt_tool import ScryptTool, dec_stage
from qrecover.render.scriptparts import CHUNK_FUNCTIONS
from qrecover.render.shell import render_argv
from qrecover.runner import PASS_ENV

VERIFIED_HEADER = f"{HEADER}.verified"


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


# Functions only the format-4 script needs (besides shell.prelude(hmac=False) and
# shell.scrypt_functions): its chunks are NAME.NNN.enc, and there are no .hmac.
_ENC_STORED_FILES = r"""
enc_stored_files() {  # enc_stored_files PATTERN: the stored files whose chunks are PATTERN.NNN.enc
    sed -n "s|^[^ ]* \($1\)\.[0-9][0-9][0-9][0-9]*\.enc\$|\1|p" "$work/blocks" | sort -u
}

""".strip()

_ENC_FUNCTIONS = r"""
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
""".strip()

SCRIPT_FUNCTIONS_V4 = "\n\n".join([_ENC_STORED_FILES, CHUNK_FUNCTIONS, _ENC_FUNCTIONS])


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

