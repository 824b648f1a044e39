#!/bin/sh
# Recovery script for the Qubes backup BACKUP
# written by qrecover 0.1.0 on DATE:
# qrecover script BACKUP -o WORK/out --passphrase-file BACKUP.passphrase
#
# It needs no Python and no qrecover: a POSIX shell (dash or bash), GNU tar,
# OpenSSL (1.0, 1.1 or 3), gzip and POSIX utilities (od, sed, awk, ...).
# Run it with:  sh THIS-FILE   (it asks for the passphrase, or takes it from
# the environment variable backup_pass; it never writes it anywhere).
#
# It restores, into the folder out= below:
#   qubes.xml
#   dom0-home/user/  dom0's home folder (dom0-home/user), about 40.0 KiB
#   sys-net/         sys-net (NetVM, template fedora-23), about 24.0 KiB
#   fedora-23/       fedora-23 (TemplateVM), about 196.0 KiB
#   work/            work (AppVM, template fedora-23), about 192.0 KiB
#   untrusted/       untrusted (AppVM, template fedora-23), about 44.0 KiB
#   standalone/      standalone (AppVM), about 72.0 KiB
#
# Scratch space: one chunk and its .hmac at a time (at most 100 MiB),
# in a private folder inside the output folder, deleted as soon as used and
# removed on exit; plus room for the restored data: about 568.0 KiB
# (sizes from the backup's qubes.xml; VM images are restored sparse).
#
# It follows the emergency recovery page, step by step (the comments name
# the steps): https://www.qubes-os.org/doc/backup-emergency-restore-v3/
# Nothing is decrypted before its HMAC matched; at the first HMAC mismatch or
# failing program it stops with a message and a non-zero exit status.

set -u

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
    # The HMAC key only ever goes through the shell's own printf (see hmac_init).
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
    # Not exported: it goes into the environment of the one command that
    # reads it (openssl enc -pass env:backup_pass), never into an argv.
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

# Steps 2 and 4 compare HMACs.  The recovery page computes them with
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

