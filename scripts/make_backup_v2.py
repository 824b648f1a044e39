#!/usr/bin/env python3
"""Write Qubes OS backup format 2 files (Qubes R2-Beta3 to R2) for tests of qrecover.

The backup is produced the way ``core/backup.py`` of qubes-core-admin wrote it
from v2.1.34 (R2-Beta3) to v2.1.63 (R2), by running the same real programs
(see fixtures/README.md, "Format 2", for the facts and the commits read):

* per stored file, one ``tar -Pc --sparse -f PIPE --tape-length KIB -C DIR
  --xform ... BASENAME``: a GNU *multi-volume* tar whose volumes are the chunks
  (the writer answered tar's "prepare volume" prompt itself; here a
  ``--new-volume-script`` moves each finished volume aside, which gives the
  same volume bytes);
* each volume on its own: ``openssl enc -e -aes-256-cbc -pass pass:P`` (with
  ``-md md5``, OpenSSL 1.0's implicit digest), or ``gzip`` when unencrypted
  and compressed, or nothing; R2-Beta3 compressed encrypted volumes with
  ``openssl enc -z`` (zlib, then encryption);
* the chunk's HMAC: ``openssl dgst -ALG -hmac P`` reading it on stdin (R2-Beta3:
  no ``-ALG``, OpenSSL 1.0's default MD5), written as ``(stdin)= HEX``;
* every chunk and ``.hmac`` appended to the backup file as its own
  ``tar -cO --posix`` archive (``backup-header``/``.hmac`` first, except in
  R2-Beta3, which wrote no header).

Stdlib-only; never imports ``qrecover``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import stat
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from make_backup import (  # sibling script, stdlib-only too
    HMAC_STYLES,
    BackupError,
    StoredFile,
    VmSpec,
    _append_member,
    _check_safe,
    _hmac_file,
    _parse_vm,
    _Planned,
    _validate,
    _vm_files,
    _walk,
    build_qubes_xml,
    disk_usage,
    make_sample_tree,
)

__all__ = [
    "DEFAULT_TAPE_LENGTH_KIB",
    "VARIANTS",
    "BackupManifestV2",
    "expected_members_v2",
    "header_text_v2",
    "main",
    "make_backup_v2",
    "openssl_has_zlib",
    "xform_target",
]

# `--tape-length 100000`: GNU tar counts in units of 1024 bytes.
DEFAULT_TAPE_LENGTH_KIB = 100000
# A volume is a whole number of records (blocking factor 20 = 10240 bytes).
_RECORD = 10240
# "r2": v2.1.39 to v2.1.63 (header without `version`); "beta3": v2.1.34 to
# v2.1.38 (R2-Beta3: no header, HMAC with openssl's default digest).
VARIANTS = ("r2", "beta3")
# OpenSSL 1.0's default `dgst` digest, what R2-Beta3's `openssl dgst -hmac` used.
BETA3_HMAC = "md5"

_NEW_VOLUME_SCRIPT = """#!/bin/sh
# Called by tar when a volume is full: keep it as NAME.NNN (0-based) and let
# tar reopen NAME for the next volume.
n=$(( TAR_VOLUME - 2 ))
mv "$TAR_ARCHIVE" "$TAR_ARCHIVE.$(printf %03d "$n")" || exit 1
"""


@dataclass
class BackupManifestV2:
    """What was written; JSON-serialisable through ``to_json()``."""

    path: str
    passphrase: str
    variant: str
    header: dict[str, str] | None  # None: no backup-header (R2-Beta3)
    encrypted: bool
    compressed: bool
    hmac_algorithm: str  # as given to `openssl dgst -ALG` ("md5" for Beta3)
    crypto_algorithm: str
    tape_length_kib: int
    hide_names: bool
    hmac_style: str = "openssl1"
    zlib_via: str | None = None  # "openssl -z", or "pigz -z" (stand-in), if used
    files: list[StoredFile] = field(default_factory=list)
    vms: list[dict[str, Any]] = field(default_factory=list)
    qubes_xml: str = ""

    @property
    def volume_size(self) -> int:
        return self.tape_length_kib * 1024

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["volume_size"] = self.volume_size
        for entry, stored in zip(data["files"], self.files):
            entry["chunk_names"] = stored.chunk_names()
        data["member_names"] = self.member_names()
        return data

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent, ensure_ascii=False)

    def member_names(self) -> list[str]:
        """Outer archive member names, in order."""
        names = [] if self.header is None else ["backup-header", "backup-header.hmac"]
        for stored in self.files:
            for chunk in stored.chunk_names():
                names += [chunk, chunk + ".hmac"]
        return names


def header_text_v2(*, encrypted: bool, compressed: bool, hmac_algorithm: str,
                   crypto_algorithm: str) -> str:
    """backup-header as v2.1.39-v2.1.63 wrote it: four lines, no `version`."""
    return (
        f"hmac-algorithm={hmac_algorithm}\n"
        f"crypto-algorithm={crypto_algorithm}\n"
        f"encrypted={encrypted}\n"
        f"compressed={compressed}\n"
    )


def openssl_has_zlib() -> bool:
    """Whether this OpenSSL can still run `openssl enc -z` (most builds cannot)."""
    proc = subprocess.run(
        ["openssl", "enc", "-e", "-aes-256-cbc", "-md", "md5", "-pass", "pass:x", "-z"],
        input=b"probe", capture_output=True, check=False,
    )
    return proc.returncode == 0


def _run(argv: list[str], stdin: IO[bytes], stdout: IO[bytes], what: str) -> None:
    proc = subprocess.run(argv, stdin=stdin, stdout=stdout, stderr=subprocess.PIPE,
                          check=False)
    if proc.returncode != 0:
        raise BackupError(f"{what} failed: {proc.stderr.decode(errors='replace')[-2000:]}")


@dataclass
class _Opts:
    passphrase: str
    variant: str
    encrypted: bool
    compressed: bool
    hmac_algorithm: str
    crypto_algorithm: str
    tape_length_kib: int
    hmac_style: str
    zlib_via: str | None


def _encode_volume(volume: Path, chunk: Path, opts: _Opts) -> None:
    """One volume -> one chunk: encrypt, or gzip, or copy (the writer's choice)."""
    with volume.open("rb") as src, chunk.open("wb") as dst:
        if opts.encrypted:
            enc = ["openssl", "enc", "-e", "-" + opts.crypto_algorithm, "-md", "md5",
                   "-pass", "pass:" + opts.passphrase]
            if not opts.compressed:
                _run(enc, src, dst, f"openssl enc of {chunk.name}")
            elif opts.zlib_via == "openssl -z":
                _run([*enc, "-z"], src, dst, f"openssl enc -z of {chunk.name}")
            else:
                # Stand-in for `openssl enc -z`: OpenSSL 1.0 deflated the data
                # into a zlib (RFC 1950) stream, then encrypted it.
                zproc = subprocess.Popen(["pigz", "-z", "-c"], stdin=src,
                                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
                assert zproc.stdout is not None
                _run(enc, zproc.stdout, dst, f"openssl enc of {chunk.name}")
                zproc.stdout.close()
                if zproc.wait() != 0:
                    raise BackupError(f"pigz -z of {chunk.name} failed")
        elif opts.compressed:
            _run(["gzip"], src, dst, f"gzip of {chunk.name}")
        else:
            shutil.copyfileobj(src, dst)


def _store_file(out: IO[bytes], stage: Path, voldir: Path, item: _Planned,
                opts: _Opts, script: Path) -> tuple[int, int]:
    """Write one stored file's chunks (and .hmac) to the backup; return
    (number of chunks, bytes of the multi-volume tar)."""
    base = os.path.basename(item.path)
    if opts.variant == "beta3":
        xform = f"s:^[^/]:{item.subdir}\\0:"
    else:
        xform = f"s:^{base}:{item.subdir}\\0:"
    archive = voldir / "volume"
    proc = subprocess.run(
        ["tar", "-Pc", "--sparse", "-f", str(archive),
         "--tape-length", str(opts.tape_length_kib), f"--new-volume-script={script}",
         "-C", os.path.dirname(item.path), "--xform", xform, base],
        stdin=subprocess.DEVNULL, capture_output=True, check=False,
    )
    if proc.returncode != 0:
        raise BackupError(f"tar of {item.path} failed: {proc.stderr.decode(errors='replace')}")
    volumes = sorted(voldir.glob("volume.*"), key=lambda p: int(p.suffix[1:]))
    volumes.append(archive)  # the last volume keeps the name tar was given
    stored = os.path.join(item.subdir, base)
    # os.path, not pathlib: pathlib drops the "." of a template's "vm3/.".
    os.makedirs(os.path.dirname(os.path.join(stage, stored)), exist_ok=True)
    total = 0
    for i, volume in enumerate(volumes):
        rel = f"{stored}.{i:03d}"
        total += volume.stat().st_size
        _encode_volume(volume, Path(os.path.join(stage, rel)), opts)
        volume.unlink()
        algorithm = BETA3_HMAC if opts.variant == "beta3" else opts.hmac_algorithm
        _hmac_file(stage / rel, stage / (rel + ".hmac"), opts.passphrase, algorithm,
                   opts.hmac_style)
        _append_member(out, stage, rel)
        _append_member(out, stage, rel + ".hmac")
    return len(volumes), total


def _plan(vms: list[VmSpec], hide_names: bool) -> list[_Planned]:
    """R2's order: AppVMs, then Net/Proxy VMs, then templates (each by qid)."""
    backed = sorted((vm for vm in vms if vm.source is not None), key=lambda v: v.qid)
    planned: list[_Planned] = []
    for group in ([v for v in backed if not v.is_template and not v.is_netvm],
                  [v for v in backed if v.is_netvm],
                  [v for v in backed if v.is_template]):
        for vm in group:
            planned += _vm_files(vm, hide_names)
    return planned


def make_backup_v2(
    out: Path,
    passphrase: str,
    vms: list[VmSpec],
    *,
    dom0_home: Path | None = None,
    dom0_user: str = "user",
    variant: str = "r2",
    encrypted: bool = True,
    compressed: bool = False,
    hmac_algorithm: str = "SHA512",
    crypto_algorithm: str = "aes-256-cbc",
    tape_length_kib: int = DEFAULT_TAPE_LENGTH_KIB,
    hide_names: bool | None = None,
    hmac_style: str = "openssl1",
    workdir: Path | None = None,
) -> BackupManifestV2:
    """Write a format-2 backup of ``vms`` (and dom0's home) to ``out``.

    ``hide_names`` defaults to ``encrypted`` (qvm-backup passed
    ``hide_vm_names=options.encrypt``). ``variant="r2"`` refuses
    encrypted+compressed as v2.1.39+ did; ``"beta3"`` allows it (`-z`).
    """
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}")
    if variant == "r2" and encrypted and compressed:
        raise ValueError("R2 (v2.1.39+) refused compressed and encrypted backups")
    if variant == "beta3" and crypto_algorithm != "aes-256-cbc":
        raise ValueError("R2-Beta3 always used aes-256-cbc")
    if hmac_style not in HMAC_STYLES:
        raise ValueError(f"hmac_style must be one of {HMAC_STYLES}")
    if tape_length_kib < 1 or (tape_length_kib * 1024) % _RECORD:
        raise ValueError("tape length must be a positive multiple of 10 KiB")
    _check_safe("hmac algorithm", hmac_algorithm)
    _check_safe("crypto algorithm", crypto_algorithm)
    _validate(vms)
    if hide_names is None:
        hide_names = encrypted
    zlib_via = None
    if variant == "beta3" and encrypted and compressed:
        zlib_via = "openssl -z" if openssl_has_zlib() else "pigz -z"
    opts = _Opts(passphrase, variant, encrypted, compressed, hmac_algorithm,
                 crypto_algorithm, tape_length_kib, hmac_style, zlib_via)

    out = Path(out)
    workroot = Path(tempfile.mkdtemp(prefix="qrecover-mkbackup2-", dir=workdir))
    try:
        stage = workroot / "stage"
        voldir = workroot / "volumes"
        srcdir = workroot / "src"
        for folder in (stage, voldir, srcdir):
            folder.mkdir()
        script = workroot / "new-volume"
        script.write_text(_NEW_VOLUME_SCRIPT, encoding="ascii")
        script.chmod(0o755)

        sizes = {vm.name: disk_usage(vm.source) for vm in vms if vm.source is not None}
        planned = _plan(vms, hide_names)
        dom0_backup: tuple[str, int] | None = None
        if dom0_home is not None:
            home = Path(dom0_home)
            if not home.is_dir():
                raise ValueError(f"dom0 home {home} is not a directory")
            if home.name != dom0_user:
                copy = srcdir / "home" / dom0_user
                copy.parent.mkdir()
                subprocess.run(["cp", "-a", "--sparse=always", str(home), str(copy)],
                               check=True)
                home = copy
            dom0_backup = (f"dom0-home/{dom0_user}", disk_usage(home))
            planned.append(_Planned(str(home), "dom0-home/", "dom0", str(dom0_home)))
        xml = build_qubes_xml(vms, hide_names=hide_names, sizes=sizes, dom0_backup=dom0_backup)
        (srcdir / "qubes.xml").write_text(xml, encoding="utf-8")
        planned.insert(0, _Planned(str(srcdir / "qubes.xml"), "", None, "<generated>"))

        header = None
        if variant == "r2":
            header = header_text_v2(encrypted=encrypted, compressed=compressed,
                                    hmac_algorithm=hmac_algorithm,
                                    crypto_algorithm=crypto_algorithm)
        manifest = BackupManifestV2(
            path=str(out), passphrase=passphrase, variant=variant,
            header=None if header is None else dict(
                line.split("=", 1) for line in header.splitlines()),
            encrypted=encrypted, compressed=compressed,
            hmac_algorithm=BETA3_HMAC if variant == "beta3" else hmac_algorithm,
            crypto_algorithm=crypto_algorithm, tape_length_kib=tape_length_kib,
            hide_names=hide_names, hmac_style=hmac_style, zlib_via=zlib_via, qubes_xml=xml,
        )
        for vm in vms:
            entry: dict[str, Any] = asdict(vm)
            entry["source"] = None if vm.source is None else str(vm.source)
            entry["backup_content"] = vm.source is not None
            entry["backup_path"] = vm.backup_path(hide_names) if vm.source else None
            entry["backup_size"] = sizes.get(vm.name)
            entry["dir_path"] = vm.dir_path
            manifest.vms.append(entry)

        with out.open("wb") as fh:
            if header is not None:
                (stage / "backup-header").write_text(header, encoding="ascii")
                _hmac_file(stage / "backup-header", stage / "backup-header.hmac",
                           passphrase, hmac_algorithm, hmac_style)
                _append_member(fh, stage, "backup-header")
                _append_member(fh, stage, "backup-header.hmac")
            for item in planned:
                chunks, total = _store_file(fh, stage, voldir, item, opts, script)
                manifest.files.append(StoredFile(
                    name=os.path.join(item.subdir, os.path.basename(item.path)),
                    chunks=chunks, vm=item.vm, source=item.origin or item.path,
                    stream_size=total, disk_usage=disk_usage(Path(item.path)),
                ))
        return manifest
    except BaseException:
        out.unlink(missing_ok=True)  # no half-written backup left behind
        raise
    finally:
        shutil.rmtree(workroot, ignore_errors=True)


def xform_target(variant: str, stored: str, target: str) -> str:
    """A symlink target as the writer's ``--xform`` left it: GNU tar applies
    the transform to symlink targets as well as to names. Beta3's
    ``s:^[^/]:SUBDIR\\0:`` prefixes every relative target; R2's
    ``s:^BASENAME:SUBDIR\\0:`` (BASENAME a regex: "." matches any character)
    rewrites targets that start like the stored file's basename, which for a
    template (BASENAME ".") is every target, absolute ones included."""
    subdir, base = os.path.split(stored)
    subdir = subdir + "/" if subdir else ""
    if variant == "beta3":
        pattern = r"^[^/]"
    else:
        pattern = "^" + "".join("." if c == "." else re.escape(c) for c in base)
    return re.sub(pattern, lambda m: subdir + m.group(0), target, count=1)


def expected_members_v2(manifest: BackupManifestV2) -> list[dict[str, Any]]:
    """Inner tar members of every stored file except qubes.xml, as GNU tar
    names them after the --xform. R2 did not pass --dereference: symlinks
    are members of their own, and tar applied the --xform to their targets
    too (see ``xform_target``)."""
    result: list[dict[str, Any]] = []
    for stored in manifest.files:
        if stored.vm is None:
            continue
        for rel, full in _walk(Path(stored.source)):
            name = stored.name + ("/" + rel if rel else "")
            st = full.lstat()
            entry: dict[str, Any] = {"stored": stored.name, "name": name}
            if stat.S_ISLNK(st.st_mode):
                target = xform_target(manifest.variant, stored.name, os.readlink(full))
                entry.update(type="symlink", target=target)
            elif stat.S_ISDIR(st.st_mode):
                entry.update(type="dir")
            else:
                digest = hashlib.sha256(full.read_bytes())
                entry.update(type="file", size=st.st_size, sha256=digest.hexdigest())
            result.append(entry)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Write a Qubes R2 (format 2) backup with the real tar -M/openssl/gzip.",
    )
    parser.add_argument("out", type=Path, help="backup file to write")
    parser.add_argument("--passphrase-file", type=Path, required=True,
                        help="file whose first line is the passphrase")
    parser.add_argument("--vm", action="append", type=_parse_vm, default=[],
                        metavar="NAME:QID:KLASS:SOURCEDIR[:TEMPLATE]",
                        help="a VM; SOURCEDIR '-' = listed in qubes.xml only")
    parser.add_argument("--dom0-home", type=Path)
    parser.add_argument("--dom0-user", default="user")
    parser.add_argument("--variant", default="r2", choices=VARIANTS,
                        help="r2: v2.1.39-63, header without version; "
                             "beta3: R2-Beta3, no header, HMAC-MD5")
    parser.add_argument("--no-encrypt", action="store_true")
    parser.add_argument("--compress", action="store_true",
                        help="gzip each volume (unencrypted), or `openssl enc -z` (beta3)")
    parser.add_argument("--hmac", choices=["SHA512", "SHA1", "SHA256"],
                        help="r2 only (default SHA512): SHA1 to v2.1.61, SHA512 from "
                             "v2.1.62; beta3 always used openssl's default, MD5")
    parser.add_argument("--crypto", default="aes-256-cbc")
    parser.add_argument("--hmac-style", default="openssl1", choices=HMAC_STYLES)
    parser.add_argument("--tape-length", type=int, default=DEFAULT_TAPE_LENGTH_KIB,
                        metavar="KIB", help="volume (= chunk) size in KiB, multiple of 10")
    parser.add_argument("--plain-paths", action="store_true",
                        help="store under appvms/NAME/... even when encrypted")
    parser.add_argument("--hidden-paths", action="store_true",
                        help="store under vmQID/... even when not encrypted")
    parser.add_argument("--workdir", type=Path)
    parser.add_argument("--sample", type=Path, metavar="DIR",
                        help="build the sample VM tree into DIR (must not exist) and back it up")
    parser.add_argument("--image-mb", type=int, default=8, help="sample image size")
    parser.add_argument("--manifest", type=Path, help="write the manifest JSON here")
    parser.add_argument("--contents", type=Path,
                        help="write the expected inner members (JSON) here")
    args = parser.parse_args(argv)

    if args.variant == "beta3" and args.hmac is not None:
        parser.error("--hmac: R2-Beta3 always used HMAC-MD5")
    lines = args.passphrase_file.read_text(encoding="utf-8").splitlines()
    if not lines or not lines[0]:
        parser.error("empty passphrase file")
    vms: list[VmSpec] = list(args.vm)
    dom0_home: Path | None = args.dom0_home
    if args.sample is not None:
        if vms:
            parser.error("--sample and --vm are exclusive")
        if args.sample.exists():
            parser.error(f"{args.sample} already exists")
        vms, sample_home = make_sample_tree(args.sample, image_mb=args.image_mb)
        if dom0_home is None:
            dom0_home = sample_home
    hide: bool | None = None
    if args.plain_paths:
        hide = False
    if args.hidden_paths:
        hide = True
    try:
        manifest = make_backup_v2(
            args.out, lines[0], vms, dom0_home=dom0_home, dom0_user=args.dom0_user,
            variant=args.variant, encrypted=not args.no_encrypt, compressed=args.compress,
            hmac_algorithm=args.hmac or "SHA512", crypto_algorithm=args.crypto,
            tape_length_kib=args.tape_length, hide_names=hide,
            hmac_style=args.hmac_style, workdir=args.workdir,
        )
    except (BackupError, ValueError) as exc:
        print(f"make_backup_v2: {exc}", file=sys.stderr)
        return 1
    if args.manifest is not None:
        args.manifest.write_text(manifest.to_json() + "\n", encoding="utf-8")
    if args.contents is not None:
        args.contents.write_text(
            json.dumps(expected_members_v2(manifest), indent=1, ensure_ascii=False) + "\n",
            encoding="utf-8",
        )
    total = sum(f.chunks for f in manifest.files)
    print(f"wrote {args.out}: {len(manifest.files)} stored files, {total} chunks",
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
