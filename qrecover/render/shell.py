"""POSIX sh building blocks shared by transcripts and recovery scripts.

Transcripts (``--transcript``) and standalone scripts (``qrecover script``)
are both plain ``sh`` files that run under dash and bash with GNU tar,
OpenSSL 1.0/1.1/3 and the decompressor.  They share one prelude of small
functions (take a member out of the backup, check an HMAC, check every stage
of a pipeline, place what a stored file held) so that both read the same way.

Commands are rendered from the same :class:`~qrecover.runner.Stage` objects
that qrecover runs, argument by argument with ``shlex.quote``; the only
arguments written differently are paths that live in qrecover's private
scratch (they become ``"$work/..."`` in the scripts, which make their own).

The passphrase is never written into a script: it comes from the variable
``backup_pass`` (the environment) or is read from the terminal with echo off.
"""

from __future__ import annotations

import os
import shlex
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path

from qrecover import __version__
from qrecover.magic import SNIFF, compression_of
from qrecover.runner import PASS_ENV, Stage
from qrecover.stages.decompress import GUNZIPS
from qrecover.stages.extract import gnu_fallback

# Scratch names inside "$work" used by the pipelines.
STAGE_DIR = '"$work/stage"'
XML_OUT = '"$work/qubes.xml"'
MAX_CHUNK_MIB = 100  # Qubes' writer cut stored files into chunks of 100 MiB


def q(text: str) -> str:
    return shlex.quote(text)


def comment(text: str) -> str:
    """Text safe inside a ``#`` comment line: no newline can end the comment early."""
    return "".join(c if c.isprintable() else "?" for c in text)


def render_argv(argv: Sequence[str], subst: Mapping[str, str] | None = None) -> str:
    """``shlex.join(argv)``, except arguments found in ``subst`` (written as given)."""
    subst = subst or {}
    return " ".join(subst.get(arg, q(arg)) for arg in argv)


def call(*words: str) -> str:
    """A call of a prelude function, each argument quoted."""
    return shlex.join(words)


def out_path(rel: str) -> str:
    """``"$out"/rel``: a path inside the output folder, quoted."""
    return '"$out"' if not rel else f'"$out"/{q(rel)}'


HEADER_MISMATCH = "wrong passphrase (or a damaged header); nothing was restored"


def pipeline_block(
    producer: Sequence[str],
    stages: Sequence[Stage],
    subst: Mapping[str, str] | None = None,
    stdout: str | None = None,
    indent: str = "",
) -> list[str]:
    """A pipeline whose every stage records its exit status (dash has no pipefail).

    ``producer`` are the lines that write the verified chunks to stdout
    (stage 0); each program of ``stages`` keeps its stderr and exit status
    in ``$work`` so that ``pipeline_ok`` can name the stage that failed.
    """
    pad = indent + "    "
    lines = [indent + "{"]
    lines += [pad + line if line else "" for line in producer]
    lines.append(pad + 'echo 0 >"$work/status.0"')
    for i, stage in enumerate(stages, start=1):
        last = i == len(stages)
        redirect = f" >{stdout}" if last and stdout else ""
        lines.append(indent + "} | {")
        lines.append(
            f"{pad}{stage_command(stage, subst)}{redirect} "
            f'2>"$work/stderr.{i}"; echo $? >"$work/status.{i}"'
        )
    lines.append(indent + "}")
    return lines


