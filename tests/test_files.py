"""qrecover files / restore --files: real ext4 images made by scripts/ext4image.py."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import zlib
from pathlib import Path

import ext4image
import pytest
from conftest import ROOT, Backup, MakeBackup, gen, run_main, sha

from qrecover import files
from qrecover.errors import EXIT_MISSING_PROGRAM, BackupError, MissingProgramError
from qrecover.files import debugfs

# its fixtures build something big: all its tests on one worker, so it is built once
pytestmark = pytest.mark.xdist_group("test_files")


@pytest.fixture(scope="session")
def private(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(image, tree): a VM private image with known content, specials added inside."""
    base = tmp_path_factory.mktemp("private")
    tree = ext4image.make_private_tree(base / "tree")
    image = ext4image.make_ext4(tree, base / "private.img", 16)
    ext4image.add_special_files(image)
    image.chmod(0o444)  # debugfs -c must not need to write it
    return image, tree


def _compare(copied: Path, source: Path) -> None:
    """Byte for byte, modes, mtimes, symlinks as links; nothing more, nothing less."""
    want = {p.relative_to(source) for p in source.rglob("*")}
    got = {p.relative_to(copied) for p in copied.rglob("*")}
    assert got == want
    for rel in want:
        src, dst = source / rel, copied / rel
        if src.is_symlink():
            assert dst.is_symlink(), rel
            assert os.readlink(dst) == os.readlink(src), rel
            continue
        s, d = src.lstat(), dst.lstat()
        assert stat.S_IFMT(d.st_mode) == stat.S_IFMT(s.st_mode), rel
        assert stat.S_IMODE(d.st_mode) == stat.S_IMODE(s.st_mode), rel
        assert d.st_mtime == s.st_mtime, rel
        assert d.st_uid == os.geteuid(), rel  # yours, not the image's uid 1000
        if src.is_file():
            assert sha(dst) == sha(src), rel


def _no_specials(root: Path) -> None:
    for path in [root, *root.rglob("*")]:
        mode = path.lstat().st_mode
        assert stat.S_ISDIR(mode) or stat.S_ISREG(mode) or stat.S_ISLNK(mode), path
        assert not mode & (stat.S_ISUID | stat.S_ISGID), path


def test_files_copies_home(private: tuple[Path, Path], tmp_path: Path) -> None:
    image, tree = private
    out = tmp_path / "out"
    result = run_main("-v", "files", image, "--output", out)
    assert result.code == 0, result.text
    assert "COPIED" in result.out
    # the commands, as they can be pasted: read-only debugfs, by inode
    assert "debugfs -c -f -" in result.err and "debugfs -c -R 'rdump <" in result.err
    # specials skipped with a note; a set-uid file loses the bit
    assert "skipped special file /home/user/pipe (FIFO)" in result.err
    assert "/home/user/null-device (character device)" in result.err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert sorted(p.name for p in out.iterdir()) == ["user"]
    copied = out / "user"
    # .bashrc is set-uid in the image (0104755): compared without that bit
    bashrc = tree / "home" / "user" / ".bashrc"
    os.chmod(bashrc, 0o755)
    try:
        _compare(copied, tree / "home" / "user")
    finally:
        os.chmod(bashrc, 0o644)
    _no_specials(out)
    old = copied / "Documents" / "old secret.txt"
    assert old.stat().st_mtime == ext4image.DISTINCT_MTIME
    assert stat.S_IMODE(old.stat().st_mode) == ext4image.DISTINCT_MODE
    assert (copied / "Documents" / "Grüße aus Köln.txt").read_text() == "Grüße - ünïcödé ✓ 日本語\n"
    assert os.readlink(copied / "escape-link") == "../../../../../../etc/passwd"


def test_files_several_paths_and_root(private: tuple[Path, Path], tmp_path: Path) -> None:
    image, tree = private
    out = tmp_path / "out"
    result = run_main("files", image, "-o", out, "/config", "home/user/Documents/")
    assert result.code == 0, result.text
    _compare(out / "config", tree / "config")
    _compare(out / "Documents", tree / "home" / "user" / "Documents")
    result = run_main("files", image, "-o", out, "/")
    assert result.code == 0, result.text
    assert (out / "rw" / "usrlocal" / "bin" / "tool").read_text() == "#!/bin/sh\n"
    assert (out / "rw" / "lost+found").is_dir()
    _no_specials(out)


def test_files_list(private: tuple[Path, Path], tmp_path: Path) -> None:
    image, _tree = private
    result = run_main("files", image, "--list")
    assert result.code == 0, result.text
    lines = result.out.splitlines()
    assert lines[0].endswith("  /home/user/")
    assert any(ln.endswith("/home/user/Documents/Grüße aus Köln.txt") for ln in lines)
    assert any(ln.startswith("-rw-r-----") and ln.endswith("old secret.txt") for ln in lines)
    assert any(ln.startswith("p") and ln.endswith("/home/user/pipe") for ln in lines)
    assert not list(tmp_path.iterdir())  # --list writes nothing


