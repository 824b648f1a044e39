#!/usr/bin/env python3
"""Write Qubes OS backup format 1 folders (Qubes R1) for tests of qrecover.

R1's ``qvm-backup`` (qubes-core-admin tag R1, ``dom0/qvm-core/qubesutils.py``
``backup_prepare``/``backup_do``; see fixtures/README.md, "Format 1") wrote no
archive at all: it made a folder ``qubes-YYYY-MM-DD-HHMMSS`` in the target
directory and, for every file to back up, ran ``mkdir -p BACKUP/SUBDIR`` and
``cp -rp FILE BACKUP/SUBDIR``, where SUBDIR is the file's folder relative to
/var/lib/qubes (``appvms/NAME``, ``servicevms/NAME``, ``vm-templates``) or
``dom0-home``. qubes.xml was copied as it was (R1 form, no ``backup_*``
attributes). No header, no HMAC, no encryption, no compression.

This script runs the same ``mkdir -p`` and ``cp -rp``. Stdlib-only; never
imports ``qrecover``.
"""

from __future__ import annotations

import argparse
import datetime
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
from typing import Any
from xml.sax.saxutils import quoteattr

sys.path.insert(0, str(Path(__file__).resolve().parent))

from make_backup import (  # sibling script, stdlib-only too
    VmSpec,
    _parse_vm,
    _validate,
    _walk,
    disk_usage,
    make_sample_tree,
)

__all__ = [
    "R1_CLASSES",
    "BackupManifestV1",
    "build_qubes_xml_r1",
    "expected_files_v1",
    "main",
    "make_backup_v1",
]

QUBES_BASE_DIR = "/var/lib/qubes"
# VM classes R1's qubes.xml knew (HVMs came with R2).
R1_CLASSES = ("QubesAppVm", "QubesTemplateVm", "QubesNetVm", "QubesProxyVm")
_KERNEL = "3.2.7-10"


@dataclass
class CopiedFile:
    """One `cp -rp SOURCE BACKUP/SUBDIR` of the writer."""

    relpath: str  # path inside the backup folder: "appvms/work/private.img"
    vm: str | None  # owning VM, "dom0" for the home, None for qubes.xml
    source: str


@dataclass
class BackupManifestV1:
    """What was written; JSON-serialisable through ``to_json()``."""

    path: str  # the backup folder
    files: list[CopiedFile] = field(default_factory=list)
    vms: list[dict[str, Any]] = field(default_factory=list)
    dom0_user: str | None = None
    qubes_xml: str = ""

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(asdict(self), indent=indent, ensure_ascii=False)


def _attrs(pairs: list[tuple[str, object]]) -> str:
    return " ".join(f"{key}={quoteattr(str(value))}" for key, value in pairs)


def build_qubes_xml_r1(vms: list[VmSpec]) -> str:
    """qubes.xml in R1's form: one line, attributes sorted, no dom0 element
    and no backup_* attributes (the shape of QUBESXML_R1 in
    qubes-core-admin-client's backupcompatibility tests)."""
    by_name = {vm.name: vm for vm in vms}
    templates = [vm for vm in vms if vm.is_template]
    netvms = [vm for vm in vms if vm.klass == "QubesNetVm"]
    proxies = [vm for vm in vms if vm.klass == "QubesProxyVm"]
    default_netvm = proxies[0].qid if proxies else (netvms[0].qid if netvms else None)
    fw_netvm = netvms[0].qid if netvms else None

    def qid_or_none(value: int | None) -> str:
        return "none" if value is None else str(value)

    root = _attrs([
        ("clockvm", qid_or_none(fw_netvm)), ("default_fw_netvm", qid_or_none(fw_netvm)),
        ("default_kernel", _KERNEL), ("default_netvm", qid_or_none(default_netvm)),
        ("default_template", qid_or_none(templates[0].qid if templates else None)),
        ("updatevm", qid_or_none(default_netvm)),
    ])
    parts = ["<?xml version='1.0' encoding='UTF-8'?>\n", f"<QubesVmCollection {root}>"]
    netid = 0
    for vm in vms:
        tpl = by_name[vm.template].qid if vm.template else None
        attrs: dict[str, object] = {
            "conf_file": f"{vm.name}.conf", "debug": "False", "default_user": "user",
            "dir_path": vm.dir_path, "include_in_backups": "True",
            "installed_by_rpm": "False", "internal": "False", "kernel": _KERNEL,
            "kernelopts": "", "label": vm.label, "maxmem": "4063",
            "memory": "200" if vm.is_netvm else "400", "name": vm.name,
            "pcidevs": "[]", "private_img": "private.img", "qid": vm.qid,
            "root_img": "root.img", "services": "{'meminfo-writer': True}",
            "template_qid": qid_or_none(tpl), "uses_default_kernel": "True",
            "uses_default_kernelopts": "True", "vcpus": "2",
            "volatile_img": "volatile.img",
        }
        if vm.is_netvm:
            netid += 1
            attrs["netid"] = netid
            if vm.klass == "QubesProxyVm":
                attrs["netvm_qid"] = qid_or_none(fw_netvm)
        else:
            attrs["netvm_qid"] = qid_or_none(default_netvm)
            attrs["uses_default_netvm"] = "True"
        parts.append(f"<{vm.klass} {_attrs(sorted(attrs.items()))} />")
    parts.append("</QubesVmCollection>\n")
    return "".join(parts)