def stage_command(stage: Stage, subst: Mapping[str, str] | None = None) -> str:
    """A stage as a script runs it.  The passphrase goes into the environment
    of a stage that reads it (openssl enc) and of no other.  A faster gzip
    decompressor that qrecover
    found installed (igzip, pigz) is used where the script runs only if it is
    installed there too; ``gzip -d`` writes the same bytes everywhere else.
    Likewise bsdtar, with GNU tar's same extraction where it is absent."""
    text = render_argv(stage.argv, subst)
    if stage.secret_env:  # in this command's environment only (get_passphrase)
        text = " ".join(f'{name}="${name}"' for name in stage.secret_env) + " " + text
    if stage.program in GUNZIPS and stage.program != "gzip":
        return (
            f"{{ if command -v {stage.program} >/dev/null 2>&1; "
            f"then {text}; else gzip -d; fi; }}"
        )
    fallback = gnu_fallback(stage)  # bsdtar ran: GNU tar where it is absent
    if fallback is not None:
        return (
            f"{{ if command -v bsdtar >/dev/null 2>&1; "
            f"then {text}; else {render_argv(fallback.argv, subst)}; fi; }}"
        )
    return text


def stage_names(stages: Sequence[Stage]) -> list[str]:
    """How ``pipeline_ok`` names each stage (stage 0 feeds the chunks)."""
    return ["taking and verifying the chunks"] + [
        " ".join(stage.argv[:2]) if stage.program == "openssl" else stage.program
        for stage in stages
    ]


def pipeline_check(what: str, stages: Sequence[Stage], indent: str = "") -> str:
    return indent + call("pipeline_ok", what, *stage_names(stages))


# The functions every script starts with.  Kept readable: they are part of
# the procedure a person may follow by hand.
_TOP = r"""
say() { printf '%s\n' "$*" >&2; }
die() {
    printf 'STOPPED: %s\n' "$*" >&2
    exit 1
}

cleanup() {
    [ -n "${echo_off:-}" ] && stty echo </dev/tty 2>/dev/null
    [ -n "${work:-}" ] && rm -rf -- "$work"
    [ -n "${out_created:-}" ] && rmdir -- "$out" 2>/dev/null
    return 0
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

need() {  # need PROGRAM...: stop early, naming what to install
    for _program in "$@"; do
        command -v "$_program" >/dev/null 2>&1 ||
            die "$_program not found: install it (Debian: apt-get install $_program)"
    done
    case $(tar --version 2>/dev/null) in
        *"GNU tar"*) ;;
        *) die "tar is not GNU tar (needed for sparse VM images): install the package tar" ;;
    esac
    # @KEY@
    case $(command -V printf 2>/dev/null) in
        *builtin*) ;;
        *) die "this shell has no builtin printf: run this script with dash or bash" ;;
    esac
}

get_passphrase() {  # from $backup_pass, else asked on the terminal with echo off
    if [ -z "${backup_pass:-}" ]; then
        { : </dev/tty; } 2>/dev/null ||
            die "no passphrase: set backup_pass in the environment or run from a terminal"
        echo_off=1
        stty -echo </dev/tty 2>/dev/null  # before the prompt: nothing typed is echoed
        printf 'Backup passphrase: ' >/dev/tty
        IFS= read -r backup_pass </dev/tty || backup_pass=
        stty echo </dev/tty 2>/dev/null
        echo_off=
        printf '\n' >/dev/tty
        [ -n "$backup_pass" ] || die "no passphrase entered"
    fi
    # @PASS@
}

make_work() {  # make_work FOLDER: private scratch, removed on every exit
    if [ ! -d "$1" ]; then
        mkdir -p -- "$1" || die "cannot create $1"
        [ "$1" = "${out:-}" ] && out_created=1
    fi
    # set only once made: cleanup must never remove a folder it did not create
    (umask 077 && mkdir -- "$1/.qrecover-sh.$$") ||
        die "cannot create the scratch folder $1/.qrecover-sh.$$"
    work=$1/.qrecover-sh.$$
}

""".strip()