def test_files_never_overwrites_without_force(private: tuple[Path, Path], tmp_path: Path) -> None:
    image, tree = private
    out = tmp_path / "out"
    (out / "Documents").mkdir(parents=True)
    (out / "Documents" / "mine.txt").write_text("my own file")
    result = run_main("files", image, "-o", out, "/home/user/Documents")
    assert result.code == 6, result.text
    assert "--force" in result.err
    assert (out / "Documents" / "mine.txt").read_text() == "my own file"
    result = run_main("files", image, "-o", out, "/home/user/Documents", "--force")
    assert result.code == 0, result.text
    _compare(out / "Documents", tree / "home" / "user" / "Documents")
    assert [p.name for p in out.iterdir()] == ["Documents"]  # no staging left behind


def test_files_errors(private: tuple[Path, Path], tmp_path: Path) -> None:
    image, _tree = private
    result = run_main("files", image, "-o", tmp_path / "out", "/no/such/folder")
    assert result.code == 2 and "/no/such/folder: not found" in result.err, result.text
    assert "--list" in result.err
    result = run_main("files", tmp_path / "missing.img", "-o", tmp_path / "out")
    assert result.code == 2 and "no such file" in result.err
    result = run_main("files", image)
    assert result.code == 2 and "--output" in result.err
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    result = run_main("files", image, "-o", blocker)
    assert result.code == 6 and "not a folder" in result.err
    assert not (tmp_path / "out").exists()


def test_partitioned_image_says_what_it_is(private: tuple[Path, Path], tmp_path: Path) -> None:
    image, _tree = private
    disk = ext4image.make_partitioned(tmp_path / "root.img", image)
    # an MBR disk: its ext partition is read through its offset, nothing mounted
    result = run_main("-v", "files", disk, "-o", tmp_path / "disk")
    assert result.code == 0, result.text
    assert f"{disk}?offset={ext4image.PARTITION_OFFSET}" in result.err
    assert "mount" not in result.text
    assert sha(tmp_path / "disk" / "user" / "script.sh") == sha(_tree / "home/user/script.sh")
    zeros = tmp_path / "zeros.img"
    zeros.write_bytes(bytes(1 << 17))
    result = run_main("files", zeros, "-o", tmp_path / "out")
    assert result.code == 4 and "all zeros" in result.err
    result = run_main("files", ROOT / "README.md", "-o", tmp_path / "out")
    assert result.code == 4 and "0xEF53" in result.err
    assert not (tmp_path / "out").exists()


def test_hostile_names_are_refused(tmp_path: Path) -> None:
    image = ext4image.make_hostile(tmp_path / "tree", tmp_path / "hostile.img")
    listing = subprocess.run(
        [ext4image.debugfs_program(), "-c", "-R", "ls -p /home/user", str(image)],
        capture_output=True,
        check=True,
    ).stdout
    assert b"/../../../../escaped.txt/" in listing  # the crafted names are really there
    assert listing.count(b"/link-to-outside/") == 2
    out = tmp_path / "deep" / "er" / "out"
    result = run_main("files", image, "-o", out)
    assert result.code == 4, result.text
    assert "nothing was copied" in result.err
    assert "not a plain name" in result.err
    assert not list(tmp_path.rglob("escaped.txt"))
    assert not (tmp_path / "outside-target").exists()
    assert not out.exists()
    # what is fine can still be copied, by naming it
    result = run_main("files", image, "-o", out, "/home")
    assert result.code == 4  # /home holds the bad folder
    result = run_main("files", image, "--list", "/")
    assert result.code == 4 and "the same name twice" in result.err


def test_missing_debugfs_names_e2fsprogs(
    private: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setattr(debugfs, "SBIN", (str(tmp_path),))
    with pytest.raises(MissingProgramError) as info:
        files.find_debugfs()
    assert info.value.exit_code == EXIT_MISSING_PROGRAM == 5
    assert "e2fsprogs" in (info.value.hint or "")
    # and through the CLI's one error boundary
    code = (
        "import sys, qrecover.files.debugfs as f; f.SBIN = (); from qrecover.cli import main; "
        "main(sys.argv[1:])"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, "files", str(private[0]), "-o", str(tmp_path / "o")],
        capture_output=True,
        text=True,
        env={**os.environ, "PATH": str(tmp_path)},
        check=False,
    )
    assert proc.returncode == 5, proc.stderr
    assert "debugfs not found" in proc.stderr and "e2fsprogs" in proc.stderr
    assert not (tmp_path / "o").exists()


