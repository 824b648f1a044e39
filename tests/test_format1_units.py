"""Format 1's pure parts, in-process: detection, R1's dir_path, the lstat-only scan,
qubes.xml's VMs, the tar -c argv, and the message for a packed folder."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from qrecover import formats
from qrecover.archive.container import FolderSource
from qrecover.errors import BackupError
from qrecover.formats import v1
from qrecover.formats.v1_folder import path_is_safe, scan_folder

XML = (
    b"<?xml version='1.0' encoding='UTF-8'?>\n<QubesVmCollection default_template=\"3\">"
    b'<QubesTemplateVm qid="3" name="fedora-17" dir_path="/var/lib/qubes/vm-templates/fedora-17"'
    b' template_qid="none" />'
    b'<QubesAppVm qid="7" name="work" dir_path="/var/lib/qubes/appvms/work" template_qid="3" />'
    b'<QubesNetVm qid="2" name="netvm" dir_path="/var/lib/qubes/servicevms/netvm"'
    b' template_qid="3" /></QubesVmCollection>\n'
)


def folder(tmp_path: Path) -> Path:
    root = tmp_path / "qubes-2012-09-01-120000"
    (root / "appvms" / "work").mkdir(parents=True)
    (root / "appvms" / "work" / "private.img").write_bytes(b"\0" * 4096)
    (root / "appvms" / "work" / "icon.png").symlink_to("/usr/share/icons/blue.png")
    (root / "vm-templates" / "fedora-17" / "apps").mkdir(parents=True)
    (root / "vm-templates" / "fedora-17" / "root.img").write_bytes(b"r" * 100)
    (root / "dom0-home" / "user").mkdir(parents=True)
    (root / "dom0-home" / "user" / ".bashrc").write_text("# r1\n")
    (root / "qubes.xml").write_bytes(XML)
    return root


def test_detection(tmp_path: Path) -> None:
    root = folder(tmp_path)
    assert formats.detect(source=FolderSource(root)) is not None
    (root / "backup-header").write_text("version=3\n")
    assert formats.detect(source=FolderSource(root)) is None  # format 3, untarred by hand
    assert formats.detect(source=FolderSource(tmp_path / "nothing")) is None
    (root / "backup-header").unlink()
    (root / "qubes.xml.000").write_bytes(b"x")  # an untarred R2-Beta3 backup: format 2
    assert formats.detect(source=FolderSource(root)) is None
    empty = tmp_path / "empty"
    empty.mkdir()
    assert not v1.claims(empty)


def test_inventory_names_and_what_is_absent(tmp_path: Path) -> None:
    fmt = v1.Format1(folder(tmp_path))
    inventory, problems = fmt.inventory(XML)
    assert problems == []
    by_name = {e.name: e for e in inventory.entities}
    assert set(by_name) == {"fedora-17", "work", "dom0"}
    assert by_name["work"].backup_path == "appvms/work" and by_name["work"].dest == "work"
    assert by_name["work"].template == "fedora-17"
    assert by_name["fedora-17"].required_stored() == "vm-templates/fedora-17/."
    assert by_name["dom0"].dest == "dom0-home/user"
    assert fmt.absent == ["netvm"] and "netvm" in fmt.notes[-1]
    assert set(fmt.scan.stored) == {"appvms/work/icon.png", "appvms/work/private.img",
                                    "vm-templates/fedora-17/.", "dom0-home/user"}
    assert fmt.authenticated_with.startswith("nothing")


@pytest.mark.parametrize("dir_path", [
    "/var/lib/qubes/appvms/../../../etc", "/etc", "", "appvms/work", "/var/lib/qubes/appvms/.",
    "/var/lib/qubes/appvms/..", "/var/lib/qubes/appvms/work/x", "/var/lib/qubes/other/work",
    "/var/lib/qubes/appvms/wo rk", "/var/lib/qubes/appvms/wo\nrk",
])
def test_hostile_dir_path_is_refused(tmp_path: Path, dir_path: str) -> None:
    fmt = v1.Format1(folder(tmp_path))
    xml = XML.replace(b"/var/lib/qubes/appvms/work", dir_path.encode())
    with pytest.raises(BackupError, match="unexpected dir_path"):
        fmt.inventory(xml)


@pytest.mark.parametrize("name", ["../../etc", "dom0-home", "qubes.xml", "a/b", "-rf"])
def test_hostile_vm_name_is_refused(tmp_path: Path, name: str) -> None:
    fmt = v1.Format1(folder(tmp_path))
    with pytest.raises(BackupError, match="refusing VM name"):
        fmt.inventory(XML.replace(b'name="work"', f'name="{name}"'.encode()))


def test_links_where_folders_belong_are_refused_never_followed(tmp_path: Path) -> None:
    root = folder(tmp_path)
    outside = tmp_path / "outside"
    (outside / "x").mkdir(parents=True)
    os.symlink(outside, root / "servicevms")
    os.symlink(outside, root / "appvms" / "evil")
    (root / "appvms" / "work" / "we ird").write_text("x")
    scan = scan_folder(root)
    assert not any(s.startswith(("servicevms", "appvms/evil")) for s in scan.stored)
    joined = "\n".join(scan.problems)
    assert "servicevms: is a symbolic link" in joined
    assert "appvms/evil: is a symbolic link" in joined
    assert "appvms/work/we ird: a name R1's writer never gave" in joined
    # checked again just before tar -c reads: a folder swapped for a link since the scan
    os.rename(root / "vm-templates" / "fedora-17", tmp_path / "moved")
    os.symlink(tmp_path / "moved", root / "vm-templates" / "fedora-17")
    assert path_is_safe(root, "vm-templates/fedora-17/.") is not None
    assert path_is_safe(root, "appvms/work/private.img") is None


def test_qubes_xml_must_be_a_file(tmp_path: Path) -> None:
    root = folder(tmp_path)
    os.rename(root / "qubes.xml", tmp_path / "elsewhere.xml")
    os.symlink(tmp_path / "elsewhere.xml", root / "qubes.xml")
    with pytest.raises(BackupError, match="symbolic link"):
        list(v1.Format1(root).members())


def test_two_homes_are_refused(tmp_path: Path) -> None:
    root = folder(tmp_path)
    (root / "dom0-home" / "other").mkdir()
    scan = scan_folder(root)
    assert scan.dom0 is None and "holds 2 folders" in scan.problems[0]
    assert not any(s.startswith("dom0-home") for s in scan.stored)


def test_read_stage_follows_nothing() -> None:
    stage = v1.read_stage(Path("/b"), "appvms/work/private.img")
    assert stage.argv == ("tar", "-c", "--sparse", "-f", "-", "-C", "/b", "--",
                          "appvms/work/private.img")
    assert not {"-h", "--dereference", "--hard-dereference"} & set(stage.argv)


@pytest.mark.parametrize(("first", "packed"), [
    ("qubes.xml", True), ("qubes-2012-09-01-120000/appvms/work/icon.png", True),
    ("./appvms/work/private.img", True), ("x/qubes.xml", True), ("dom0-home/user/.bashrc", True),
    ("qubes.xml.000", False), ("src/main.c", False), ("vm7/private.img.000", False),
    ("appvms", False),
])
def test_a_packed_folder_is_named(first: str, packed: bool) -> None:
    if packed:
        with pytest.raises(BackupError, match="packed into an archive"):
            formats.detect(first=first, refuse_packed=True)
    else:
        formats.detect(first=first, refuse_packed=True)
    formats.detect(first=first)  # only where a header was looked for and not found


def test_a_packed_folder_is_named_before_any_passphrase(tmp_path: Path) -> None:
    import subprocess

    root = folder(tmp_path)
    packed = tmp_path / "r1.tar"
    subprocess.run(["tar", "-c", "-f", str(packed), "-C", str(tmp_path), root.name], check=True)
    assert v1.first_file(str(packed)) == f"{root.name}/appvms/work/icon.png"
    with pytest.raises(BackupError, match="packed into an archive"):
        formats.detect(paths=[str(packed)])
    formats.detect(paths=[str(root / "qubes.xml")])  # not a tar: left to the run
    formats.detect(paths=["-"])
