#!/usr/bin/env python3
"""Write crafted bad backups: damaged, truncated, tampered, hostile.

Each case starts from a valid format-3 backup written by make_backup.py (the
Qubes R3.2 writer's own commands) and changes it the way a dying disk, a
half-finished copy or an attacker would.  Where an attacker who knows the
passphrase re-signs what they changed, the new HMACs come from the same
``openssl dgst -hmac`` the writer used, and new inner archives go through
the same ``gzip`` and ``openssl enc -md md5``.  Hostile names that GNU tar
refuses to write are written with Python's tarfile (an attacker's tool).

stdlib only; never imports qrecover.  ``cases(workdir)`` returns the cases;
``python3 scripts/make_bad_backups.py DIR`` writes them with a cases.json.
"""

from __future__ import annotations

import io
import json
import os
import random
import re
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import List, Tuple

sys.path.insert(0, str(Path(__file__).resolve().parent))

import make_backup as gen
import make_backup_v2 as gen2
import make_backup_v4 as gen4

PASSPHRASE = "bad-backup passphrase"
CHUNK = 4096
Members = List[Tuple[str, bytes]]  # typing's: a runtime alias (Python 3.8)

EXIT_AUTH = 3
EXIT_BACKUP = 4


@dataclass
class Case:
    name: str
    path: str
    code: int  # the documented exit code qrecover must end with
    message: str  # must appear in the one-line error (names the file or chunk)
    passphrase: str = PASSPHRASE
    partial: str | None = None  # output path that must exist only as .partial


# -- the writer's own commands --------------------------------------------


def openssl_hmac(data: bytes, algorithm: str = "SHA512") -> bytes:
    """``openssl dgst -ALG -hmac PASS`` on stdin, in OpenSSL 1.0's text style."""
    out = subprocess.run(["openssl", "dgst", "-" + algorithm, "-hmac", PASSPHRASE],
                         input=data, capture_output=True, check=True).stdout
    return out[out.index(b"(stdin)= "):]


def gzip_bytes(data: bytes) -> bytes:
    return subprocess.run(["gzip", "-c"], input=data, capture_output=True, check=True).stdout


def encrypt(data: bytes) -> bytes:
    return subprocess.run(
        ["openssl", "enc", "-e", "-aes-256-cbc", "-md", "md5", "-pass", "pass:" + PASSPHRASE],
        input=data, capture_output=True, check=True).stdout


def stored(name: str, inner_tar: bytes, chunk: int = 1 << 20) -> Members:
    """A stored file's members: gzip | openssl enc | split, each chunk with its .hmac."""
    stream = encrypt(gzip_bytes(inner_tar))
    members: Members = []
    for i, start in enumerate(range(0, max(len(stream), 1), chunk)):
        data = stream[start:start + chunk]
        members += [(f"{name}.{i:03d}", data), (f"{name}.{i:03d}.hmac", openssl_hmac(data))]
    return members


def stored_plain(name: str, inner: bytes) -> Members:
    """An unencrypted, uncompressed stored file in one chunk."""
    return [(f"{name}.000", inner), (f"{name}.000.hmac", openssl_hmac(inner))]


def inner_tar(entries: list[tarfile.TarInfo], data: dict[str, bytes] | None = None) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for info in entries:
            payload = (data or {}).get(info.name)
            if payload is not None:
                info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload) if payload is not None else None)
    return buf.getvalue()


