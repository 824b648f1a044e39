"""Both extractors restore alike: bsdtar when installed, GNU tar otherwise.

qrecover extracts a restored stored file with bsdtar (libarchive) when it is
on PATH, else with GNU tar (qrecover/stages/extract.py).  Each test runs with
each: ``bsdtar`` on a PATH that has it, ``tar`` on the same PATH without it.
Fixtures come from the generators (scripts/make_backup.py for format 3, with
GNU old sparse members; make_backup_v4.py for format 4, PAX sparse 1.0;
make_bad_backups.py for every crafted damaged and hostile backup).
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import shutil
import stat
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from qrecover.stages.extract import extract_stage, pick_extractor

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT / "scripts") not in sys.path:
    sys.path.insert(0, str(ROOT / "scripts"))

import make_backup as gen  # noqa: E402  (the independent writers, never qrecover code)
import make_backup_v4 as gen4  # noqa: E402
import make_bad_backups as bad  # noqa: E402
from conftest import Run, built_once, run_main  # noqa: E402

PASSPHRASE = "extractors: a passphrase, ünïcödé"
EXTRACTORS = ["bsdtar", "tar"]
DASH = shutil.which("dash") or "dash"


def path_without(folder: Path, hidden: tuple[str, ...]) -> str:
    """A PATH of one folder: every program of the current PATH except ``hidden``."""
    folder.mkdir(parents=True, exist_ok=True)
    for entry in os.environ["PATH"].split(os.pathsep):
        if not os.path.isdir(entry):
            continue
        for program in sorted(os.listdir(entry)):
            link = folder / program
            full = os.path.join(entry, program)
            # earlier PATH entries win, as in the shell
            if program not in hidden and not os.path.lexists(link) and os.access(full, os.X_OK):
                os.symlink(full, link)
    return str(folder)


@pytest.fixture(scope="module")
def paths(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """extractor -> a PATH on which qrecover picks it."""
    assert shutil.which("bsdtar"), "bsdtar is missing (.ci/run installs libarchive-tools)"
    base = tmp_path_factory.mktemp("paths")
    return {"bsdtar": path_without(base / "all", ()),
            "tar": path_without(base / "no-bsdtar", ("bsdtar",))}


def run(path: str, *args: str | Path, cwd: Path | None = None) -> Run:
    """``qrecover ARGS`` with ``path`` as PATH: in this process (``run_main``), which
    finds the programs it starts on PATH as the installed program would."""
    return run_main(*args, env={"PATH": path}, cwd=cwd)


def extracting(log: str) -> set[str]:
    """The extractors a ``-v`` log shows extracting a stored file."""
    return set(re.findall(r"\| (bsdtar|tar) -x -f - -C ", log))


# -- what a restored tree is ------------------------------------------------------


def data_map(path: Path) -> list[tuple[int, int]]:
    """Where a file holds data (SEEK_DATA/SEEK_HOLE): the rest is holes."""
    runs = []
    with path.open("rb") as f:
        fd, size, pos = f.fileno(), os.fstat(f.fileno()).st_size, 0
        while pos < size:
            try:
                start = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError:  # ENXIO: only a hole is left
                break
            end = os.lseek(fd, start, os.SEEK_HOLE)
            runs.append((start, end))
            pos = end
    return runs


def describe(root: Path) -> dict[str, tuple[object, ...]]:
    """Every entry under ``root``: type, mode, owner, size, mtime, bytes, holes, xattrs."""
    found: dict[str, tuple[object, ...]] = {}
    for path in sorted(root.rglob("*")):
        st = path.lstat()
        rel = str(path.relative_to(root))
        common = (stat.filemode(st.st_mode), st.st_uid, st.st_gid)
        if stat.S_ISLNK(st.st_mode):
            found[rel] = ("link", *common, os.readlink(path))
        elif stat.S_ISDIR(st.st_mode):
            found[rel] = ("dir", *common, os.listxattr(path))
        else:
            digest = hashlib.sha256(path.read_bytes()).hexdigest()
            # qubes.xml is written by qrecover itself, never extracted: its mtime
            # is when it was written
            mtime = None if rel == "qubes.xml" else st.st_mtime_ns
            found[rel] = ("file", *common, st.st_size, mtime, digest,
                          tuple(data_map(path)), os.listxattr(path))
    return found


# -- the sparse forms of formats 3 and 4 ------------------------------------------


@pytest.fixture(scope="module")
def backups(tmp_path_factory: pytest.TempPathFactory) -> dict[int, tuple[Path, Path, Path]]:
    """format -> (backup, passphrase file, source tree): the generators' sample VMs,
    work/private.img a 32 MiB sparse image with data at its start, middle and end."""
    made: dict[int, tuple[Path, Path, Path]] = {}
    tree = tmp_path_factory.mktemp("tree")
    vms, home = gen.make_sample_tree(tree, image_mb=32)
    folder = tmp_path_factory.mktemp("backups")
    passfile = folder / "pass"
    passfile.write_text(PASSPHRASE + "\n")
    gen.make_backup(folder / "v3", PASSPHRASE, vms, dom0_home=home, workdir=folder)
    gen4.make_backup_v4(folder / "v4", PASSPHRASE, vms, dom0_home=home, workdir=folder)
    made[3] = (folder / "v3", passfile, tree)
    made[4] = (folder / "v4", passfile, tree)
    return made


@pytest.fixture(scope="module")
def restored(
    backups: dict[int, tuple[Path, Path, Path]], paths: dict[str, str],
    tmp_path_factory: pytest.TempPathFactory,
) -> dict[tuple[int, str], tuple[Path, Run]]:
    """(format, extractor) -> (output folder, the -v run)."""
    done = {}
    for version, (backup, passfile, _tree) in backups.items():
        for extractor in EXTRACTORS:
            out = tmp_path_factory.mktemp(f"v{version}-{extractor}") / "out"
            result = run(paths[extractor], "-v", "restore", backup, "-o", out,
                         "--passphrase-file", passfile)
            done[(version, extractor)] = (out, result)
    return done


@pytest.mark.parametrize("version", [3, 4])
@pytest.mark.parametrize("extractor", EXTRACTORS)
def test_each_extractor_restores_the_backup(
    restored: dict[tuple[int, str], tuple[Path, Run]],
    backups: dict[int, tuple[Path, Path, Path]], version: int, extractor: str,
) -> None:
    out, result = restored[(version, extractor)]
    assert result.code == 0, result.err
    # the -v log names what ran: bsdtar (when installed) for the disk images only
    assert extracting(result.err) == ({"bsdtar", "tar"} if extractor == "bsdtar" else {"tar"})
    images = re.findall(r"\| (bsdtar|tar) -x .*# fed the chunks of (\S+)", result.err)
    assert images, result.err
    for tool, stored in images:
        assert tool == (extractor if stored.endswith(".img") else "tar"), (tool, stored)
    source = backups[version][2] / "vms" / "work" / "private.img"
    image = out / "work" / "private.img"
    assert image.read_bytes() == source.read_bytes()
    st = image.stat()
    assert st.st_size == 32 << 20
    assert st.st_blocks * 512 < 4 << 20, "the image is not sparse"
    assert data_map(image)[-1][1] == st.st_size  # its last block of data, at the very end
    assert (out / "dom0-home" / "user" / "notes-link").is_symlink()


@pytest.mark.parametrize("version", [3, 4])
def test_both_extractors_restore_identical_trees(
    restored: dict[tuple[int, str], tuple[Path, Run]], version: int,
) -> None:
    """Same names, types, modes, owners, sizes, mtimes, bytes, holes and (no) xattrs."""
    bsd, gnu = (describe(restored[(version, e)][0]) for e in EXTRACTORS)
    assert bsd == gnu
    assert len(bsd) > 20
    assert all(entry[-1] in ([], ()) for entry in bsd.values() if entry[0] != "link")


def test_pick_extractor_follows_path(paths: dict[str, str], monkeypatch: pytest.MonkeyPatch,
                                     tmp_path: Path) -> None:
    for extractor, path in paths.items():
        monkeypatch.setenv("PATH", path)
        assert pick_extractor() == extractor
    monkeypatch.setenv("PATH", str(tmp_path))  # neither: GNU tar, reported missing later
    assert pick_extractor() == "tar"


# -- what is shown: dry run, transcript, explain, script ---------------------------


@pytest.mark.parametrize("extractor", EXTRACTORS)
def test_dry_run_and_explain_name_the_extractor(
    backups: dict[int, tuple[Path, Path, Path]], paths: dict[str, str], extractor: str,
    tmp_path: Path,
) -> None:
    backup, passfile, _ = backups[3]
    dry = run(paths[extractor], "restore", "--dry-run", backup, "-o", tmp_path / "o",
              "--passphrase-file", passfile)
    assert dry.code == 0, dry.err
    assert extracting(dry.out + dry.err) == ({"bsdtar", "tar"} if extractor == "bsdtar"
                                             else {"tar"})
    dom0 = dry.out[dry.out.index("dom0-home"):]
    assert "| tar -x -f - -C" in dom0.split("then what")[0] or extractor == "tar", dry.out
    explained = run(paths[extractor], "restore", "--explain", backup, "-o", tmp_path / "e",
                    "--passphrase-file", passfile, "--vm", "untrusted")
    assert explained.code == 0, explained.err
    assert f"| {extractor} -x -f - -C " in explained.out + explained.err


def test_script_uses_gnu_tar(backups: dict[int, tuple[Path, Path, Path]],
                             paths: dict[str, str], tmp_path: Path) -> None:
    """A standalone script runs elsewhere: GNU tar, which every rescue system has."""
    for version in (3, 4):
        backup, passfile, _ = backups[version]
        made = run(paths["bsdtar"], "script", backup, "-o", tmp_path / "o",
                   "--passphrase-file", passfile)
        assert made.code == 0, made.err
        assert "tar -x -f - -C" in made.out
        assert "bsdtar" not in made.out


@pytest.mark.parametrize("version", [3, 4])
def test_transcript_names_bsdtar_and_replays_with_gnu_tar_without_it(
    backups: dict[int, tuple[Path, Path, Path]], paths: dict[str, str], version: int,
    tmp_path: Path,
) -> None:
    backup, passfile, _ = backups[version]
    out, transcript = tmp_path / "out", tmp_path / "run.sh"
    result = run(paths["bsdtar"], "restore", backup, "-o", out, "--passphrase-file", passfile,
                 "--vm", "untrusted", "--transcript", transcript)
    assert result.code == 0, result.err
    text = transcript.read_text(encoding="utf-8")
    assert re.search(r"if command -v bsdtar >/dev/null 2>&1; then bsdtar -x -f - -C "
                     r'"\$work/stage" --strip-components=1 [^;]*; else tar -x -f - -C '
                     r'"\$work/stage" --strip-components=1 --no-same-owner; fi', text), text
    want = describe(out)
    for extractor in EXTRACTORS:
        shutil.rmtree(out)
        env = {k: v for k, v in os.environ.items() if k != "QRECOVER_PASSPHRASE"}
        env.update(PATH=paths[extractor], backup_pass=PASSPHRASE)
        proc = subprocess.run([DASH, str(transcript)], cwd=tmp_path, env=env, text=True,
                              capture_output=True, stdin=subprocess.DEVNULL, timeout=240,
                              check=False)
        assert proc.returncode == 0, proc.stderr
        assert describe(out) == want, extractor


# -- every crafted bad backup, with each extractor ---------------------------------


@pytest.fixture(scope="module")
def bad_cases(tmp_path_factory: pytest.TempPathFactory) -> list[bad.Case]:
    # the cases test_bad_input reads, written once per test run (they are only read)
    return built_once(tmp_path_factory, "bad cases", bad.cases)


def _tree(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


@pytest.mark.parametrize("extractor", EXTRACTORS)
def test_every_bad_backup_ends_the_documented_way(
    bad_cases: list[bad.Case], paths: dict[str, str], extractor: str, tmp_path: Path,
) -> None:
    """test_bad_input's restore checks, for each case, with this extractor; and where
    an extraction started, it was this one."""
    assert len(bad_cases) > 60  # every case the generator writes (test_bad_input lists them)
    reached = 0
    for n, case in enumerate(bad_cases):
        top = tmp_path / str(n)
        out = top / "out"
        out.mkdir(parents=True)
        passfile = top / "pass"
        passfile.write_text(case.passphrase + "\n")
        mine = out / "my-notes.txt"
        mine.write_text("mine")
        before = _tree(top)
        result = run(paths[extractor], "-v", "restore", case.path, "--passphrase-file",
                     passfile, "--output", out)
        said = f"{case.name}: {result.err}"
        assert result.code == case.code, said
        assert case.message in result.err, said
        assert "Traceback" not in result.out + result.err, said
        assert mine.read_text() == "mine", said
        assert {p for p in _tree(top) - before if not p.startswith("out")} == set(), said
        assert not any(".qrecover" in p for p in _tree(top)), said
        assert not Path("/tmp/qrecover-escape").exists(), said
        for path in out.rglob("*"):
            mode = path.lstat().st_mode
            assert not (stat.S_ISCHR(mode) or stat.S_ISBLK(mode) or stat.S_ISFIFO(mode)), said
        if case.partial is not None:
            assert not (out / case.partial).exists(), said
            assert os.path.lexists(out / (case.partial + ".partial")), said
        if case.code == 3:
            assert _tree(out) == {"my-notes.txt"}, said
        shown = extracting(result.err)
        assert shown <= {extractor, "tar"}, said  # GNU tar extracts what is not an image
        reached += extractor in shown
    assert reached >= 10  # the hostile inner archives did reach the extractor


# -- the extractor's own protections, without the guard in front -------------------


def _member(name: str, kind: bytes = tarfile.REGTYPE, **fields: object) -> tarfile.TarInfo:
    info = bad.member(name, kind, str(fields.pop("linkname", "")))
    for key, value in fields.items():
        setattr(info, key, value)
    return info


def _archive(members: list[tuple[tarfile.TarInfo, bytes | None]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for info, data in members:
            if data is not None:
                info.size = len(data)
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return buf.getvalue()


def _extract(extractor: str, archive: bytes, target: Path) -> subprocess.CompletedProcess[bytes]:
    target.mkdir(parents=True)
    stage = extract_stage(target, 1, extractor)
    return subprocess.run(stage.argv, input=archive, capture_output=True, check=False)


# xattrs a hostile archive may carry: a file capability (as dangerous as a
# set-user-ID bit), a user attribute, and an ACL granting another user access.
_XATTRS = {
    "SCHILY.xattr.security.capability": "\x01\x00\x00\x02\x00\x20\x00\x00" + "\x00" * 12,
    "SCHILY.xattr.user.note": "hello",
    "SCHILY.acl.access": "user::rw-,user:1000:rwx,group::r--,mask::rwx,other::r--",
}


@pytest.mark.parametrize("extractor", EXTRACTORS)
def test_no_owner_xattr_acl_or_foreign_setuid_restored(extractor: str, tmp_path: Path) -> None:
    xa = _member("vm7/xa")
    xa.pax_headers = dict(_XATTRS)
    archive = _archive([
        (xa, b"x"),
        (_member("vm7/suid", mode=0o4755, uid=1000, gid=1000, uname="u", gname="g"), b"x"),
        (_member("vm7/sgid", mode=0o2755, uid=1000, gid=1000), b"x"),
        (_member("vm7/m664", mode=0o664, uid=1000, gid=1000), b"x"),
    ])
    target = tmp_path / "t"
    proc = _extract(extractor, archive, target)
    assert proc.returncode == 0, proc.stderr
    for path in target.iterdir():
        st = path.lstat()
        assert (st.st_uid, st.st_gid) == (os.getuid(), os.getgid()), path
        assert os.listxattr(path) == [], path
        if os.getuid() != 0:  # as GNU tar: the umask applies, no set-ID bits
            assert not st.st_mode & (stat.S_ISUID | stat.S_ISGID), path
    # as root, GNU tar keeps the archive's modes exactly, its set-ID bits too;
    # bsdtar keeps the modes and drops a set-ID bit of another owner's file
    if os.getuid() == 0:
        assert stat.S_IMODE((target / "m664").stat().st_mode) == 0o664
        assert bool((target / "suid").stat().st_mode & stat.S_ISUID) == (extractor == "tar")


@pytest.mark.parametrize("extractor", EXTRACTORS)
@pytest.mark.parametrize("members", [
    [("vm7/../../escape", tarfile.REGTYPE, "")],
    [("vm7/link", tarfile.SYMTYPE, "OUTSIDE"), ("vm7/link/escape", tarfile.REGTYPE, "")],
    [("vm7/link", tarfile.SYMTYPE, "../../outside"), ("vm7/link/escape", tarfile.REGTYPE, "")],
    [("vm7/hard", tarfile.LNKTYPE, "vm7/../../outside/victim")],
], ids=["dotdot", "through-absolute-symlink", "through-relative-symlink", "hardlink-dotdot"])
def test_nothing_written_outside_even_without_the_guard(
    extractor: str, members: list[tuple[str, bytes, str]], tmp_path: Path
) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "victim").write_text("victim")
    entries = []
    for name, kind, link in members:
        link = link.replace("OUTSIDE", str(outside))
        data = b"pwned" if kind == tarfile.REGTYPE else None
        entries.append((_member(name, kind, linkname=link), data))
    proc = _extract(extractor, _archive(entries), tmp_path / "a" / "b")
    assert proc.returncode != 0, "the extractor must say it refused"
    assert sorted(os.listdir(outside)) == ["victim"]
    assert (outside / "victim").read_text() == "victim"
    assert (outside / "victim").stat().st_nlink == 1
    assert not (tmp_path / "escape").exists() and not (tmp_path / "a" / "escape").exists()


@pytest.mark.parametrize("extractor", EXTRACTORS)
def test_absolute_names_land_inside(extractor: str, tmp_path: Path) -> None:
    archive = _archive([(_member(str(tmp_path / "abs-escape")), b"x")])
    proc = _extract(extractor, archive, tmp_path / "t")
    assert proc.returncode == 0, proc.stderr
    assert not (tmp_path / "abs-escape").exists()
    assert any(p.name == "abs-escape" for p in (tmp_path / "t").rglob("*"))


@pytest.mark.parametrize("strip", [1, 2])
def test_strip_components_alike_for_qubes_names(strip: int, tmp_path: Path) -> None:
    """The names Qubes' writers use (``vm3/./root.img`` for a template stored as
    ``vm3/.``), stripped the same by both."""
    names = ["vm3/./root.img", "vm3/./apps/a.desktop", "vm7/private.img",
             "dom0-home/user/.bashrc", "dom0-home/user/Documents/deep/f"]
    archive = _archive([(_member(n), n.encode()) for n in names])
    got = {}
    for extractor in EXTRACTORS:
        target = tmp_path / extractor
        target.mkdir()
        stage = extract_stage(target, strip, extractor)
        proc = subprocess.run(stage.argv, input=archive, capture_output=True, check=False)
        assert proc.returncode == 0, proc.stderr
        got[extractor] = {str(p.relative_to(target)): p.read_bytes() if p.is_file() else None
                          for p in target.rglob("*")}
    assert got["bsdtar"] == got["tar"]
    assert got["tar"]["root.img"] == b"vm3/./root.img"


# -- a stored file cut by a bad chunk --------------------------------------------

CHUNK = 64 * 1024


@pytest.fixture(scope="module")
def tampered(tmp_path_factory: pytest.TempPathFactory) -> dict[int, tuple[Path, Path, Path]]:
    """format -> (untarred backup with chunk 012 of vm7/private.img damaged,
    passphrase file, the source image): 1.5 MiB of random bytes in 64 KiB chunks."""
    root = tmp_path_factory.mktemp("cut")
    src = root / "work"
    src.mkdir()
    (src / "private.img").write_bytes(os.urandom(3 << 19))
    vms = [gen.VmSpec("work", 7, source=src)]
    passfile = root / "pass"
    passfile.write_text(PASSPHRASE + "\n")
    made = {}
    for version, write, suffix in ((3, gen.make_backup, ""), (4, gen4.make_backup_v4, ".enc")):
        backup = root / f"v{version}"
        write(backup, PASSPHRASE, vms, chunk_size=CHUNK, workdir=root)
        folder = root / f"v{version}-untarred"
        folder.mkdir()
        subprocess.run(["tar", "-i", "-xf", str(backup), "-C", str(folder)], check=True)
        victim = folder / "vm7" / f"private.img.012{suffix}"
        data = bytearray(victim.read_bytes())
        data[len(data) // 2] ^= 0x01
        victim.write_bytes(bytes(data))
        made[version] = (folder, passfile, src / "private.img")
    return made


@pytest.mark.parametrize("version", [3, 4])
def test_a_cut_stored_file_leaves_the_same_partial(
    tampered: dict[int, tuple[Path, Path, Path]], paths: dict[str, str], version: int,
    tmp_path: Path,
) -> None:
    """Only what came before the bad chunk, with each extractor: bsdtar is stopped
    before it would finish the cut member at its full size (CuttingGuard)."""
    folder, passfile, source = tampered[version]
    sizes = {}
    for extractor in EXTRACTORS:
        out = tmp_path / extractor
        result = run(paths[extractor], "-v", "restore", folder, "-o", out,
                     "--passphrase-file", passfile)
        assert result.code == 4, result.err
        assert "private.img.012" in result.err
        assert extractor in extracting(result.err)
        partial = out / "work" / "private.img.partial"
        assert not (out / "work" / "private.img").exists()
        size = partial.stat().st_size
        assert 0 < size <= 12 * CHUNK, (extractor, size)
        with source.open("rb") as f:
            assert partial.read_bytes() == f.read(size), extractor
        sizes[extractor] = size
    # GNU tar writes whole 512-byte blocks; bsdtar all it was given
    assert abs(sizes["bsdtar"] - sizes["tar"]) < 512, sizes


def test_names_bsdtar_would_refuse_go_to_gnu_tar(tmp_path: Path) -> None:
    """Why bsdtar extracts only disk images: a pax archive (as GNU tar writes one)
    with a name that is not UTF-8 makes bsdtar exit 1 in the C locale of many a
    rescue system; GNU tar extracts it as it is.  So the plan gives such names'
    stored files (dom0's home, a template's folder) to GNU tar."""
    src = tmp_path / "src"
    src.mkdir()
    name = b"caf\xe9.txt"
    (src / os.fsdecode(name)).write_bytes(b"x")
    archive = tmp_path / "a.tar"
    env = {**os.environ, "LC_ALL": "C"}
    env.pop("LANG", None)
    subprocess.run(["tar", "--format=pax", "-cf", str(archive), "-C", str(src),
                    os.fsdecode(name)], check=True, env=env)
    codes = {}
    for tool in EXTRACTORS:
        dest = tmp_path / tool
        dest.mkdir()
        codes[tool] = subprocess.run([tool, "-x", "-f", str(archive), "-C", str(dest)],
                                     env=env, capture_output=True, check=False).returncode
        assert os.listdir(os.fsencode(dest)) == [name]
    assert codes == {"bsdtar": 1, "tar": 0}, codes
    plan_tool = {s: _plan_tool(s) for s in ("vm7/private.img", "vm3/.", "dom0-home/user",
                                            "vm7/icon.png", "vm7/root.img")}
    assert plan_tool == {"vm7/private.img": "bsdtar", "vm3/.": "tar", "dom0-home/user": "tar",
                         "vm7/icon.png": "tar", "vm7/root.img": "bsdtar"}


def _plan_tool(stored: str) -> str:
    from qrecover.events import Mode
    from qrecover.formats.base import StreamFed
    from qrecover.plan import Plan

    plan = Plan(fmt=StreamFed(), mode=Mode.RESTORE, selected=(), gunzip="gzip",  # type: ignore[arg-type]
                extractor="bsdtar")
    return plan.extractor_for(stored)
