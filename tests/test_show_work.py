"""Transcripts, standalone scripts, --explain and --dry-run, end to end.

The scripts qrecover writes are run for real with dash (no Python, no
qrecover) on backups written by scripts/make_backup.py, and what they restore
is compared byte for byte, and for sparseness, with `qrecover restore`.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
from conftest import (
    PASSPHRASE,
    Backup,
    MakeBackup,
    Run,
    assert_restored,
    reference,
    run_cli,
    run_main,
    sha,
)
from helpers import (
    DASH,
    ODD,
    argv_logging_path,
    assert_same_tree,
    run_sh,
    tampered_copy,
    tree,
    wrapped,
)
from make_backup import exit_code

from qrecover.stages.decompress import pick_gunzip


def write_script(backup: Backup | Path, passfile: Path, out: Path, dest: Path, *extra: str) -> Path:
    source = backup.path if isinstance(backup, Backup) else backup
    result = run_main("script", source, "-o", out, "--passphrase-file", passfile, *extra)
    assert result.code == 0, result.text
    assert result.out.startswith("#!/bin/sh\n")
    dest.write_text(result.out, encoding="utf-8")
    return dest


VARIANTS: list[dict[str, Any]] = [
    {},  # gzip, encrypted, hidden names: templates (vm3/.), dom0's home, a standalone VM
    {"compression": "bzip2", "hide_names": False},
    {"encrypted": False, "hmac_algorithm": "SHA256", "hmac_style": "openssl3"},
]


@pytest.mark.parametrize("options", VARIANTS, ids=str)
def test_script_round_trip(make: MakeBackup, tmp_path: Path, options: dict[str, Any]) -> None:
    backup = make(**options)
    ref = tmp_path / "ref"
    reference(backup, ref)
    out = tmp_path / ODD
    script = write_script(backup, backup.passfile, out, tmp_path / "recover.sh")
    work = tmp_path / "cwd"
    work.mkdir()
    proc = run_sh(script, work)
    assert proc.returncode == 0, proc.stderr
    assert_same_tree(out, ref)
    assert_restored(out, backup)
    assert list(work.iterdir()) == []  # nothing left in the folder it ran from


def test_script_chunks_past_1000(
    backup_past_1000: Backup, past_1000_restored: tuple[Path, Run], tmp_path: Path
) -> None:
    ref, result = past_1000_restored  # reference(backup_past_1000, ref), run once per run
    assert result.code == 0, result.text
    out = tmp_path / ODD
    script = write_script(backup_past_1000, backup_past_1000.passfile, out, tmp_path / "recover.sh")
    proc = run_sh(script, tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "vm12/private.img.1000: HMAC matches" in proc.stderr
    assert_same_tree(out, ref)


def test_script_from_untarred_folder_and_selected_vms(
    default_backup: Backup, tmp_path: Path
) -> None:
    folder = tmp_path / "untarred"
    folder.mkdir()
    subprocess.run(["tar", "-i", "-xf", str(default_backup.path), "-C", str(folder)], check=True)
    before = tree(folder)
    ref = tmp_path / "ref"
    reference(default_backup, ref, "--vm", "fedora-23", "--vm", "dom0")
    out = tmp_path / ODD
    script = write_script(
        folder, default_backup.passfile, out, tmp_path / "r.sh", "--vm", "fedora-23", "--vm", "dom0"
    )
    proc = run_sh(script, tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert_same_tree(out, ref)
    assert sorted(p.name for p in out.iterdir()) == ["dom0-home", "fedora-23", "qubes.xml"]
    assert tree(folder) == before  # the user's untarred files are left alone


def test_script_for_a_backup_read_from_stdin(default_backup: Backup, tmp_path: Path) -> None:
    out = tmp_path / ODD
    result = run_cli(
        "script",
        "-",
        "-o",
        out,
        "--vm",
        "work",
        "--passphrase-file",
        default_backup.passfile,
        stdin=default_backup.path.read_bytes(),
    )
    assert result.code == 0, result.text
    script = tmp_path / "r.sh"
    script.write_text(result.out, encoding="utf-8")
    proc = run_sh(script, tmp_path)
    assert proc.returncode != 0
    assert "set backup=" in proc.stderr
    assert not out.exists()
    # the person fills in the path, as the comment says
    script.write_text(
        result.out.replace("backup=''", f"backup='{default_backup.path}'"), encoding="utf-8"
    )
    proc = run_sh(script, tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert_restored(out, default_backup, ["work"])


@pytest.mark.parametrize("options", [{}, {"compression": "bzip2", "encrypted": False}], ids=str)
def test_transcript_replays_the_restore(
    make: MakeBackup, tmp_path: Path, options: dict[str, Any]
) -> None:
    backup = make(**options)
    out = tmp_path / ODD
    transcript = tmp_path / "run.sh"
    reference(backup, out, "--transcript", transcript)
    kept = tmp_path / "first"
    out.rename(kept)  # the first output is gone
    empty = tmp_path / "empty"
    empty.mkdir()
    proc = run_sh(transcript, empty)
    assert proc.returncode == 0, proc.stderr
    assert_same_tree(out, kept)
    assert list(empty.iterdir()) == []
    text = transcript.read_text(encoding="utf-8")
    assert "take vm7/private.img.000 vm7/private.img.000.hmac" in text
    assert "check_hmac vm3/..000" in text


def test_transcript_replays_where_the_faster_gunzip_is_missing(
    default_backup: Backup, tmp_path: Path
) -> None:
    """qrecover ran igzip -d; the transcript replays with gzip -d where igzip is absent."""
    out = tmp_path / ODD
    transcript = tmp_path / "run.sh"
    recorded = _path_without(tmp_path / "with", ("pigz",))
    assert (Path(recorded.split(":")[0]) / "igzip").exists(), "igzip missing (.ci/run installs it)"
    result = run_main(
        "-v", "restore", default_backup.path, "-o", out, "--passphrase-file",
        default_backup.passfile, "--transcript", transcript, env={"PATH": recorded},
    )  # fmt: skip
    assert result.code == 0, result.text
    assert "| igzip -d |" in result.err
    text = transcript.read_text(encoding="utf-8")
    assert "if command -v igzip >/dev/null 2>&1; then igzip -d; else gzip -d; fi" in text
    kept = tmp_path / "first"
    out.rename(kept)
    for name, path in (("without", _path_without(tmp_path / "without", ("igzip", "pigz"))),
                       ("again", recorded)):  # fmt: skip
        empty = tmp_path / f"cwd-{name}"
        empty.mkdir()
        proc = run_sh(transcript, empty, path=path)
        assert proc.returncode == 0, proc.stderr
        assert_same_tree(out, kept)
        shutil.rmtree(out)


def _path_without(folder: Path, hidden: tuple[str, ...]) -> str:
    """A PATH of one folder: every program of the current PATH except ``hidden``."""
    folder.mkdir(parents=True)
    for entry in reversed(os.environ["PATH"].split(os.pathsep)):
        if not os.path.isdir(entry):
            continue
        for program in os.listdir(entry):
            link = folder / program
            if program not in hidden and os.access(os.path.join(entry, program), os.X_OK):
                if link.is_symlink():
                    link.unlink()  # earlier PATH entries win, as in the shell
                link.symlink_to(os.path.join(entry, program))
    return str(folder)


def test_transcript_of_chunked_verify_replays(make: MakeBackup, tmp_path: Path) -> None:
    backup = make(chunk_size=16 * 1024)
    transcript = tmp_path / "verify.sh"
    result = run_main(
        "verify", backup.path, "--passphrase-file", backup.passfile, "--transcript", transcript
    )
    assert result.code == 0, result.text
    text = transcript.read_text(encoding="utf-8")
    # every chunk, in order, each verified before it is fed
    chunks = [
        n
        for n in backup.manifest.member_names()
        if n.startswith("vm7/private.img.") and not n.endswith(".hmac")
    ]
    assert len(chunks) > 3
    positions = [text.index(f"check_hmac {c}\n") for c in chunks]
    assert positions == sorted(positions)
    for chunk in chunks:
        assert text.index(f"check_hmac {chunk}\n") < text.index(f"feed {chunk}\n")
    proc = run_sh(transcript, tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["verify.sh"]
    # an existing transcript file is not overwritten
    again = run_main(
        "verify", backup.path, "--passphrase-file", backup.passfile, "--transcript", transcript
    )
    assert again.code == 6 and "already exists" in again.err


def _recording_openssl(bindir: Path, logdir: Path) -> str:
    """An `openssl` first on PATH that keeps a copy of what `openssl enc` reads."""
    logdir.mkdir()
    body = (
        'if [ "$1" = enc ]; then\n'
        f'    tee "{logdir}/enc.$$" | {{real}} "$@"\n'
        "    exit $?\n"
        "fi\n"
        'exec {real} "$@"\n'
    )
    return wrapped(bindir, ("openssl",), body)


def test_tampered_chunk_stops_the_script_before_openssl_enc(
    make: MakeBackup, tmp_path: Path
) -> None:
    backup = make(chunk_size=16 * 1024)
    victim = "vm7/private.img.001"
    tampered = tampered_copy(backup.path, tmp_path / "tampered-backup", victim, at=100)
    out = tmp_path / ODD
    script = write_script(tampered, backup.passfile, out, tmp_path / "r.sh", "--vm", "work")
    path = _recording_openssl(tmp_path / "bin", tmp_path / "log")
    proc = run_sh(script, tmp_path, path=path)
    assert proc.returncode != 0
    assert f"{victim}: HMAC mismatch" in proc.stderr
    # chunk .000 was fed; not one byte of .001 ever reached openssl enc
    folder = tmp_path / "untarred"
    folder.mkdir()
    subprocess.run(["tar", "-i", "-xf", str(tampered), "-C", str(folder)], check=True)
    first = (folder / "vm7/private.img.000").read_bytes()
    bad = (folder / victim).read_bytes()
    fed = [p.read_bytes() for p in (tmp_path / "log").iterdir()]
    assert first in fed  # the private.img pipeline got chunk .000 and nothing more
    assert all(bad[:4096] not in data for data in fed)
    assert not (out / "work" / "private.img").exists()
    leftovers = [p.name for p in out.rglob("*") if p.name.startswith(".qrecover")]
    assert leftovers == []
    # the transcript of the same run stops at the same chunk on replay
    transcript = tmp_path / "t.sh"
    result = run_main(
        "restore",
        tampered,
        "-o",
        tmp_path / "o2",
        "--vm",
        "work",
        "--passphrase-file",
        backup.passfile,
        "--transcript",
        transcript,
    )
    assert result.code == 4
    shutil.rmtree(tmp_path / "o2")
    proc = run_sh(transcript, tmp_path)
    assert proc.returncode != 0 and f"{victim}: HMAC mismatch" in proc.stderr
    assert not (tmp_path / "o2" / "work" / "private.img").exists()


def test_failing_middle_stage_stops_the_script(default_backup: Backup, tmp_path: Path) -> None:
    bindir = tmp_path / "bin"
    bindir.mkdir()
    gzip = bindir / "gzip"
    gzip.write_text('#!/bin/sh\nhead -c 10 >/dev/null\necho "gzip: injected failure" >&2\nexit 1\n')
    gzip.chmod(0o755)
    out = tmp_path / ODD
    script = write_script(default_backup, default_backup.passfile, out, tmp_path / "r.sh")
    proc = run_sh(script, tmp_path, path=f"{bindir}:{os.environ['PATH']}")
    assert proc.returncode != 0
    assert "qubes.xml: gzip failed (exit status 1): gzip: injected failure" in proc.stderr
    assert "STOPPED: qubes.xml: not restored" in proc.stderr
    assert not (out / "qubes.xml").exists()


def test_wrong_passphrase_stops_the_script_at_step_2(
    default_backup: Backup, tmp_path: Path
) -> None:
    out = tmp_path / ODD
    script = write_script(default_backup, default_backup.passfile, out, tmp_path / "r.sh")
    proc = run_sh(script, tmp_path, env_extra={"backup_pass": "not the passphrase"})
    assert proc.returncode != 0
    assert "backup-header: HMAC mismatch: wrong passphrase" in proc.stderr
    assert not out.exists()


def test_explain_narrates_every_step(default_backup: Backup, tmp_path: Path) -> None:
    out = tmp_path / ODD
    result = run_main(
        "restore",
        default_backup.path,
        "-o",
        out,
        "--vm",
        "work",
        "--explain",
        "--passphrase-file",
        default_backup.passfile,
    )
    assert result.code == 0, result.text
    err = result.err
    for step in ("Step 1", "Step 2", "Step 3", "Step 4", "Steps 5-7", "Step 8"):
        assert f"* {step}" in err, step
    assert "tar -i -xvf" in err
    assert "HMAC-SHA512 matches backup-header.hmac" in err
    assert "HMAC matches vm7/private.img.000.hmac" in err
    # igzip or pigz -d replaces gzip -d where installed; what ran is what is shown
    assert re.search(
        r"openssl enc -d -aes-256-cbc -md md5 -pass env:backup_pass "
        r"\| (gzip|pigz|igzip) -d \| tar -x",
        err,
    )
    assert f"sudo mount -o loop,ro '{out}/work/private.img' /mnt" in err
    assert err.index("* Step 2") < err.index("* Step 3") < err.index("* Step 4")
    verify = run_main(
        "verify",
        default_backup.path,
        "--vm",
        "work",
        "--explain",
        "--passphrase-file",
        default_backup.passfile,
    )
    assert verify.code == 0 and "decrypted, decompressed and listed" in verify.err


def test_dry_run_plans_and_writes_nothing(default_backup: Backup, tmp_path: Path) -> None:
    out = tmp_path / ODD
    result = run_main(
        "restore",
        default_backup.path,
        "-o",
        out,
        "--dry-run",
        "--passphrase-file",
        default_backup.passfile,
    )
    assert result.code == 0, result.text
    assert not out.exists()
    assert f"{out}/work/" in result.out and f"{out}/dom0-home/user/" in result.out
    assert "work (AppVM, template fedora-23)" in result.out
    # the decompressor the restore runs (igzip, else pigz, else gzip), not gzip -d
    gunzip = pick_gunzip()
    assert f"openssl enc -d -aes-256-cbc -md md5 -pass env:backup_pass | {gunzip} -d" in result.out
    assert "--strip-components=1" in result.out
    out.mkdir()
    (out / "work").mkdir()
    again = run_main(
        "restore",
        default_backup.path,
        "-o",
        out,
        "--dry-run",
        "--vm",
        "work",
        "--passphrase-file",
        default_backup.passfile,
    )
    assert again.code == 6 and "It would stop" in again.out and "--force" in again.out
    assert sorted(p.name for p in out.iterdir()) == ["work"]
    bad = tmp_path / "bad"
    bad.write_text("wrong\n")
    wrong = run_main(
        "restore", default_backup.path, "-o", out, "--dry-run", "--passphrase-file", bad
    )
    assert wrong.code == 3


def test_passphrase_never_shown(default_backup: Backup, tmp_path: Path) -> None:
    """Not in any output, log, transcript, script, error message, or argv of the scripts."""
    secret_forms = [PASSPHRASE, PASSPHRASE.encode("utf-8").hex()]
    texts: list[str] = []
    pf = default_backup.passfile
    out = tmp_path / ODD
    transcript = tmp_path / "t.sh"
    runs = [
        run_main(
            "-v",
            "restore",
            default_backup.path,
            "-o",
            out,
            "--passphrase-file",
            pf,
            "--transcript",
            transcript,
            "--explain",
        ),
        run_main(
            "-v",
            "verify",
            default_backup.path,
            "--passphrase-file",
            pf,
            "--explain",
            "--transcript",
            tmp_path / "v.sh",
        ),
        run_main(
            "-v",
            "restore",
            default_backup.path,
            "-o",
            tmp_path / "d",
            "--dry-run",
            "--passphrase-file",
            pf,
        ),
        run_main(
            "-v", "script", default_backup.path, "-o", tmp_path / "s", "--passphrase-file", pf
        ),
        run_main("-v", "info", default_backup.path, "--passphrase-file", pf),
    ]
    assert [r.code for r in runs] == [0, 0, 0, 0, 0], [r.err for r in runs]
    assert "+ openssl enc -d" in runs[0].err  # -v did log the commands
    bad = tmp_path / "bad"
    bad.write_text(PASSPHRASE + "x\n")
    wrong = run_main(
        "-v",
        "restore",
        default_backup.path,
        "-o",
        tmp_path / "w",
        "--passphrase-file",
        bad,
        "--transcript",
        tmp_path / "w.sh",
    )
    assert wrong.code == 3
    runs.append(wrong)
    texts += [r.out + r.err for r in runs]
    script = tmp_path / "s.sh"
    script.write_text(runs[3].out, encoding="utf-8")
    for name in ("t.sh", "v.sh", "w.sh"):
        texts.append((tmp_path / name).read_text(encoding="utf-8"))
    # replay the transcript and run the script with every program's argv logged
    shutil.rmtree(out)
    log = tmp_path / "argv.log"
    path = argv_logging_path(tmp_path / "bin", log) + ":" + os.environ["PATH"]
    for sh_file in (transcript, script):
        proc = run_sh(sh_file, tmp_path, path=path)
        assert proc.returncode == 0, proc.stderr
        texts.append(proc.stdout + proc.stderr)
    argv_log = log.read_text(encoding="utf-8", errors="replace")
    assert "openssl dgst -sha512 -binary" in argv_log and "openssl enc -d" in argv_log
    texts.append(argv_log)
    for leftover in tmp_path.rglob("*"):
        if leftover.is_file() and leftover.suffix != ".img" and leftover != bad:
            texts.append(leftover.read_bytes().decode("utf-8", "replace"))
    for text in texts:
        for secret in secret_forms:
            assert secret not in text


def test_script_asks_for_the_passphrase_without_echo(
    default_backup: Backup, tmp_path: Path
) -> None:
    import pty
    import time

    out = tmp_path / ODD
    script = write_script(
        default_backup, default_backup.passfile, out, tmp_path / "r.sh", "--vm", "work"
    )
    # tar and the decompressors note whether the passphrase is in their environment
    bindir = tmp_path / "bin"
    bindir.mkdir()
    leaks = tmp_path / "leaks"
    for program in ("tar", "gzip", "pigz", "igzip", "openssl"):
        real = shutil.which(program)
        if real is not None:
            (bindir / program).write_text(
                f'#!/bin/sh\n[ -n "${{backup_pass:-}}" ] && echo {program} >>"{leaks}"\n'
                f'exec {real} "$@"\n'
            )
            (bindir / program).chmod(0o755)
    pid, fd = pty.fork()
    if pid == 0:  # the child: dash on a terminal, no backup_pass in its environment
        env = {k: v for k, v in os.environ.items() if k != "backup_pass"}
        env["PATH"] = f"{bindir}:{env['PATH']}"
        os.execve(DASH, [DASH, str(script)], env)
    seen = b""

    def read_until(marker: bytes) -> None:
        nonlocal seen
        deadline = time.monotonic() + 60
        while marker not in seen and time.monotonic() < deadline:
            try:
                seen += os.read(fd, 4096)
            except OSError:
                break

    read_until(b"passphrase: ")
    os.write(fd, PASSPHRASE.encode("utf-8") + b"\n")
    read_until(b"done:")
    _, status = os.waitpid(pid, 0)
    os.close(fd)
    assert exit_code(status) == 0, seen.decode("utf-8", "replace")
    assert PASSPHRASE.encode("utf-8") not in seen  # typed with echo off
    assert_restored(out, default_backup, ["work"])
    # only openssl enc, which reads it (-pass env:backup_pass), had it
    assert set(leaks.read_text().split()) == {"openssl"}


def test_transcript_file_is_never_the_backup_nor_written_through_a_link(
    default_backup: Backup, tmp_path: Path
) -> None:
    copy = tmp_path / "backup"
    shutil.copy(default_backup.path, copy)
    before = sha(copy)
    result = run_main(
        "restore",
        copy,
        "-o",
        tmp_path / "o1",
        "--passphrase-file",
        default_backup.passfile,
        "--transcript",
        copy,
        "--force",
    )
    assert result.code == 2 and "is the backup itself" in result.err
    assert sha(copy) == before
    victim = tmp_path / "victim.txt"
    victim.write_text("mine")
    link = tmp_path / "t.sh"
    link.symlink_to(victim)
    result = run_main(
        "restore",
        copy,
        "-o",
        tmp_path / "o2",
        "--vm",
        "work",
        "--passphrase-file",
        default_backup.passfile,
        "--transcript",
        link,
        "--force",
    )
    assert result.code == 0, result.text
    assert victim.read_text() == "mine"
    assert not link.is_symlink() and "tar -i" in link.read_text()
    assert not list(tmp_path.glob(".t.sh.*.partial"))


def test_transcript_of_a_run_with_problems_does_not_end_in_success(
    make: MakeBackup, tmp_path: Path
) -> None:
    # qrecover exits 4 for a problem not tied to one stored file (here a VM
    # whose private.img is missing): the replay must not say all went well.
    backup = make()
    members = [n for n in backup.manifest.member_names() if not n.startswith("vm7/private.img.")]
    folder = tmp_path / "untarred"
    folder.mkdir()
    subprocess.run(["tar", "-i", "-xf", str(backup.path), "-C", str(folder), *members], check=True)
    transcript = tmp_path / "t.sh"
    result = run_main(
        "restore",
        folder,
        "-o",
        tmp_path / "out",
        "--passphrase-file",
        backup.passfile,
        "--transcript",
        transcript,
    )
    assert result.code == 4 and "vm7/private.img: missing" in result.err
    shutil.rmtree(tmp_path / "out")
    proc = run_sh(transcript, tmp_path)
    assert proc.returncode != 0
    assert "qrecover reported problems" in proc.stderr and "replay done" not in proc.stderr
