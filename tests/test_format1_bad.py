"""Crafted format-1 folders (scripts/make_bad_backups.py, cases_v1): each ends the documented way.

For every case, through the CLI's main() (in this process, or the installed
program where it must run as another user): the documented exit code, the
message naming what is at fault, no traceback, nothing written outside the
output folder, no FIFO or device node created, the VMs that are fine still
restored, and nothing of a refused link's target read.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

import make_bad_backups as bad  # noqa: E402  (never qrecover code)
from conftest import run_main  # noqa: E402

pytestmark = pytest.mark.xdist_group("test_format1_bad")  # module fixtures built once

QRECOVER = str(Path(sys.executable).parent / "qrecover")
OUTSIDE_TEXT = b"secret outside the backup"

CASE_NAMES = [
    "v1-vm-folder-missing",
    "v1-private-img-missing",
    "v1-vm-folder-symlink-out",
    "v1-tree-folder-symlink-out",
    "v1-template-symlink-out",
    "v1-file-symlink-out",
    "v1-qubes-xml-symlink",
    "v1-fifo",
    "v1-socket",
    "v1-device-node",
    "v1-qubes-xml-missing",
    "v1-qubes-xml-truncated",
    "v1-qubes-xml-garbage",
    "v1-dir-path-dotdot",
    "v1-dir-path-absolute",
    "v1-vm-name-dotdot",
    "v1-unreadable-file",
    "v1-entry-name-newline",
    "v1-dom0-two-homes",
    "v1-packed-tar",
]


@pytest.fixture(scope="module")
def cases(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bad.CaseV1]:
    return {c.name: c for c in bad.cases_v1(tmp_path_factory.mktemp("bad1"))}


def test_every_case_is_tested(cases: dict[str, bad.CaseV1]) -> None:
    made = set(cases)
    if os.geteuid() != 0:
        made.add("v1-device-node")  # made only as root (mknod)
    assert made == set(CASE_NAMES)


@pytest.fixture
def world(tmp_path: Path) -> Iterator[Path]:
    """A folder an ordinary user may enter (pytest's own are root's, mode 0700)."""
    folder = Path(tempfile.mkdtemp(prefix="qrecover-v1-"))
    folder.chmod(0o755)
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


def _run(argv: list[str], nobody: bool, passphrase: str | None = None
         ) -> subprocess.CompletedProcess[str]:
    prefix: list[str] = []
    if nobody and os.geteuid() == 0:  # root reads a mode-000 file: run as nobody
        prefix = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
    if not prefix:  # in this process (conftest's run_main): the same main() the script calls
        run = run_main(*argv, env={} if passphrase is None else
                       {"QRECOVER_PASSPHRASE": passphrase})
        return subprocess.CompletedProcess(argv, run.code, run.out, run.err)
    env = {k: v for k, v in os.environ.items() if k != "QRECOVER_PASSPHRASE"}
    if passphrase is not None:
        env["QRECOVER_PASSPHRASE"] = passphrase
    return subprocess.run([*prefix, QRECOVER, *argv], capture_output=True, text=True,
                          env=env, stdin=subprocess.DEVNULL, timeout=300, check=False)


def _tree(out: Path) -> list[Path]:
    return [Path(d, n) for d, dirs, files in os.walk(out) for n in [*dirs, *files]]


@pytest.mark.parametrize("mode", ["restore", "verify"])
@pytest.mark.parametrize("name", CASE_NAMES)
def test_case(cases: dict[str, bad.CaseV1], name: str, mode: str, world: Path) -> None:
    if name not in cases:
        pytest.skip("a device node can only be made by root (mknod)")
    case = cases[name]
    backup = Path(case.path)
    if case.as_nobody:  # where an ordinary user can reach it, modes kept
        subprocess.run(["cp", "-a", str(backup), str(world / "backup")], check=True)
        backup = world / "backup"
        if os.geteuid() == 0:
            os.chown(world, 65534, 65534)
    out = world / "out"
    argv = [mode, str(backup)] + (["--output", str(out)] if mode == "restore" else [])
    before = sorted(os.listdir(world))
    # No passphrase: none is needed for a folder, and a packed one is named before.
    folder = backup.is_dir()
    proc = _run(argv, case.as_nobody)
    assert proc.returncode == case.code, proc.stderr
    assert case.message in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr and "internal error" not in proc.stderr
    if folder:  # said before anything is read
        assert "nothing in this backup can be authenticated" in proc.stderr.splitlines()[0]
    after = sorted(os.listdir(world))
    assert set(after) - set(before) <= {"out"}, "written outside the output folder"
    if mode == "verify":
        assert not out.exists()
        return
    for rel in case.restored:
        assert os.path.lexists(out / rel), f"{rel} not restored: {proc.stderr}"
    for rel in case.absent:
        assert not os.path.lexists(out / rel), f"{rel} restored"
    for path in _tree(out) if out.exists() else []:
        st = path.lstat()
        assert not (stat.S_ISFIFO(st.st_mode) or stat.S_ISCHR(st.st_mode)
                    or stat.S_ISBLK(st.st_mode) or stat.S_ISSOCK(st.st_mode)), f"{path} created"
        assert not path.name.startswith(".qrecover-"), f"scratch left: {path}"
        if stat.S_ISREG(st.st_mode):
            assert OUTSIDE_TEXT not in path.read_bytes(), f"{path}: read outside the backup"
    if case.code != 0:
        errors = [line for line in proc.stderr.splitlines() if "error:" in line]
        assert len(errors) <= 1, proc.stderr


def test_a_link_to_outside_is_restored_as_the_link(cases: dict[str, bad.CaseV1],
                                                   tmp_path: Path) -> None:
    case = cases["v1-file-symlink-out"]
    out = tmp_path / "out"
    proc = _run(["restore", case.path, "--output", str(out), "--vm", "work"], False)
    assert proc.returncode == 0, proc.stderr
    image = out / "work" / "private.img"
    assert image.is_symlink()
    assert os.readlink(image) == os.readlink(Path(case.path) / "appvms/work/private.img")


def test_a_missing_vm_folder_is_named_and_the_others_restored(
    cases: dict[str, bad.CaseV1], tmp_path: Path
) -> None:
    case = cases["v1-vm-folder-missing"]
    info = _run(["info", case.path], False)
    assert info.returncode == 0
    assert "not in this folder" in info.stdout and "untrusted" in info.stdout
    unknown = _run(["restore", case.path, "--output", str(tmp_path / "o"), "--vm", "untrusted"],
                   False)
    assert unknown.returncode == 2 and "not in this backup: untrusted" in unknown.stderr
