"""Format 2's sh fragments (--transcript, qrecover script) and by-hand steps.

In a script, a stored file's pipeline is ``{ take, check, feed each chunk }
| tar -x -M -f - ...``: ``feed`` (redefined here) writes the first volume
down the pipe and keeps the later ones in the scratch folder, and tar's
new-volume script hands it those, in order, once the pipe has ended.  So a
script needs room for one stored file's volumes (qrecover itself holds two
or three).  The recovery page's own loop is fixed here: POSIX ``$(( ))``
instead of bash's ``$[ ]``, and only NAME.NNN chunks, never their .hmac.
"""

from __future__ import annotations

from qrecover.formats.v2 import PAGE, BackupHeaderV2
from qrecover.formats.v2.volumes import replay_stage as replay_stage  # (moved: words)
from qrecover.inventory import Entity


def _decrypt(cipher: str, out: str = "") -> str:
    return (f'backup_pass="$backup_pass" openssl enc -d -{cipher} -md md5 '
            f'-pass env:backup_pass -in "$1"{out} 2>"$work/stderr.dec"')


def volume_of(header: BackupHeaderV2) -> str:
    """The shell function that writes one verified chunk's plaintext volume."""
    cipher = header.crypto_algorithm
    inflate = f"""{_decrypt(cipher, ' -out "$work/plain"')} || return 1
    pigz -d -z <"$work/plain"
    _status=$?
    rm -f -- "$work/plain"
    return $_status"""
    if header.encrypted is None:
        body = f"""_magic=$(od -An -tx1 -N8 -- "$1" | tr -d ' \\n')
    case $_magic in
        53616c7465645f5f)  # Salted__: openssl enc, maybe with zlib (-z) inside
            {_decrypt(cipher, ' -out "$work/plain"')} || return 1
            case $(od -An -tx1 -N1 -- "$work/plain" | tr -d ' \\n') in
                78) pigz -d -z <"$work/plain" ;;
                *) cat -- "$work/plain" ;;
            esac
            _status=$?
            rm -f -- "$work/plain"
            return $_status ;;
        1f8b*) gzip -d -c <"$1" ;;  # gzip
        *) cat -- "$1" ;;  # a bare tar volume
    esac"""
    elif header.encrypted and header.compressed_flag:
        body = inflate
    elif header.encrypted:
        body = _decrypt(cipher)
    elif header.compressed_flag:
        body = 'gzip -d -c <"$1"'
    else:
        body = 'cat -- "$1"'
    return f"""volume_of() {{  # volume_of CHUNK: steps 4-5, its plaintext volume on stdout
    {body}
}}"""


FUNCTIONS = r"""
feed() {  # feed CHUNK: the first volume down the pipe to tar -M, the others kept for it
    case $1 in
        *.000) rm -f -- "$work"/volume.*
            volume_of "$work/$1" || die "$1: not decrypted/decompressed" ;;
        *) volume_of "$work/$1" >"$work/volume.${1##*.}" || die "$1: not decrypted/decompressed" ;;
    esac
    rm -f -- "$work/$1" "$work/$1.hmac"
}

next_volume_script() {  # step 6's new-volume script (the page's, made POSIX)
    cat >"$work/next-volume" <<'EOF'
# tar -M runs this when a volume ends; TAR_VOLUME is the one it wants (1 = .000)
_n=$((TAR_VOLUME - 1))
_v=$(printf '%s/volume.%03d' "$work" "$_n")
rm -f -- "$(printf '%s/volume.%03d' "$work" "$((_n - 1))")"
[ -f "$_v" ] ||
    { printf 'STOPPED: chunk .%03d of this stored file is missing\n' "$_n" >&2; exit 1; }
printf '%s' "$_v" >"/dev/fd/$TAR_FD"
EOF
    export work
}
""".strip()


def functions(header: BackupHeaderV2) -> list[str]:
    return ["", volume_of(header), "", FUNCTIONS, ""]


def programs(header: BackupHeaderV2) -> list[str]:
    found = ["tar", "od", "sed", "tr", "wc", "awk", "tail"]
    if header.encrypted is not False:
        found.append("openssl")
    if header.encrypted is None or (header.encrypted and header.compressed_flag):
        found.append("pigz")
    if header.encrypted is None or (header.compressed_flag and not header.encrypted):
        found.append("gzip")
    return found


def by_hand(header: BackupHeaderV2, example: Entity | None) -> list[str]:
    digest = header.hmac_algorithm.lower()
    path = example.backup_path if example is not None else "vm1"
    stored = f"{path}/private.img" if example is not None and example.name != "dom0" else path
    cipher = header.crypto_algorithm
    if header.encrypted is None:
        step45 = ("openssl enc -d ... if the chunk starts with Salted__ (then pigz -d -z if "
                  "that starts with 0x78), gzip -d if it starts with 1f 8b, else as it is")
    elif header.encrypted:
        step45 = f"openssl enc -d -md md5 -{cipher} -pass env:backup_pass -in \"$c\""
        if header.compressed_flag:
            step45 += " | pigz -d -z"
    elif header.compressed_flag:
        step45 = 'gzip -d -c < "$c"'
    else:
        step45 = 'cat "$c"'
    return [
        f"The page: {PAGE}",
        "Its multi-volume loop is bash-only and its find also matches .hmac files;",
        "these steps are corrected:",
        "  1. mkdir work && cd work && tar -i -xf /path/to/BACKUP",
        "  2. printf 'passphrase: '; stty -echo; read -r backup_pass; stty echo",
        "     export backup_pass",
        f"  3. for each chunk c = {stored}.000, .001, ... in numeric order:",
        f"       openssl dgst -{digest} -hmac \"$backup_pass\" < \"$c\"; cat \"$c.hmac\"  (equal?)",
        "     (R2 from v2.1.39 also wrote backup-header: check it the same way first)",
        f"  4./5. each chunk on its own: {step45} > dec/\"$c\"",
        "  6. a new-volume script nv:  n=$((TAR_VOLUME - 1));",
        "       printf '%s' \"$(dirname \"$TAR_ARCHIVE\")/$(basename \"$TAR_ARCHIVE\" .000)"
        ".$(printf %03d $n)\" > /dev/fd/$TAR_FD",
        f"     tar -x -M --new-volume-script='sh nv' -f dec/{stored}.000 -C OUT",
        "  7. to read a VM's files: sudo mount -o loop,ro OUT/.../private.img /mnt",
    ]


def header_checks(header: BackupHeaderV2) -> list[tuple[str, str]]:
    if header.encrypted is None:
        return []
    return [
        ("hmac-algorithm", header.hmac_algorithm),
        ("crypto-algorithm", header.crypto_algorithm),
        ("encrypted", str(header.encrypted)),
        ("compressed", str(header.compressed_flag)),
    ]