# Format 3's and 2's checks: HMACs (step 2 and 4 of the format-3 page).
HMAC_FUNCTIONS = r"""# Steps 2 and 4 compare HMACs.  The recovery page computes them with
#     openssl dgst -sha512 -hmac "your_passphrase" FILE
# which puts the passphrase on a command line, where any user of the machine
# can read it (ps).  The same HMAC (RFC 2104) is computed here from plain
# digests, HMAC = H((K xor opad) . H((K xor ipad) . FILE)), and the key's
# bytes only pass through the shell's builtin printf and through pipes.
hmac_init() {  # hmac_init DIGEST BLOCK-SIZE
    hmac_digest=$1
    _block=$2
    _key=$(printf '%s' "$backup_pass" | od -An -v -tu1) || die "od failed"
    set -- $_key
    if [ "$#" -gt "$_block" ]; then  # a key longer than a block is hashed first
        _key=$(printf '%s' "$backup_pass" | openssl dgst "-$hmac_digest" -binary |
            od -An -v -tu1) || die "openssl dgst failed"
        set -- $_key
    fi
    hmac_ipad=
    hmac_opad=
    _n=0
    for _byte in "$@"; do
        _x=$((_byte ^ 54))
        hmac_ipad="$hmac_ipad\\$((_x / 64))$((_x / 8 % 8))$((_x % 8))"
        _x=$((_byte ^ 92))
        hmac_opad="$hmac_opad\\$((_x / 64))$((_x / 8 % 8))$((_x % 8))"
        _n=$((_n + 1))
    done
    while [ "$_n" -lt "$_block" ]; do
        hmac_ipad="$hmac_ipad\\066"
        hmac_opad="$hmac_opad\\134"
        _n=$((_n + 1))
    done
    _key=
    set --
}

hmac_hex() {  # hmac_hex FILE: the hex digest `openssl dgst -DIGEST -hmac PASSPHRASE FILE` prints
    _line=$({
        printf "$hmac_opad"
        { printf "$hmac_ipad"; cat -- "$1"; } | openssl dgst "-$hmac_digest" -binary
    } | openssl dgst "-$hmac_digest")
    # "(stdin)= HEX" (OpenSSL 1.x) or "SHA2-512(stdin)= HEX" (OpenSSL 3)
    printf '%s' "${_line##*= }"
}

check_hmac() {  # check_hmac MEMBER [WHY]: its HMAC must be the one in MEMBER.hmac
    # An .hmac file is one line, "(stdin)= HEX"; more than 4 KiB of it is refused.
    _line=$(dd if="$work/$1.hmac" bs=4097 count=1 2>/dev/null) || die "$1.hmac: cannot read it"
    [ "${#_line}" -le 4096 ] || die "$1.hmac: larger than 4 KiB, not an HMAC file"
    _want=${_line##*=}
    _want=${_want#"${_want%%[!" "]*}"}  # spaces after "="
    _want=${_want%%[[:space:]]*}  # a trailing CR or blanks
    case $_want in
        "" | *[!0-9A-Fa-f]*) die "$1.hmac: not an HMAC line" ;;
        *[A-F]*) _want=$(printf '%s' "$_want" | tr ABCDEF abcdef) ;;
    esac
    _got=$(hmac_hex "$work/$1")
    [ -n "$_got" ] && [ "$_got" = "$_want" ] ||
        die "$1: HMAC mismatch: ${2:-damaged or tampered with; nothing of it was used}"
    say "  $1: HMAC matches $1.hmac"
}

""".strip()

