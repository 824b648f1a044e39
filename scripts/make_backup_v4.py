#!/usr/bin/env python3
"""Write Qubes OS backup format 4 files (Qubes R4.x) for tests of qrecover.

The backup is produced the way the Qubes R4 writer (qubes-core-admin,
``qubes/backup.py``) produced it:

* ``backup-header`` (``version=4``, ``encrypted=True``, ``compressed``,
  ``compression-filter``, ``hmac-algorithm=scrypt``, ``backup-id``) and
  ``backup-header.hmac``, which is ``scrypt enc`` of the header under the
  passphrase ``backup-header!PASSPHRASE``;
* per stored file, an inner tar archive, compressed as a whole:
  - VM volumes (``private.img``, and ``root.img`` for templates and
    standalone VMs) as R4's own tar writer wrote them (its
    ``qubes.tarwriter``, used for LVM volumes, R4's default storage): one
    PAX member with GNU sparse 1.0 (``GNU.sparse.major=1``, ``minor=0``,
    ``name``, ``realsize``; ustar name ``vm7/GNUSparseFile.PID/private.img``;
    the sparse map as text at the start of the data), data found by looking
    for all-zero 512-byte blocks, piped through the bare compression program
    (``gzip``).  ``volume_writer="gnutar"`` instead stores volumes the way R4
    did on a file pool: with the GNU tar command below;
  - other files (``firewall.xml``, dom0's home, ``qubes.xml``) with
    ``tar -Pc --sparse -C DIR [--dereference] --xform=s:^BASE:SUBDIR\\0:
    [--use-compress-program=FILTER] BASE``;
* the compressed stream is cut into 100 MiB chunks, each encrypted on its own
  by ``scrypt enc`` under ``BACKUPID!NAME.NNN!PASSPHRASE`` into
  ``NAME.NNN.enc`` (an exact multiple of the chunk size gets one more, empty,
  chunk, as R4's loop did);
* every member is appended to the backup as its own
  ``tar -cO --posix -C STAGE RELPATH`` archive; no ``.hmac`` members.

VMs are always stored under ``vmQID/`` (R4 always hid names) and the R4
qubes.xml (``<qubes><domains><domain class=...>``) has the features
``backup-content``, ``backup-path`` (``vm7/``, with R4's trailing slash;
``dom0-home/USER`` for dom0) and ``backup-size``.

R4 ran ``scrypt enc`` with its default cost (several seconds and up to
gigabytes of memory per chunk, chosen from the machine); ``kdf="fast"``
(the default here) uses ``--logN 10 -r 8 -p 1`` instead so that tests stay
fast, ``kdf="r4"`` the defaults, ``kdf="time1"`` ``-t 1`` (about a second of
key derivation per chunk, chosen by scrypt from this machine: a real cost for
benchmarks that stay short).  Both give files any scrypt decrypts.  The
writer needs scrypt >= 1.3 (``--passphrase env:``, ``--logN``).

Stdlib-only, and never imports anything from ``qrecover``: it is the
independent reference writer the restore code is tested against.
"""

from __future__ import annotations

import argparse
import datetime
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from make_backup import (  # sibling script, stdlib-only too
    COMPRESSION_FILTERS,
    DEFAULT_CHUNK_SIZE,
    BackupError,
    BackupManifest,
    StoredFile,
    VmSpec,
    _append_member,
    _copy_chunk,
    _tail,
    disk_usage,
    expected_members,
    make_sample_tree,
)

__all__ = [
    "FAST_KDF",
    "KDF_MODES",
    "BackupManifestV4",
    "build_qubes_xml_r4",
    "header_text_v4",
    "main",
    "make_backup_v4",
    "r4_class",
    "write_sparse_pax",
]

FORMAT_VERSION = "4"
FAST_KDF = ("--logN", "10", "-r", "8", "-p", "1")
# The scrypt enc options of each --kdf mode ("r4": none, scrypt's defaults).
KDF_MODES: dict[str, tuple[str, ...]] = {"fast": FAST_KDF, "r4": (), "time1": ("-t", "1")}
VOLUME_WRITERS = ("tarwriter", "gnutar")
BLOCK = 512
_READ = 1024 * 1024
_SCRYPT_ENV = "QRECOVER_MKBACKUP_SCRYPT_PASS"


