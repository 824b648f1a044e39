"""Format 1 (Qubes R1) end to end, through the CLI (its main(), as the installed script
calls it; the nobody run starts the installed program), on folders written by
scripts/make_backup_v1.py (R1's own mkdir -p and cp -rp, never qrecover's code).

restore byte for byte (holes kept, links as links), the selection options,
info, verify, --dry-run, script (run under dash), --transcript (replayed
under dash), --explain, --resume, and the warning that nothing in a format-1
backup can be authenticated, before the run and in its summary.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from qrecover.stages.extract import pick_extractor  # bsdtar where installed

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

import make_backup as gen  # noqa: E402  (never qrecover code)
import make_backup_v1 as gen1  # noqa: E402
from conftest import run_main  # noqa: E402

pytestmark = pytest.mark.xdist_group("test_format1")  # module fixtures built once

QRECOVER = str(Path(sys.executable).parent / "qrecover")
WARNING = "nothing in this backup can be authenticated"
# Where each VM's folder in the backup lands in the output (qubes.xml's names).
FOLDERS = {
    "appvms/work": "work",
    "appvms/untrusted": "untrusted",
    "appvms/standalone": "standalone",
    "servicevms/sys-net": "sys-net",
    "vm-templates/fedora-23": "fedora-23",
    "dom0-home/user": "dom0-home/user",
}


@dataclass
class Result:
    code: int
    out: str
    err: str


def run(*args: str | Path, env: dict[str, str] | None = None) -> Result:
    """``qrecover ARGS``: its main() in this process (conftest's ``run_main``)."""
    done = run_main(*args, env=env)
    return Result(done.code, done.out, done.err)


@pytest.fixture(scope="module")
def backup(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An R1 folder: a sparse 64 MiB image, a link as icon.png, a standalone VM,
    a template, a NetVM, dom0's home; sys-firewall in qubes.xml but not backed up."""
    root = tmp_path_factory.mktemp("r1")
    vms, home = gen.make_sample_tree(root / "tree", image_mb=64)
    for vm in vms:
        if vm.name == "work" and vm.source is not None:
            (vm.source / "icon.png").unlink()
            (vm.source / "icon.png").symlink_to("/usr/share/qubes/icons/blue.png")
    (root / "target").mkdir()
    manifest = gen1.make_backup_v1(root / "target", vms, dom0_home=home,
                                   folder_name="qubes-2012-09-01-120000")
    return Path(manifest.path)


@pytest.fixture(scope="module")
def restored(backup: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Result]:
    out = tmp_path_factory.mktemp("r1out") / "out"
    return out, run("restore", backup, "--output", out)


def tree(folder: Path) -> dict[str, tuple[str, str]]:
    """Every entry under ``folder``: its type and contents (sha256, link target)."""
    found: dict[str, tuple[str, str]] = {}
    for dirpath, dirs, files in os.walk(folder):
        for name in [*dirs, *files]:
            path = Path(dirpath, name)
            rel = str(path.relative_to(folder))
            st = path.lstat()
            if stat.S_ISLNK(st.st_mode):
                found[rel] = ("link", os.readlink(path))
            elif stat.S_ISDIR(st.st_mode):
                found[rel] = ("dir", "")
            else:
                found[rel] = ("file", hashlib.sha256(path.read_bytes()).hexdigest())
    return found


def test_restore_is_byte_for_byte(backup: Path, restored: tuple[Path, Result]) -> None:
    out, result = restored
    assert result.code == 0, result.err
    for stored, dest in FOLDERS.items():
        assert tree(out / dest) == tree(backup / stored), dest
    assert (out / "qubes.xml").read_bytes() == (backup / "qubes.xml").read_bytes()
    assert not (out / "sys-firewall").exists()  # in qubes.xml, not in the backup
    assert sorted(os.listdir(out)) == sorted(
        ["qubes.xml", "dom0-home", *(d for d in FOLDERS.values() if "/" not in d)]
    )


def test_links_stay_links_and_images_stay_sparse(backup: Path,
                                                 restored: tuple[Path, Result]) -> None:
    out, _ = restored
    icon = out / "work" / "icon.png"
    assert icon.is_symlink() and os.readlink(icon) == "/usr/share/qubes/icons/blue.png"
    image = out / "work" / "private.img"
    source = backup / "appvms" / "work" / "private.img"
    assert image.stat().st_size == source.stat().st_size == 64 * 1024 * 1024
    # holes kept: no more blocks than the source, and far fewer than its size
    assert image.stat().st_blocks <= source.stat().st_blocks + 64
    assert image.stat().st_blocks * 512 < image.stat().st_size // 4


def test_restore_says_nothing_was_authenticated(restored: tuple[Path, Result]) -> None:
    _, result = restored
    lines = result.err.splitlines()
    assert WARNING in lines[0]  # before anything is restored
    assert "sys-firewall" in result.err and "not in this folder" in result.err
    verdict = result.out.strip().splitlines()[-1]
    assert "NOTHING was authenticated" in verdict and "restored 14 stored file(s)" in verdict


def test_restore_never_overwrites(backup: Path, restored: tuple[Path, Result]) -> None:
    out, _ = restored
    again = run("restore", backup, "--output", out, "--vm", "work")
    assert again.code == 6 and "would overwrite" in again.err


def test_info(backup: Path) -> None:
    result = run("info", backup)
    assert result.code == 0, result.err
    assert "format 1, written by Qubes R1 (and R2-Beta1/Beta2)" in result.out
    assert "NOT AUTHENTICATED" in result.out and WARNING in result.out
    for name in ("work", "untrusted", "standalone", "sys-net", "fedora-23", "dom0"):
        assert f"  {name} " in result.out
    assert "not in this folder" in result.out and "sys-firewall" in result.out
    doc = json.loads(run("info", backup, "--json").out)
    assert doc["header"]["version"] == 1 and doc["header"]["hmac"] == "none"
    by_name = {vm["name"]: vm for vm in doc["vms"]}
    assert by_name["work"]["backup_path"] == "appvms/work"
    assert by_name["fedora-23"]["type"] == "TemplateVM"
    assert by_name["dom0"]["backup_path"] == "dom0-home/user"
    assert "sys-firewall" not in by_name


def test_selection(backup: Path, tmp_path: Path) -> None:
    out = tmp_path / "sel"
    result = run("restore", backup, "--output", out, "--vm", "work", "--vm", "dom0",
                 "--vm", "fedora-23", "--exclude", "fedora-23")
    assert result.code == 0, result.err
    assert sorted(os.listdir(out)) == ["dom0-home", "qubes.xml", "work"]
    out2 = tmp_path / "skip"
    result = run("restore", backup, "--output", out2, "--skip-dom0-home", "--exclude", "work")
    assert result.code == 0, result.err
    assert "dom0-home" not in os.listdir(out2) and "work" not in os.listdir(out2)
    assert "untrusted" in os.listdir(out2)
    unknown = run("restore", backup, "--output", tmp_path / "x", "--vm", "sys-firewall")
    assert unknown.code == 2 and "not in this backup: sys-firewall" in unknown.err


def test_verify_reads_everything_and_writes_nothing(backup: Path, tmp_path: Path) -> None:
    result = run("verify", backup)
    assert result.code == 0, result.err
    assert WARNING in result.err.splitlines()[0]
    assert result.out.count("OK  ") == 14
    assert "read completely, but NOTHING was authenticated" in result.out.splitlines()[-1]


def test_dry_run(backup: Path, tmp_path: Path, restored: tuple[Path, Result]) -> None:
    out = tmp_path / "dry"
    result = run("restore", backup, "--output", out, "--dry-run")
    assert result.code == 0, result.err
    assert not out.exists()
    assert "NOTHING in it can be authenticated" in result.out
    x = pick_extractor()
    assert f"tar -c --sparse -f - -C {backup} -- appvms/work/F | {x} -x" in result.out
    assert "tar -i" not in result.out  # nothing to untar
    busy = run("restore", backup, "--output", restored[0], "--dry-run")
    assert busy.code == 6 and "It would stop" in busy.out


@pytest.fixture
def world() -> Iterator[Path]:
    folder = Path(tempfile.mkdtemp(prefix="qrecover-v1e-"))
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


def test_script_under_dash_restores_the_same(backup: Path, restored: tuple[Path, Result],
                                             tmp_path: Path) -> None:
    out = tmp_path / "by-script"
    script = run("script", backup, "--output", out)
    assert script.code == 0, script.err
    assert "\nget_passphrase\n" not in script.out  # nothing asks for one
    assert "WARNING: format 1 (Qubes R1) has no HMAC" in script.out
    path = tmp_path / "recover.sh"
    path.write_text(script.out)
    replay = subprocess.run(["dash", str(path)], capture_output=True, text=True,
                            stdin=subprocess.DEVNULL, timeout=300, check=False)
    assert replay.returncode == 0, replay.stderr
    assert tree(out) == tree(restored[0])
    image = out / "work" / "private.img"
    assert image.stat().st_blocks * 512 < image.stat().st_size // 4  # sparse


def test_script_stops_at_a_fifo(backup: Path, tmp_path: Path) -> None:
    copy = tmp_path / "copy"
    subprocess.run(["cp", "-a", str(backup), str(copy)], check=True)
    os.mkfifo(copy / "appvms" / "work" / "pipe")
    out = tmp_path / "o"
    text = run("script", copy, "--output", out, "--vm", "work").out
    (tmp_path / "r.sh").write_text(text)
    replay = subprocess.run(["dash", str(tmp_path / "r.sh")], capture_output=True, text=True,
                            stdin=subprocess.DEVNULL, timeout=300, check=False)
    assert replay.returncode != 0 and "pipe: a FIFO" in replay.stderr
    assert not (out / "work" / "pipe").exists()


def test_transcript_replays_under_dash(backup: Path, tmp_path: Path) -> None:
    out = tmp_path / "t"
    transcript = tmp_path / "t.sh"
    result = run("restore", backup, "--output", out, "--vm", "work", "--vm", "dom0",
                 "--vm", "fedora-23", "--transcript", transcript, "--explain")
    assert result.code == 0, result.err
    first = tree(out)
    text = transcript.read_text()
    assert "WARNING: format 1" in text and "\nlist_members\n" not in text  # no untar
    shutil.rmtree(out)
    replay = subprocess.run(["dash", str(transcript)], capture_output=True, text=True,
                            stdin=subprocess.DEVNULL, timeout=300, check=False)
    assert replay.returncode == 0, replay.stderr
    assert tree(out) == first
    # --explain, in format 1's own words
    assert "* Step 1 - read qubes.xml from the folder" in result.err
    assert "* No header to verify" in result.err
    assert "* Step 2 - copy appvms/work/private.img" in result.err
    x = pick_extractor()
    assert f"$ tar -c --sparse -f - -C {backup} -- appvms/work/private.img | {x} -x" in result.err


def test_resume_after_a_failure(backup: Path, tmp_path: Path) -> None:
    copy = tmp_path / "copy"
    subprocess.run(["cp", "-a", str(backup), str(copy)], check=True)
    os.mkfifo(copy / "appvms" / "work" / "pipe")
    out = tmp_path / "o"
    first = run("restore", copy, "--output", out)
    assert first.code == 4 and "FIFO, not restored" in first.err
    image = out / "untrusted" / "private.img"
    inode = image.stat().st_ino
    os.unlink(copy / "appvms" / "work" / "pipe")
    again = run("restore", copy, "--output", out, "--resume")
    assert again.code == 0, again.err
    assert "KEPT" in again.out and image.stat().st_ino == inode
    assert tree(out / "work") == tree(copy / "appvms" / "work")


def test_a_failure_inside_a_folder_keeps_it_as_partial(backup: Path, world: Path) -> None:
    copy = world / "copy"
    subprocess.run(["cp", "-a", str(backup), str(copy)], check=True)
    (copy / "dom0-home" / "user" / ".bashrc").chmod(0)
    world.chmod(0o755)
    prefix: list[str] = []
    if os.geteuid() == 0:  # root reads a mode-000 file: run as an ordinary user
        os.chown(world, 65534, 65534)
        prefix = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
    out = world / "out"
    proc = subprocess.run([*prefix, QRECOVER, "restore", str(copy), "--output", str(out),
                           "--vm", "dom0"], capture_output=True, text=True,
                          stdin=subprocess.DEVNULL, timeout=300, check=False)
    assert proc.returncode == 4, proc.stderr
    assert "Permission denied" in proc.stderr
    assert (out / "dom0-home" / "user.partial").is_dir()
    assert not (out / "dom0-home" / "user").exists()
    assert WARNING in proc.stderr.splitlines()[-1] or WARNING in proc.stderr


def test_sparse_islands_hard_links_and_long_names(tmp_path: Path) -> None:
    """What GNU tar -c writes with extra headers (old-GNU sparse extension blocks for
    a file of many data islands, long-name headers, hard links) passes the guard and
    restores exactly."""
    src = tmp_path / "src"
    work = src / "work"
    work.mkdir(parents=True)
    image = work / "private.img"
    with image.open("wb") as f:
        for i in range(40):  # 40 islands of data, 1 MiB apart
            f.seek(i * 1024 * 1024)
            f.write(bytes([i + 1]) * 5000)
        f.truncate(48 * 1024 * 1024)
    home = src / "home"
    deep = home / ("d" * 90) / ("e" * 90)
    deep.mkdir(parents=True)
    (deep / ("f" * 120 + ".txt")).write_text("long name\n")
    (home / "a").write_text("linked\n")
    os.link(home / "a", home / "b")
    (tmp_path / "target").mkdir()
    manifest = gen1.make_backup_v1(tmp_path / "target", [gen.VmSpec("work", 7, source=work)],
                                   dom0_home=home)
    backed = Path(manifest.path)
    # cp -rp copies a hard link as two files; a folder copied with cp -a keeps one
    os.link(backed / "dom0-home/user/a", backed / "dom0-home/user/c")
    out = tmp_path / "out"
    result = run("restore", backed, "--output", out)
    assert result.code == 0, result.err
    assert tree(out / "work") == tree(backed / "appvms" / "work")
    assert tree(out / "dom0-home" / "user") == tree(backed / "dom0-home" / "user")
    restored = out / "work" / "private.img"
    assert restored.stat().st_blocks <= image.stat().st_blocks + 64
    assert os.stat(out / "dom0-home/user/a").st_ino == os.stat(out / "dom0-home/user/c").st_ino


def test_restore_files_from_an_r1_image(tmp_path: Path) -> None:
    """restore --files on format 1: the VM's private.img (a real ext4 image, made by
    mkfs.ext4 -d) restored, then its /home/user copied out with debugfs."""
    import ext4image

    src = tmp_path / "src" / "work"
    src.mkdir(parents=True)
    tree_dir = ext4image.make_private_tree(tmp_path / "tree")
    ext4image.make_ext4(tree_dir, src / "private.img", 16)
    (tmp_path / "target").mkdir()
    manifest = gen1.make_backup_v1(tmp_path / "target", [gen.VmSpec("work", 7, source=src)])
    out = tmp_path / "out"
    result = run("restore", manifest.path, "--output", out, "--files")
    assert result.code == 0, result.err
    assert tree(out / "work" / "files" / "user") == tree(tree_dir / "home" / "user")


def test_a_vm_folder_qubes_xml_does_not_list_is_restored_under_its_name(
    backup: Path, tmp_path: Path
) -> None:
    """Issue 22, item 5: the data is there and named, and nothing in format 1 is
    authenticated anyway: restored under the folder's name with a note, exit 0."""
    copy = tmp_path / "qubes-2012-09-01-120000"
    shutil.copytree(backup, copy, symlinks=True)
    shutil.copytree(copy / "appvms" / "untrusted", copy / "appvms" / "stray", symlinks=True)
    out = tmp_path / "out"
    result = run("restore", copy, "--output", out, "--vm", "stray")
    assert result.code == 0, result.err
    assert "not in its qubes.xml, so restored under the folder's name" in result.err
    assert "stray (appvms/stray)" in result.err
    assert tree(out / "stray") == tree(copy / "appvms" / "stray")
    listed = run("info", copy)
    assert listed.code == 0 and "stray" in listed.out, listed.err