_REST = r"""list_members() {  # step 1, listing only: "BLOCK NAME" for each member of the backup
    if [ -d "$backup" ]; then  # a backup already untarred by hand
        (cd -- "$backup" && find . -type f) | sed 's|^\./|- |' >"$work/blocks" ||
            die "$backup: cannot list it"
    else
        # -R: the block number of each member, so that `take` reads from there on
        # instead of reading the backup again from its start for every chunk.
        tar -i -t -R -f "$backup" >"$work/listing" 2>"$work/stderr.list" ||
            die "$backup: cannot list it: $(tail -n 1 "$work/stderr.list")"
        sed -n 's/^block \([0-9][0-9]*\): \([^*].*\)$/\1 \2/p' "$work/listing" >"$work/blocks"
        rm -f -- "$work/listing"
    fi
}

take() {  # take MEMBER...: step 1 for these members only, into the scratch folder
    _block=$(awk -v name="$1" '$2 == name { print $1; exit }' "$work/blocks")
    [ -n "$_block" ] || die "$1: not in the backup"
    take_from "$_block" "$@"
}

take_from() {  # take_from BLOCK MEMBER...: the same, knowing where the first one starts
    _block=$1
    shift
    if [ -d "$backup" ]; then
        for _member in "$@"; do
            case $_member in */*) mkdir -p -- "$work/${_member%/*}" ;; esac
            cp -- "$backup/$_member" "$work/$_member" || die "$_member: missing from $backup"
        done
    else
        # The same as `tar -i -x -f "$backup" MEMBER...`, reading from BLOCK on.
        tail -c +$((_block * 512 + 1)) -- "$backup" |
            tar -i -x -f - -C "$work" --occurrence=1 --no-same-owner -- "$@" \
                2>"$work/stderr.take" ||
            die "$*: not taken out of the backup: $(tail -n 1 "$work/stderr.take")"
    fi
    for _member in "$@"; do
        [ -f "$work/$_member" ] && [ ! -h "$work/$_member" ] ||
            die "$_member: not a regular file in the backup"
    done
}

feed() {  # feed MEMBER: a verified chunk into the pipeline, then delete it
    cat -- "$work/$1" || die "$1: could not feed it"
    rm -f -- "$work/$1" "$work/$1.hmac"
}

fresh_stage() {  # an empty folder for the next stored file's inner archive
    rm -rf -- "$work/stage" "$work"/status.* "$work"/stderr.*
    mkdir -- "$work/stage" || die "cannot create $work/stage"
}

pipeline_ok() {  # pipeline_ok WHAT STAGE-NAME...: every stage of the pipeline exited 0
    _what=$1
    shift
    _i=0
    _failed=
    for _name in "$@"; do
        _status=$(cat -- "$work/status.$_i" 2>/dev/null)
        if [ "$_status" != 0 ]; then
            _failed=1
            _said=
            [ -s "$work/stderr.$_i" ] && _said=$(grep -v -e 'deprecated key derivation' \
                -e 'Using -iter or -pbkdf2' -- "$work/stderr.$_i" | tail -n 1)
            say "$_what: $_name failed (exit status ${_status:-none})${_said:+: $_said}"
        fi
        _i=$((_i + 1))
    done
    [ -z "$_failed" ] || die "$_what: not restored (nothing of it was placed in the output)"
}

place() {  # place FROM FOLDER: move what a stored file held into FOLDER; never replace
    [ ! -h "$2" ] || die "$2: is a symbolic link; refusing to write through it"
    mkdir -p -- "$2" || die "cannot create $2"
    _placed=
    for _entry in "$1"/* "$1"/.[!.]* "$1"/..?*; do
        [ -e "$_entry" ] || [ -h "$_entry" ] || continue
        _target=$2/${_entry##*/}
        if [ -e "$_target" ] || [ -h "$_target" ]; then
            die "$_target already exists; not replaced (choose an empty output folder)"
        fi
        mv -- "$_entry" "$_target" || die "cannot move into $_target"
        say "  restored $_target"
        _placed=1
    done
    [ -n "$_placed" ] || die "$1: the stored file held nothing to restore"
}

place_file() {  # place_file FROM TARGET
    [ -e "$2" ] || [ -h "$2" ] && die "$2 already exists; not replaced"
    mv -- "$1" "$2" || die "cannot move into $2"
    say "  restored $2"
}

header_is() {  # header_is KEY VALUE: step 3, the header says what this script expects
    grep -q -i -x -- "$1=$2" "$work/backup-header" ||
        die "backup-header: expected $1=$2: not the backup this script was written for"
}
""".strip()

