"""End to end through the installed CLI, on backups written the way Qubes R4 wrote them
(format 4: scrypt per chunk, PAX/GNU-sparse-1.0 volume archives, R4 qubes.xml).

The backups use scrypt with a cheap key derivation (see make_backup_v4's ``kdf``)
so that the suite stays fast; qrecover runs the real scrypt on them."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
from conftest import (
    PASSPHRASE,
    Backup,
    MakeBackup,
    assert_restored,
    bin_dir,
    gen,
    qrecover_exe,
    run_cli,
    run_main,
    sha,
    watch_family,
)
from helpers import fake_scrypt, untar

# its fixtures build something big: all its tests on one worker, so it is built once
pytestmark = pytest.mark.xdist_group("test_format4_e2e")


def restore(backup: Backup | Path, out: Path, passfile: Path, *extra: str) -> None:
    where = backup.path if isinstance(backup, Backup) else backup
    result = run_main("restore", where, "--output", out, "--passphrase-file", passfile, *extra)
    assert result.code == 0, result.text
    assert "every chunk authenticated by scrypt" in result.out


def test_r4_restore_everything_byte_for_byte_and_sparse(make4: MakeBackup, tmp_path: Path) -> None:
    backup = make4()
    assert "vm7/private.img.000.enc" in backup.manifest.member_names()
    out = tmp_path / "out"
    restore(backup, out, backup.passfile)
    assert_restored(out, backup)
    assert (out / "work" / "private.img").is_file()
    assert (out / "work" / "firewall.xml").is_file()
    assert (out / "fedora-23" / "root.img").is_file()  # R4 stores volumes, not the folder
    assert (out / "dom0-home" / "user" / "Documents" / "Grüße notes.txt").is_file()
    assert not (out / "vm7").exists()
    assert not any("GNUSparseFile" in str(p) for p in out.rglob("*"))


def test_r4_from_pipe(make4: MakeBackup, tmp_path: Path) -> None:
    backup = make4()
    out = tmp_path / "out"
    result = run_cli(
        "restore", "-", "-o", out, "--passphrase-file", backup.passfile,
        stdin=backup.path.read_bytes(),
    )
    assert result.code == 0, result.text
    assert_restored(out, backup)


def test_r4_from_folder_untarred_by_hand(make4: MakeBackup, tmp_path: Path) -> None:
    backup = make4()
    folder = untar(backup.path, tmp_path / "untarred")
    out = tmp_path / "out"
    restore(folder, out, backup.passfile, "--vm", "work", "--vm", "dom0")
    assert_restored(out, backup, ["work", "dom0"])
    assert sorted(p.name for p in out.iterdir()) == ["dom0-home", "qubes.xml", "work"]
    assert sorted(p.name for p in folder.rglob("*") if p.is_file()) == sorted(
        Path(n).name for n in backup.manifest.member_names()
    ), "the user's untarred folder is left as it was"


@pytest.mark.parametrize(
    "options",
    [
        {"volume_writer": "gnutar"},  # R4 on a file pool: GNU tar for volumes too
        {"compression": None},
        {"compression": "bzip2"},
        {"chunk_size": 16 * 1024},  # several chunks per image, scrypt'd one by one
    ],
    ids=str,
)
def test_r4_writer_variants(make4: MakeBackup, tmp_path: Path, options: dict[str, object]) -> None:
    backup = make4(**options)
    out = tmp_path / "out"
    restore(backup, out, backup.passfile)
    assert_restored(out, backup)


def test_r4_verify_and_info(make4: MakeBackup) -> None:
    backup = make4()
    result = run_main("verify", backup.path, "--passphrase-file", backup.passfile)
    assert result.code == 0, result.text
    for stored in backup.manifest.files:
        if stored.vm is not None:
            assert any(
                line.startswith("OK") and f" {stored.name} " in line
                for line in result.out.splitlines()
            ), stored.name
    info = run_main("info", backup.path, "--json", "--passphrase-file", backup.passfile)
    assert info.code == 0, info.text
    data = json.loads(info.out)
    assert data["header"]["version"] == 4
    assert data["header"]["hmac-algorithm"] == "scrypt"
    assert data["header"]["backup-id"] == backup.manifest.header["backup-id"]
    by_name = {vm["name"]: vm for vm in data["vms"]}
    assert set(by_name) == {"work", "fedora-23", "sys-net", "untrusted", "standalone", "dom0"}
    assert by_name["work"] == {
        "name": "work", "type": "AppVM", "template": "fedora-23", "backup_path": "vm7",
        "size": by_name["work"]["size"],
    }
    assert by_name["work"]["size"] > 0
    assert by_name["fedora-23"]["type"] == "TemplateVM"
    assert by_name["standalone"]["type"] == "StandaloneVM"
    assert by_name["dom0"]["backup_path"] == "dom0-home/user"
    text = run_main("info", backup.path, "--passphrase-file", backup.passfile)
    assert text.code == 0 and "format 4" in text.out and "scrypt" in text.out


@pytest.fixture(scope="module")
def big4(make4: MakeBackup, tmp_path_factory: pytest.TempPathFactory) -> Backup:
    """One VM with 16 MiB of incompressible data in 1 MiB chunks: sixteen scrypt runs,
    each long enough to be seen in /proc."""
    src = tmp_path_factory.mktemp("big4") / "work"
    src.mkdir()
    (src / "private.img").write_bytes(os.urandom(16 << 20))
    return make4(
        vms=[gen.VmSpec("work", 7, source=src)], dom0_home=None, chunk_size=1 << 20,
        compression=None,
    )


def test_r4_passphrase_never_on_a_command_line(big4: Backup, tmp_path: Path) -> None:
    """The command line of qrecover and of every process under it, looked at over and
    over for the whole restore, never holds the passphrase; nor does the environment
    of any program but scrypt (given it as env:backup_pass)."""
    out = tmp_path / "o"
    log = tmp_path / "log"
    env = {k: v for k, v in os.environ.items() if k != "QRECOVER_PASSPHRASE"}
    with log.open("wb") as sink:
        proc = subprocess.Popen(
            [*qrecover_exe(), "-v", "restore", str(big4.path), "-o", str(out)],
            stdin=subprocess.DEVNULL, stdout=sink, stderr=subprocess.STDOUT,
            env={**env, "QRECOVER_PASSPHRASE": PASSPHRASE},
        )
        seen = watch_family(proc)
    text = log.read_text(encoding="utf-8", errors="replace")
    assert proc.returncode == 0, text
    assert_restored(out, big4)
    secret = PASSPHRASE.encode()
    scrypts = {s.pid for s in seen if s.comm == "scrypt" and b"\0dec\0" in s.cmdline}
    assert scrypts, "no scrypt process was seen: nothing was checked"
    assert len({s.pid for s in seen}) > len(scrypts)  # and the rest of the family too
    for what in seen:
        assert secret not in what.cmdline, what.cmdline
    # A child still being started shows qrecover's name (and, once exec has begun, the
    # new program's environment): judge each program only once it bears its own name.
    own_names = {s.comm for s in seen if s.pid == proc.pid}
    for what in seen:
        if what.comm not in {*own_names, "scrypt"} and what.cmdline:
            assert secret not in what.environ, what.cmdline
    assert "scrypt dec --passphrase env:backup_pass" in text
    assert PASSPHRASE not in text


def test_r4_wrong_passphrase_exit_3_nothing_written(make4: MakeBackup, tmp_path: Path) -> None:
    backup = make4()
    bad = tmp_path / "bad"
    bad.write_text("not it\n")
    out = tmp_path / "out"
    result = run_main("restore", backup.path, "-o", out, "--passphrase-file", bad)
    assert result.code == 3, result.text
    assert "passphrase" in result.err and "Traceback" not in result.text
    assert not out.exists()


def test_r4_tampered_enc_chunk_keeps_partial(make4: MakeBackup, tmp_path: Path) -> None:
    backup = make4(chunk_size=16 * 1024)
    folder = untar(backup.path, tmp_path / "untarred")
    victim = folder / "vm7" / "private.img.001.enc"
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0x01  # in the ciphertext: only scrypt's final HMAC notices
    victim.write_bytes(bytes(data))
    out = tmp_path / "out"
    result = run_main("restore", folder, "-o", out, "--passphrase-file", backup.passfile)
    assert result.code == 4, result.text
    assert "vm7/private.img.001.enc" in result.err and "scrypt" in result.err
    assert not (out / "work" / "private.img").exists()
    partial = out / "work" / "private.img.partial"
    assert partial.exists()
    # scrypt wrote the damaged chunk's plaintext to scratch; none of it was used:
    # the .partial holds no more than chunk 000 alone decompresses to.
    plain0 = tmp_path / "plain0"
    subprocess.run(
        ["scrypt", "dec", "--passphrase", "env:S", str(folder / "vm7/private.img.000.enc"),
         str(plain0)],
        env={**os.environ, "S": f"{backup.manifest.header['backup-id']}!vm7/private.img.000!"
             + PASSPHRASE},
        check=True,
    )
    gunzip = subprocess.run(["gzip", "-dc"], input=plain0.read_bytes(), capture_output=True,
                            check=False)
    assert 0 < len(gunzip.stdout) < 200 * 1024
    assert partial.stat().st_size <= len(gunzip.stdout)
    expected = {k: v for k, v in backup.expected_files().items() if k != "work/private.img"}
    for rel, source in expected.items():
        assert sha(out / rel) == sha(source), rel
    assert not [p for p in out.rglob("*") if p.name.startswith(".qrecover")]


def test_r4_header_altered_is_exit_3(make4: MakeBackup, tmp_path: Path) -> None:
    backup = make4()
    folder = untar(backup.path, tmp_path / "untarred")
    header = folder / "backup-header"
    header.write_bytes(header.read_bytes().replace(b"compressed=True", b"compressed=False"))
    result = run_main("info", folder, "--passphrase-file", backup.passfile)
    assert result.code == 3, result.text
    assert "backup-header" in result.err


def _scrypt_enc(src: Path, dst: Path, secret: str) -> None:
    subprocess.run(
        ["scrypt", "enc", "--logN", "10", "-r", "8", "-p", "1", "--passphrase", "env:S",
         str(src), str(dst)],
        env={**os.environ, "S": secret}, check=True,
    )


def test_scrypt_authenticated_unknown_version_exit_4_names_it(
    make4: MakeBackup, tmp_path: Path
) -> None:
    backup = make4()
    folder = untar(backup.path, tmp_path / "untarred")
    header = folder / "backup-header"
    header.write_bytes(header.read_bytes().replace(b"version=4", b"version=7"))
    (folder / "backup-header.hmac").unlink()
    _scrypt_enc(header, folder / "backup-header.hmac", f"backup-header!{PASSPHRASE}")
    result = run_main("info", folder, "--passphrase-file", backup.passfile)
    assert result.code == 4, result.text
    assert "version 7" in result.err


def test_r4_missing_scrypt_exit_5(make4: MakeBackup, tmp_path: Path) -> None:
    backup = make4()
    bindir = bin_dir(tmp_path, ["tar", "gzip", "cat", "openssl"])
    result = run_main(
        "verify", backup.path, "--passphrase-file", backup.passfile, env={"PATH": str(bindir)}
    )
    assert result.code == 5, result.text
    assert "scrypt" in result.err and "install" in result.err


def test_r4_scrypt_1_2_1_gets_the_passphrase_on_stdin(make4: MakeBackup, tmp_path: Path) -> None:
    backup = make4(chunk_size=64 * 1024)
    bindir = bin_dir(tmp_path, ["tar", "gzip", "cat"])
    log = tmp_path / "argv.log"
    usage = "usage: scrypt {enc | dec} [-M maxmem] [-m maxmemfrac] [-P] [-t maxtime] infile"
    fake_scrypt(bindir, usage, log)
    out = tmp_path / "out"
    result = run_main(
        "restore", backup.path, "-o", out, "--passphrase-file", backup.passfile,
        env={"PATH": str(bindir)},
    )
    assert result.code == 0, result.text
    assert_restored(out, backup)
    argvs = log.read_text()
    assert "dec -P " in argvs and "--passphrase" not in argvs
    assert PASSPHRASE not in argvs


def test_r4_scrypt_1_2_0_is_refused_exit_5(make4: MakeBackup, tmp_path: Path) -> None:
    backup = make4()
    bindir = bin_dir(tmp_path, ["tar", "gzip", "cat"])
    usage = "usage: scrypt {enc | dec} [-M maxmem] [-m maxmemfrac] [-t maxtime] infile [outfile]"
    fake_scrypt(bindir, usage, tmp_path / "argv.log")
    result = run_main(
        "info", backup.path, "--passphrase-file", backup.passfile, env={"PATH": str(bindir)}
    )
    assert result.code == 5, result.text
    assert "1.2.1" in result.err