class BackupManifestV4(BackupManifest):
    """The manifest of a format-4 backup: chunks are ``NAME.NNN.enc``, no .hmac."""

    def member_names(self) -> list[str]:
        names = ["backup-header", "backup-header.hmac"]
        for stored in self.files:
            names += [chunk + ".enc" for chunk in stored.chunk_names()]
        return names


def r4_class(vm: VmSpec) -> str:
    """The R4 class of a VM described with its R3 class name."""
    if vm.is_template:
        return "TemplateVM"
    if vm.template is None:
        return "StandaloneVM"
    return "AppVM"  # R4 has no NetVM/ProxyVM classes: provides_network instead


# --------------------------------------------------------------------------
# R4's tar writer for volumes: PAX + GNU sparse 1.0


def _data_extents(path: Path) -> Iterator[tuple[int, int]]:
    """(offset, length) of every run of 512-byte blocks that are not all zero.

    Like R4's writer it looks at the bytes (a written block of zeros is a
    hole too); holes the file system already knows are skipped unread.
    """
    size = path.stat().st_size
    zero = bytes(BLOCK)
    start: int | None = None
    pos = 0
    with path.open("rb") as fh:
        fd = fh.fileno()
        while pos < size:
            try:
                data_at = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError:  # ENXIO: nothing but a hole up to the end
                data_at = size
            if data_at > pos:  # a hole the file system knows: all zero
                if start is not None:
                    yield start, pos - start
                    start = None
                pos = data_at - data_at % BLOCK
                if pos >= size:
                    break
            try:
                hole_at = os.lseek(fd, pos, os.SEEK_HOLE)
            except OSError:
                hole_at = size
            hole_at = min(size, hole_at + -hole_at % BLOCK)
            fh.seek(pos)
            while pos < hole_at:
                buf = fh.read(min(_READ, hole_at - pos))
                if not buf:
                    hole_at = pos  # the file shrank: stop here
                    break
                for off in range(0, len(buf), BLOCK):
                    if buf[off : off + BLOCK] == zero[: len(buf) - off]:
                        if start is not None:
                            yield start, pos + off - start
                            start = None
                    elif start is None:
                        start = pos + off
                pos += len(buf)
            if pos < size and hole_at < size and pos < hole_at:
                break
    if start is not None:
        yield start, pos - start


def _sparse_map(path: Path) -> list[tuple[int, int]]:
    size = path.stat().st_size
    extents = list(_data_extents(path))
    if not extents or extents[-1][0] + extents[-1][1] < size:
        # A final empty extent at the end keeps the file's full length.
        extents.append((size, 0))
    return extents


def write_sparse_pax(src: Path, name: str, out: IO[bytes], pid: int) -> None:
    """Write ``src`` as one PAX/GNU-sparse-1.0 member named ``name``, then the
    two zero blocks that end an archive (R4's writer wrote nothing more)."""
    extents = _sparse_map(src)
    text = f"{len(extents)}\n" + "".join(f"{off}\n{length}\n" for off, length in extents)
    mapbuf = text.encode("ascii")
    mapbuf += bytes(-len(mapbuf) % BLOCK)
    info = tarfile.TarInfo(f"{os.path.dirname(name)}/GNUSparseFile.{pid}/{os.path.basename(name)}")
    info.type = tarfile.REGTYPE
    info.size = len(mapbuf) + sum(length for _off, length in extents)
    info.pax_headers = {
        "GNU.sparse.major": "1",
        "GNU.sparse.minor": "0",
        "GNU.sparse.name": name,
        "GNU.sparse.realsize": str(src.stat().st_size),
    }
    out.write(info.tobuf(tarfile.PAX_FORMAT))
    out.write(mapbuf)
    written = len(mapbuf)
    with src.open("rb") as fh:
        for off, length in extents:
            fh.seek(off)
            left = length
            while left:
                buf = fh.read(min(_READ, left))
                if not buf:
                    raise BackupError(f"{src}: shorter than its sparse map")
                out.write(buf)
                left -= len(buf)
                written += len(buf)
    out.write(bytes(-written % BLOCK))  # R4's images are whole blocks: no-op there
    out.write(bytes(2 * BLOCK))


