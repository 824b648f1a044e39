"""Plain helpers the test modules share: untarring a backup by hand, damaging a copy
of one, comparing restored trees, running the scripts qrecover writes, and programs
put first on PATH that log or pretend. No fixtures here (those are in conftest.py);
a test module imports what it needs from here, never from another test module."""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import stat
import subprocess
import tarfile
from pathlib import Path
from typing import Any, Iterator

import pytest

PASSPHRASE = "correct horse battery staple ünïcödé"
DASH = shutil.which("dash") or "/usr/bin/dash"
# An output folder name with a space and non-ASCII characters, as users have.
ODD = "out dir ü €"


def sha(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# -- a backup taken apart by hand, or damaged ------------------------------------


def untar(backup: Path, folder: Path) -> Path:
    """The backup untarred by hand into a new ``folder``, as the recovery page's
    step 1 does (``tar -i``: every small archive of the concatenation)."""
    folder.mkdir()
    subprocess.run(["tar", "-i", "-xf", str(backup), "-C", str(folder)], check=True)
    return folder


def spans(path: Path) -> dict[str, tuple[int, int, int]]:
    """Each outer member: (its archive's first byte, its data's first byte, the next's)."""
    with tarfile.open(path, ignore_zeros=True) as archive:
        members = list(archive)
    size = path.stat().st_size
    return {
        m.name: (m.offset, m.offset_data, members[i + 1].offset if i + 1 < len(members) else size)
        for i, m in enumerate(members)
    }


def flip(path: Path, offset: int, mask: int = 0x01) -> None:
    """Flip the bits of ``mask`` in the byte at ``offset`` of ``path``, in place."""
    with path.open("r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ mask]))


def tampered_copy(
    backup: Path, dest: Path, member: str, at: int | None = None, mask: int = 0x01
) -> Path:
    """A copy of ``backup`` at ``dest`` with one byte of ``member``'s data changed:
    byte ``at`` of it, or its middle (in a format-4 chunk's ciphertext only scrypt's
    HMAC, at the end of the chunk, notices)."""
    shutil.copyfile(backup, dest)
    with tarfile.open(dest, "r:", ignore_zeros=True) as archive:
        info = archive.getmember(member)
    flip(dest, info.offset_data + (info.size // 2 if at is None else at), mask)
    return dest


# -- restored trees ---------------------------------------------------------------


def tree(root: Path) -> dict[str, tuple[Any, ...]]:
    """Every name below ``root``: its type, and a link's target or a file's size and hash."""
    entries: dict[str, tuple[Any, ...]] = {}
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root).as_posix()
        if path.is_symlink():
            entries[rel] = ("link", os.readlink(path))
        elif path.is_dir():
            entries[rel] = ("dir",)
        else:
            entries[rel] = ("file", path.stat().st_size, sha(path))
    return entries


def assert_same_tree(got: Path, want: Path) -> None:
    """Same names, types, link targets and bytes (or, for two files, the same bytes);
    a file of 1 MiB or more (a VM image) uses no more disk than the original's
    allocation and 256 KiB: holes stayed holes."""
    if want.is_file():
        pairs = [(got, want)]
        assert got.is_file() and sha(got) == sha(want), got
    else:
        got_tree, want_tree = tree(got), tree(want)
        assert got_tree == want_tree, (got, want)
        pairs = [(got / rel, want / rel) for rel, entry in want_tree.items() if entry[0] == "file"]
    for got_file, want_file in pairs:
        if want_file.stat().st_size >= 1 << 20:
            got_alloc = got_file.stat().st_blocks * 512
            want_alloc = want_file.stat().st_blocks * 512
            assert got_alloc <= want_alloc + (256 << 10), (got_file, got_alloc, want_alloc)


# -- the scripts qrecover writes, run for real --------------------------------------


def run_sh(
    script: Path, cwd: Path, env_extra: dict[str, str] | None = None, path: str | None = None
) -> subprocess.CompletedProcess[str]:
    """``script`` run by dash with the passphrase in ``backup_pass``, as its header says."""
    env = {k: v for k, v in os.environ.items() if k not in ("QRECOVER_PASSPHRASE", "backup_pass")}
    env["backup_pass"] = PASSPHRASE
    if path is not None:
        env["PATH"] = path
    env.update(env_extra or {})
    return subprocess.run(
        [DASH, str(script)],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        timeout=240,
        check=False,
    )


# -- programs first on PATH -----------------------------------------------------------

_LOGGED = (
    "tar", "openssl", "gzip", "od", "sed", "tr", "wc", "grep", "sort", "find", "cat",
    "rm", "mkdir", "mv", "cp", "tail", "stty", "rmdir", "head",
)  # fmt: skip


def wrapped(bindir: Path, programs: tuple[str, ...], body: str) -> str:
    """A new ``bindir`` of sh wrappers, one for each of ``programs`` installed here:
    ``body`` with ``{program}`` and ``{real}`` (the real program's path) filled in.
    Returns a PATH that finds them first."""
    bindir.mkdir()
    for program in programs:
        real = shutil.which(program)
        if real is None:
            continue
        wrapper = bindir / program
        wrapper.write_text("#!/bin/sh\n" + body.format(program=program, real=real))
        wrapper.chmod(0o755)
    return f"{bindir}:{os.environ['PATH']}"


def argv_logging_path(bindir: Path, log: Path) -> str:
    """Wrappers that log every argv of the programs a script runs to ``log``, then
    run the real program; a PATH of them alone."""
    body = f'printf "%s\\n" "{{program}} $*" >>"{log}"\nexec {{real}} "$@"\n'
    wrapped(bindir, _LOGGED, body)
    return str(bindir)


def recording(programs: tuple[str, ...], bindir: Path, logdir: Path) -> str:
    """Each of ``programs`` first on PATH, keeping a copy of everything it reads
    in ``logdir`` (``in.PID``), then running the real one."""
    logdir.mkdir()
    return wrapped(bindir, programs, f'tee "{logdir}/in.$$" | {{real}} "$@"\n')


def fake_scrypt(bindir: Path, usage: str, log: Path) -> None:
    """A scrypt in ``bindir`` that shows an older version's usage, logs its argv,
    and does the work with the real scrypt (so the -P path is exercised for real)."""
    real = shutil.which("scrypt")
    script = bindir / "scrypt"
    script.write_text(
        "#!/bin/sh\n"
        f'printf "%s\\n" "$*" >> {log}\n'
        'if [ "$1" = "--help" ]; then\n'
        f"  printf '%s\\n' '{usage}' >&2; exit 1\n"
        "fi\n"
        f'exec {real} "$@"\n'
    )
    script.chmod(script.stat().st_mode | stat.S_IXUSR)


@contextlib.contextmanager
def mounted_tmpfs(where: Path, size: str) -> Iterator[Path]:
    """A small tmpfs at ``where`` (a full disk on demand); skipped, with the reason,
    where this machine cannot mount one."""
    where.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        pytest.skip(
            f"cannot mount a small filesystem here ({proc.stderr.strip()}); "
            "needs root in a machine that allows mount"
        )
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)
