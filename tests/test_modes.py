"""Files the backup made unreadable to their owner (mode 0004, a folder 0000).

A restore as an ordinary user extracts them with those modes; making each
placed file durable must not then need to open it (it exited 1 with a
PermissionError while fsyncing ``secret.txt``).  As root, the restore runs as
nobody, who is such an ordinary user.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import ROOT, qrecover_exe


@pytest.fixture
def world() -> Iterator[Path]:
    """A folder an ordinary user may enter (pytest's own are root's, mode 0700)."""
    folder = Path(tempfile.mkdtemp(prefix="qrecover-modes-"))
    folder.chmod(0o755)
    yield folder
    for path in folder.rglob("*"):
        if path.is_dir() and not path.is_symlink():
            path.chmod(0o755)
    shutil.rmtree(folder, ignore_errors=True)


def test_restore_of_files_their_owner_cannot_read(world: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("the writer's tar reads a mode-0004 file only as root")
    src, home = world / "src", world / "home" / "user"
    src.mkdir()
    (src / "private.img").write_bytes(os.urandom(50_000))
    (home / "locked").mkdir(parents=True)
    (home / "secret.txt").write_text("secret\n")
    (home / "locked" / "inner.txt").write_text("inner\n")
    (home / "secret.txt").chmod(0o004)
    (home / "locked").chmod(0o000)
    (world / "pw").write_text("pw\n")
    (world / "work").mkdir()
    backup = world / "backup"
    subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "make_backup.py"), str(backup),
         "--passphrase-file", str(world / "pw"), "--vm", f"work:7:QubesAppVm:{src}",
         "--dom0-home", str(home), "--dom0-user", "user", "--workdir", str(world / "work")],
        check=True, capture_output=True,
    )
    backup.chmod(0o644)
    out = world / "o"
    out.mkdir(mode=0o777)
    out.chmod(0o777)
    nobody = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
    prefix = nobody
    env = {**os.environ, "QRECOVER_PASSPHRASE": "pw"}
    result = subprocess.run(
        [*prefix, *qrecover_exe(), "restore", str(backup), "-o", str(out / "r")],
        capture_output=True, text=True, env=env, stdin=subprocess.DEVNULL, timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "internal error" not in result.stderr
    restored = out / "r" / "dom0-home" / "user"
    assert (restored / "secret.txt").stat().st_mode & 0o777 == 0o004
    assert (restored / "locked").stat().st_mode & 0o777 == 0o000
    assert (restored / "locked" / "inner.txt").read_text() == "inner\n"
    assert (restored / "secret.txt").read_text() == "secret\n"
    assert (out / "r" / "work" / "private.img").read_bytes() == (src / "private.img").read_bytes()
