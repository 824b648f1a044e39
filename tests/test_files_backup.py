"""qrecover files BACKUP --vm NAME: files straight from a backup made by the generators.

The backups (formats 3 and 4) are written by scripts/make_backup.py and
scripts/make_backup_v4.py around real images: an ext4 private.img
(mkfs.ext4 -d) and a GPT root.img (scripts/ext4image.py).  The image is
restored into scratch inside DIR by the restore engine, read, and removed.
"""

from __future__ import annotations

import os
import select
import signal
import subprocess
import time
from pathlib import Path

import ext4image
import pytest
from conftest import Backup, MakeBackup, gen, qrecover_exe, run_main, sha, sigint_as_at_a_terminal
from helpers import mounted_tmpfs, tampered_copy

pytestmark = pytest.mark.xdist_group("test_files")

HOME = Path("home") / "user"


def _no_scratch(out: Path) -> None:
    left = [p for p in out.rglob("*") if p.name.startswith(".qrecover")] if out.exists() else []
    assert left == []


@pytest.fixture(scope="session")
def vm_folders(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[gen.VmSpec], Path]:
    """box: standalone (private.img ext4, root.img GPT); tpl: a template; app: an AppVM.

    Returns the VMs and the private tree box's image holds."""
    base = tmp_path_factory.mktemp("vm-folders")
    tree = ext4image.make_private_tree(base / "private-tree")
    system = base / "system-tree"
    (system / "etc").mkdir(parents=True)
    (system / "etc" / "hostname").write_text("box\n")
    root_fs = ext4image.make_ext4(system, base / "root.fs", 4)
    vms = []
    for name, qid, klass, template in (
        ("box", 7, "QubesAppVm", None),
        ("tpl", 3, "QubesTemplateVm", None),
        ("app", 9, "QubesAppVm", "tpl"),
    ):
        folder = base / "vms" / name
        folder.mkdir(parents=True)
        ext4image.make_ext4(tree, folder / "private.img", 8)
        if template is None:
            ext4image.make_template_root(folder / "root.img", root_fs)
        vms.append(gen.VmSpec(name, qid, klass, template, folder))
    return vms, tree


@pytest.fixture(scope="session", params=["format 3", "format 4"])
def backup(
    request: pytest.FixtureRequest,
    make: MakeBackup,
    make4: MakeBackup,
    vm_folders: tuple[list[gen.VmSpec], Path],
) -> Backup:
    maker = make if request.param == "format 3" else make4
    return maker(vms=vm_folders[0], dom0_home=None)


def _files(backup: Backup, *args: str | Path) -> list[str | Path]:
    return ["files", backup.path, *args, "--passphrase-file", backup.passfile]


def test_private_img_of_a_vm(
    backup: Backup, vm_folders: tuple[list[gen.VmSpec], Path], tmp_path: Path
) -> None:
    tree = vm_folders[1]
    out = tmp_path / "out"
    result = run_main(*_files(backup, "--vm", "box", "-o", out))
    assert result.code == 0, result.text
    # the space said before starting; the image restored, read and removed
    assert "IMAGE     box: restoring its private.img into private scratch in" in result.out
    assert "needs up to" in result.out and "free; removed when done" in result.out
    assert result.out.index("IMAGE") < result.out.index("RESTORED") < result.out.index("COPIED")
    assert sorted(p.name for p in out.iterdir()) == ["user"]
    _no_scratch(out)
    for rel in ("Documents/Grüße aus Köln.txt", "Documents/tax return 2016.pdf", "script.sh"):
        assert sha(out / "user" / rel) == sha(tree / HOME / rel), rel
    assert (out / "user" / "link to notes").is_symlink()


