#!/usr/bin/env python3
"""Write Qubes OS backup format 3 files (Qubes R2/R3.x) for tests of qrecover.

The backup is produced the way the Qubes R3.2 writer produced it, by running
the same real programs:

* per stored file: ``tar -Pc --sparse -C DIR [--dereference]
  --xform 's:^BASENAME:SUBDIR\\0:' [--use-compress-program=FILTER] BASENAME``
  piped into ``openssl enc -e -CIPHER -md md5 -pass pass:PASSPHRASE``
  (``-md md5`` is what OpenSSL 1.0, shipped with R2/R3, used implicitly);
* the resulting stream is cut into chunks ``NAME.000``, ``NAME.001``, ...
  (``"%03d"``), each followed by ``NAME.NNN.hmac`` written by
  ``openssl dgst -DIGEST -hmac PASSPHRASE`` reading the chunk on stdin;
* every chunk and every ``.hmac`` is appended to the backup file as its own
  ``tar -cO --posix -C STAGE RELPATH`` archive.

This script is stdlib-only and must never import anything from ``qrecover``:
it is the independent reference writer the restore code is tested against.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import re
import shutil
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any
from xml.sax.saxutils import quoteattr

__all__ = [
    "VM_CLASSES",
    "BackupError",
    "BackupManifest",
    "StoredFile",
    "VmSpec",
    "expected_members",
    "main",
    "make_backup",
    "make_sample_tree",
]

QUBES_BASE_DIR = "/var/lib/qubes"
FORMAT_VERSION = "3"
DEFAULT_CHUNK_SIZE = 100 * 1024 * 1024
# What Qubes R2/R3 wrote into the header for `compressed=True` without an
# explicit filter.
DEFAULT_COMPRESSION_FILTER = "gzip"

VM_CLASSES = (
    "QubesAppVm",
    "QubesTemplateVm",
    "QubesNetVm",
    "QubesProxyVm",
    "QubesHVm",
    "QubesTemplateHVm",
)
# Every filter Qubes' restore accepts (gzip, bzip2, xz always; the others
# when installed), each run as `tar --use-compress-program=FILTER`.
COMPRESSION_FILTERS = ("gzip", "bzip2", "xz", "lzma", "pbzip2", "pigz", "zstd", "zstdmt")
# R3.2's `qvm-backup -Z` took a whole command ("gzip -3", qubes-issues
# #3865): tar ran it as given and the header said compression-filter=gzip -3.
_FILTER_WITH_LEVEL = re.compile(r"^([a-z0-9]+) (-[0-9]{1,2}|--fast|--best)$")


def randbytes(rng: random.Random, n: int) -> bytes:
    """``rng.randbytes(n)`` (Python 3.9 and later): the same bytes for the same seed,
    on Python 3.8 too."""
    return rng.getrandbits(n * 8).to_bytes(n, "little") if n else b""


def exit_code(status: int) -> int:
    """``os.waitstatus_to_exitcode`` (Python 3.9 and later): -N for signal N."""
    return -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)


def check_compression(value: str) -> str:
    """A filter name, or (format 3 only) a filter name and a level."""
    match = _FILTER_WITH_LEVEL.match(value)
    if value not in COMPRESSION_FILTERS and not (match and match[1] in COMPRESSION_FILTERS):
        raise ValueError(
            f"compression must be one of {COMPRESSION_FILTERS} (maybe with a level) or None"
        )
    return value


HMAC_STYLES = ("openssl1", "openssl3")
# Values that end up on a command line or in the header: same alphabet as the
# one Qubes' header parser accepts.
_SAFE_VALUE = re.compile(r"^[A-Za-z0-9-]+$")
_VM_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_.-]*$")
_READ_BLOCK = 1024 * 1024
# Fixed mtime for the sample tree (2016-08-04, the R3.2 era).
SAMPLE_MTIME = 1470279173


class BackupError(RuntimeError):
    """A program of the writer pipeline failed."""


@dataclass
class VmSpec:
    """One VM of the backed-up system, as it appears in qubes.xml."""

    name: str
    qid: int
    klass: str = "QubesAppVm"
    template: str | None = None
    source: Path | None = None
    label: str = "red"

    @property
    def is_template(self) -> bool:
        return "Template" in self.klass

    @property
    def is_netvm(self) -> bool:
        return self.klass in ("QubesNetVm", "QubesProxyVm")

    @property
    def is_appvm(self) -> bool:
        """Qubes R3 ``is_appvm()``: AppVMs and HVMs (not Net/Proxy VMs)."""
        return self.klass in ("QubesAppVm", "QubesHVm")

    @property
    def updateable(self) -> bool:
        """Templates and standalone VMs (no template) own their root.img."""
        return self.is_template or self.template is None

    @property
    def dir_path(self) -> str:
        """The VM directory on a Qubes R3 dom0."""
        if self.is_template:
            group = "vm-templates"
        elif self.is_netvm:
            group = "servicevms"
        else:
            group = "appvms"
        return f"{QUBES_BASE_DIR}/{group}/{self.name}"

    def backup_path(self, hide_names: bool) -> str:
        if hide_names:
            return f"vm{self.qid}"
        return os.path.relpath(self.dir_path, QUBES_BASE_DIR)


@dataclass
class StoredFile:
    """One stored file of the backup: one encryption stream, split in chunks."""

    name: str  # stored name: "qubes.xml", "vm7/private.img", "vm3/.", "dom0-home/user"
    chunks: int  # number of chunks NAME.000 ... (an empty final chunk included)
    vm: str | None  # owning VM name, "dom0" for dom0's home, None for qubes.xml
    source: str  # path given to tar (for a template: "DIR/.")
    stream_size: int = 0  # bytes of the chunked stream (encrypted or not)
    disk_usage: int = 0  # `du -s --block-size=1` of the source

    def chunk_names(self) -> list[str]:
        return [f"{self.name}.{i:03d}" for i in range(self.chunks)]


@dataclass
class BackupManifest:
    """What was written; JSON-serialisable through ``to_json()``."""

    path: str
    passphrase: str
    header: dict[str, str]
    files: list[StoredFile] = field(default_factory=list)
    vms: list[dict[str, Any]] = field(default_factory=list)
    hmac_style: str = "openssl1"
    chunk_size: int = DEFAULT_CHUNK_SIZE
    hide_names: bool = True
    qubes_xml: str = ""

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        for entry, stored in zip(data["files"], self.files):
            entry["chunk_names"] = stored.chunk_names()
        return data

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent, ensure_ascii=False)

    def member_names(self) -> list[str]:
        """Outer archive member names, in order."""
        names = ["backup-header", "backup-header.hmac"]
        for stored in self.files:
            for chunk in stored.chunk_names():
                names += [chunk, chunk + ".hmac"]
        return names


# --------------------------------------------------------------------------
# helpers


def _check_safe(what: str, value: str) -> None:
    if not _SAFE_VALUE.match(value):
        raise ValueError(f"{what} {value!r} is not of [A-Za-z0-9-]")


def disk_usage(path: Path) -> int:
    """Allocated size in bytes, as ``du -s --block-size=1`` reports it."""
    if not os.path.lexists(path):
        return 0
    proc = subprocess.run(
        ["du", "-s", "--block-size=1", str(path)],
        check=True,
        capture_output=True,
    )
    return int(proc.stdout.split()[0])


def _tail(path: Path, limit: int = 2000) -> str:
    try:
        data = path.read_bytes()
    except OSError:
        return ""
    return data[-limit:].decode("utf-8", "replace").strip()


def _start_hmac(data_path: Path, passphrase: str, algorithm: str) -> subprocess.Popen[bytes]:
    """Start ``openssl dgst -ALG -hmac PASS`` reading ``data_path`` on stdin."""
    with data_path.open("rb") as stdin:
        return subprocess.Popen(
            ["openssl", "dgst", "-" + algorithm, "-hmac", passphrase],
            stdin=stdin,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )


def _finish_hmac(proc: subprocess.Popen[bytes], hmac_path: Path, style: str) -> None:
    """Write the digest line to ``hmac_path``; OpenSSL 1.0 style (``(stdin)= HEX``)
    if asked, else as the installed OpenSSL 3 prints it (``SHA2-512(stdin)= HEX``)."""
    out, err = proc.communicate()
    if proc.returncode != 0:
        raise BackupError(
            f"openssl dgst failed for {hmac_path.name}: {err.decode(errors='replace')}"
        )
    if style == "openssl1":
        pos = out.find(b"(stdin)= ")
        if pos < 0:
            raise BackupError(f"unexpected openssl dgst output: {out!r}")
        out = out[pos:]
    hmac_path.write_bytes(out)


def _hmac_file(
    data_path: Path, hmac_path: Path, passphrase: str, algorithm: str, style: str
) -> None:
    _finish_hmac(_start_hmac(data_path, passphrase, algorithm), hmac_path, style)


def _append_member(out: IO[bytes], stage: Path, relpath: str) -> None:
    """Append ``tar -cO --posix -C STAGE RELPATH`` to the backup, then delete
    the staged file (Qubes' sending worker did the same)."""
    out.flush()
    proc = subprocess.run(
        ["tar", "-cO", "--posix", "-C", str(stage), relpath],
        stdout=out,
        stderr=subprocess.PIPE,
        check=False,
    )
    if proc.returncode != 0:
        raise BackupError(
            f"outer tar failed on {relpath}: {proc.stderr.decode(errors='replace')}"
        )
    (stage / relpath).unlink()


def _copy_chunk(stream: IO[bytes], target: Path, limit: int) -> int:
    copied = 0
    with target.open("wb") as fh:
        while copied < limit:
            buf = stream.read(min(_READ_BLOCK, limit - copied))
            if not buf:
                break
            fh.write(buf)
            copied += len(buf)
    return copied


def _send_chunk(
    out: IO[bytes], stage: Path, rel: str, hmac_proc: subprocess.Popen[bytes], style: str
) -> None:
    """Append a staged chunk, then its .hmac, to the backup."""
    try:
        _finish_hmac(hmac_proc, stage / (rel + ".hmac"), style)
    finally:
        if hmac_proc.poll() is None:
            hmac_proc.kill()
            hmac_proc.wait()
    _append_member(out, stage, rel)
    _append_member(out, stage, rel + ".hmac")


@dataclass
class _Options:
    passphrase: str
    encrypted: bool
    compression: str | None
    hmac_algorithm: str
    crypto_algorithm: str
    hmac_style: str
    chunk_size: int
    empty_final_chunk: bool


def _store_file(
    out: IO[bytes], stage: Path, path: str, subdir: str, opts: _Options
) -> tuple[int, int]:
    """Run the R3.2 pipeline for one stored file; return (chunks, stream bytes)."""
    dirname, basename = os.path.split(path)
    tar_cmd = ["tar", "-Pc", "--sparse", "-f", "-", "-C", dirname]
    if subdir != "dom0-home/":
        tar_cmd.append("--dereference")
    tar_cmd += ["--xform", f"s:^{basename}:{subdir}\\0:"]
    if opts.compression:
        tar_cmd.append(f"--use-compress-program={opts.compression}")
    tar_cmd.append(basename)

    stored_rel = os.path.join(subdir, basename)
    (stage / subdir).mkdir(parents=True, exist_ok=True)
    errdir = Path(tempfile.mkdtemp(prefix="err_", dir=stage.parent))
    procs: list[tuple[str, subprocess.Popen[bytes], Path]] = []
    pending: tuple[str, subprocess.Popen[bytes]] | None = None
    try:
        tar_err = errdir / "tar"
        with tar_err.open("wb") as err:
            tar = subprocess.Popen(tar_cmd, stdout=subprocess.PIPE, stderr=err)
        procs.append(("tar", tar, tar_err))
        assert tar.stdout is not None
        stream: IO[bytes] = tar.stdout
        if opts.encrypted:
            enc_err = errdir / "openssl"
            with enc_err.open("wb") as err:
                enc = subprocess.Popen(
                    [
                        "openssl", "enc", "-e", "-" + opts.crypto_algorithm,
                        "-md", "md5", "-pass", "pass:" + opts.passphrase,
                    ],
                    stdin=tar.stdout,
                    stdout=subprocess.PIPE,
                    stderr=err,
                )
            tar.stdout.close()
            procs.append(("openssl enc", enc, enc_err))
            assert enc.stdout is not None
            stream = enc.stdout

        # Chunk i's HMAC runs while chunk i-1 and its .hmac are appended, so
        # at most two chunks are staged at a time.
        index = 0
        total = 0
        while True:
            rel = f"{stored_rel}.{index:03d}"
            size = _copy_chunk(stream, stage / rel, opts.chunk_size)
            if size == 0 and index > 0 and not opts.empty_final_chunk:
                (stage / rel).unlink()
                break
            total += size
            prev = pending
            pending = (rel, _start_hmac(stage / rel, opts.passphrase, opts.hmac_algorithm))
            if prev is not None:
                _send_chunk(out, stage, prev[0], prev[1], opts.hmac_style)
            index += 1
            if size < opts.chunk_size:
                break
        if pending is not None:
            _send_chunk(out, stage, pending[0], pending[1], opts.hmac_style)
            pending = None
        stream.close()
        failures = []
        for what, proc, errfile in procs:
            if proc.wait() != 0:
                failures.append(f"{what} exited {proc.returncode}: {_tail(errfile)}")
        if failures:
            raise BackupError(f"storing {path}: " + "; ".join(failures))
        return index, total
    finally:
        if pending is not None:
            procs.append(("openssl dgst", pending[1], errdir))
        for _, proc, _ in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        shutil.rmtree(errdir, ignore_errors=True)


# --------------------------------------------------------------------------
# what to store


@dataclass
class _Planned:
    path: str
    subdir: str
    vm: str | None
    origin: str = ""  # path to report in the manifest, if not ``path``


def _vm_files(vm: VmSpec, hide_names: bool) -> list[_Planned]:
    """Stored files of one VM, in the order of the R3.2 writer."""
    assert vm.source is not None
    src = vm.source
    subdir = vm.backup_path(hide_names) + "/"
    if vm.is_template:
        # A template is one archive of its whole directory: path "DIR/.".
        return [_Planned(os.path.join(str(src), "."), subdir, vm.name)]
    names = ["private.img"]
    if vm.is_appvm:
        names.append("icon.png")
    if vm.updateable:
        names.append("apps.templates" if (src / "apps.templates").exists() else "apps")
        names.append("kernels")
    names += ["firewall.xml", "whitelisted-appmenus.list"]
    if vm.updateable:
        names.append("root.img")
    return [
        _Planned(str(src / name), subdir, vm.name)
        for name in names
        if os.path.lexists(src / name)
    ]


def _validate(vms: list[VmSpec]) -> dict[str, VmSpec]:
    by_name: dict[str, VmSpec] = {}
    qids = {0}
    for vm in vms:
        if vm.klass not in VM_CLASSES:
            raise ValueError(f"{vm.name}: unknown class {vm.klass!r}")
        if not _VM_NAME.match(vm.name) or len(vm.name) > 31 or vm.name == "dom0":
            raise ValueError(f"invalid VM name {vm.name!r}")
        if vm.name in by_name:
            raise ValueError(f"duplicate VM name {vm.name!r}")
        if vm.qid in qids or vm.qid < 1:
            raise ValueError(f"{vm.name}: qid {vm.qid} invalid or duplicate")
        if vm.source is not None and not Path(vm.source).is_dir():
            raise ValueError(f"{vm.name}: source {vm.source} is not a directory")
        by_name[vm.name] = vm
        qids.add(vm.qid)
    for vm in vms:
        if vm.template is not None:
            tpl = by_name.get(vm.template)
            if tpl is None or not tpl.is_template:
                raise ValueError(f"{vm.name}: template {vm.template!r} is not a template VmSpec")
            if vm.is_template:
                raise ValueError(f"{vm.name}: a template has no template")
    return by_name


# --------------------------------------------------------------------------
# qubes.xml (R2/R3 form)


def _attrs(pairs: list[tuple[str, object]]) -> str:
    return " ".join(
        f"{key}={quoteattr(str(value), {chr(10): '&#10;', chr(13): '&#13;', chr(9): '&#9;'})}"
        for key, value in pairs
    )


def build_qubes_xml(
    vms: list[VmSpec],
    *,
    hide_names: bool,
    sizes: dict[str, int],
    dom0_backup: tuple[str, int] | None,
) -> str:
    """qubes.xml as R3.2 saved it just before the backup (backup_* set)."""
    by_name = {vm.name: vm for vm in vms}
    templates = [vm for vm in vms if vm.klass == "QubesTemplateVm"]
    netvms = [vm for vm in vms if vm.klass == "QubesNetVm"]
    proxies = [vm for vm in vms if vm.klass == "QubesProxyVm"]
    default_netvm = proxies[0].qid if proxies else (netvms[0].qid if netvms else None)
    default_fw_netvm = netvms[0].qid if netvms else None
    kernel = "4.4.14-11"

    def qid_or(value: int | None, empty: str) -> str:
        return empty if value is None else str(value)

    root = _attrs([
        ("updatevm", qid_or(default_netvm, "none")),
        ("default_kernel", kernel),
        ("default_netvm", qid_or(default_netvm, "none")),
        ("default_fw_netvm", qid_or(default_fw_netvm, "none")),
        ("default_template", qid_or(templates[0].qid if templates else None, "none")),
        ("clockvm", qid_or(default_fw_netvm, "none")),
    ])
    lines = ["<?xml version='1.0' encoding='UTF-8'?>", f"<QubesVmCollection {root}>"]

    dom0: list[tuple[str, object]] = [
        ("autostart", "False"),
    ]
    if dom0_backup is not None:
        dom0 += [
            ("backup_content", "True"),
            ("backup_path", dom0_backup[0]),
            ("backup_size", dom0_backup[1]),
        ]
    else:
        dom0.append(("backup_content", "False"))
    dom0 += [
        ("conf_file", "dom0.conf"), ("debug", "False"), ("default_user", "user"),
        ("dir_path", f"{QUBES_BASE_DIR}/servicevms/dom0"), ("dispvm_netvm", "none"),
        ("firewall_conf", "firewall.xml"), ("include_in_backups", "True"),
        ("installed_by_rpm", "False"), ("internal", "False"), ("label", "black"),
        ("maxmem", "0"), ("memory", "300"), ("name", "dom0"), ("netid", "0"),
        ("pcidevs", "[]"), ("qid", "0"), ("qrexec_timeout", "60"),
        ("services", "{'meminfo-writer': True}"), ("template_qid", "none"),
        ("uses_default_dispvm_netvm", "True"), ("vcpus", "0"),
    ]
    lines.append(f"  <QubesAdminVm {_attrs(dom0)}/>")

    netid = 0
    for vm in vms:
        tpl = by_name[vm.template].qid if vm.template else None
        attrs: list[tuple[str, object]] = [("qid", vm.qid), ("name", vm.name)]
        if vm.source is not None:
            attrs += [
                ("backup_content", "True"),
                ("backup_path", vm.backup_path(hide_names)),
                ("backup_size", sizes[vm.name]),
            ]
        else:
            attrs.append(("backup_content", "False"))
        attrs += [
            ("dir_path", vm.dir_path),
            ("conf_file", f"{vm.name}.conf"),
            ("template_qid", qid_or(tpl, "none")),
        ]
        if vm.is_netvm:
            netid += 1
            own_net = default_fw_netvm if vm.klass == "QubesProxyVm" else None
            attrs += [("netvm_qid", qid_or(own_net, "none")), ("netid", netid)]
        else:
            attrs += [("netvm_qid", qid_or(default_netvm, "none")),
                      ("uses_default_netvm", "True")]
        attrs += [
            ("label", vm.label), ("internal", "False"), ("include_in_backups", "True"),
            ("installed_by_rpm", "False"), ("default_user", "user"),
            ("memory", 200 if vm.is_netvm else 400), ("maxmem", 4000), ("vcpus", 2),
            ("pcidevs", "[]"), ("services", "{'meminfo-writer': True}"),
            ("qrexec_timeout", 60), ("debug", "False"),
            ("private_img", "private.img"), ("root_img", "root.img"),
        ]
        if vm.klass in ("QubesHVm", "QubesTemplateHVm"):
            attrs += [("timezone", "localtime"), ("qrexec_installed", "False"),
                      ("guiagent_installed", "False"), ("drive", "None")]
        else:
            attrs += [("kernel", kernel), ("uses_default_kernel", "True"),
                      ("kernelopts", ""), ("uses_default_kernelopts", "True"),
                      ("volatile_img", "volatile.img")]
        lines.append(f"  <{vm.klass} {_attrs(attrs)}/>")
    lines.append("</QubesVmCollection>")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------
# the writer


def header_text(
    *, encrypted: bool, compression: str | None, hmac_algorithm: str, crypto_algorithm: str
) -> str:
    """backup-header as R3.2 wrote it (crypto-algorithm even when not
    encrypted; compression-filter only when compressed)."""
    lines = [
        f"version={FORMAT_VERSION}",
        f"hmac-algorithm={hmac_algorithm}",
        f"crypto-algorithm={crypto_algorithm}",
        f"encrypted={encrypted}",
        f"compressed={compression is not None}",
    ]
    if compression is not None:
        lines.append(f"compression-filter={compression}")
    return "".join(line + "\n" for line in lines)


def make_backup(
    out: Path,
    passphrase: str,
    vms: list[VmSpec],
    *,
    dom0_home: Path | None = None,
    dom0_user: str = "user",
    encrypted: bool = True,
    compression: str | None = "gzip",
    hmac_algorithm: str = "SHA512",
    crypto_algorithm: str = "aes-256-cbc",
    hmac_style: str = "openssl1",
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    hide_names: bool = True,
    workdir: Path | None = None,
    empty_final_chunk: bool = True,
) -> BackupManifest:
    """Write a format-3 backup of ``vms`` (and dom0's home) to ``out``.

    ``empty_final_chunk``: R3.2 cut a chunk when the next 400 KiB read would
    pass the size limit and only stopped on a read that returned nothing, so
    a stream whose length is an exact multiple of the chunk size got one more,
    empty, chunk (with its .hmac). True reproduces that.
    """
    if compression is not None:
        check_compression(compression)
    if hmac_style not in HMAC_STYLES:
        raise ValueError(f"hmac_style must be one of {HMAC_STYLES}")
    if chunk_size < 1:
        raise ValueError("chunk_size must be positive")
    _check_safe("hmac algorithm", hmac_algorithm)
    _check_safe("crypto algorithm", crypto_algorithm)
    if not re.match(r"^[a-z_][a-z0-9_.-]*$", dom0_user):
        raise ValueError(f"invalid dom0 user name {dom0_user!r}")
    _validate(vms)
    opts = _Options(
        passphrase=passphrase, encrypted=encrypted, compression=compression,
        hmac_algorithm=hmac_algorithm, crypto_algorithm=crypto_algorithm,
        hmac_style=hmac_style, chunk_size=chunk_size,
        empty_final_chunk=empty_final_chunk,
    )

    out = Path(out)
    workroot = Path(tempfile.mkdtemp(prefix="qrecover-mkbackup-", dir=workdir))
    try:
        stage = workroot / "stage"  # like Qubes' backup_XXXX temp dir
        stage.mkdir()
        srcdir = workroot / "src"  # qubes.xml (and a dom0 home copy if renamed)
        srcdir.mkdir()

        sizes = {vm.name: disk_usage(vm.source) for vm in vms if vm.source is not None}
        planned: list[_Planned] = []
        backed = [vm for vm in vms if vm.source is not None]
        for vm in sorted((v for v in backed if not v.is_template), key=lambda v: v.name):
            planned += _vm_files(vm, hide_names)
        for vm in (v for v in backed if v.is_template):
            planned += _vm_files(vm, hide_names)

        dom0_backup: tuple[str, int] | None = None
        if dom0_home is not None:
            home = Path(dom0_home)
            if not home.is_dir():
                raise ValueError(f"dom0 home {home} is not a directory")
            if home.name != dom0_user:
                # Qubes stored /home/USER as "USER": give tar that basename.
                copy = srcdir / "home" / dom0_user
                copy.parent.mkdir()
                subprocess.run(
                    ["cp", "-a", "--sparse=always", str(home), str(copy)], check=True
                )
                home = copy
            dom0_backup = (f"dom0-home/{dom0_user}", disk_usage(home))
            planned.append(_Planned(str(home), "dom0-home/", "dom0", str(dom0_home)))

        xml = build_qubes_xml(vms, hide_names=hide_names, sizes=sizes, dom0_backup=dom0_backup)
        (srcdir / "qubes.xml").write_text(xml, encoding="utf-8")
        planned.insert(0, _Planned(str(srcdir / "qubes.xml"), "", None, "<generated>"))

        header = header_text(
            encrypted=encrypted, compression=compression,
            hmac_algorithm=hmac_algorithm, crypto_algorithm=crypto_algorithm,
        )
        manifest = BackupManifest(
            path=str(out),
            passphrase=passphrase,
            header=dict(line.split("=", 1) for line in header.splitlines()),
            hmac_style=hmac_style,
            chunk_size=chunk_size,
            hide_names=hide_names,
            qubes_xml=xml,
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
            (stage / "backup-header").write_text(header, encoding="ascii")
            _hmac_file(
                stage / "backup-header", stage / "backup-header.hmac",
                passphrase, hmac_algorithm, hmac_style,
            )
            _append_member(fh, stage, "backup-header")
            _append_member(fh, stage, "backup-header.hmac")
            for item in planned:
                chunks, total = _store_file(fh, stage, item.path, item.subdir, opts)
                manifest.files.append(StoredFile(
                    name=os.path.join(item.subdir, os.path.basename(item.path)),
                    chunks=chunks,
                    vm=item.vm,
                    source=item.origin or item.path,
                    stream_size=total,
                    disk_usage=disk_usage(Path(item.path)),
                ))
        return manifest
    except BaseException:
        out.unlink(missing_ok=True)  # no half-written backup left behind
        raise
    finally:
        shutil.rmtree(workroot, ignore_errors=True)


# --------------------------------------------------------------------------
# expected contents of the inner archives (for tests of the restore code)


def _walk(path: Path) -> Iterator[tuple[str, Path]]:
    yield "", path
    if path.is_dir() and not path.is_symlink():
        for dirpath, dirnames, filenames in os.walk(path):
            dirnames.sort()
            base = Path(dirpath)
            for name in sorted(dirnames + filenames):
                full = base / name
                yield str(full.relative_to(path)), full


def expected_members(manifest: BackupManifest) -> list[dict[str, Any]]:
    """Inner tar members of every stored file (except qubes.xml), as GNU tar
    names them after the --xform, with type, size and sha256 of contents."""
    result: list[dict[str, Any]] = []
    for stored in manifest.files:
        if stored.vm is None:
            continue
        deref = not stored.name.startswith("dom0-home/")
        for rel, full in _walk(Path(stored.source)):
            name = stored.name + ("/" + rel if rel else "")
            st = full.stat() if deref else full.lstat()
            entry: dict[str, Any] = {"stored": stored.name, "name": name}
            if stat.S_ISLNK(st.st_mode):
                entry.update(type="symlink", target=os.readlink(full))
            elif stat.S_ISDIR(st.st_mode):
                entry.update(type="dir")
            else:
                digest = hashlib.sha256()
                with full.open("rb") as fh:
                    for block in iter(lambda: fh.read(_READ_BLOCK), b""):
                        digest.update(block)
                entry.update(type="file", size=st.st_size, sha256=digest.hexdigest())
            result.append(entry)
    return result


# --------------------------------------------------------------------------
# sample tree

_WORDS = (
    "qubes", "backup", "restore", "private", "image", "template", "domain", "sparse",
    "chunk", "header", "passphrase", "openssl", "tar", "gzip", "xen", "vm", "netvm",
    "proxy", "firewall", "label", "red", "green", "blue", "black", "yellow", "purple",
    "gray", "orange", "work", "personal", "banking", "vault", "untrusted",
    "disposable", "root", "kernel", "volume", "block", "device", "file", "system",
    "ext4", "journal", "inode", "extent", "hole", "data", "offset", "sector", "page",
    "memory", "qrexec", "policy", "service", "dom0", "user", "home", "documents",
    "notes", "letter", "invoice", "photo", "music", "video", "archive",
)


def _det_bytes(seed: str, size: int) -> bytes:
    """Deterministic pseudo-random bytes (SHAKE-256 of the seed)."""
    return hashlib.shake_256(seed.encode()).digest(size)


def _det_text(seed: str, size: int) -> bytes:
    """Deterministic, gzip-friendly text of exactly ``size`` bytes."""
    raw = _det_bytes(seed, size // 3 + 16)
    words: list[str] = []
    length = 0
    for i, byte in enumerate(raw):
        word = _WORDS[byte % len(_WORDS)] + ("\n" if i % 11 == 10 else " ")
        words.append(word)
        length += len(word)
        if length >= size:
            break
    text = "".join(words).encode()
    return (text * (size // max(len(text), 1) + 1))[:size]


def _sparse_image(path: Path, size: int, pieces: list[tuple[int, bytes]]) -> None:
    with path.open("wb") as fh:
        fh.truncate(size)
        for offset, data in pieces:
            if offset + len(data) > size:
                raise ValueError("piece beyond image end")
            fh.seek(offset)
            fh.write(data)


def _write(path: Path, data: bytes | str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data.encode() if isinstance(data, str) else data)


MARKER = b"qrecover-sample: the quick brown fox restored from work/private.img"

_FIREWALL = """<QubesFirewallRules policy="deny" dns="allow" icmp="allow" yumProxy="allow">
  <rule address="192.168.0.0" netmask="16" proto="tcp" port="443" toport="443"/>
</QubesFirewallRules>
"""
_ICON = bytes.fromhex("89504e470d0a1a0a0000000d49484452") + b"qrecover-icon"


def make_sample_tree(
    root: Path, *, image_mb: int = 8, big_sparse_gib: int = 0
) -> tuple[list[VmSpec], Path]:
    """Build a deterministic set of VM directories and a dom0 home under ``root``.

    Returns (vms, dom0_home). VMs: sys-net (2, NetVM), fedora-23 (3, template),
    sys-firewall (4, ProxyVM, not backed up), work (7, AppVM), untrusted (9,
    AppVM), standalone (10, standalone AppVM with root.img and apps/).
    ``big_sparse_gib`` > 0 makes work/private.img that many GiB (sparse), with
    data past the 4 GiB mark.
    """
    root = Path(root)
    mib = 1024 * 1024
    img = image_mb * mib
    if image_mb < 2:
        raise ValueError("image_mb must be at least 2")

    vmroot = root / "vms"
    work = vmroot / "work"
    work.mkdir(parents=True)
    work_size = big_sparse_gib * 1024 * mib if big_sparse_gib > 0 else img
    work_pieces = [
        (0, _det_text("work-0", 96 * 1024)),
        (mib, _det_bytes("work-1", 16 * 1024) + _det_text("work-1t", 48 * 1024)),
        (img // 2 + 256 * 1024, MARKER + b"\n" + _det_text("work-2", 8 * 1024)),
        (work_size - 4096, _det_text("work-end", 4096)),
    ]
    if big_sparse_gib > 4:
        work_pieces.append((4 * 1024 * mib + 8192, MARKER + b" (past 4 GiB)\n"))
    _sparse_image(work / "private.img", work_size, work_pieces)
    _write(work / "icon.png", _ICON)
    _write(work / "firewall.xml", _FIREWALL)
    _write(work / "whitelisted-appmenus.list", "firefox.desktop\nxterm.desktop\n")

    tpl = vmroot / "fedora-23"
    tpl.mkdir()
    _sparse_image(tpl / "root.img", img, [
        (0, _det_text("tpl-root-0", 128 * 1024)),
        (img - 2 * mib, _det_text("tpl-root-1", 32 * 1024)),
    ])
    _sparse_image(tpl / "private.img", img // 2, [(0, _det_text("tpl-priv", 16 * 1024))])
    _write(tpl / "apps.templates" / "firefox.desktop",
           "[Desktop Entry]\nName=%VMNAME%: Firefox\nExec=qvm-run -q -a %VMNAME% firefox\n")
    _write(tpl / "icon.png", _ICON)
    _write(tpl / "whitelisted-appmenus.list", "xterm.desktop\n")

    net = vmroot / "sys-net"
    net.mkdir()
    _sparse_image(net / "private.img", img // 2, [(0, _det_text("net-priv", 20 * 1024))])

    untrusted = vmroot / "untrusted"
    untrusted.mkdir()
    _sparse_image(untrusted / "private.img", img, [
        (512 * 1024, _det_text("untrusted-priv", 24 * 1024)),
    ])
    _write(untrusted / "icon.png", _ICON)
    _write(untrusted / "firewall.xml", _FIREWALL)
    # Template-based AppVMs have generated menus in apps/; R3.2 did not back
    # them up (only updateable VMs' apps/ were stored).
    _write(untrusted / "apps" / "untrusted-firefox.desktop", "[Desktop Entry]\nName=x\n")

    standalone = vmroot / "standalone"
    standalone.mkdir()
    _sparse_image(standalone / "private.img", img // 2, [
        (0, _det_text("standalone-priv", 12 * 1024)),
    ])
    _sparse_image(standalone / "root.img", img, [
        (mib, _det_text("standalone-root", 40 * 1024)),
    ])
    _write(standalone / "icon.png", _ICON)
    _write(standalone / "apps" / "Grüße app.desktop",
           "[Desktop Entry]\nName=Grüße app\nExec=grüße --now\n")
    _write(standalone / "apps" / "my notes.desktop", "[Desktop Entry]\nName=my notes\n")

    home = root / "home" / "user"
    home.mkdir(parents=True)
    _write(home / ".bashrc", "# .bashrc\nexport EDITOR=vim\n")
    _write(home / "Documents" / "Grüße notes.txt", "Grüße aus dom0 - ünïcödé ✓\n")
    _write(home / "Documents" / "report 2016.txt", _det_text("home-report", 6000))
    _write(home / "Documents" / "deep" / "nested" / "file.bin", _det_bytes("home-bin", 3000))
    (home / "Downloads").mkdir()
    os.symlink("Documents/Grüße notes.txt", home / "notes-link")

    for base in (vmroot, root / "home"):
        for dirpath, dirnames, filenames in os.walk(base, topdown=False):
            for name in dirnames + filenames:
                os.utime(Path(dirpath) / name, (SAMPLE_MTIME, SAMPLE_MTIME),
                         follow_symlinks=False)
            os.utime(dirpath, (SAMPLE_MTIME, SAMPLE_MTIME))

    vms = [
        VmSpec("sys-net", 2, "QubesNetVm", "fedora-23", net, "red"),
        VmSpec("fedora-23", 3, "QubesTemplateVm", None, tpl, "black"),
        VmSpec("sys-firewall", 4, "QubesProxyVm", "fedora-23", None, "green"),
        VmSpec("work", 7, "QubesAppVm", "fedora-23", work, "blue"),
        VmSpec("untrusted", 9, "QubesAppVm", "fedora-23", untrusted, "red"),
        VmSpec("standalone", 10, "QubesAppVm", None, standalone, "purple"),
    ]
    return vms, home


# --------------------------------------------------------------------------
# CLI


def _parse_vm(text: str) -> VmSpec:
    parts = text.split(":")
    if len(parts) not in (4, 5):
        raise argparse.ArgumentTypeError("expected NAME:QID:KLASS:SOURCEDIR[:TEMPLATE]")
    name, qid, klass, source = parts[:4]
    template = parts[4] if len(parts) == 5 and parts[4] else None
    try:
        qid_num = int(qid)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"bad qid {qid!r}") from exc
    if klass not in VM_CLASSES:
        raise argparse.ArgumentTypeError(f"KLASS must be one of {', '.join(VM_CLASSES)}")
    src = None if source in ("", "-") else Path(source)
    return VmSpec(name, qid_num, klass, template, src)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Write a Qubes R2/R3 (format 3) backup with the real tar/openssl.",
    )
    parser.add_argument("out", type=Path, help="backup file to write")
    parser.add_argument("--passphrase-file", type=Path, required=True,
                        help="file whose first line is the passphrase")
    parser.add_argument("--vm", action="append", type=_parse_vm, default=[],
                        metavar="NAME:QID:KLASS:SOURCEDIR[:TEMPLATE]",
                        help="a VM; SOURCEDIR '-' = listed in qubes.xml only")
    parser.add_argument("--dom0-home", type=Path)
    parser.add_argument("--dom0-user", default="user")
    parser.add_argument("--no-encrypt", action="store_true")
    parser.add_argument("--compression", default="gzip",
                        help=f"none, one of {', '.join(COMPRESSION_FILTERS)}, "
                             "or one with a level as R3.2's -Z allowed ('gzip -3')")
    parser.add_argument("--hmac", default="SHA512", choices=["SHA512", "SHA256", "SHA1"])
    parser.add_argument("--crypto", default="aes-256-cbc")
    parser.add_argument("--hmac-style", default="openssl1", choices=HMAC_STYLES)
    parser.add_argument("--chunk-size", type=int, default=DEFAULT_CHUNK_SIZE)
    parser.add_argument("--no-empty-final-chunk", action="store_true",
                        help="drop the empty last chunk R3.2 wrote when the stream "
                             "length is a multiple of the chunk size")
    parser.add_argument("--plain-paths", action="store_true",
                        help="store under appvms/NAME/... instead of vmQID/...")
    parser.add_argument("--workdir", type=Path)
    parser.add_argument("--sample", type=Path, metavar="DIR",
                        help="build the sample VM tree into DIR (must not exist) and back it up")
    parser.add_argument("--image-mb", type=int, default=8, help="sample image size")
    parser.add_argument("--big-sparse-gib", type=int, default=0,
                        help="sample: make work/private.img this many GiB")
    parser.add_argument("--manifest", type=Path, help="write the manifest JSON here")
    parser.add_argument("--contents", type=Path,
                        help="write the expected inner members (JSON) here")
    args = parser.parse_args(argv)

    lines = args.passphrase_file.read_text(encoding="utf-8").splitlines()
    if not lines or not lines[0]:
        parser.error("empty passphrase file")
    passphrase = lines[0]

    vms: list[VmSpec] = list(args.vm)
    dom0_home: Path | None = args.dom0_home
    if args.sample is not None:
        if vms:
            parser.error("--sample and --vm are exclusive")
        if args.sample.exists():
            parser.error(f"{args.sample} already exists")
        vms, sample_home = make_sample_tree(
            args.sample, image_mb=args.image_mb, big_sparse_gib=args.big_sparse_gib
        )
        if dom0_home is None:
            dom0_home = sample_home
    try:
        manifest = make_backup(
            args.out, passphrase, vms,
            dom0_home=dom0_home, dom0_user=args.dom0_user,
            encrypted=not args.no_encrypt,
            compression=None if args.compression == "none" else args.compression,
            hmac_algorithm=args.hmac, crypto_algorithm=args.crypto,
            hmac_style=args.hmac_style, chunk_size=args.chunk_size,
            hide_names=not args.plain_paths, workdir=args.workdir,
            empty_final_chunk=not args.no_empty_final_chunk,
        )
    except (BackupError, ValueError) as exc:
        print(f"make_backup: {exc}", file=sys.stderr)
        return 1
    if args.manifest is not None:
        args.manifest.write_text(manifest.to_json() + "\n", encoding="utf-8")
    if args.contents is not None:
        args.contents.write_text(
            json.dumps(expected_members(manifest), indent=1, ensure_ascii=False) + "\n",
            encoding="utf-8",
        )
    total = sum(f.chunks for f in manifest.files)
    print(f"wrote {args.out}: {len(manifest.files)} stored files, {total} chunks",
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