# --------------------------------------------------------------------------
# qubes.xml (R4 form) and the header


def build_qubes_xml_r4(
    vms: list[VmSpec], *, paths: dict[str, str], sizes: dict[str, int], dom0: tuple[str, int] | None
) -> str:
    """qubes.xml as R4 saved it for the backup: every domain's backup-content
    set ("1" or ""), backup-path and backup-size for those in the backup."""
    from xml.sax.saxutils import escape

    labels = ["red", "orange", "yellow", "green", "gray", "blue", "purple", "black"]
    lines = ["<?xml version='1.0' encoding='UTF-8'?>", "<qubes>", "  <labels>"]
    lines += [
        f'    <label id="label-{i}" color="0x000000">{c}</label>'
        for i, c in enumerate(labels, 1)
    ]
    lines += ["  </labels>", "  <pools>",
              '    <pool driver="lvm_thin" name="lvm" thin_pool="pool00" '
              'volume_group="qubes_dom0"/>',
              "  </pools>", "  <properties>"]
    templates = [vm for vm in vms if vm.is_template]
    if templates:
        lines.append(f'    <property name="default_template">{templates[0].name}</property>')
    lines += ["  </properties>", "  <domains>"]

    def label_id(label: str) -> str:
        return f"label-{labels.index(label) + 1}" if label in labels else "label-1"

    def features(backed: tuple[str, int] | None) -> list[str]:
        if backed is None:
            return ['        <feature name="backup-content"></feature>']
        return [
            '        <feature name="backup-content">1</feature>',
            f'        <feature name="backup-path">{escape(backed[0])}</feature>',
            f'        <feature name="backup-size">{backed[1]}</feature>',
        ]

    lines += ['    <domain id="domain-0" class="AdminVM">', "      <properties>",
              '        <property name="label">label-8</property>', "      </properties>",
              "      <features>", *features(dom0), "      </features>", "      <tags/>",
              "    </domain>"]
    for vm in vms:
        klass = r4_class(vm)
        props = [("label", label_id(vm.label)), ("name", vm.name), ("qid", str(vm.qid))]
        if vm.template is not None:
            props.append(("template", vm.template))
        if vm.is_netvm:
            props.append(("provides_network", "True"))
        backed = (paths[vm.name], sizes[vm.name]) if vm.name in paths else None
        lines.append(f'    <domain id="domain-{vm.qid}" class="{klass}">')
        lines.append("      <properties>")
        lines += [f'        <property name="{k}">{escape(v)}</property>' for k, v in props]
        lines += ["      </properties>", "      <features>", *features(backed),
                  "      </features>", "      <tags/>", "      <volume-config>"]
        base = "vm-templates" if vm.is_template else "appvms"
        own_root = "True" if vm.updateable else "False"
        lines += [
            f'        <volume name="root" pool="lvm" save_on_stop="{own_root}" '
            f'vid="qubes_dom0/vm-{vm.name}-root"/>',
            f'        <volume name="private" pool="lvm" save_on_stop="True" '
            f'vid="qubes_dom0/vm-{vm.name}-private"/>',
            f'        <volume name="volatile" pool="lvm" vid="{base}/{vm.name}/volatile"/>',
            "      </volume-config>",
            "    </domain>",
        ]
    lines += ["  </domains>", "</qubes>"]
    return "\n".join(lines) + "\n"


def header_text_v4(*, compressed: bool, compression: str, backup_id: str) -> str:
    """backup-header as R4 wrote it: version first, then the other keys in
    R4's order; compression-filter even when not compressed."""
    lines = [
        f"version={FORMAT_VERSION}",
        "encrypted=True",
        f"compressed={compressed}",
        f"compression-filter={compression}",
        "hmac-algorithm=scrypt",
        f"backup-id={backup_id}",
    ]
    return "".join(line + "\n" for line in lines)