def test_root_img_and_paths(backup: Backup, tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = run_main(*_files(backup, "--vm", "box", "--image", "root", "/etc", "-o", out))
    assert result.code == 0, result.text
    assert "restoring its root.img" in result.out
    assert (out / "etc" / "hostname").read_text() == "box\n"
    assert sorted(p.name for p in out.iterdir()) == ["etc"]
    # a template: format 3 stores its folder whole (vm3/.), format 4 each volume
    tpl = tmp_path / "tpl"
    result = run_main(*_files(backup, "--vm", "tpl", "--image", "root", "/etc", "-o", tpl))
    assert result.code == 0, result.text
    whole = backup.path.name == "qubes-backup"  # the format-3 writer's file
    assert ("RESTORED  tpl              vm3/. ->" in result.out) == whole
    assert (tpl / "etc" / "hostname").read_text() == "box\n"
    assert sorted(p.name for p in tpl.iterdir()) == ["etc"]
    # --list: the restored root.img's partitions, then nothing is left
    listed = tmp_path / "listed"
    result = run_main(*_files(backup, "--vm", "box", "--image", "root", "--list", "-o", listed))
    assert result.code == 0, result.text
    assert "GPT partition table" in result.out and "*  3 Linux filesystem" in result.out
    assert not listed.exists()


def test_a_vm_without_the_image(backup: Backup, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    result = run_main(*_files(backup, "--vm", "app", "--image", "root", "-o", out))
    assert result.code == 4, result.text
    assert "app: the backup holds no root.img for it (it holds: " in result.err
    assert list(out.iterdir()) == []  # DIR was there before: kept, and empty
    result = run_main(*_files(backup, "--vm", "nobody", "-o", out))
    assert result.code == 2 and "not in this backup: nobody" in result.err
    assert list(out.iterdir()) == []


def test_refused_when_the_disk_is_too_small(backup: Backup, tmp_path: Path) -> None:
    with mounted_tmpfs(tmp_path / "small", "1m") as where:
        out = where / "out"
        result = run_main(*_files(backup, "--vm", "box", "-o", out))
        assert result.code == 6, result.text
        assert "RESTORED" not in result.out and "Traceback" not in result.text
        assert "free, but box's private.img may need up to" in result.err
        assert "nothing was restored" in result.err
        assert not out.exists()  # made by the run, removed with its scratch


def test_wrong_passphrase_and_options(backup: Backup, tmp_path: Path) -> None:
    wrong = tmp_path / "wrong"
    wrong.write_text("not it\n")
    out = tmp_path / "out"
    result = run_main("files", backup.path, "--vm", "box", "-o", out, "--passphrase-file", wrong)
    assert result.code == 3, result.text
    assert not out.exists()
    result = run_main("files", backup.path, "--passphrase-file", wrong, "-o", out)
    assert result.code == 2 and "give --vm NAME with the BACKUP" in result.err
    result = run_main("files", backup.path, "--vm", "box")
    assert result.code == 2 and "--output DIR is needed with --vm" in result.err
    result = run_main("files", backup.path, "-o", out)  # the backup without --vm
    assert result.code == 2 and "is a tar archive, not a VM image" in result.err
    assert f"qrecover files {backup.path} --vm NAME --output DIR" in result.err
    result = run_main(*_files(backup, "--vm", "box", "--image", "swap", "-o", out))
    assert result.code == 2 and "choose private or root" in result.err
    # what exists in DIR is never overwritten: refused before the restore
    out.mkdir()
    (out / "user").mkdir()
    result = run_main(*_files(backup, "--vm", "box", "-o", out))
    assert result.code == 6 and "would overwrite" in result.err
    assert "RESTORED" not in result.out
    assert sorted(p.name for p in out.iterdir()) == ["user"]


def test_transcript_and_explain(backup: Backup, tmp_path: Path) -> None:
    out = tmp_path / "out"
    script = tmp_path / "replay.sh"
    result = run_main(*_files(backup, "--vm", "box", "-o", out, "--transcript", script,
                              "--explain"))
    assert result.code == 0, result.text
    text = script.read_text()
    assert "vm7/private.img" in text and "backup-header" in text
    assert "HMAC" in result.err or "scrypt" in result.err  # the narration, on stderr
    _no_scratch(out)


def test_interrupted_leaves_no_image(backup: Backup, tmp_path: Path) -> None:
    """SIGINT while the image is being restored (the backup half fed on stdin): exit 130,
    and the scratch folder with the half-restored image is gone."""
    out = tmp_path / "out"
    out.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "QRECOVER_PASSPHRASE"}
    proc = subprocess.Popen(
        [*qrecover_exe(), "files", "-", "--vm", "box", "-o", str(out),
         "--passphrase-file", str(backup.passfile)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
        preexec_fn=sigint_as_at_a_terminal,
    )
    assert proc.stdin is not None and proc.stdout is not None
    data = backup.path.read_bytes()
    proc.stdin.write(data[: len(data) // 2])
    proc.stdin.flush()
    seen = b""
    deadline = time.monotonic() + 120
    while b"IMAGE" not in seen:  # printed once the plan is made, before the image is read
        assert time.monotonic() < deadline, seen
        ready, _, _ = select.select([proc.stdout], [], [], 5)
        if ready:
            block = os.read(proc.stdout.fileno(), 4096)
            assert block, "qrecover ended before restoring"
            seen += block
    assert [p.name[:15] for p in out.iterdir()] == [".qrecover-image"]
    proc.send_signal(signal.SIGINT)
    _out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert b"Traceback" not in err
    assert list(out.iterdir()) == []


def test_an_image_restored_as_a_link_is_not_followed(tmp_path: Path) -> None:
    """A validly signed backup whose private.img is a symbolic link to a file of yours:
    refused (exit 4), the file never read, nothing left."""
    import tarfile

    import make_bad_backups as bad

    victim = tmp_path / "victim.img"
    victim.write_bytes(b"not for the backup to read")
    link_tar = bad.inner_tar([bad.member("vm7/private.img", tarfile.SYMTYPE, str(victim))])
    members = (
        bad.signed_header(bad.HEADER)
        + bad.xml_members(bad.qubes_xml(bad.vm_xml(size=64 << 10)))
        + bad.stored("vm7/private.img", link_tar)
    )
    backup = tmp_path / "trap"
    bad.write_outer(backup, members)
    passfile = tmp_path / "pass"
    passfile.write_text(bad.PASSPHRASE + "\n")
    out = tmp_path / "out"
    result = run_main("files", backup, "--vm", "work", "-o", out, "--passphrase-file", passfile)
    assert result.code == 4, result.text
    assert "restored as a symbolic link; not followed" in result.err
    assert "COPIED" not in result.out
    assert not out.exists()


def test_other_copy_gives_the_lost_chunk(backup: Backup, tmp_path: Path) -> None:
    """A chunk of box's private.img damaged in BACKUP: refused alone (exit 4), and
    taken from --other-copy (the intact backup) instead; the files then come out."""

    name = "vm7/private.img.000" + (".enc" if backup.path.name.endswith("r4") else "")
    bad = tampered_copy(backup.path, tmp_path / "damaged", name, at=100, mask=0x04)
    out = tmp_path / "out"
    result = run_main("files", bad, "--vm", "box", "-o", out, "--passphrase-file",
                      backup.passfile)
    assert result.code == 4, result.text
    assert not out.exists()
    result = run_main("files", bad, "--vm", "box", "-o", out, "--passphrase-file",
                      backup.passfile, "--other-copy", backup.path)
    assert result.code == 0, result.text
    assert (out / "user" / "script.sh").read_text() == "#!/bin/sh\necho hello\n"
    _no_scratch(out)
    result = run_main("files", bad, "--other-copy", backup.path, "-o", tmp_path / "o")
    assert result.code == 2 and "--other-copy reads a backup" in result.err