@pytest.fixture(scope="session")
def ext4_backup(
    make: MakeBackup, tmp_path_factory: pytest.TempPathFactory, private: tuple[Path, Path]
) -> Backup:
    """work: an ext4 private.img; vault: one without /home/user; junk: not ext at all."""
    base = tmp_path_factory.mktemp("vms")
    work = base / "work"
    work.mkdir()
    (work / "private.img").write_bytes(private[0].read_bytes())
    vault = base / "vault"
    (vault / "tree" / "config").mkdir(parents=True)
    (vault / "tree" / "config" / "rc.local").write_text("#!/bin/sh\n")
    ext4image.make_ext4(vault / "tree", base / "vault.img", 8)
    (vault / "tree" / "config" / "rc.local").unlink()
    (vault / "tree" / "config").rmdir()
    (vault / "tree").rmdir()
    (base / "vault.img").rename(vault / "private.img")
    junk = base / "junk"
    junk.mkdir()
    (junk / "private.img").write_bytes(b"not a file system" * 1000)
    vms = [
        gen.VmSpec("work", 7, "QubesAppVm", None, work),
        gen.VmSpec("vault", 8, "QubesAppVm", None, vault),
        gen.VmSpec("junk", 9, "QubesAppVm", None, junk),
    ]
    return make(vms=vms, dom0_home=None)


def test_restore_files(ext4_backup: Backup, private: tuple[Path, Path], tmp_path: Path) -> None:
    out = tmp_path / "out"
    args = ["restore", ext4_backup.path, "-o", out, "--passphrase-file", ext4_backup.passfile]
    result = run_main(*args, "--vm", "work", "--vm", "vault", "--files")
    assert result.code == 0, result.text
    assert sha(out / "work" / "private.img") == sha(private[0])
    bashrc = private[1] / "home" / "user" / ".bashrc"
    os.chmod(bashrc, 0o755)
    try:
        _compare(out / "work" / "files" / "user", private[1] / "home" / "user")
    finally:
        os.chmod(bashrc, 0o644)
    assert "vault: no /home/user in its private.img" in result.err
    assert not (out / "vault" / "files").exists()
    _no_specials(out / "work" / "files")
    # a private.img that is not ext: that VM fails, the others are still copied
    out2 = tmp_path / "out2"
    result = run_main(
        "restore",
        ext4_backup.path,
        "-o",
        out2,
        "--passphrase-file",
        ext4_backup.passfile,
        "--files",
    )
    assert result.code == 4, result.text
    assert "junk" in result.err and "holds no file system qrecover reads" in result.out
    assert (out2 / "work" / "files" / "user" / "script.sh").is_file()
    assert (out2 / "junk" / "private.img").is_file()  # the restore itself stands


# -- pure parts, no binaries ------------------------------------------------


def test_argv_builders() -> None:
    image = Path("/media/my disk/work private.img")
    assert files.debugfs_rdump_argv(image, 15) == [
        "debugfs",
        "-c",
        "-R",
        "rdump <15> .",
        "/media/my disk/work private.img",
    ]
    assert files.debugfs_ls_argv(image, 2, "/usr/sbin/debugfs") == [
        "/usr/sbin/debugfs",
        "-c",
        "-R",
        "ls -p <2>",
        str(image),
    ]
    assert files.debugfs_batch_argv(image) == ["debugfs", "-c", "-f", "-", str(image)]
    assert files.printf_argv(["ls -p <2>", "ls -p <12>"]) == [
        "printf",
        "%s\\n",
        "ls -p <2>",
        "ls -p <12>",
    ]
    for unsafe in ("a b", 'x"y', "-R", ""):
        with pytest.raises(ValueError):
            files.debugfs_rdump_argv(image, 15, unsafe)
    assert files.dest_name("/home/user/") == "user"
    assert files.dest_name("/") == "rw"


def test_parse_ls_keeps_any_name() -> None:
    block = (
        b"/14/040755/1000/1000/.//\n/13/040755/0/0/..//\n"
        b"/15/100640/1000/1000/tax return \xc3\xbc 2016.pdf/70000/\n"
        b"/16/120777/0/0/bad\xffbyte/3/\n"
        b"/17/010644/0/0/x/0/\ngarbage line\n\n"
    )
    entries, bad = files.parse_ls(block)
    assert [e.name for e in entries] == [
        b".",
        b"..",
        "tax return ü 2016.pdf".encode(),
        b"bad\xffbyte",
        b"x",
    ]
    assert entries[2].size == 70000 and entries[2].mode == 0o100640
    assert bad == ["garbage line"]
    assert files.show(os.fsdecode(b"bad\xffbyte\n")) == "bad\\xffbyte\\n"


