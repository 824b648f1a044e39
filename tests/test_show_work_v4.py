"""Transcripts, standalone scripts, --explain and --dry-run on format-4 (Qubes R4) backups.

The backups are written by scripts/make_backup_v4.py the way Qubes R4 wrote them
(scrypt per chunk, with a cheap key derivation so that the suite stays fast);
the scripts qrecover writes are run for real with dash (and bash), with the real
scrypt, and what they restore is compared byte for byte, and for sparseness, with
`qrecover restore`.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
from conftest import PASSPHRASE, MakeBackup, assert_restored, gen4, reference, run_main
from helpers import (
    DASH,
    ODD,
    argv_logging_path,
    assert_same_tree,
    fake_scrypt,
    recording,
    run_sh,
    tampered_copy,
    untar,
)

from qrecover.formats.v4 import sh as v4_sh
from qrecover.formats.v4.sh import SCRIPT_FUNCTIONS_V4
from qrecover.render import shell
from qrecover.stages.decompress import pick_gunzip
from qrecover.stages.extract import pick_extractor

SCRYPT_1_2_1_USAGE = (
    "usage: scrypt {enc | dec} [-M maxmem] [-m maxmemfrac] [-P] [-t maxtime] infile [outfile]"
)


def write_script(source: Path, passfile: Path, out: Path, dest: Path, *extra: str) -> Path:
    result = run_main("script", source, "-o", out, "--passphrase-file", passfile, *extra)
    assert result.code == 0, result.text
    assert result.out.startswith("#!/bin/sh\n")
    dest.write_text(result.out, encoding="utf-8")
    return dest


def scrypt_dec(enc: Path, secret: str) -> bytes:
    """What the real scrypt decrypts ``enc`` to (for checking what was fed)."""
    plain = enc.with_name(enc.name + ".plain")
    subprocess.run(
        ["scrypt", "dec", "--passphrase", "env:S", str(enc), str(plain)],
        env={**os.environ, "S": secret},
        check=True,
    )
    return plain.read_bytes()


VARIANTS: list[tuple[dict[str, Any], str]] = [
    ({"chunk_size": 16 * 1024}, DASH),  # several chunks per image; templates, dom0's home
    ({"compression": "bzip2"}, DASH),
    ({"compression": None}, "bash"),  # uncompressed: no decompressor at all
]


@pytest.mark.parametrize(("options", "sh"), VARIANTS, ids=lambda v: str(v))
def test_r4_script_round_trip(
    make4: MakeBackup, tmp_path: Path, options: dict[str, Any], sh: str
) -> None:
    backup = make4(**options)
    ref = tmp_path / "ref"
    reference(backup, ref)
    out = tmp_path / ODD
    script = write_script(backup.path, backup.passfile, out, tmp_path / "recover.sh")
    text = script.read_text(encoding="utf-8")
    assert "backup-emergency-restore-v4" in text and "openssl" not in text
    assert PASSPHRASE not in text
    work = tmp_path / "cwd"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("QRECOVER_PASSPHRASE",)}
    env["backup_pass"] = PASSPHRASE
    proc = subprocess.run(
        [sh, str(script)], cwd=work, env=env, capture_output=True, text=True,
        stdin=subprocess.DEVNULL, timeout=240, check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert "backup-header: identical to its copy authenticated by scrypt" in proc.stderr
    assert_same_tree(out, ref)
    assert_restored(out, backup)
    assert (out / "fedora-23" / "root.img").is_file()  # R4 templates: root.img + private.img
    assert (out / "dom0-home" / "user").is_dir()
    assert list(work.iterdir()) == []  # nothing left in the folder it ran from
    if "chunk_size" in options:
        assert "vm7/private.img.002.enc: authenticated by scrypt" in proc.stderr


def test_r4_transcripts_replay_restore_and_verify(make4: MakeBackup, tmp_path: Path) -> None:
    backup = make4(chunk_size=16 * 1024)
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
    assert "backup-emergency-restore-v4" in text and "openssl" not in text
    backup_id = backup.manifest.header["backup-id"]
    chunks = [
        n[: -len(".enc")]
        for n in backup.manifest.member_names()
        if n.startswith("vm7/private.img.") and n.endswith(".enc")
    ]
    assert len(chunks) > 2
    positions = []
    for chunk in chunks:
        # each chunk: taken out, decrypted by scrypt (the '!' single-quoted), then fed
        decrypt = f"scrypt_dec {chunk}.enc {chunk} '{backup_id}!{chunk}!'\n"
        assert text.index(f"take {chunk}.enc\n") < text.index(decrypt)
        assert text.index(decrypt) < text.index(f"feed {chunk}\n")
        positions.append(text.index(decrypt))
    assert positions == sorted(positions)
    # a verify transcript verifies again and writes nothing
    vt = tmp_path / "verify.sh"
    result = run_main(
        "verify", backup.path, "--passphrase-file", backup.passfile, "--transcript", vt
    )
    assert result.code == 0, result.text
    before = sorted(p.name for p in tmp_path.iterdir())
    proc = run_sh(vt, tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "replay done: everything verified" in proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_r4_tampered_chunk_stops_before_the_decompressor(
    make4: MakeBackup, tmp_path: Path
) -> None:
    backup = make4(chunk_size=16 * 1024)
    victim = "vm7/private.img.001"
    tampered = tampered_copy(backup.path, tmp_path / "tampered-backup", victim + ".enc")
    out = tmp_path / ODD
    script = write_script(tampered, backup.passfile, out, tmp_path / "r.sh", "--vm", "work")
    path = recording(("gzip", "pigz", "igzip"), tmp_path / "bin", tmp_path / "log")
    proc = run_sh(script, tmp_path, path=path)
    assert proc.returncode != 0
    assert f"STOPPED: {victim}.enc: scrypt could not authenticate it" in proc.stderr
    # what the decompressor of private.img read: chunk .000's plaintext, and not
    # one byte more (scrypt may have written some of .001's: it was not used)
    folder = untar(backup.path, tmp_path / "untarred")
    backup_id = backup.manifest.header["backup-id"]
    plain = [
        scrypt_dec(folder / f"vm7/private.img.{i:03d}.enc",
                   f"{backup_id}!vm7/private.img.{i:03d}!{PASSPHRASE}")
        for i in (0, 1)
    ]
    fed = [p.read_bytes() for p in (tmp_path / "log").iterdir()]
    assert plain[0] in fed
    assert all(plain[1][:4096] not in data for data in fed)
    assert not (out / "work" / "private.img").exists()
    assert [p.name for p in out.rglob("*") if p.name.startswith(".qrecover")] == []
    # the transcript of the same run stops at the same chunk on replay
    transcript = tmp_path / "t.sh"
    result = run_main(
        "restore", tampered, "-o", tmp_path / "o2", "--vm", "work",
        "--passphrase-file", backup.passfile, "--transcript", transcript,
    )
    assert result.code == 4, result.text
    shutil.rmtree(tmp_path / "o2")
    for log in (tmp_path / "log").iterdir():
        log.unlink()
    proc = run_sh(transcript, tmp_path, path=path)
    assert proc.returncode != 0
    assert f"STOPPED: {victim}.enc: scrypt could not authenticate it" in proc.stderr
    fed = [p.read_bytes() for p in (tmp_path / "log").iterdir()]
    assert plain[0] in fed and all(plain[1][:4096] not in data for data in fed)
    assert not (tmp_path / "o2" / "work" / "private.img").exists()


def test_r4_wrong_passphrase_stops_the_script_at_step_3(
    make4: MakeBackup, tmp_path: Path
) -> None:
    backup = make4()
    out = tmp_path / ODD
    script = write_script(backup.path, backup.passfile, out, tmp_path / "r.sh", "--vm", "work")
    proc = run_sh(script, tmp_path, env_extra={"backup_pass": "not the passphrase"})
    assert proc.returncode != 0
    assert "backup-header.hmac: scrypt could not authenticate it" in proc.stderr
    assert "wrong passphrase" in proc.stderr
    assert not out.exists()


def test_r4_scripts_with_scrypt_1_2_1_use_P(make4: MakeBackup, tmp_path: Path) -> None:
    """A scrypt that only has -P: the script and the transcript (written while
    qrecover used scrypt 1.3's env:) find out at run time and use -P."""
    backup = make4(chunk_size=16 * 1024)
    ref = tmp_path / "ref"
    transcript = tmp_path / "t.sh"
    reference(backup, ref, "--vm", "work", "--transcript", transcript)
    kept = tmp_path / "kept"
    ref.rename(kept)
    out = tmp_path / ODD
    script = write_script(backup.path, backup.passfile, out, tmp_path / "r.sh", "--vm", "work")
    bindir = tmp_path / "bin"
    bindir.mkdir()
    log = tmp_path / "argv.log"
    fake_scrypt(bindir, SCRYPT_1_2_1_USAGE, log)
    path = f"{bindir}:{os.environ['PATH']}"
    for sh_file, target in ((script, out), (transcript, ref)):
        proc = run_sh(sh_file, tmp_path, path=path)
        assert proc.returncode == 0, proc.stderr
        assert_same_tree(target, kept)
    argvs = log.read_text(encoding="utf-8")
    assert argvs.count("dec -P ") >= 4 and "--passphrase" not in argvs
    assert PASSPHRASE not in argvs


def test_r4_explain_narrates_the_v4_steps(make4: MakeBackup, tmp_path: Path) -> None:
    backup = make4(chunk_size=16 * 1024)
    out = tmp_path / ODD
    result = run_main(
        "restore", backup.path, "-o", out, "--vm", "work", "--explain",
        "--passphrase-file", backup.passfile,
    )
    assert result.code == 0, result.text
    err = result.err
    titles = [f"* Step {n} " for n in range(1, 10)]
    for title in titles:
        assert title in err, title
    assert [err.index(t) for t in titles] == sorted(err.index(t) for t in titles)
    assert "backup-emergency-restore-v4" in err and "NAME.000.enc" in err
    assert (
        "backup_pass='backup-header!'\"$backup_pass\" scrypt dec --passphrase env:backup_pass "
        "backup-header.hmac backup-header.verified && cmp backup-header backup-header.verified"
    ) in err
    backup_id = backup.manifest.header["backup-id"]
    assert f"backup_id={backup_id}" in err
    assert (
        f"backup_pass='{backup_id}!vm7/private.img.001!'\"$backup_pass\" scrypt dec "
        "--passphrase env:backup_pass vm7/private.img.001.enc vm7/private.img.001"
    ) in err
    assert "scrypt exited 0: the chunk is authentic" in err
    # igzip/pigz, bsdtar if there
    assert re.search(r"\| (gzip|pigz|igzip) -d \| (bsdtar|tar) -x -f - -C", err)
    assert f"sudo mount -o loop,ro '{out}/work/private.img' /mnt" in err
    assert "openssl" not in err and "HMAC matches" not in err
    verify = run_main(
        "verify", backup.path, "--vm", "work", "--explain", "--passphrase-file", backup.passfile
    )
    assert verify.code == 0 and "decrypted, decompressed and listed" in verify.err


def test_r4_dry_run_plans_and_writes_nothing(make4: MakeBackup, tmp_path: Path) -> None:
    backup = make4()
    out = tmp_path / ODD
    result = run_main(
        "restore", backup.path, "-o", out, "--dry-run", "--passphrase-file", backup.passfile
    )
    assert result.code == 0, result.text
    assert not out.exists()
    text = result.out
    assert "authentic (scrypt; format 4, Qubes R4)" in text
    assert f"{out}/work/" in text and f"{out}/dom0-home/user/" in text
    assert f"{out}/fedora-23/" in text and "fedora-23 (TemplateVM)" in text
    backup_id = backup.manifest.header["backup-id"]
    assert (
        f"backup_pass='{backup_id}!vm7/F.NNN!'\"$backup_pass\" scrypt dec --passphrase "
        "env:backup_pass vm7/F.NNN.enc vm7/F.NNN"
    ) in text
    assert f"| {pick_gunzip()} -d | {pick_extractor()} -x -f - -C \"$staging\" " \
        "--strip-components=1" in text
    assert "backup-emergency-restore-v4" in text
    for line in text.splitlines():  # every command shown pastes as it is
        if line.startswith("  8    "):
            shlex.split(line[7:].split("   (")[0])
    bad = tmp_path / "bad"
    bad.write_text("wrong\n")
    wrong = run_main("restore", backup.path, "-o", out, "--dry-run", "--passphrase-file", bad)
    assert wrong.code == 3 and not out.exists()


def test_r4_passphrase_never_shown(make4: MakeBackup, tmp_path: Path) -> None:
    """Not in any output, -v log, transcript, script, error message, or argv of
    what the scripts run."""
    backup = make4(chunk_size=16 * 1024)
    secret_forms = [PASSPHRASE, PASSPHRASE.encode("utf-8").hex()]
    pf = backup.passfile
    out = tmp_path / ODD
    transcript = tmp_path / "t.sh"
    runs = [
        run_main("-v", "restore", backup.path, "-o", out, "--passphrase-file", pf,
                 "--transcript", transcript, "--explain"),
        run_main("-v", "verify", backup.path, "--passphrase-file", pf, "--explain",
                 "--transcript", tmp_path / "v.sh"),
        run_main("-v", "restore", backup.path, "-o", tmp_path / "d", "--dry-run",
                 "--passphrase-file", pf),
        run_main("-v", "script", backup.path, "-o", tmp_path / "s", "--passphrase-file", pf),
    ]
    assert [r.code for r in runs] == [0, 0, 0, 0], [r.err for r in runs]
    assert "+ backup_pass=" in runs[0].err and "scrypt dec" in runs[0].err  # -v logged
    bad = tmp_path / "bad"
    bad.write_text(PASSPHRASE + "x\n")
    wrong = run_main("-v", "restore", backup.path, "-o", tmp_path / "w", "--passphrase-file",
                     bad, "--transcript", tmp_path / "w.sh", "--explain")
    assert wrong.code == 3
    tampered = tampered_copy(backup.path, tmp_path / "tampered-backup", "vm7/private.img.000.enc")
    damaged = run_main("-v", "restore", tampered, "-o", tmp_path / "x", "--passphrase-file", pf,
                       "--explain", "--transcript", tmp_path / "x.sh")
    assert damaged.code == 4 and "vm7/private.img.000.enc" in damaged.err
    runs += [wrong, damaged]
    texts = [r.out + r.err for r in runs]
    script = tmp_path / "s.sh"
    script.write_text(runs[3].out, encoding="utf-8")
    # replay the transcript and run the script with every program's argv logged
    shutil.rmtree(out)
    log = tmp_path / "argv.log"
    path = argv_logging_path(tmp_path / "bin", log)
    scrypt_wrapper = tmp_path / "bin" / "scrypt"
    scrypt_wrapper.write_text(
        f'#!/bin/sh\nprintf "%s\\n" "scrypt $*" >>"{log}"\nexec {shutil.which("scrypt")} "$@"\n'
    )
    scrypt_wrapper.chmod(0o755)
    for sh_file in (transcript, script):
        proc = run_sh(sh_file, tmp_path, path=path + ":" + os.environ["PATH"])
        assert proc.returncode == 0, proc.stderr
        texts.append(proc.stdout + proc.stderr)
    argv_log = log.read_text(encoding="utf-8", errors="replace")
    assert "scrypt dec --passphrase env:backup_pass" in argv_log
    texts.append(argv_log)
    for leftover in tmp_path.rglob("*"):
        if leftover.is_file() and leftover.suffix != ".img" and leftover != bad:
            texts.append(leftover.read_bytes().decode("utf-8", "replace"))
    for text in texts:
        for secret in secret_forms:
            assert secret not in text


# ---- the sh functions on their own ---------------------------------------------

HARD = "it's \"a\" !x! $HOME `id` \\n ünï"  # quotes, '!', '$', backquotes, backslash


@pytest.mark.parametrize("style", ["env", "stdin"])
@pytest.mark.parametrize("sh", [DASH, "bash"])
def test_scrypt_dec_passes_any_passphrase(tmp_path: Path, style: str, sh: str) -> None:
    """'!' (bash's history character), quotes and '$' reach scrypt intact, in
    both ways the scripts pass the passphrase."""
    work = tmp_path / "work"
    (work / "vm7").mkdir(parents=True)
    (tmp_path / "plain").write_bytes(os.urandom(3000))
    prefix = "20230405T123455-1234!vm7/private.img.000!"
    subprocess.run(
        ["scrypt", "enc", *gen4.FAST_KDF, "--passphrase", "env:S", str(tmp_path / "plain"),
         str(work / "vm7/private.img.000.enc")],
        env={**os.environ, "S": prefix + HARD}, check=True,
    )
    harness = tmp_path / "h.sh"
    harness.write_text(
        "\n".join([
            shell.prelude(hmac=False), "trap - EXIT", v4_sh.scrypt_functions(),
            f"work={shlex.quote(str(work))}",
            f"scrypt_style={style}",
            shell.call("scrypt_dec", "vm7/private.img.000.enc", "vm7/private.img.000", prefix),
        ]) + "\n",
        encoding="utf-8",
    )
    env = {**os.environ, "backup_pass": HARD}
    proc = subprocess.run([sh, str(harness)], env=env, capture_output=True, text=True,
                          check=False)
    assert proc.returncode == 0, proc.stderr
    assert (work / "vm7/private.img.000").read_bytes() == (tmp_path / "plain").read_bytes()
    assert not (work / "vm7/private.img.000.enc").exists()  # deleted once used
    env["backup_pass"] = HARD + "x"
    (work / "vm7/private.img.000.enc").write_bytes(b"not scrypt")
    proc = subprocess.run([sh, str(harness)], env=env, capture_output=True, text=True,
                          check=False)
    assert proc.returncode != 0 and "scrypt could not authenticate it" in proc.stderr
    assert not (work / "vm7/private.img.000").exists()  # no plaintext left behind


def test_enc_chunk_list_is_numeric_and_complete(tmp_path: Path) -> None:
    work = tmp_path / "work"
    work.mkdir()
    names = [f"vm7/private.img.{i:03d}.enc" for i in range(1002)]
    blocks = [f"{10 * i} {n}" for i, n in enumerate(reversed(names))]
    blocks += ["5 vm7/private.img.000", "6 vm7/root.img.000.enc", "7 vm7/private.img.x.enc"]
    (work / "blocks").write_text("\n".join(blocks) + "\n")
    harness = tmp_path / "h.sh"
    harness.write_text(
        "\n".join([shell.prelude(hmac=False), "trap - EXIT", SCRIPT_FUNCTIONS_V4,
                   f"work={shlex.quote(str(work))}", "enc_chunk_list vm7/private.img"]) + "\n",
        encoding="utf-8",
    )
    proc = subprocess.run([DASH, str(harness)], capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr
    listed = proc.stdout.splitlines()
    assert [line.split()[1] for line in listed] == [n[: -len(".enc")] for n in names]
    assert listed[1000] == f"{10 * 1} vm7/private.img.1000"  # .999 then .1000
    # a missing chunk stops it
    (work / "blocks").write_text("\n".join(b for b in blocks if "img.500.enc" not in b) + "\n")
    proc = subprocess.run([DASH, str(harness)], capture_output=True, text=True, check=False)
    assert proc.returncode != 0 and "vm7/private.img.500.enc: chunk missing" in proc.stderr