# How the passphrase stays out of every argv, said where the prelude needs a
# builtin printf and where it reads the passphrase: with an HMAC check, or with
# scrypt (format 4, whose prelude has no HMAC functions).
_NOTES = {
    True: (
        "The HMAC key only ever goes through the shell's own printf (see hmac_init).",
        "Not exported: it goes into the environment of the one command that\n"
        "    # reads it (openssl enc -pass env:backup_pass), never into an argv.",
    ),
    False: (
        "The passphrase only ever goes through the shell's own printf (see scrypt_dec).",
        "Not exported: scrypt gets it in its environment or on its stdin\n"
        "    # (see scrypt_dec), never argv.",
    ),
}


def prelude(hmac: bool = True) -> str:
    """The functions every script starts with (``hmac``: with the HMAC checks
    of formats 2 and 3; format 4's scrypt checks its chunks itself)."""
    key, passing = _NOTES[hmac]
    top = _TOP.replace("@KEY@", key).replace("@PASS@", passing)
    return "\n\n".join([top, HMAC_FUNCTIONS, _REST] if hmac else [top, _REST])


PRELUDE = prelude()


def backup_assignment(backup: str | None, what: str) -> list[str]:
    """``backup=...`` at the top; for a backup read from a pipe, the user fills it in."""
    if backup is None:
        return [
            f"# {what} read the backup from standard input, which a script cannot read",
            "# again: write the path of the backup file (or of the folder it was",
            "# untarred into) between the quotes.",
            "backup=''",
            '[ -n "$backup" ] || die "set backup= at the top of this script to the backup file"',
        ]
    return [f"backup={q(backup)}"]


def transcript_head(
    argv: tuple[str, ...], about: Sequence[str], functions: Sequence[str],
    backup: str | None, output: Path | None, setup: Sequence[str],
) -> list[str]:
    """The start of a --transcript: what it is (``about``), the sh functions,
    the settings, ``setup`` (``need`` and the passphrase) and its scratch
    folder, in the output folder when it restores (``output``)."""
    when = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    shown = call("qrecover", *argv) if argv else "qrecover"
    return [
        "#!/bin/sh",
        f"# Transcript of: {comment(shown)}",
        f"# written by qrecover {__version__} on {when}, as the run went.",
        "#",
        *about,
        "# The replay stops, non-zero, at the first failing check or stage.",
        "",
        "set -u",
        "",
        *(line for part in functions for line in (part, "")),
        *backup_assignment(backup, "qrecover"),
        *([f"out={q(str(output))}  # the output folder"] if output is not None else []),
        *setup,
        'make_work "$out"' if output is not None else 'make_work "${TMPDIR:-/tmp}"',
    ]


def passphrase_lines() -> list[str]:
    return [
        f"# The passphrase: from the environment variable {PASS_ENV} when it is set,",
        "# else asked for on the terminal. It is never written into any file.",
        "get_passphrase",
    ]


def untar_command(backup: str, *members: str, feed: str | None = None) -> str:
    """The page's step 1 for this backup (only ``members``, if named); a
    backup read from standard input comes from ``feed`` (or ``...``)."""
    if backup == "-":
        return f"{feed or '...'} | " + render_argv(("tar", "-i", "-xvf", "-", *members))
    return render_argv(("tar", "-i", "-xvf", os.path.abspath(backup), *members))


def feed_command(backups: Sequence[str]) -> str | None:
    """The command that writes a backup given as pieces, or compressed as a
    whole, to standard output (None for one plain file, a folder or stdin)."""
    if list(backups) == ["-"]:
        return None
    paths = [os.path.abspath(b) for b in backups]
    try:
        with open(paths[0], "rb") as f:
            comp = compression_of(os.pread(f.fileno(), SNIFF, 0))
    except (IsADirectoryError, OSError):
        comp = None
    if len(paths) == 1 and comp is None:
        return None
    cat = render_argv(("cat", *paths))
    if comp is None:
        return cat
    if len(paths) == 1:
        return render_argv((*comp.argv, paths[0]))
    return f"{cat} | {render_argv(comp.argv)}"