def test_split_batch_refuses_forged_markers() -> None:
    requests = ["ls -p <2>", "ls -p <12>"]
    out = b"debugfs: ls -p <2>\n/2/040755/0/0/.//\ndebugfs: ls -p <12>\n/12/040755/0/0/.//\n"
    blocks, problems = files.split_batch(out, requests)
    assert problems == [] and blocks[1].strip() == b"/12/040755/0/0/.//"
    forged = out.replace(b"debugfs: ls -p <12>", b"debugfs: ls -p <99>")
    assert files.split_batch(forged, requests)[1]


def test_gpt_disk_with_a_bad_checksum_is_refused(tmp_path: Path) -> None:
    disk = bytearray(4096 * 512)
    disk[446 + 4] = 0xEE  # protective MBR
    disk[446 + 8 : 446 + 16] = (1).to_bytes(4, "little") + (4095).to_bytes(4, "little")
    disk[510:512] = b"\x55\xaa"
    header = bytearray(92)
    header[:8] = b"EFI PART"
    header[72:80] = (2).to_bytes(8, "little")  # entries at LBA 2
    header[80:84] = (128).to_bytes(4, "little")
    header[84:88] = (128).to_bytes(4, "little")
    disk[512 : 512 + 92] = header
    entry = bytearray(128)
    entry[:16] = b"\x0f\xc6\x3d\xaf\x84\x83\x47\x72\x8e\x79\x3d\x69\xd8\x47\x7d\xe4"
    entry[32:48] = (2048).to_bytes(8, "little") + (4095).to_bytes(8, "little")
    disk[1024 : 1024 + 128] = entry
    disk[2048 * 512 + 1080 : 2048 * 512 + 1082] = b"\x53\xef"
    image = tmp_path / "root.img"
    image.write_bytes(bytes(disk))
    header[12:16] = (92).to_bytes(4, "little")  # its size
    disk[512 : 512 + 92] = header
    image.write_bytes(bytes(disk))
    # no header checksum (and no backup header): a damaged table, said as such
    with pytest.raises(BackupError) as info:
        files.check_image(image)
    assert info.value.message == (
        f"{image}: its GPT partition table is damaged: the primary header has a header "
        "checksum that does not match, the backup header (last sector) has no GPT header "
        "signature"
    )
    # with its checksum, it is read: partition 1, through its offset
    header[16:20] = zlib.crc32(bytes(header[:16] + bytes(4) + header[20:])).to_bytes(4, "little")
    disk[512 : 512 + 92] = header
    image.write_bytes(bytes(disk))
    volume = files.find_volume(image)
    assert (volume.offset, volume.content) == (1048576, "ext2/3/4 file system")
    assert volume.table is not None and volume.table.notes == (
        "the GPT partition entries' checksum does not match (damaged table?)",
    )


def test_restore_files_never_follows_a_symlink_from_the_backup(
    private: tuple[Path, Path], tmp_path: Path
) -> None:
    # A validly signed backup whose VM also restores files -> somewhere else:
    # restore --files must not copy into it, nor (with --force) delete there.
    import tarfile

    import make_bad_backups as bad

    victim = tmp_path / "victim"
    (victim / "user").mkdir(parents=True)
    (victim / "user" / "precious.txt").write_text("mine")
    src = tmp_path / "src"
    src.mkdir()
    (src / "private.img").write_bytes(private[0].read_bytes())
    image_tar = subprocess.run(
        [
            "tar",
            "-c",
            "--sparse",
            "-C",
            str(src),
            "--xform",
            "s:^private.img:vm7/\\0:",
            "private.img",
        ],
        capture_output=True,
        check=True,
    ).stdout
    link_tar = bad.inner_tar([bad.member("vm7/files", tarfile.SYMTYPE, str(victim))])
    members = (
        bad.signed_header(bad.HEADER)
        + bad.xml_members(bad.qubes_xml(bad.vm_xml(size=64 << 20)))
        + bad.stored("vm7/private.img", image_tar)
        + bad.stored("vm7/files", link_tar)
    )
    backup = tmp_path / "trap"
    bad.write_outer(backup, members)
    passfile = tmp_path / "pass"
    passfile.write_text(bad.PASSPHRASE + "\n")
    for extra in ((), ("--force",)):
        out = tmp_path / f"out{len(extra)}"
        result = run_main(
            "restore", backup, "-o", out, "--passphrase-file", passfile, "--files", *extra
        )
        assert result.code == 4, result.text
        assert "symbolic link" in result.text
        assert (victim / "user" / "precious.txt").read_text() == "mine"
        assert sorted(p.name for p in victim.rglob("*")) == ["precious.txt", "user"]