# --------------------------------------------------------------------------
# the writer


@dataclass
class _Opts:
    passphrase: str
    backup_id: str
    compression: str | None
    chunk_size: int
    empty_final_chunk: bool
    kdf: tuple[str, ...]


def _scrypt_enc(src: Path, dst: Path, secret: str, kdf: tuple[str, ...]) -> None:
    env = {**os.environ, _SCRYPT_ENV: secret}
    proc = subprocess.run(
        ["scrypt", "enc", *kdf, "--passphrase", f"env:{_SCRYPT_ENV}", str(src), str(dst)],
        env=env,
        capture_output=True,
        check=False,
    )
    if proc.returncode != 0:
        raise BackupError(f"scrypt enc {src.name}: {proc.stderr.decode(errors='replace')}")


@dataclass
class _Item:
    path: Path  # what is stored: a file, or dom0's home folder
    subdir: str  # "vm7/", "dom0-home/", ""
    name: str  # name in the archive: "private.img", "user", "qubes.xml"
    vm: str | None
    writer: str  # "tarwriter" or "gnutar"
    origin: str = ""


def _store(out: IO[bytes], stage: Path, plain: Path, item: _Item, opts: _Opts) -> tuple[int, int]:
    """Write one stored file's chunks; return (chunks, plaintext stream bytes)."""
    stored_rel = item.subdir + item.name
    errdir = Path(tempfile.mkdtemp(prefix="err_", dir=plain))
    procs: list[tuple[str, subprocess.Popen[bytes], Path]] = []
    tarfile_path: Path | None = None
    try:
        if item.writer == "tarwriter":
            tarfile_path = plain / "inner.tar"
            with tarfile_path.open("wb") as fh:
                write_sparse_pax(item.path, stored_rel, fh, pid=os.getpid())
            if opts.compression:
                errfile = errdir / "compress"
                with tarfile_path.open("rb") as src, errfile.open("wb") as err:
                    proc = subprocess.Popen(
                        [opts.compression], stdin=src, stdout=subprocess.PIPE, stderr=err
                    )
                procs.append((opts.compression, proc, errfile))
                assert proc.stdout is not None
                stream: IO[bytes] = proc.stdout
            else:
                stream = tarfile_path.open("rb")
        else:
            cmd = ["tar", "-Pc", "--sparse", "-f", "-", "-C", str(item.path.parent)]
            if item.subdir != "dom0-home/":
                cmd.append("--dereference")
            if opts.compression:
                cmd.append(f"--use-compress-program={opts.compression}")
            cmd += [f"--xform=s:^{item.path.name}:{item.subdir}\\0:", item.path.name]
            errfile = errdir / "tar"
            with errfile.open("wb") as err:
                proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err)
            procs.append(("tar", proc, errfile))
            assert proc.stdout is not None
            stream = proc.stdout
        (stage / item.subdir).mkdir(parents=True, exist_ok=True)
        (plain / item.subdir).mkdir(parents=True, exist_ok=True)
        index = 0
        total = 0
        while True:
            rel = f"{stored_rel}.{index:03d}"
            size = _copy_chunk(stream, plain / rel, opts.chunk_size)
            if size == 0 and index > 0 and not opts.empty_final_chunk:
                (plain / rel).unlink()
                break
            total += size
            secret = f"{opts.backup_id}!{rel}!{opts.passphrase}"
            _scrypt_enc(plain / rel, stage / (rel + ".enc"), secret, opts.kdf)
            (plain / rel).unlink()
            _append_member(out, stage, rel + ".enc")
            index += 1
            if size < opts.chunk_size:
                break
        stream.close()
        failures = [
            f"{what} exited {proc.returncode}: {_tail(errfile)}"
            for what, proc, errfile in procs
            if proc.wait() != 0
        ]
        if failures:
            raise BackupError(f"storing {item.path}: " + "; ".join(failures))
        return index, total
    finally:
        for _, proc, _ in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        if tarfile_path is not None:
            tarfile_path.unlink(missing_ok=True)
        shutil.rmtree(errdir, ignore_errors=True)