def _vm_copies(vm: VmSpec) -> list[tuple[Path, str, str]]:
    """(source, SUBDIR, name) for one VM, in R1's order. A template is its
    whole directory, copied into vm-templates/."""
    assert vm.source is not None
    src = vm.source
    subdir = os.path.relpath(vm.dir_path, QUBES_BASE_DIR)
    if vm.is_template:
        return [(src, os.path.dirname(subdir), vm.name)]
    names = ["private.img"]
    if vm.is_appvm:
        names.append("icon.png")
    if vm.updateable:
        names.append("apps.templates" if (src / "apps.templates").exists() else "apps")
        names.append("kernels")
    names += ["firewall.xml", "whitelisted-appmenus.list"]
    if vm.updateable:
        names.append("root.img")
    return [(src / name, subdir, name) for name in names if os.path.lexists(src / name)]


def _cp(source: Path, backup: Path, subdir: str, name: str) -> None:
    """``mkdir -p BACKUP/SUBDIR; cp -rp SOURCE BACKUP/SUBDIR`` (to NAME when the
    source's basename differs from what /var/lib/qubes would have held)."""
    dest_dir = backup / subdir
    subprocess.run(["mkdir", "-p", str(dest_dir)], check=True)
    target = dest_dir if source.name == name else dest_dir / name
    subprocess.run(["cp", "-rp", str(source), str(target)], check=True)


def make_backup_v1(
    target: Path,
    vms: list[VmSpec],
    *,
    dom0_home: Path | None = None,
    dom0_user: str = "user",
    folder_name: str | None = None,
) -> BackupManifestV1:
    """Write an R1 backup folder inside ``target`` (an existing directory)
    named ``folder_name`` or ``qubes-%Y-%m-%d-%H%M%S``; return its manifest."""
    target = Path(target)
    if not target.is_dir():
        raise ValueError(f"{target} is not a directory")
    for vm in vms:
        if vm.klass not in R1_CLASSES:
            raise ValueError(f"{vm.name}: R1 had no class {vm.klass}")
    if not re.match(r"^[a-z_][a-z0-9_.-]*$", dom0_user):
        raise ValueError(f"invalid dom0 user name {dom0_user!r}")
    _validate(vms)
    name = folder_name or "qubes-" + datetime.datetime.now().strftime("%Y-%m-%d-%H%M%S")
    backup = target / name
    backup.mkdir()  # R1 refused an existing folder
    try:
        xml = build_qubes_xml_r1(vms)
        manifest = BackupManifestV1(path=str(backup), qubes_xml=xml)
        # The live qubes.xml, copied like every other file.
        with tempfile.TemporaryDirectory(prefix="qrecover-mkbackup1-") as tmp:
            live = Path(tmp) / "qubes.xml"
            live.write_text(xml, encoding="utf-8")
            _cp(live, backup, "", "qubes.xml")
        manifest.files.append(CopiedFile("qubes.xml", None, "<generated>"))
        backed = sorted((vm for vm in vms if vm.source is not None), key=lambda v: v.qid)
        for group in ([v for v in backed if not v.is_template and not v.is_netvm],
                      [v for v in backed if v.is_netvm],
                      [v for v in backed if v.is_template]):
            for vm in group:
                for source, subdir, fname in _vm_copies(vm):
                    _cp(source, backup, subdir, fname)
                    manifest.files.append(
                        CopiedFile(os.path.join(subdir, fname), vm.name, str(source)))
        if dom0_home is not None:
            home = Path(dom0_home)
            if not home.is_dir():
                raise ValueError(f"dom0 home {home} is not a directory")
            _cp(home, backup, "dom0-home", dom0_user)
            manifest.files.append(CopiedFile(f"dom0-home/{dom0_user}", "dom0", str(home)))
            manifest.dom0_user = dom0_user
        for vm in vms:
            entry: dict[str, Any] = asdict(vm)
            entry["source"] = None if vm.source is None else str(vm.source)
            entry["backup_content"] = vm.source is not None
            entry["dir_path"] = vm.dir_path
            entry["backup_size"] = disk_usage(vm.source) if vm.source else None
            manifest.vms.append(entry)
        return manifest
    except BaseException:
        shutil.rmtree(backup, ignore_errors=True)
        raise


