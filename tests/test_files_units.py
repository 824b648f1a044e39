"""qrecover/files/ in-process: each module on real images made by scripts/ext4image.py.

tests/test_files.py runs the installed CLI end to end; here the pieces are
called directly: the ``ls -p`` parser on what the real debugfs printed, the
walk and its checks, the copy, the image probe, and the two commands.
"""

from __future__ import annotations

import ast
import io
import logging
import os
import stat
import subprocess
from pathlib import Path

import ext4image
import pytest
from conftest import ROOT, sha

from qrecover.errors import EXIT_BACKUP, EXIT_OK, BackupError, UsageError
from qrecover.files import command, debugfs, image, listing
from qrecover.files.copy import FilesRequest, copy_files, open_image
from qrecover.files.debugfs import Debugfs, RawEntry, parse_ls, split_batch
from qrecover.files.listing import PathNotFound, walk
from qrecover.inventory import Entity
from qrecover.report import FileResult, Report

# its fixtures build something big: all its tests on one worker, so it is built once
pytestmark = pytest.mark.xdist_group("test_files_units")

HOME = "/home/user"
SPECIALS = {"/home/user/pipe (FIFO)", "/home/user/null-device (character device)"}


@pytest.fixture(scope="module")
def private(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(image, tree): a VM private image with known content, a FIFO and a device inside."""
    base = tmp_path_factory.mktemp("units")
    tree = ext4image.make_private_tree(base / "tree")
    img = ext4image.make_ext4(tree, base / "private.img", 8)
    ext4image.add_special_files(img)
    return img, tree


def _real_debugfs(img: Path, requests: list[str]) -> bytes:
    """What debugfs itself prints for ``requests`` (run here, not through qrecover)."""
    proc = subprocess.run(
        [ext4image.debugfs_program(), "-c", "-f", "-", str(img)],
        input="".join(f"{r}\n" for r in requests).encode(),
        capture_output=True,
        check=True,
    )
    return proc.stdout


def _ls(img: Path, ino: int) -> dict[bytes, RawEntry]:
    blocks, problems = split_batch(_real_debugfs(img, [f"ls -p <{ino}>"]), [f"ls -p <{ino}>"])
    assert problems == []
    entries, bad = parse_ls(blocks[0])
    assert bad == []
    return {e.name: e for e in entries}


def _on_disk(root: Path) -> dict[str, os.stat_result]:
    """rel path -> lstat of everything below ``root`` ('' for root itself)."""
    found = {"": root.lstat()}
    found.update({str(p.relative_to(root)): p.lstat() for p in root.rglob("*")})
    return found


# -- debugfs: the parser on real output -------------------------------------


def test_parse_ls_reads_what_debugfs_printed(private: tuple[Path, Path]) -> None:
    img, tree = private
    root = _ls(img, 2)
    assert set(root) == {b".", b"..", b"lost+found", b"home", b"config", b"usrlocal"}
    assert root[b"."].ino == root[b".."].ino == 2  # the root is its own parent
    assert all(stat.S_ISDIR(e.mode) for e in root.values())
    home = _ls(img, root[b"home"].ino)
    user = home[b"user"]
    # two folders in one debugfs run: the batch is cut at each echoed request
    requests = [f"ls -p <{home[b'.'].ino}>", f"ls -p <{user.ino}>"]
    blocks, problems = split_batch(_real_debugfs(img, requests), requests)
    assert problems == [] and len(blocks) == 2
    entries, bad = parse_ls(blocks[1])
    assert bad == []
    listed = {os.fsdecode(e.name): e for e in entries if e.name not in (b".", b"..")}
    source = tree / "home" / "user"
    assert set(listed) == {p.name for p in source.iterdir()} | {"pipe", "null-device"}
    for name, entry in listed.items():
        if name in ("pipe", "null-device"):
            continue
        st = (source / name).lstat()
        assert stat.S_IFMT(entry.mode) == stat.S_IFMT(st.st_mode), name
        if stat.S_ISREG(st.st_mode):
            assert entry.size == st.st_size, name
    assert stat.S_ISFIFO(listed["pipe"].mode) and stat.S_ISCHR(listed["null-device"].mode)
    assert listed[".bashrc"].mode == 0o104755  # set by add_special_files
    assert stat.S_IMODE(listed["script.sh"].mode) == 0o750


# -- listing: the walk and its checks ---------------------------------------


def test_walk_lists_every_level_in_one_run_each(
    private: tuple[Path, Path], caplog: pytest.LogCaptureFixture
) -> None:
    img, tree = private
    fs = open_image(img)
    with caplog.at_level(logging.INFO, logger="qrecover"):
        walked = walk(fs, HOME)
    assert walked.problems == []
    assert walked.path == HOME and walked.top.image_path == HOME
    disk = _on_disk(tree / "home" / "user")
    copied = {e.rel: e for e in walked.copied()}
    assert set(copied) == set(disk)
    for rel, entry in copied.items():
        assert stat.S_IFMT(entry.mode) == stat.S_IFMT(disk[rel].st_mode), rel
        if entry.kind == "file":
            assert entry.size == disk[rel].st_size, rel
        assert entry.image_path == f"{HOME}/{rel}".rstrip("/")
    assert {f"{e.image_path} ({e.special_kind()})" for e in walked.specials()} == SPECIALS
    # one debugfs run to find each part of the PATH, then one per folder level
    levels = {rel.count("/") for rel, st in disk.items() if rel and stat.S_ISDIR(st.st_mode)}
    runs = [r.getMessage() for r in caplog.records if r.getMessage().startswith("+ ")]
    assert len(runs) == 2 + 1 + len(levels)
    assert all(" | debugfs -c -f - " in run and run.startswith("+ printf ") for run in runs)


def test_walk_is_the_same_whatever_the_batch_size(
    private: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    img, _tree = private
    whole = walk(open_image(img), "/")
    monkeypatch.setattr(debugfs, "LS_BATCH", 1)
    one_by_one = walk(open_image(img), "/")
    assert one_by_one.problems == whole.problems == []
    assert one_by_one.entries == whole.entries
    assert any(e.image_path == "/usrlocal/bin/tool" for e in whole.entries)


def test_walk_refuses_what_is_not_there(private: tuple[Path, Path]) -> None:
    img, _tree = private
    fs = open_image(img)
    with pytest.raises(PathNotFound) as info:
        walk(fs, "/home/nobody/x")
    assert info.value.message == (
        f"/home/nobody/x: not found in {fs.image} (there is no /home/nobody)"
    )
    assert info.value.hint == f"see what it holds with: qrecover files {fs.image} --list /"
    with pytest.raises(PathNotFound, match=r"/home/user/script\.sh: not a folder"):
        walk(fs, "/home/user/script.sh/x")
    with pytest.raises(PathNotFound, match=r"^/home/user/pipe: is a FIFO, nothing to copy$"):
        walk(fs, "/home/user/pipe")
    with pytest.raises(UsageError, match=r"'\.\.' is not allowed"):
        walk(fs, "/home/../etc")
    single = walk(fs, "home/user/script.sh")
    assert [e.kind for e in single.entries] == ["file"] and single.top.rel == ""


def test_walk_records_hostile_names(tmp_path: Path) -> None:
    img = ext4image.make_hostile(tmp_path / "tree", tmp_path / "hostile.img")
    walked = walk(open_image(img), HOME)
    assert walked.problems == [
        "/home/user/../../../../escaped.txt: a file name that is not a plain name",
        "/home/user/link-to-outside: the same name twice in one folder",
    ]


class _Listed(Debugfs):
    """A Debugfs answering from a crafted listing, for damage debugfs cannot be made to show."""

    def __init__(self, folders: dict[int, list[RawEntry]]) -> None:
        super().__init__(Path("crafted.img"), "debugfs", None)
        self.folders = folders

    def list_dirs(self, inos: object) -> tuple[dict[int, list[RawEntry]], list[str]]:
        assert isinstance(inos, list)
        return {ino: self.folders.get(ino, []) for ino in inos}, []


def _dir(ino: int, name: bytes) -> RawEntry:
    return RawEntry(ino, stat.S_IFDIR | 0o755, name, 0)


def test_walk_finds_loops_and_broken_folders() -> None:
    folders = {
        2: [
            *(_dir(2, b"."), _dir(2, b".."), _dir(11, b"a"), _dir(12, b"b")),
            *(_dir(13, b"c"), _dir(14, b"d")),
            RawEntry(0, 0, b"", 0),  # an empty slot: skipped
        ],
        11: [_dir(11, b"."), _dir(2, b".."), _dir(12, b"again")],  # b reached twice
        12: [_dir(12, b"."), _dir(2, b".."), _dir(12, b"."), RawEntry(15, 0o100644, b"x\0y", 1)],
        13: [_dir(99, b"."), _dir(2, b"..")],  # '.' naming another folder
        14: [],  # neither '.' nor '..'
    }
    walked = walk(_Listed(folders), "/")
    assert walked.problems == [
        "/a/again: the same folder appears twice (a loop)",
        "/b/.: a second '.' entry in one folder",
        "/b/x\\x00y: a file name that is not a plain name",
        "/b: folder without its '.' and '..' entries",
        "/c/.: a second '.' entry in one folder",
        "/d: folder without its '.' and '..' entries",
    ]
    assert [e.image_path for e in walked.entries] == ["/", "/a", "/b", "/c", "/d", "/a/again"]


# -- copy -------------------------------------------------------------------


def test_copy_files_counts_what_it_copied(private: tuple[Path, Path], tmp_path: Path) -> None:
    img, tree = private
    out = tmp_path / "out"
    seen: list[str] = []
    results = copy_files(
        FilesRequest(img, (HOME, "/config"), out), lambda result: seen.append(result.path)
    )
    assert seen == [HOME, "/config"] == [r.path for r in results]
    user, config = results
    disk = _on_disk(tree / "home" / "user")
    assert user.ok and user.place == out / "user"
    assert user.files == sum(stat.S_ISREG(st.st_mode) for st in disk.values())
    assert user.folders == sum(stat.S_ISDIR(st.st_mode) for st in disk.values())
    assert user.links == sum(stat.S_ISLNK(st.st_mode) for st in disk.values()) == 2
    assert user.bytes == sum(st.st_size for st in disk.values() if stat.S_ISREG(st.st_mode))
    assert set(user.skipped) == SPECIALS
    assert (config.files, config.folders, config.links, config.skipped) == (1, 1, 0, [])
    assert sorted(p.name for p in out.iterdir()) == ["config", "user"]  # no staging left
    notes = "Documents/deep/er/still deeper/notes.md"
    assert sha(out / "user" / notes) == sha(tree / "home" / "user" / notes)


def test_copy_files_checks_before_writing(private: tuple[Path, Path], tmp_path: Path) -> None:
    img, _tree = private
    out = tmp_path / "out"
    with pytest.raises(UsageError, match="two PATHs would both be copied to user"):
        copy_files(FilesRequest(img, (HOME, "/a/user"), out))
    with pytest.raises(PathNotFound):
        copy_files(FilesRequest(img, ("/config", "/missing"), out))
    assert not out.exists()


# -- image ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("offset", "magic", "content"),
    [
        (0, b"LUKS\xba\xbe\x00\x02", "LUKS encrypted volume"),
        (0, b"XFSB", "XFS file system"),
        (0, b"hsqs", "squashfs file system"),
        (0x10040, b"_BHRfS_M", "btrfs file system"),
        (4086, b"SWAPSPACE2", "swap space"),
        (1080, b"\x53\xef", "ext2/3/4 file system"),
    ],
)
def test_probe_content(offset: int, magic: bytes, content: str) -> None:
    data = bytearray(0x20000)
    data[offset : offset + len(magic)] = magic
    assert image.probe_content(io.BytesIO(bytes(data))) == content
    assert image.probe_content(io.BytesIO(bytes(0x20000))) is None


def test_read_partitions_of_an_mbr_disk(private: tuple[Path, Path], tmp_path: Path) -> None:
    img, _tree = private
    disk = ext4image.make_partitioned(tmp_path / "root.img", img)
    with disk.open("rb") as f:
        table = image.read_partitions(f)
    assert table == (
        "MBR",
        [
            image.Partition(
                1, "0x83 Linux", ext4image.PARTITION_OFFSET, img.stat().st_size,
                "ext2/3/4 file system",
            )
        ],
    )
    with img.open("rb") as f:
        assert image.read_partitions(f) is None
    image.check_image(img)  # an ext image passes
    luks = tmp_path / "luks.img"
    luks.write_bytes(b"LUKS\xba\xbe" + bytes(4096))
    with pytest.raises(BackupError) as info:
        image.check_image(luks)
    assert info.value.message == (
        f"{luks} holds no file system qrecover reads (ext2/3/4, NTFS): it holds a LUKS "
        "encrypted volume"
    )
    empty = tmp_path / "empty.img"
    empty.touch()
    with pytest.raises(BackupError, match="it is empty"):
        image.check_image(empty)


# -- command ----------------------------------------------------------------


def test_files_command_prints_one_line_per_path(
    private: tuple[Path, Path], tmp_path: Path
) -> None:
    img, _tree = private
    out = tmp_path / "out"
    said = io.StringIO()
    copied = command.files_command(img, out, ["/config"], list_only=False, force=False, out=said)
    assert copied == EXIT_OK
    assert said.getvalue() == (
        f"COPIED    /config -> {out / 'config'} (1 file(s), 1 folder(s), 0 symlink(s), 10 B)\n"
    )
    said = io.StringIO()
    listed = command.files_command(img, None, ["/usrlocal"], list_only=True, force=False,
                                   out=said)
    assert listed == EXIT_OK
    lines = said.getvalue().splitlines()
    assert [line.split()[-1] for line in lines] == [
        "/usrlocal/",
        "/usrlocal/bin/",
        "/usrlocal/bin/tool",
    ]
    assert lines[0].startswith("drwxr-xr-x            -  ")
    with pytest.raises(UsageError, match="--output DIR is needed"):
        command.files_command(img, None, [], list_only=False, force=False, out=said)


def test_restore_files_copies_each_restored_home(
    private: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    img, tree = private
    out = tmp_path / "out"
    (out / "work").mkdir(parents=True)
    (out / "work" / "private.img").write_bytes(img.read_bytes())
    (out / "half").mkdir()
    (out / "half" / "private.img").write_bytes(img.read_bytes())
    work = Entity("work", "AppVM", None, "vm7", 0, "work")
    half = Entity("half", "AppVM", None, "vm8", 0, "half")
    report = Report(
        selected=(work, half),
        files=[
            FileResult("vm7/private.img", "work"),
            FileResult("vm8/private.img", "half", failure=BackupError("x")),
        ],
    )
    said = io.StringIO()
    assert command.restore_files(report, out, force=False, out=said) == EXIT_OK
    assert said.getvalue().startswith(f"FILES     work             {out}/work/private.img:{HOME}\n")
    assert "half: not restored completely; its files are not copied" in capsys.readouterr().err
    notes = "Documents/deep/er/still deeper/notes.md"
    assert sha(out / "work" / "files" / "user" / notes) == sha(tree / "home" / "user" / notes)
    assert not (out / "half" / "files").exists()
    # files/ made by the backup as a symbolic link: not followed, the VM fails
    (out / "work" / "files").rename(tmp_path / "moved")
    (out / "work" / "files").symlink_to(tmp_path / "moved")
    said = io.StringIO()
    assert command.restore_files(report, out, force=True, out=said) == EXIT_BACKUP
    assert "is a symbolic link (made by the backup?); not followed" in said.getvalue()
    assert sorted(p.name for p in (tmp_path / "moved").iterdir()) == ["user"]


# -- the package's shape ----------------------------------------------------


def test_files_modules_import_in_one_direction() -> None:
    """partitions <- image <- debugfs <- ntfs <- listing <- copy <- damaged <- command <-
    from_backup: no cycle, each under 400 lines."""
    order = [
        "partitions", "image", "debugfs", "ntfs", "listing", "copy", "damaged", "command",
        "from_backup",
    ]
    for position, name in enumerate(order):
        path = ROOT / "qrecover" / "files" / f"{name}.py"
        source = path.read_text()
        assert source.count("\n") < 400, path
        imported = {
            node.module.rsplit(".", 1)[1]
            for node in ast.walk(ast.parse(source))
            if isinstance(node, ast.ImportFrom)
            and node.module
            and node.module.startswith("qrecover.files.")
        }
        assert imported <= set(order[:position]), (name, imported)
    assert listing.DEFAULT_PATH == HOME