def _vm_items(vm: VmSpec, volume_writer: str) -> list[_Item]:
    """R4's files of one VM: its save_on_stop volumes (root first, as in
    volume-config), then firewall.xml if the VM has one."""
    assert vm.source is not None
    subdir = f"vm{vm.qid}/"
    volumes = ["root", "private"] if vm.updateable else ["private"]
    items = [
        _Item(vm.source / f"{vol}.img", subdir, f"{vol}.img", vm.name, volume_writer)
        for vol in volumes
        if (vm.source / f"{vol}.img").is_file()
    ]
    if (vm.source / "firewall.xml").is_file():
        items.append(_Item(vm.source / "firewall.xml", subdir, "firewall.xml", vm.name, "gnutar"))
    return items


def make_backup_v4(
    out: Path,
    passphrase: str,
    vms: list[VmSpec],
    *,
    dom0_home: Path | None = None,
    dom0_user: str = "user",
    compression: str | None = "gzip",
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    volume_writer: str = "tarwriter",
    kdf: str = "fast",
    backup_id: str | None = None,
    workdir: Path | None = None,
    empty_final_chunk: bool = True,
) -> BackupManifestV4:
    """Write a format-4 backup of ``vms`` (and dom0's home) to ``out``.

    ``compression=None`` writes ``compressed=False`` (the header still names
    gzip, as R4's did).
    """
    if compression is not None and compression not in COMPRESSION_FILTERS:
        raise ValueError(f"compression must be one of {COMPRESSION_FILTERS} or None")
    if volume_writer not in VOLUME_WRITERS:
        raise ValueError(f"volume_writer must be one of {VOLUME_WRITERS}")
    if kdf not in KDF_MODES:
        raise ValueError(f"kdf must be one of {', '.join(KDF_MODES)}")
    if chunk_size < 1:
        raise ValueError("chunk_size must be positive")
    if backup_id is None:
        backup_id = datetime.datetime.now().strftime("%Y%m%dT%H%M%S-") + str(os.getpid())
    opts = _Opts(
        passphrase=passphrase, backup_id=backup_id, compression=compression,
        chunk_size=chunk_size, empty_final_chunk=empty_final_chunk,
        kdf=KDF_MODES[kdf],
    )
    out = Path(out)
    workroot = Path(tempfile.mkdtemp(prefix="qrecover-mkbackup4-", dir=workdir))
    try:
        stage = workroot / "stage"  # what the outer tar appends (like R4's tmpdir)
        plain = workroot / "plain"  # plaintext chunks, before scrypt enc
        srcdir = workroot / "src"
        for d in (stage, plain, srcdir):
            d.mkdir()
        backed = sorted((v for v in vms if v.source is not None), key=lambda v: v.name)
        items: list[_Item] = []
        paths: dict[str, str] = {}
        sizes: dict[str, int] = {}
        for vm in backed:
            vm_items = _vm_items(vm, volume_writer)
            items += vm_items
            paths[vm.name] = f"vm{vm.qid}/"
            sizes[vm.name] = sum(disk_usage(i.path) for i in vm_items)
        dom0: tuple[str, int] | None = None
        if dom0_home is not None:
            home = Path(dom0_home)
            if not home.is_dir():
                raise ValueError(f"dom0 home {home} is not a directory")
            if home.name != dom0_user:
                copy = srcdir / "home" / dom0_user
                copy.parent.mkdir()
                subprocess.run(["cp", "-a", "--sparse=always", str(home), str(copy)], check=True)
                home = copy
            dom0 = (f"dom0-home/{dom0_user}", disk_usage(home))
            items.append(_Item(home, "dom0-home/", dom0_user, "dom0", "gnutar", str(dom0_home)))
        xml = build_qubes_xml_r4(vms, paths=paths, sizes=sizes, dom0=dom0)
        (srcdir / "qubes.xml").write_text(xml, encoding="utf-8")
        items.insert(0, _Item(srcdir / "qubes.xml", "", "qubes.xml", None, "gnutar", "<generated>"))

        header = header_text_v4(
            compressed=compression is not None, compression=compression or "gzip",
            backup_id=backup_id,
        )
        manifest = BackupManifestV4(
            path=str(out), passphrase=passphrase,
            header=dict(line.split("=", 1) for line in header.splitlines()),
            hmac_style="scrypt", chunk_size=chunk_size, hide_names=True, qubes_xml=xml,
        )
        for vm in vms:
            manifest.vms.append({
                "name": vm.name, "qid": vm.qid, "class": r4_class(vm), "template": vm.template,
                "source": None if vm.source is None else str(vm.source),
                "backup_content": vm.name in paths, "backup_path": paths.get(vm.name),
                "backup_size": sizes.get(vm.name),
            })
        with out.open("wb") as fh:
            (stage / "backup-header").write_text(header, encoding="ascii")
            _scrypt_enc(stage / "backup-header", stage / "backup-header.hmac",
                        f"backup-header!{passphrase}", opts.kdf)
            _append_member(fh, stage, "backup-header")
            _append_member(fh, stage, "backup-header.hmac")
            for item in items:
                chunks, total = _store(fh, stage, plain, item, opts)
                manifest.files.append(StoredFile(
                    name=item.subdir + item.name, chunks=chunks, vm=item.vm,
                    source=item.origin or str(item.path), stream_size=total,
                    disk_usage=disk_usage(item.path),
                ))
        return manifest
    except BaseException:
        out.unlink(missing_ok=True)
        raise
    finally:
        shutil.rmtree(workroot, ignore_errors=True)


