"""Self-check of scripts/make_backup_v1.py without any qrecover code.

An R1 backup folder is restored the way R1's qvm-backup-restore did it
(qubes-core-admin tag R1, dom0/qvm-core/qubesutils.py): qubes.xml read from
the folder; a VM is in the backup when its ``dir_path`` with /var/lib/qubes
replaced by the folder exists; files copied back with ``cp -rp``; dom0's
home is the one folder under ``dom0-home``. The result is compared byte for
byte with the sources, holes and symlinks included.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

# its fixtures build something big: all its tests on one worker, so it is built once
pytestmark = pytest.mark.xdist_group("test_generator_v1")

SCRIPTS = Path(__file__).resolve().parent.parent / "scripts"
sys.path.insert(0, str(SCRIPTS))

import make_backup as mb  # noqa: E402
import make_backup_v1 as mb1  # noqa: E402


@pytest.fixture(scope="module")
def backup(tmp_path_factory: pytest.TempPathFactory) -> tuple[mb1.BackupManifestV1, Path]:
    root = tmp_path_factory.mktemp("sample1")
    vms, home = mb.make_sample_tree(root / "tree", image_mb=2)
    for vm in vms:
        if vm.name == "work" and vm.source is not None:
            (vm.source / "icon.png").unlink()
            (vm.source / "icon.png").symlink_to("/usr/share/qubes/icons/blue.png")
    target = root / "target"
    target.mkdir()
    return mb1.make_backup_v1(target, vms, dom0_home=home), root


def r1_restore(folder: Path, dest: Path) -> dict[str, str]:
    """R1's restore, by hand; returns {vm name: restored dir}."""
    xml = ET.parse(folder / "qubes.xml").getroot()
    assert xml.tag == "QubesVmCollection"
    restored: dict[str, str] = {}
    for elem in xml:
        dir_path = elem.attrib["dir_path"]
        in_backup = folder / os.path.relpath(dir_path, "/var/lib/qubes")
        if not in_backup.is_dir():
            continue
        target = dest / os.path.relpath(dir_path, "/var/lib/qubes")
        target.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run(["cp", "-rp", str(in_backup), str(target)], check=True)
        restored[elem.attrib["name"]] = str(target)
    homes = os.listdir(folder / "dom0-home")
    assert len(homes) == 1, "more than one dom0 home in the backup"
    (dest / "dom0-home").mkdir()
    subprocess.run(["cp", "-rp", str(folder / "dom0-home" / homes[0]),
                    str(dest / "dom0-home")], check=True)
    return restored


def test_layout_and_qubes_xml(backup: tuple[mb1.BackupManifestV1, Path]) -> None:
    manifest, _ = backup
    folder = Path(manifest.path)
    assert folder.name.startswith("qubes-")
    assert sorted(os.listdir(folder)) == ["appvms", "dom0-home", "qubes.xml", "servicevms",
                                          "vm-templates"]
    # No header, no HMAC, nothing encrypted: plain files only.
    for _dirpath, _dirs, files in os.walk(folder):
        for name in files:
            assert not name.endswith(".hmac") and name != "backup-header", name
    xml = ET.parse(folder / "qubes.xml").getroot()
    names = [e.attrib["name"] for e in xml]
    assert "sys-firewall" in names  # listed though not backed up
    assert not (folder / "servicevms" / "sys-firewall").exists()
    for elem in xml:
        assert not any(k.startswith("backup_") for k in elem.attrib), elem.attrib
        assert elem.tag in mb1.R1_CLASSES
    assert (folder / "vm-templates" / "fedora-23" / "root.img").is_file()
    assert os.readlink(folder / "appvms" / "work" / "icon.png") == \
        "/usr/share/qubes/icons/blue.png"
    # cp -rp kept the image sparse.
    img = folder / "appvms" / "work" / "private.img"
    assert img.stat().st_blocks * 512 < img.stat().st_size // 2


def test_restore_by_r1_procedure(backup: tuple[mb1.BackupManifestV1, Path],
                                 tmp_path: Path) -> None:
    manifest, _ = backup
    restored = r1_restore(Path(manifest.path), tmp_path)
    assert sorted(restored) == sorted(v["name"] for v in manifest.vms if v["backup_content"])
    expected = mb1.expected_files_v1(manifest)
    assert expected
    for entry in expected:
        path = tmp_path / entry["name"]
        if entry["type"] == "symlink":
            assert os.readlink(path) == entry["target"], entry["name"]
        elif entry["type"] == "dir":
            assert path.is_dir() and not path.is_symlink(), entry["name"]
        else:
            data = path.read_bytes()
            assert len(data) == entry["size"], entry["name"]
            assert hashlib.sha256(data).hexdigest() == entry["sha256"], entry["name"]
    found = {str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")}
    wanted = {e["name"] for e in expected}
    wanted |= {str(p) for n in wanted for p in Path(n).parents} - {"."}
    assert found == wanted


def test_cli(tmp_path: Path) -> None:
    (tmp_path / "t").mkdir()
    proc = subprocess.run(
        [sys.executable, str(SCRIPTS / "make_backup_v1.py"), str(tmp_path / "t"),
         "--name", "qubes-2012-09-01-120000", "--sample", str(tmp_path / "tree"),
         "--image-mb", "2", "--manifest", str(tmp_path / "m.json"),
         "--contents", str(tmp_path / "c.json")],
        capture_output=True, text=True, check=False,
    )
    assert proc.returncode == 0, proc.stderr
    manifest = json.loads((tmp_path / "m.json").read_text(encoding="utf-8"))
    assert manifest["path"] == str(tmp_path / "t" / "qubes-2012-09-01-120000")
    assert {f["relpath"] for f in manifest["files"]} >= {
        "qubes.xml", "appvms/work/private.img", "vm-templates/fedora-23", "dom0-home/user"}
    contents = json.loads((tmp_path / "c.json").read_text(encoding="utf-8"))
    assert any(e["name"] == "dom0-home/user/notes-link" and e["type"] == "symlink"
               for e in contents)
    # R1 refused to write into an existing backup folder.
    again = subprocess.run(
        [sys.executable, str(SCRIPTS / "make_backup_v1.py"), str(tmp_path / "t"),
         "--name", "qubes-2012-09-01-120000", "--sample", str(tmp_path / "tree2"),
         "--image-mb", "2"], capture_output=True, text=True, check=False)
    assert again.returncode == 1 and "exists" in again.stderr