list_members() {  # step 1, listing only: "BLOCK NAME" for each member of the backup
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

# ---- settings: change them here if the backup or the output folder moved
backup=BACKUP
out=WORK/out

need tar openssl gzip od sed tr wc grep sort awk tail find
# The passphrase: from the environment variable backup_pass when it is set,
# else asked for on the terminal. It is never written into any file.
get_passphrase
make_work "$out"

# ---- step 1: untar the backup. It is many small tar archives in a row, hence
# tar -i (--ignore-zeros). Its members are listed once here; each is then taken
# out on its own when it is needed, and deleted once used.
list_members

# ---- step 1 (header members), step 2: verify the header's HMAC before reading it
take backup-header backup-header.hmac
hmac_init sha512 128
check_hmac backup-header 'wrong passphrase (or a damaged header); nothing was restored'
# ---- step 3: read the header; this script was written for these values
cat -- "$work/backup-header" >&2
header_is version 3
header_is hmac-algorithm SHA512
header_is encrypted True
header_is compressed True
header_is crypto-algorithm aes-256-cbc
header_is compression-filter gzip

# ---- qubes.xml: steps 4-7 (it lists the VMs; kept in the output folder)
# openssl enc: -md md5 because Qubes R2-R3.2 used OpenSSL 1.0, whose key
# derivation was MD5 (OpenSSL >= 1.1 defaults to SHA-256: 'bad decrypt');
# OpenSSL 3 warns that this key derivation is deprecated: expected.
chunk_list qubes.xml >"$work/chunks" || exit 1
fresh_stage
{
    feed_chunks "$work/chunks"
    echo 0 >"$work/status.0"
} | {
    backup_pass="$backup_pass" openssl enc -d -aes-256-cbc -md md5 -pass env:backup_pass 2>"$work/stderr.1"; echo $? >"$work/status.1"
} | {
    gzip -d 2>"$work/stderr.2"; echo $? >"$work/status.2"
} | {
    tar -x -O -f - qubes.xml >"$work/qubes.xml" 2>"$work/stderr.3"; echo $? >"$work/status.3"
}
pipeline_ok qubes.xml 'taking and verifying the chunks' 'openssl enc' gzip tar
place_file "$work/qubes.xml" "$out"/qubes.xml

# ==== dom0's home folder (dom0-home/user), stored as dom0-home/user -> "$out"/dom0-home/
# Steps 4-7 for each of its stored files, found in the listing of step 1:
# the chunks of each, in numeric order, each one verified (step 4) before it
# goes into the pipeline; what the stored file held is moved into place
# only once every stage succeeded.
stored_files dom0-home/user >"$work/stored"
[ -s "$work/stored" ] || die 'dom0: none of its files are in the backup'
while IFS= read -r stored <&4; do
    check_stored_name "$stored"
    chunk_list "$stored" >"$work/chunks" || exit 1
    say "$stored: $(wc -l <"$work/chunks") chunk(s), into dom0-home/"
    fresh_stage
    {
        feed_chunks "$work/chunks"
        echo 0 >"$work/status.0"
    } | {
        backup_pass="$backup_pass" openssl enc -d -aes-256-cbc -md md5 -pass env:backup_pass 2>"$work/stderr.1"; echo $? >"$work/status.1"
    } | {
        gzip -d 2>"$work/stderr.2"; echo $? >"$work/status.2"
    } | {
        tar -x -f - -C "$work/stage" --strip-components=1 --no-same-owner 2>"$work/stderr.3"; echo $? >"$work/status.3"
    }
    pipeline_ok "$stored" 'taking and verifying the chunks' 'openssl enc' gzip tar
    place "$work/stage" "$out"/dom0-home
done 4<"$work/stored"

# ==== sys-net (NetVM, template fedora-23), stored under vm2/ -> "$out"/sys-net/
# Steps 4-7 for each of its stored files, found in the listing of step 1:
# the chunks of each, in numeric order, each one verified (step 4) before it
# goes into the pipeline; what the stored file held is moved into place
# only once every stage succeeded.
stored_files 'vm2/.*' >"$work/stored"
[ -s "$work/stored" ] || die 'sys-net: none of its files are in the backup'
while IFS= read -r stored <&4; do
    check_stored_name "$stored"
    chunk_list "$stored" >"$work/chunks" || exit 1
    say "$stored: $(wc -l <"$work/chunks") chunk(s), into sys-net/"
    fresh_stage
    {
        feed_chunks "$work/chunks"
        echo 0 >"$work/status.0"
    } | {
        backup_pass="$backup_pass" openssl enc -d -aes-256-cbc -md md5 -pass env:backup_pass 2>"$work/stderr.1"; echo $? >"$work/status.1"
    } | {
        gzip -d 2>"$work/stderr.2"; echo $? >"$work/status.2"
    } | {
        tar -x -f - -C "$work/stage" --strip-components=1 --no-same-owner 2>"$work/stderr.3"; echo $? >"$work/status.3"
    }
    pipeline_ok "$stored" 'taking and verifying the chunks' 'openssl enc' gzip tar
    place "$work/stage" "$out"/sys-net
done 4<"$work/stored"

# ==== fedora-23 (TemplateVM), stored under vm3/ -> "$out"/fedora-23/
# Steps 4-7 for each of its stored files, found in the listing of step 1:
# the chunks of each, in numeric order, each one verified (step 4) before it
# goes into the pipeline; what the stored file held is moved into place
# only once every stage succeeded.
stored_files 'vm3/.*' >"$work/stored"
[ -s "$work/stored" ] || die 'fedora-23: none of its files are in the backup'
while IFS= read -r stored <&4; do
    check_stored_name "$stored"
    chunk_list "$stored" >"$work/chunks" || exit 1
    say "$stored: $(wc -l <"$work/chunks") chunk(s), into fedora-23/"
    fresh_stage
    {
        feed_chunks "$work/chunks"
        echo 0 >"$work/status.0"
    } | {
        backup_pass="$backup_pass" openssl enc -d -aes-256-cbc -md md5 -pass env:backup_pass 2>"$work/stderr.1"; echo $? >"$work/status.1"
    } | {
        gzip -d 2>"$work/stderr.2"; echo $? >"$work/status.2"
    } | {
        tar -x -f - -C "$work/stage" --strip-components=1 --no-same-owner 2>"$work/stderr.3"; echo $? >"$work/status.3"
    }
    pipeline_ok "$stored" 'taking and verifying the chunks' 'openssl enc' gzip tar
    place "$work/stage" "$out"/fedora-23
done 4<"$work/stored"

# ==== work (AppVM, template fedora-23), stored under vm7/ -> "$out"/work/
# Steps 4-7 for each of its stored files, found in the listing of step 1:
# the chunks of each, in numeric order, each one verified (step 4) before it
# goes into the pipeline; what the stored file held is moved into place
# only once every stage succeeded.
stored_files 'vm7/.*' >"$work/stored"
[ -s "$work/stored" ] || die 'work: none of its files are in the backup'
while IFS= read -r stored <&4; do
    check_stored_name "$stored"
    chunk_list "$stored" >"$work/chunks" || exit 1
    say "$stored: $(wc -l <"$work/chunks") chunk(s), into work/"
    fresh_stage
    {
        feed_chunks "$work/chunks"
        echo 0 >"$work/status.0"
    } | {
        backup_pass="$backup_pass" openssl enc -d -aes-256-cbc -md md5 -pass env:backup_pass 2>"$work/stderr.1"; echo $? >"$work/status.1"
    } | {
        gzip -d 2>"$work/stderr.2"; echo $? >"$work/status.2"
    } | {
        tar -x -f - -C "$work/stage" --strip-components=1 --no-same-owner 2>"$work/stderr.3"; echo $? >"$work/status.3"
    }
    pipeline_ok "$stored" 'taking and verifying the chunks' 'openssl enc' gzip tar
    place "$work/stage" "$out"/work
done 4<"$work/stored"

# ==== untrusted (AppVM, template fedora-23), stored under vm9/ -> "$out"/untrusted/
# Steps 4-7 for each of its stored files, found in the listing of step 1:
# the chunks of each, in numeric order, each one verified (step 4) before it
# goes into the pipeline; what the stored file held is moved into place
# only once every stage succeeded.
stored_files 'vm9/.*' >"$work/stored"
[ -s "$work/stored" ] || die 'untrusted: none of its files are in the backup'
while IFS= read -r stored <&4; do
    check_stored_name "$stored"
    chunk_list "$stored" >"$work/chunks" || exit 1
    say "$stored: $(wc -l <"$work/chunks") chunk(s), into untrusted/"
    fresh_stage
    {
        feed_chunks "$work/chunks"
        echo 0 >"$work/status.0"
    } | {
        backup_pass="$backup_pass" openssl enc -d -aes-256-cbc -md md5 -pass env:backup_pass 2>"$work/stderr.1"; echo $? >"$work/status.1"
    } | {
        gzip -d 2>"$work/stderr.2"; echo $? >"$work/status.2"
    } | {
        tar -x -f - -C "$work/stage" --strip-components=1 --no-same-owner 2>"$work/stderr.3"; echo $? >"$work/status.3"
    }
    pipeline_ok "$stored" 'taking and verifying the chunks' 'openssl enc' gzip tar
    place "$work/stage" "$out"/untrusted
done 4<"$work/stored"

# ==== standalone (AppVM), stored under vm10/ -> "$out"/standalone/
# Steps 4-7 for each of its stored files, found in the listing of step 1:
# the chunks of each, in numeric order, each one verified (step 4) before it
# goes into the pipeline; what the stored file held is moved into place
# only once every stage succeeded.
stored_files 'vm10/.*' >"$work/stored"
[ -s "$work/stored" ] || die 'standalone: none of its files are in the backup'
while IFS= read -r stored <&4; do
    check_stored_name "$stored"
    chunk_list "$stored" >"$work/chunks" || exit 1
    say "$stored: $(wc -l <"$work/chunks") chunk(s), into standalone/"
    fresh_stage
    {
        feed_chunks "$work/chunks"
        echo 0 >"$work/status.0"
    } | {
        backup_pass="$backup_pass" openssl enc -d -aes-256-cbc -md md5 -pass env:backup_pass 2>"$work/stderr.1"; echo $? >"$work/status.1"
    } | {
        gzip -d 2>"$work/stderr.2"; echo $? >"$work/status.2"
    } | {
        tar -x -f - -C "$work/stage" --strip-components=1 --no-same-owner 2>"$work/stderr.3"; echo $? >"$work/status.3"
    }
    pipeline_ok "$stored" 'taking and verifying the chunks' 'openssl enc' gzip tar
    place "$work/stage" "$out"/standalone
done 4<"$work/stored"

say "done: 6 VM(s) restored into $out, every HMAC matched"
# ---- step 8: to read a VM's files, mount its private.img (ext4) read-only:
say "step 8, to read its files: sudo mount -o loop,ro \"$out/sys-net/private.img\" /mnt"