# --------------------------------------------------------------------------
# CLI


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Write a Qubes R4 (format 4) backup with the real tar/gzip/scrypt.",
    )
    parser.add_argument("out", type=Path, help="backup file to write")
    parser.add_argument("--passphrase-file", type=Path, required=True,
                        help="file whose first line is the passphrase")
    parser.add_argument("--sample", type=Path, metavar="DIR", required=True,
                        help="build the sample VM tree into DIR (must not exist) and back it up")
    parser.add_argument("--image-mb", type=int, default=8, help="sample image size")
    parser.add_argument("--compression", default="gzip", choices=[*COMPRESSION_FILTERS, "none"])
    parser.add_argument("--chunk-size", type=int, default=DEFAULT_CHUNK_SIZE)
    parser.add_argument("--volume-writer", default="tarwriter", choices=VOLUME_WRITERS)
    parser.add_argument("--kdf", default="fast", choices=list(KDF_MODES),
                        help="scrypt cost: fast (tests), r4 (scrypt's defaults, as R4) "
                        "or time1 (scrypt enc -t 1: a real cost, about 1 s a chunk)")
    parser.add_argument("--backup-id")
    parser.add_argument("--workdir", type=Path)
    parser.add_argument("--manifest", type=Path, help="write the manifest JSON here")
    parser.add_argument("--contents", type=Path,
                        help="write the expected inner members (JSON) here")
    args = parser.parse_args(argv)
    lines = args.passphrase_file.read_text(encoding="utf-8").splitlines()
    if not lines or not lines[0]:
        parser.error("empty passphrase file")
    if args.sample.exists():
        parser.error(f"{args.sample} already exists")
    vms, home = make_sample_tree(args.sample, image_mb=args.image_mb)
    try:
        manifest = make_backup_v4(
            args.out, lines[0], vms, dom0_home=home,
            compression=None if args.compression == "none" else args.compression,
            chunk_size=args.chunk_size, volume_writer=args.volume_writer, kdf=args.kdf,
            backup_id=args.backup_id, workdir=args.workdir,
        )
    except (BackupError, ValueError) as exc:
        print(f"make_backup_v4: {exc}", file=sys.stderr)
        return 1
    if args.manifest is not None:
        args.manifest.write_text(manifest.to_json() + "\n", encoding="utf-8")
    if args.contents is not None:
        import json

        data: list[dict[str, Any]] = expected_members(manifest)
        args.contents.write_text(json.dumps(data, indent=1, ensure_ascii=False) + "\n",
                                 encoding="utf-8")
    total = sum(f.chunks for f in manifest.files)
    print(f"wrote {args.out}: {len(manifest.files)} stored files, {total} chunks", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