def expected_files_v1(manifest: BackupManifestV1) -> list[dict[str, Any]]:
    """Every path of the backup folder except qubes.xml, with type, size and
    sha256 of contents, from the *sources* (cp -rp keeps symlinks)."""
    result: list[dict[str, Any]] = []
    for copied in manifest.files:
        if copied.vm is None:
            continue
        for rel, full in _walk(Path(copied.source)):
            name = copied.relpath + ("/" + rel if rel else "")
            st = full.lstat()
            entry: dict[str, Any] = {"vm": copied.vm, "name": name}
            if stat.S_ISLNK(st.st_mode):
                entry.update(type="symlink", target=os.readlink(full))
            elif stat.S_ISDIR(st.st_mode):
                entry.update(type="dir")
            else:
                entry.update(type="file", size=st.st_size,
                             sha256=hashlib.sha256(full.read_bytes()).hexdigest())
            result.append(entry)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Write a Qubes R1 (format 1) backup folder with mkdir -p and cp -rp.",
    )
    parser.add_argument("target", type=Path,
                        help="existing directory; the backup folder is made inside it")
    parser.add_argument("--name", help="backup folder name (default qubes-DATE as R1)")
    parser.add_argument("--vm", action="append", type=_parse_vm, default=[],
                        metavar="NAME:QID:KLASS:SOURCEDIR[:TEMPLATE]",
                        help="a VM; SOURCEDIR '-' = listed in qubes.xml only")
    parser.add_argument("--dom0-home", type=Path)
    parser.add_argument("--dom0-user", default="user")
    parser.add_argument("--sample", type=Path, metavar="DIR",
                        help="build the sample VM tree into DIR (must not exist) and back it up")
    parser.add_argument("--image-mb", type=int, default=8, help="sample image size")
    parser.add_argument("--manifest", type=Path, help="write the manifest JSON here")
    parser.add_argument("--contents", type=Path,
                        help="write the expected files (JSON) here")
    args = parser.parse_args(argv)

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
    try:
        manifest = make_backup_v1(args.target, vms, dom0_home=dom0_home,
                                  dom0_user=args.dom0_user, folder_name=args.name)
    except (OSError, subprocess.CalledProcessError, ValueError) as exc:
        print(f"make_backup_v1: {exc}", file=sys.stderr)
        return 1
    if args.manifest is not None:
        args.manifest.write_text(manifest.to_json() + "\n", encoding="utf-8")
    if args.contents is not None:
        args.contents.write_text(
            json.dumps(expected_files_v1(manifest), indent=1, ensure_ascii=False) + "\n",
            encoding="utf-8",
        )
    print(f"wrote {manifest.path}: {len(manifest.files)} copies", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