def member(name: str, kind: bytes = tarfile.REGTYPE, linkname: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = linkname
    info.mode = 0o644
    info.mtime = 1470279173
    if kind in (tarfile.CHRTYPE, tarfile.BLKTYPE):
        info.devmajor, info.devminor = 1, 3
    return info


def write_outer(path: Path, members: Members) -> None:
    """Concatenate one ``tar -cO --posix`` archive per member, as Qubes did.

    Names GNU tar would rewrite (``..``, absolute, control characters) are
    written with Python's tarfile instead, so they reach the reader as is.
    """
    with path.open("wb") as out, tempfile.TemporaryDirectory() as stage:
        for name, data in members:
            parts = name.split("/")
            plain = (name.isprintable() and not name.startswith("/") and ".." not in parts
                     and name.isascii() and all(0 < len(p) <= 200 for p in parts))
            if plain:
                target = Path(stage) / name
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(data)
                out.flush()
                subprocess.run(["tar", "-cO", "--posix", "-C", stage, name], stdout=out,
                               check=True)
                target.unlink()
            else:
                buf = io.BytesIO()
                with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
                out.write(buf.getvalue())


def read_outer(path: Path) -> Members:
    with tarfile.open(path, mode="r:", ignore_zeros=True) as tar:
        result = []
        for info in tar:
            f = tar.extractfile(info)
            assert f is not None
            result.append((info.name, f.read()))
        return result


# -- the cases -------------------------------------------------------------

HEADER = (b"version=3\nhmac-algorithm=SHA512\ncrypto-algorithm=aes-256-cbc\n"
          b"encrypted=True\ncompressed=True\ncompression-filter=gzip\n")


def qubes_xml(*vms: str, with_dom0: bool = False) -> bytes:
    dom0 = '<QubesAdminVm qid="0" name="dom0" backup_content="False"/>'
    return ("<QubesVmCollection>" + dom0 + "".join(vms) + "</QubesVmCollection>").encode()


def vm_xml(name: str = "work", path: str = "vm7", size: int = 4096) -> str:
    return (f'<QubesAppVm qid="7" name="{name}" backup_content="True" backup_path="{path}" '
            f'backup_size="{size}" template_qid="none"/>')


def xml_members(doc: bytes) -> Members:
    return stored("qubes.xml", inner_tar([member("qubes.xml")], {"qubes.xml": doc}))


def signed_header(text: bytes) -> Members:
    return [("backup-header", text), ("backup-header.hmac", openssl_hmac(text))]


def hostile(entries: list[tarfile.TarInfo], data: dict[str, bytes] | None = None,
            size: int = 4096, name: str = "vm7/private.img") -> Members:
    """A validly signed backup whose one VM's stored file ``name`` holds ``entries``."""
    return (signed_header(HEADER) + xml_members(qubes_xml(vm_xml(size=size)))
            + stored(name, inner_tar(entries, data)))


def damaged_gzip_members() -> Members:
    """Authentic chunks (the HMAC is over what was written) whose gzip stream is
    damaged: its trailer's CRC-32 does not match the data (a writer's or
    memory fault before the HMAC was taken)."""
    data = gen.randbytes(random.Random(5), 2 << 20)  # enough that some of it comes out
    inner = inner_tar([member("vm7/private.img")], {"vm7/private.img": data})
    compressed = bytearray(gzip_bytes(inner))
    compressed[-8] ^= 0xFF  # the CRC-32 is the trailer's first 4 bytes
    stream = encrypt(bytes(compressed))
    return (signed_header(HEADER) + xml_members(qubes_xml(vm_xml(size=4096)))
            + [("vm7/private.img.000", stream),
               ("vm7/private.img.000.hmac", openssl_hmac(stream))])


BOMB_GZ = b""


def bomb_members() -> Members:
    """A few hundred KiB that gunzip to 256 MiB of zeros, declared as 4 KiB."""
    size = 256 * 1024 * 1024
    info = member("vm7/private.img")
    info.size = size
    head = info.tobuf(format=tarfile.GNU_FORMAT)
    proc = subprocess.Popen(["gzip", "-c"], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    assert proc.stdin is not None and proc.stdout is not None

    def feed() -> None:
        assert proc.stdin is not None
        proc.stdin.write(head)
        zeros = bytes(1 << 20)
        for _ in range(size >> 20):
            proc.stdin.write(zeros)
        proc.stdin.write(bytes(1024))
        proc.stdin.close()

    import threading

    writer = threading.Thread(target=feed)
    writer.start()
    compressed = proc.stdout.read()
    writer.join()
    proc.wait()
    global BOMB_GZ
    BOMB_GZ = compressed
    stream = encrypt(compressed)
    return (signed_header(HEADER) + xml_members(qubes_xml(vm_xml(size=4096)))
            + [("vm7/private.img.000", stream),
               ("vm7/private.img.000.hmac", openssl_hmac(stream))])


def valid_backup(workdir: Path) -> tuple[Path, Members]:
    """A real backup of one small VM, several chunks long, from make_backup."""
    src = workdir / "src" / "work"
    src.mkdir(parents=True, exist_ok=True)
    rng = random.Random(7)
    (src / "private.img").write_bytes(bytes(rng.getrandbits(8) for _ in range(6 * CHUNK)))
    (src / "icon.png").write_bytes(b"\x89PNG icon")
    path = workdir / "valid"
    gen.make_backup(path, PASSPHRASE, [gen.VmSpec("work", 7, source=src)],
                    chunk_size=CHUNK, workdir=workdir)
    return path, read_outer(path)


def cases(workdir: Path) -> list[Case]:
    """Write every case under ``workdir``; return them."""
    workdir.mkdir(parents=True, exist_ok=True)
    _valid_path, valid = valid_backup(workdir)
    names = [n for n, _ in valid]
    img = [n for n in names if n.startswith("vm7/private.img.") and not n.endswith(".hmac")]
    assert len(img) >= 4, img
    result: list[Case] = []

    def add(name: str, content: Members | bytes | Path, code: int, message: str,
            **kw: str) -> None:
        path = workdir / f"{name}.backup"
        if isinstance(content, Path):  # a folder, as if untarred by hand
            path = content
        elif isinstance(content, bytes):
            path.write_bytes(content)
        else:
            write_outer(path, content)
        result.append(Case(name, str(path), code, message, **kw))

    def without(*drop: str) -> Members:
        return [(n, d) for n, d in valid if n not in drop]

    def replace(name: str, fn: Callable[[bytes], bytes]) -> Members:
        return [(n, fn(d) if n == name else d) for n, d in valid]

    def header_case(name: str, text: bytes, message: str) -> None:
        add(name, signed_header(text) + valid[2:], EXIT_BACKUP, message)

    # passphrase and header
    add("wrong-passphrase", valid, EXIT_AUTH, "passphrase", passphrase="not the passphrase")
    add("header-tampered", replace("backup-header", lambda d: d.replace(b"gzip", b"xz")),
        EXIT_AUTH, "backup-header")
    add("header-hmac-missing", without("backup-header.hmac"), EXIT_BACKUP,
        "backup-header.hmac")
    header_case("header-hmac-not-a-digest", HEADER.replace(b"SHA512", b"whirlpool"),
                "hmac-algorithm")
    header_case("header-cipher-option", HEADER.replace(b"aes-256-cbc", b"-engine"),
                "crypto-algorithm")
    header_case("header-cipher-path", HEADER.replace(b"aes-256-cbc", b"../../bin/sh"),
                "backup-header line 3")
    header_case("header-filter-option", HEADER.replace(b"filter=gzip", b"filter=--to-stdout"),
                "compression-filter")
    header_case("header-filter-program", HEADER.replace(b"filter=gzip", b"filter=sh"),
                "compression-filter")
    header_case("header-version-5", HEADER.replace(b"version=3", b"version=5"), "version 5")
    header_case("header-missing-keys", b"version=3\nhmac-algorithm=SHA512\n", "encrypted")
    header_case("header-duplicate-key", HEADER + b"encrypted=False\n", "duplicate key")
    header_case("header-non-ascii", HEADER + "comment=caf\u00e9\n".encode(), "not ASCII")
    header_case("header-long-line", HEADER + b"x=" + b"a" * 100000 + b"\n", "backup-header")

    # chunks
    add("chunk-byte-flipped", replace(img[1], lambda d: d[:10] + bytes([d[10] ^ 1]) + d[11:]),
        EXIT_BACKUP, img[1], partial="work/private.img")
    add("chunk-truncated", replace(img[2], lambda d: d[: len(d) // 2]), EXIT_BACKUP, img[2],
        partial="work/private.img")
    add("chunk-missing-middle", without(img[1], img[1] + ".hmac"), EXIT_BACKUP, img[1],
        partial="work/private.img")
    add("chunk-last-missing", without(img[-1], img[-1] + ".hmac"), EXIT_BACKUP,
        "vm7/private.img", partial="work/private.img")
    add("stored-file-missing", without(*img, *(n + ".hmac" for n in img)), EXIT_BACKUP,
        "vm7/private.img: missing")
    add("chunk-hmac-missing", without(img[2] + ".hmac"), EXIT_BACKUP, img[2] + ".hmac",
        partial="work/private.img")
    i1, i2 = names.index(img[1]), names.index(img[2])
    swapped = list(valid)
    swapped[i1:i1 + 2], swapped[i2:i2 + 2] = valid[i2:i2 + 2], valid[i1:i1 + 2]
    add("chunks-out-of-order", swapped, EXIT_BACKUP, img[1], partial="work/private.img")
    dup = list(valid)
    dup[i2:i2] = valid[i1:i1 + 2]
    add("chunk-duplicated", dup, EXIT_BACKUP, img[1], partial="work/private.img")
    add("hmac-over-4k", replace(img[1] + ".hmac", lambda d: d + b"\n" * 5000), EXIT_BACKUP,
        img[1] + ".hmac", partial="work/private.img")
    whole = (workdir / "valid").read_bytes()
    cut = whole.find(valid[names.index(img[2])][1][:64])
    add("stream-cut-mid-member", whole[: cut + 100], EXIT_BACKUP, img[2],
        partial="work/private.img")
    hmac_at = whole.find(valid[names.index(img[2] + ".hmac")][1])
    add("stream-cut-mid-hmac", whole[: hmac_at + 20], EXIT_BACKUP, img[2] + ".hmac",
        partial="work/private.img")

    # not a backup
    add("empty", b"", EXIT_BACKUP, "empty")
    not_backups(workdir, whole, valid, add)
    add("ordinary-tarball", [("README", b"hello\n"), ("src/main.c", b"int main;\n")],
        EXIT_BACKUP, "README")
    add("no-qubes-xml", valid[:2] + valid[4:], EXIT_BACKUP, "qubes.xml")

    # hostile outer names
    for label, bad in [("dotdot", "../../evil.000"), ("absolute", "/tmp/evil.000"),
                       ("control-chars", "vm7/priv\x1b[2Jate.img.000")]:
        add(f"outer-name-{label}", [*valid[:4], (bad, b"x"), (bad + ".hmac", b"x")],
            EXIT_BACKUP, "refusing" if label != "control-chars" else "refusing member name")

    # hostile qubes.xml (signed with the passphrase)
    laughs = (b'<?xml version="1.0"?><!DOCTYPE l [<!ENTITY a "aaaaaaaaaa">'
              + b"".join(b'<!ENTITY %c "&%c;&%c;&%c;&%c;&%c;&%c;&%c;&%c;&%c;&%c;">'
                         % ((98 + i,) + (97 + i,) * 10) for i in range(9))
              + b"]><QubesVmCollection>&j;</QubesVmCollection>")
    for label, doc in [
        ("malformed", b"<QubesVmCollection><QubesAppVm"),
        ("billion-laughs", laughs),
        ("path-dotdot", qubes_xml(vm_xml(path="../../x"))),
        ("path-absolute", qubes_xml(vm_xml(path="/etc"))),
        ("name-slash", qubes_xml(vm_xml(name="a/b"))),
    ]:
        add(f"qubes-xml-{label}", signed_header(HEADER) + xml_members(doc) + valid[4:],
            EXIT_BACKUP, "qubes.xml")

    # hostile inner archives (validly authenticated)
    f = member("vm7/private.img")
    add("inner-dotdot", hostile([f, member("vm7/private.img/../../../escape")],
                                {"vm7/private.img": b"x"}), EXIT_BACKUP, "outside")
    add("inner-absolute", hostile([member("/tmp/qrecover-escape")],
                                  {"/tmp/qrecover-escape": b"x"}), EXIT_BACKUP, "outside")
    add("inner-symlink-then-write",
        hostile([member("vm7/private.img", tarfile.SYMTYPE, "/tmp"),
                 member("vm7/private.img/qrecover-escape")],
                {"vm7/private.img/qrecover-escape": b"x"}), EXIT_BACKUP, "written through")
    add("inner-hardlink-outside",
        hostile([member("vm7/private.img", tarfile.LNKTYPE, "/etc/hostname")]),
        EXIT_BACKUP, "hard link")
    add("inner-device-and-fifo",
        hostile([member("vm7/apps", tarfile.DIRTYPE), member("vm7/apps/null", tarfile.CHRTYPE),
                 member("vm7/apps/fifo", tarfile.FIFOTYPE), member("vm7/apps/ok.desktop")],
                {"vm7/apps/ok.desktop": b"[Desktop Entry]\n"}, name="vm7/apps"),
        EXIT_BACKUP, "character device")
    add("inner-bomb", bomb_members(), EXIT_BACKUP, "decompression bomb",
        partial="work/private.img")
    add("gzip-stream-damaged", damaged_gzip_members(), EXIT_BACKUP,
        "vm7/private.img: igzip exited 1", partial="work/private.img")
    # unencrypted, uncompressed, the last chunk holding only the end-of-archive
    # blocks: dropping it cuts the inner archive exactly at a member boundary
    plain = HEADER.replace(b"encrypted=True", b"encrypted=False").replace(
        b"compressed=True\ncompression-filter=gzip", b"compressed=False")
    inner = inner_tar([member("vm7/apps", tarfile.DIRTYPE), member("vm7/apps/a.desktop")],
                      {"vm7/apps/a.desktop": b"[Desktop Entry]\n" * 40})
    end = (len(inner.rstrip(b"\0")) + 511) // 512 * 512  # just past the last member
    first = inner[:end]
    add("plain-last-chunk-missing",
        signed_header(plain)
        + stored_plain("qubes.xml", inner_tar([member("qubes.xml")],
                                              {"qubes.xml": qubes_xml(vm_xml())}))
        + [("vm7/apps.000", first), ("vm7/apps.000.hmac", openssl_hmac(first))],
        EXIT_BACKUP, "end-of-archive", partial="work/apps")
    cases_v4(workdir, add, BOMB_GZ)
    return result


# -- not a backup at all, or a backup in another wrapping --------------------


def compressed(argv: list[str], data: bytes) -> bytes:
    return subprocess.run(argv, input=data, capture_output=True, check=True).stdout


def zip_of(members: dict[str, bytes]) -> bytes:
    import zipfile

    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        for name, data in members.items():
            z.writestr(name, data)
    return buf.getvalue()


def cpio_of(members: dict[str, bytes]) -> bytes:
    """cpio's newc format, as ``cpio -o -H newc`` writes it."""
    out = bytearray()
    for ino, (name, data) in enumerate([*members.items(), ("TRAILER!!!", b"")], 1):
        raw = name.encode() + b"\0"
        fields = [ino, 0o100644, 0, 0, 1, 0, len(data), 0, 0, 0, 0, len(raw), 0]
        out += b"070701" + b"".join(b"%08X" % f for f in fields) + raw
        out += bytes(-len(out) % 4) + data + bytes(-(len(out) + len(data)) % 4)
    return bytes(out)


def ar_of(members: dict[str, bytes]) -> bytes:
    out = bytearray(b"!<arch>\n")
    for name, data in members.items():
        out += b"%-16s%-12d%-6d%-6d%-8o%-10d`\n" % (name.encode() + b"/", 0, 0, 0, 0o644,
                                                   len(data))
        out += data + (b"\n" if len(data) % 2 else b"")
    return bytes(out)


def plain_tar(entries: list[tuple[str, bytes | None]]) -> bytes:
    """An ordinary tar (None: a symbolic link to /etc/passwd)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for name, data in entries:
            info = tarfile.TarInfo(name)
            if data is None:
                info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
            else:
                info.size = len(data)
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return buf.getvalue()


def not_backups(workdir: Path, whole: bytes, valid: Members,
                add: Callable[..., None]) -> None:
    """One crafted case of each kind scripts/fuzz --mode input makes, from fixed
    seeds: random bytes, zeros, other formats, compression, cut backups."""
    rng = random.Random(15)
    sources = {"README": b"hello\n", "src/main.c": b"int main(void) { return 0; }\n"}
    # A valid tar header's checksum cannot match by chance in 512 random bytes
    # only if the check is made: this fails the same way whatever the seed.
    add("random-bytes", gen.randbytes(random.Random(1), 256 * 1024), EXIT_BACKUP,
        "random-bytes.backup: not a tar archive, so not a Qubes backup: it starts with the bytes")
    add("random-bytes-odd-size", gen.randbytes(rng, 1000), EXIT_BACKUP, "not a tar archive")
    add("zero-filled", bytes(100_000), EXIT_BACKUP, "zero-filled (100000 bytes of zeros)")
    add("zeros-then-random", bytes(1536) + gen.randbytes(rng, 600), EXIT_BACKUP,
        "it starts with 1536 bytes of zeros; what follows starts with the bytes")
    add("zip-of-backup", zip_of({"backup": whole}), EXIT_BACKUP, "it is a zip archive")
    add("seven-zip", b"7z\xbc\xaf\x27\x1c\x00\x04" + gen.randbytes(rng, 300), EXIT_BACKUP,
        "it is a 7-Zip archive")
    add("cpio-archive", cpio_of(sources), EXIT_BACKUP, "it is a cpio archive")
    add("ar-archive", ar_of({"debian-binary": b"2.0\n"}), EXIT_BACKUP, "it is an ar archive")
    add("gzip-of-random", compressed(["gzip", "-c"], gen.randbytes(rng, 5000)), EXIT_BACKUP,
        "not a tar archive, so not a Qubes backup")
    add("compressed-twice", compressed(["xz", "-c"], compressed(["gzip", "-c"], whole)),
        EXIT_BACKUP, "it starts like a gzip stream (compressed twice?)")
    gz = compressed(["bzip2", "-c"], whole)
    add("compressed-backup-cut", gz[: len(gz) // 2], EXIT_BACKUP,
        "bzip2 exited 2: bzip2: Compressed file ends unexpectedly")
    add("tgz-of-sources", compressed(["gzip", "-c"], plain_tar(list(sources.items()))),
        EXIT_BACKUP, "found 'README'")
    add("ordinary-tarball", [("README", b"hello\n"), ("src/main.c", b"int main;\n")],
        EXIT_BACKUP, "README")
    add("tar-symlink-first", plain_tar([("backup-header", None)]), EXIT_BACKUP,
        "'backup-header' is not a regular file (it is a symbolic link)")
    hmac_end = whole.find(valid[1][1]) + len(valid[1][1])
    add("backup-cut-in-padding", whole[: hmac_end + 10], EXIT_BACKUP, "padding")
    second = whole.find(b"vm7/private.img.001") // 512 * 512  # its PAX header's block
    add("backup-suffix-at-member", whole[second:], EXIT_BACKUP,
        "does not start with backup-header (found 'vm7/private.img.001')")
    add("backup-suffix-mid-member", whole[1000:], EXIT_BACKUP, "not a tar archive")
    folder = workdir / "random-files.folder"
    folder.mkdir()
    (folder / "notes.txt").write_bytes(gen.randbytes(rng, 700))
    (folder / "qubes.xml.000").write_bytes(gen.randbytes(rng, 700))
    add("random-files-folder", folder, EXIT_BACKUP, "no backup-header in this folder")


# -- format 4 (Qubes R4): the same damage, authenticated by scrypt ----------

BACKUP_ID = "20261128T080000-4242"
HEADER_V4 = gen4.header_text_v4(compressed=True, compression="gzip",
                                 backup_id=BACKUP_ID).encode()


def scrypt_enc(data: bytes, secret: str, work: Path) -> bytes:
    """``scrypt enc`` as R4's writer ran it (with the writer's fast test KDF)."""
    src, dst = work / "scrypt-in", work / "scrypt-out"
    src.write_bytes(data)
    gen4._scrypt_enc(src, dst, secret, gen4.FAST_KDF)
    out = dst.read_bytes()
    src.unlink()
    dst.unlink()
    return out


def signed_header_v4(text: bytes, work: Path) -> Members:
    return [("backup-header", text),
            ("backup-header.hmac", scrypt_enc(text, f"backup-header!{PASSPHRASE}", work))]


def stored_v4(name: str, inner: bytes, work: Path, compressed: bytes | None = None) -> Members:
    """gzip | split | scrypt enc per chunk, with R4's per-chunk passphrase."""
    stream = compressed if compressed is not None else gzip_bytes(inner)
    members: Members = []
    for i, start in enumerate(range(0, max(len(stream), 1), 1 << 20)):
        chunk = f"{name}.{i:03d}"
        secret = f"{BACKUP_ID}!{chunk}!{PASSPHRASE}"
        members.append((chunk + ".enc", scrypt_enc(stream[start:start + (1 << 20)], secret,
                                                    work)))
    return members


def qubes_xml_v4() -> bytes:
    return (b'<qubes><domains><domain class="AdminVM" id="domain-0"><properties>'
            b'<property name="name">dom0</property></properties><features/></domain>'
            b'<domain class="AppVM" id="domain-7"><properties><property name="name">work'
            b'</property></properties><features><feature name="backup-content">True</feature>'
            b'<feature name="backup-path">vm7/</feature><feature name="backup-size">4096'
            b"</feature></features></domain></domains></qubes>")


def hostile_v4(entries: list[tarfile.TarInfo], data: dict[str, bytes] | None, work: Path,
               name: str = "vm7/private.img", compressed: bytes | None = None) -> Members:
    xml = inner_tar([member("qubes.xml")], {"qubes.xml": qubes_xml_v4()})
    return (signed_header_v4(HEADER_V4, work) + stored_v4("qubes.xml", xml, work)
            + stored_v4(name, inner_tar(entries, data), work, compressed))


def valid_backup_v4(workdir: Path) -> Members:
    src = workdir / "src4" / "work"
    src.mkdir(parents=True, exist_ok=True)
    rng = random.Random(8)
    (src / "private.img").write_bytes(gen.randbytes(rng, 6 * CHUNK))
    path = workdir / "valid-v4"
    gen4.make_backup_v4(path, PASSPHRASE, [gen.VmSpec("work", 7, source=src)],
                        chunk_size=CHUNK, workdir=workdir, compression=None)
    return read_outer(path)


def cases_v4(workdir: Path, add: Callable[..., None], bomb: bytes) -> None:
    valid = valid_backup_v4(workdir)
    names = [n for n, _ in valid]
    img = [n for n in names if n.startswith("vm7/private.img.")]
    assert len(img) >= 4, img

    def without(*drop: str) -> Members:
        return [(n, d) for n, d in valid if n not in drop]

    def replace(name: str, fn: Callable[[bytes], bytes]) -> Members:
        return [(n, fn(d) if n == name else d) for n, d in valid]

    add("v4-wrong-passphrase", valid, EXIT_AUTH, "passphrase", passphrase="not it")
    add("v4-header-tampered", replace("backup-header", lambda d: d.replace(b"True", b"False")),
        EXIT_AUTH, "backup-header")
    add("v4-header-hmac-missing", without("backup-header.hmac"), EXIT_BACKUP,
        "backup-header.hmac")
    add("v4-chunk-byte-flipped", replace(img[1], lambda d: d[:-5] + bytes([d[-5] ^ 1]) + d[-4:]),
        EXIT_BACKUP, img[1], partial="work/private.img")
    add("v4-chunk-missing-middle", without(img[1]), EXIT_BACKUP, re.sub(r"\.enc$", "", img[1]),
        partial="work/private.img")
    add("v4-chunk-last-missing", without(img[-1]), EXIT_BACKUP, "vm7/private.img",
        partial="work/private.img")
    i1 = names.index(img[1])
    dup = list(valid)
    dup.insert(i1 + 2, valid[i1])
    add("v4-chunk-duplicated", dup, EXIT_BACKUP, re.sub(r"\.enc$", "", img[1]),
        partial="work/private.img")
    add("v4-outer-name-dotdot", [*valid[:3], ("../../evil.000.enc", b"x")], EXIT_BACKUP,
        "refusing")
    add("v4-inner-device-and-fifo",
        hostile_v4([member("vm7/apps", tarfile.DIRTYPE), member("vm7/apps/null", tarfile.CHRTYPE),
                    member("vm7/apps/fifo", tarfile.FIFOTYPE), member("vm7/apps/ok.desktop")],
                   {"vm7/apps/ok.desktop": b"[Desktop Entry]\n"}, workdir, name="vm7/apps"),
        EXIT_BACKUP, "character device")
    add("v4-inner-symlink-then-write",
        hostile_v4([member("vm7/private.img", tarfile.SYMTYPE, "/tmp"),
                    member("vm7/private.img/qrecover-escape")],
                   {"vm7/private.img/qrecover-escape": b"x"}, workdir),
        EXIT_BACKUP, "written through")
    add("v4-inner-bomb", hostile_v4([], None, workdir, compressed=bomb), EXIT_BACKUP,
        "decompression bomb", partial="work/private.img")


# -- format 2 (Qubes R2-Beta3 to R2): the same damage to tar -M volumes ------
# Written by make_backup_v2.py (real tar -M, openssl enc); an attacker who
# knows the passphrase re-signs a changed volume with openssl dgst.  Not part
# of cases(): tests/test_format2_bad.py runs them.

V2_TAPE_KIB = 10  # 10 KiB volumes: the 50 KiB image spans six of them


def valid_backup_v2(workdir: Path, variant: str, encrypted: bool) -> Members:
    src = workdir / f"src-v2-{variant}-{encrypted}" / "work"
    src.mkdir(parents=True, exist_ok=True)
    rng = random.Random(9)
    (src / "private.img").write_bytes(gen.randbytes(rng, 50 * 1024))
    (src / "icon.png").write_bytes(b"\x89PNG icon")
    path = workdir / f"valid-v2-{variant}-{encrypted}"
    gen2.make_backup_v2(path, PASSPHRASE, [gen.VmSpec("work", 7, source=src)],
                        variant=variant, encrypted=encrypted, hide_names=True,
                        tape_length_kib=V2_TAPE_KIB, workdir=workdir)
    return read_outer(path)


def compressed_backup_v2(workdir: Path) -> tuple[Members, Members]:
    """An 80 MiB image that R2's writer (real ``tar -M``, ``gzip``) split into
    40 MiB volumes; and the same with its qubes.xml re-signed by an attacker who
    knows the passphrase to declare 4 KiB: that inner archive outgrows its
    budget (twice the declared size plus 64 MiB) only in its second volume."""
    src = workdir / "src-v2-budget" / "work"
    src.mkdir(parents=True, exist_ok=True)
    block = b"qrecover" * (1 << 17)  # 1 MiB, not zeros: tar --sparse keeps it all
    with (src / "private.img").open("wb") as f:
        for _ in range(80):
            f.write(block)
    path = workdir / "valid-v2-budget"
    gen2.make_backup_v2(path, PASSPHRASE, [gen.VmSpec("work", 7, source=src)], variant="r2",
                        encrypted=False, compressed=True, hide_names=True,
                        tape_length_kib=40 * 1024, workdir=workdir)
    (src / "private.img").unlink()
    valid = read_outer(path)
    path.unlink()
    plain = subprocess.run(["gzip", "-d", "-c"], input=dict(valid)["qubes.xml.000"],
                           capture_output=True, check=True).stdout
    with tarfile.open(fileobj=io.BytesIO(plain)) as tar:
        info = tar.getmembers()[0]  # the member R2's tar wrote, kept as it was
        extracted = tar.extractfile(info)
        assert extracted is not None
        doc = re.sub(rb'backup_size="[0-9]+"', b'backup_size="4096"', extracted.read())
    assert b'backup_size="4096"' in doc
    info.size = len(doc)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tar:
        tar.addfile(info, io.BytesIO(doc))
    chunk = gzip_bytes(buf.getvalue())
    new = {"qubes.xml.000": chunk, "qubes.xml.000.hmac": openssl_hmac(chunk)}
    return valid, [(n, new.get(n, d)) for n, d in valid]


def cases_v2(workdir: Path) -> list[Case]:
    """Write the format-2 cases under ``workdir``; return them."""
    workdir.mkdir(parents=True, exist_ok=True)
    result: list[Case] = []

    def add(name: str, content: Members, code: int, message: str, **kw: str) -> None:
        path = workdir / f"{name}.backup"
        write_outer(path, content)
        result.append(Case(name, str(path), code, message, **kw))

    enc = valid_backup_v2(workdir, "r2", True)
    plain = valid_backup_v2(workdir, "r2", False)
    beta3 = valid_backup_v2(workdir, "beta3", True)
    img = [n for n, _ in enc if n.startswith("vm7/private.img.") and not n.endswith(".hmac")]
    assert len(img) >= 4, img

    def without(valid: Members, *drop: str) -> Members:
        return [(n, d) for n, d in valid if n not in drop]

    def resigned(valid: Members, name: str, data: bytes) -> Members:
        new = {name: data, name + ".hmac": openssl_hmac(data)}
        return [(n, new.get(n, d)) for n, d in valid]

    add("v2-wrong-passphrase", enc, EXIT_AUTH, "passphrase", passphrase="not it")
    add("v2-beta3-wrong-passphrase", beta3, EXIT_AUTH, "qubes.xml.000", passphrase="not it")
    add("v2-header-tampered", [(n, d.replace(b"True", b"False") if n == "backup-header" else d)
                               for n, d in enc], EXIT_AUTH, "backup-header")
    add("v2-header-version-2", [*signed_header(b"version=2\n" + enc[0][1]), *enc[2:]],
        EXIT_BACKUP, "names version=2")
    flipped = bytearray(dict(enc)[img[1]])
    flipped[40] ^= 1
    add("v2-chunk-byte-flipped", [(n, bytes(flipped) if n == img[1] else d) for n, d in enc],
        EXIT_BACKUP, img[1], partial="work/private.img")
    add("v2-chunk-missing-middle", without(enc, img[2], img[2] + ".hmac"), EXIT_BACKUP,
        f"{img[2]}: chunk missing", partial="work/private.img")
    add("v2-chunk-last-missing", without(enc, img[-1], img[-1] + ".hmac"), EXIT_BACKUP,
        f"continues in {img[-1]}", partial="work/private.img")
    # a later volume replaced by a whole (authentic) tar: no continuation header
    alone = inner_tar([member("vm7/private.img")], {"vm7/private.img": b"x" * 700})
    add("v2-volume-not-continued", resigned(plain, img[1], alone), EXIT_BACKUP,
        "continuation", partial="work/private.img")
    add("v2-inner-device-and-fifo",
        resigned(plain, "vm7/icon.png.000",
                 inner_tar([member("vm7/icon.png"), member("vm7/null", tarfile.CHRTYPE),
                            member("vm7/fifo", tarfile.FIFOTYPE)], {"vm7/icon.png": b"png"})),
        EXIT_BACKUP, "character device")
    add("v2-inner-dotdot",
        resigned(plain, "vm7/icon.png.000",
                 inner_tar([member("vm7/icon.png/../../../escape")],
                           {"vm7/icon.png/../../../escape": b"x"})), EXIT_BACKUP, "outside")
    add("v2-inner-absolute",
        resigned(plain, "vm7/icon.png.000",
                 inner_tar([member("/tmp/qrecover-escape")], {"/tmp/qrecover-escape": b"x"})),
        EXIT_BACKUP, "outside")
    # a chunk that gunzips past any volume (256 MiB), and a budget outgrown
    # across volumes: scratch and the output stay bounded whatever is signed
    if not BOMB_GZ:
        bomb_members()
    gzipped, outgrown = compressed_backup_v2(workdir)
    assert "vm7/private.img.002" in dict(gzipped)  # three volumes
    add("v2-chunk-expands-past-256-mib", resigned(gzipped, "vm7/private.img.001", BOMB_GZ),
        EXIT_BACKUP, "vm7/private.img.001: expands past", partial="work/private.img")
    add("v2-budget-outgrown-across-volumes", outgrown, EXIT_BACKUP, "decompression bomb",
        partial="work/private.img")
    return result


# -- format 1 (Qubes R1): crafted folders ------------------------------------
#
# Each starts from a folder written by make_backup_v1.py (R1's own mkdir -p and
# cp -rp) and is changed with the plain file-system calls a damaged copy or an
# attacker would use.  Format 1 authenticates nothing, so what is checked is
# everything else: names, links, special files, and what is reported.


@dataclass
class CaseV1:
    name: str
    path: str
    code: int  # the documented exit code
    message: str  # must appear on stderr
    restored: tuple[str, ...] = ()  # output paths that must be there afterwards
    absent: tuple[str, ...] = ()  # output paths that must not be there
    as_nobody: bool = False  # run by an ordinary user (root reads every file)
    root_only: bool = False  # could only be made as root (a device node)


_TREES_V1: dict[Path, tuple[list[gen.VmSpec], Path]] = {}


def valid_backup_v1(workdir: Path, name: str) -> Path:
    """A small R1 folder of the sample VMs (work, untrusted, sys-net, fedora-23,
    standalone) and dom0's home, written by make_backup_v1.py."""
    import make_backup_v1 as gen1

    if workdir not in _TREES_V1:  # one source tree, copied into every case
        _TREES_V1[workdir] = gen.make_sample_tree(workdir / "src-v1", image_mb=2)
    vms, home = _TREES_V1[workdir]
    target = workdir / "v1"
    target.mkdir(exist_ok=True)
    manifest = gen1.make_backup_v1(target, vms, dom0_home=home, folder_name=name)
    return Path(manifest.path)


def cases_v1(workdir: Path) -> list[CaseV1]:
    """Write every format-1 case under ``workdir``; return them."""
    workdir.mkdir(parents=True, exist_ok=True)
    outside = workdir / "outside-v1"
    outside.mkdir(exist_ok=True)
    (outside / "private.img").write_bytes(b"a file outside the backup folder\n")
    (outside / "secret.txt").write_bytes(b"secret outside the backup\n")
    result: list[CaseV1] = []

    def add(name: str, change: Callable[[Path], object], code: int, message: str,
            restored: tuple[str, ...] = (), absent: tuple[str, ...] = (),
            as_nobody: bool = False, root_only: bool = False) -> None:
        folder = valid_backup_v1(workdir, name)
        change(folder)
        result.append(CaseV1(name, str(folder), code, message, restored, absent,
                             as_nobody, root_only))

    def rm(rel: str) -> Callable[[Path], object]:
        return lambda f: subprocess.run(["rm", "-rf", "--", str(f / rel)], check=True)

    def link(rel: str, target: Path) -> Callable[[Path], object]:
        def change(f: Path) -> None:
            subprocess.run(["rm", "-rf", "--", str(f / rel)], check=True)
            os.symlink(target, f / rel)
        return change

    def fifo(f: Path) -> None:
        os.mkfifo(f / "appvms/work/pipe")
        os.mkfifo(f / "dom0-home/user/Documents/pipe")

    def unix_socket(f: Path) -> None:
        import socket

        here = os.getcwd()
        os.chdir(f / "dom0-home/user")  # bound by a short name: paths may pass 108 bytes
        try:
            with socket.socket(socket.AF_UNIX) as sock:
                sock.bind("sock")
        finally:
            os.chdir(here)

    def write(rel: str, data: bytes) -> Callable[[Path], object]:
        return lambda f: (f / rel).write_bytes(data)

    def xml_edit(old: str, new: str) -> Callable[[Path], object]:
        def change(f: Path) -> None:
            xml = (f / "qubes.xml").read_text(encoding="utf-8")
            assert old in xml, old
            (f / "qubes.xml").write_text(xml.replace(old, new, 1), encoding="utf-8")
        return change

    add("v1-vm-folder-missing", rm("appvms/untrusted"), 0, "untrusted",
        restored=("work/private.img",), absent=("untrusted",))
    add("v1-private-img-missing", rm("appvms/work/private.img"), EXIT_BACKUP,
        "appvms/work/private.img: missing", restored=("work/icon.png", "untrusted/private.img"))
    add("v1-vm-folder-symlink-out", link("appvms/work", outside), EXIT_BACKUP,
        "symbolic link", restored=("untrusted/private.img",), absent=("work",))
    add("v1-tree-folder-symlink-out", link("appvms", outside), EXIT_BACKUP,
        "symbolic link", restored=("sys-net/private.img",), absent=("work", "untrusted"))
    add("v1-template-symlink-out", link("vm-templates/fedora-23", outside), EXIT_BACKUP,
        "symbolic link", restored=("work/private.img",), absent=("fedora-23",))
    add("v1-file-symlink-out", link("appvms/work/private.img", outside / "secret.txt"), 0,
        "", restored=("work/private.img", "work/icon.png"))
    add("v1-qubes-xml-symlink", link("qubes.xml", outside / "secret.txt"), EXIT_BACKUP,
        "qubes.xml: is a symbolic link")
    add("v1-fifo", fifo, EXIT_BACKUP, "FIFO, not restored",
        restored=("work/private.img", "dom0-home/user/.bashrc"),
        absent=("work/pipe", "dom0-home/user/Documents/pipe"))
    add("v1-socket", unix_socket, EXIT_BACKUP, "socket, not restored",
        restored=("dom0-home/user/.bashrc",), absent=("dom0-home/user/sock",))
    if os.geteuid() == 0:  # mknod needs root; the case is made only where it can be
        add("v1-device-node", lambda f: os.mknod(f / "dom0-home/user/null",
                                                  0o600 | 0o020000, os.makedev(1, 3)),
            EXIT_BACKUP, "character device", restored=("dom0-home/user/.bashrc",),
            absent=("dom0-home/user/null",), root_only=True)
    add("v1-qubes-xml-missing", rm("qubes.xml"), EXIT_BACKUP, "qubes.xml: missing")
    add("v1-qubes-xml-truncated",
        lambda f: (f / "qubes.xml").write_bytes((f / "qubes.xml").read_bytes()[:700]),
        EXIT_BACKUP, "qubes.xml: not well-formed XML")
    add("v1-qubes-xml-garbage",
        write("qubes.xml", bytes(random.Random(11).getrandbits(8) for _ in range(3000))),
        EXIT_BACKUP, "qubes.xml")
    add("v1-dir-path-dotdot",
        xml_edit('dir_path="/var/lib/qubes/appvms/work"',
                 'dir_path="/var/lib/qubes/appvms/../../../etc"'),
        EXIT_BACKUP, "unexpected dir_path")
    add("v1-dir-path-absolute",
        xml_edit('dir_path="/var/lib/qubes/appvms/work"', 'dir_path="/etc"'),
        EXIT_BACKUP, "unexpected dir_path")
    add("v1-vm-name-dotdot", xml_edit('name="work"', 'name="../../etc"'),
        EXIT_BACKUP, "refusing VM name")
    add("v1-unreadable-file", lambda f: os.chmod(f / "appvms/work/firewall.xml", 0),
        EXIT_BACKUP, "Permission denied", restored=("work/private.img",),
        absent=("work/firewall.xml",), as_nobody=True)
    add("v1-entry-name-newline", write("appvms/work/evil\nname", b"x"), EXIT_BACKUP,
        "a name R1's writer never gave", restored=("work/private.img",))
    add("v1-dom0-two-homes",
        lambda f: subprocess.run(["cp", "-rp", str(f / "dom0-home/user"),
                                  str(f / "dom0-home/other")], check=True),
        EXIT_BACKUP, "holds 2 folders", restored=("work/private.img",), absent=("dom0-home",))

    packed = valid_backup_v1(workdir, "v1-packed")
    tar_path = workdir / "v1-packed.tar"
    subprocess.run(["tar", "-c", "-f", str(tar_path), "-C", str(packed.parent), packed.name],
                   check=True)
    result.append(CaseV1("v1-packed-tar", str(tar_path), EXIT_BACKUP, "packed into an archive"))
    return result


def main(argv: list[str] | None = None) -> int:
    args = argv if argv is not None else sys.argv[1:]
    if len(args) != 1 or args[0].startswith("-"):
        print("usage: make_bad_backups.py DIR", file=sys.stderr)
        return 2
    folder = Path(args[0])
    made = cases(folder) + cases_v2(folder / "v2")
    (folder / "cases.json").write_text(json.dumps([asdict(c) for c in made], indent=2))
    print(f"{len(made)} cases in {folder}")


    made = cases(folder)
    made_v1 = cases_v1(folder / "format1")  # format 1: folders (its own section)
    docs = [asdict(c) for c in made] + [asdict(c) for c in made_v1]
    (folder / "cases.json").write_text(json.dumps(docs, indent=2))
    print(f"{len(docs)} cases in {folder}")
    return 0


if __name__ == "__main__":
    os.umask(0o022)
    sys.exit(main())
