"""End to end through the installed CLI, on backups written the way Qubes R3.2 wrote them."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import (
    PASSPHRASE,
    Backup,
    MakeBackup,
    Run,
    assert_restored,
    bin_dir,
    qrecover_exe,
    run_cli,
    run_main,
    sha,
)

from qrecover.errors import EXIT_CODES


def restore(backup: Backup, out: Path, *extra: str) -> None:
    result = run_main(
        "restore", backup.path, "--output", out, "--passphrase-file", backup.passfile, *extra
    )
    assert result.code == 0, result.text
    assert "all HMACs matched" in result.out


def test_restore_everything(default_backup: Backup, tmp_path: Path) -> None:
    out = tmp_path / "out"
    restore(default_backup, out)
    assert_restored(out, default_backup)
    # the layout: DIR/<vm>/..., a template's directory whole, dom0's home
    assert (out / "work" / "private.img").is_file()
    assert (out / "fedora-23" / "root.img").is_file()
    assert (out / "dom0-home" / "user").is_dir()
    assert not (out / "vm7").exists()


def test_restore_from_pipe(default_backup: Backup, tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = run_cli(
        "restore",
        "-",
        "--output",
        out,
        "--passphrase-file",
        default_backup.passfile,
        stdin=default_backup.path.read_bytes(),
    )
    assert result.code == 0, result.text
    assert_restored(out, default_backup)


def test_restore_from_folder_untarred_by_hand(default_backup: Backup, tmp_path: Path) -> None:
    folder = tmp_path / "untarred"
    folder.mkdir()
    subprocess.run(["tar", "-i", "-xf", str(default_backup.path), "-C", str(folder)], check=True)
    out = tmp_path / "out"
    restore(
        Backup(
            folder,
            default_backup.passfile,
            default_backup.manifest,
            default_backup.vms,
            default_backup.dom0_home,
        ),
        out,
    )
    assert_restored(out, default_backup)


@pytest.mark.parametrize(
    "options",
    [
        {"compression": "bzip2"},
        {"compression": "xz"},
        {"compression": None},
        {"encrypted": False},
        {"encrypted": False, "compression": None},
        {"hmac_algorithm": "SHA256", "hmac_style": "openssl3"},
        {"hide_names": False},
        {"crypto_algorithm": "aes-128-cbc"},
    ],
    ids=str,
)
def test_writer_variants(make: MakeBackup, tmp_path: Path, options: dict[str, object]) -> None:
    backup = make(**options)
    out = tmp_path / "out"
    restore(backup, out)
    assert_restored(out, backup)


def test_passphrase_from_environment(default_backup: Backup, tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = run_main(
        "restore",
        default_backup.path,
        "-o",
        out,
        "--vm",
        "work",
        env={"QRECOVER_PASSPHRASE": PASSPHRASE},
    )
    assert result.code == 0, result.text
    assert_restored(out, default_backup, ["work"])


def test_chunk_1000_and_beyond(
    backup_past_1000: Backup, past_1000_restored: tuple[Path, Run]
) -> None:
    names = backup_past_1000.manifest.member_names()
    assert "vm12/private.img.1000" in names and "vm12/private.img.999" in names
    out, result = past_1000_restored  # restore(backup_past_1000, out), run once per run
    assert result.code == 0, result.text
    assert "all HMACs matched" in result.out
    assert_restored(out, backup_past_1000)


def test_vm_selection(default_backup: Backup, tmp_path: Path) -> None:
    out = tmp_path / "out"
    restore(default_backup, out, "--vm", "work", "--vm", "dom0")
    assert_restored(out, default_backup, ["work", "dom0"])
    assert sorted(p.name for p in out.iterdir()) == ["dom0-home", "qubes.xml", "work"]


def test_unknown_vm_is_usage_error_listing_names(default_backup: Backup, tmp_path: Path) -> None:
    result = run_main(
        "restore",
        default_backup.path,
        "-o",
        tmp_path / "o",
        "--vm",
        "nosuch",
        "--passphrase-file",
        default_backup.passfile,
    )
    assert result.code == 2
    assert "nosuch" in result.err and "work" in result.err and "dom0" in result.err
    assert not (tmp_path / "o").exists()


def test_verify_and_info(default_backup: Backup) -> None:
    result = run_main("verify", default_backup.path, "--passphrase-file", default_backup.passfile)
    assert result.code == 0, result.text
    stored = [f.name for f in default_backup.manifest.files if f.name != "qubes.xml"]
    for name in stored:
        assert any(
            line.startswith("OK") and f" {name} " in line + " " for line in result.out.splitlines()
        ), name
    info = run_main(
        "info", default_backup.path, "--json", "--passphrase-file", default_backup.passfile
    )
    assert info.code == 0, info.text
    data = json.loads(info.out)
    assert data["header"]["version"] == 3 and data["header"]["compression-filter"] == "gzip"
    by_name = {vm["name"]: vm for vm in data["vms"]}
    assert set(by_name) >= {"work", "fedora-23", "dom0"}
    assert by_name["work"]["template"] == "fedora-23"
    assert by_name["work"]["backup_path"] == "vm7"
    assert by_name["fedora-23"]["type"] == "TemplateVM"
    assert set(by_name["work"]) == {"name", "type", "template", "backup_path", "size"}
    text = run_main("info", default_backup.path, "--passphrase-file", default_backup.passfile)
    assert text.code == 0 and "work" in text.out and "vm7" in text.out


def test_wrong_passphrase_exit_3_nothing_written(default_backup: Backup, tmp_path: Path) -> None:
    bad = tmp_path / "bad"
    bad.write_text("not it\n")
    out = tmp_path / "out"
    result = run_main("restore", default_backup.path, "-o", out, "--passphrase-file", bad)
    assert result.code == 3
    assert "passphrase" in result.err and "Traceback" not in result.text
    assert not out.exists()


def test_no_passphrase_and_no_terminal_is_usage_error(default_backup: Backup) -> None:
    proc = subprocess.run(
        ["setsid", *qrecover_exe(), "info", str(default_backup.path)],
        capture_output=True,
        text=True,
        env={**os.environ, "QRECOVER_PASSPHRASE": ""},
        check=False,
        stdin=subprocess.DEVNULL,
    )
    assert proc.returncode == 2, proc.stderr
    assert "passphrase" in proc.stderr


def test_tampered_chunk_keeps_partial_and_restores_the_rest(
    make: MakeBackup, tmp_path: Path
) -> None:
    backup = make(chunk_size=16 * 1024)
    folder = tmp_path / "untarred"
    folder.mkdir()
    subprocess.run(["tar", "-i", "-xf", str(backup.path), "-C", str(folder)], check=True)
    victim = folder / "vm7" / "private.img.001"
    data = bytearray(victim.read_bytes())
    data[100] ^= 0x01
    victim.write_bytes(bytes(data))
    out = tmp_path / "out"
    result = run_main("restore", folder, "-o", out, "--passphrase-file", backup.passfile)
    assert result.code == 4, result.text
    assert "vm7/private.img.001" in result.err and "HMAC mismatch" in result.err
    assert not (out / "work" / "private.img").exists()
    assert (out / "work" / "private.img.partial").exists()
    # everything else came back
    expected = {k: v for k, v in backup.expected_files().items() if k != "work/private.img"}
    for rel, source in expected.items():
        assert sha(out / rel) == sha(source), rel


def test_missing_program_exit_5(default_backup: Backup, tmp_path: Path) -> None:
    bindir = bin_dir(tmp_path, ["tar", "gzip", "cat"])
    result = run_main(
        "verify",
        default_backup.path,
        "--passphrase-file",
        default_backup.passfile,
        env={"PATH": str(bindir)},
    )
    assert result.code == 5, result.text
    assert "openssl" in result.err and "install" in result.err


def test_existing_output_exit_6_then_force(default_backup: Backup, tmp_path: Path) -> None:
    out = tmp_path / "out"
    (out / "work").mkdir(parents=True)
    mine = out / "work" / "private.img"
    mine.write_bytes(b"the user's own file")
    result = run_main(
        "restore", default_backup.path, "-o", out, "--passphrase-file", default_backup.passfile
    )
    assert result.code == 6, result.text
    assert mine.read_bytes() == b"the user's own file"
    restore(default_backup, out, "--force")
    assert_restored(out, default_backup)


def test_exit_codes_documented() -> None:
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    helptext = run_main("--help").out
    for code in EXIT_CODES:
        assert f"| {code} |" in readme, code
        assert f"{code}:" in helptext, code


def test_cipher_missing_from_this_openssl_is_exit_5(make: MakeBackup, tmp_path: Path) -> None:
    backup = make(crypto_algorithm="aes-128-cbc")
    real = subprocess.check_output(["which", "openssl"], text=True).strip()
    bindir = tmp_path / "bin"
    bindir.mkdir()
    wrapper = bindir / "openssl"
    # An OpenSSL build without AES-128 (as a stripped-down one might be).
    wrapper.write_text(
        "#!/bin/sh\n"
        'if [ "$1 $2" = "enc -list" ]; then printf "Supported ciphers:\\n-aes-256-cbc\\n"; '
        f'exit 0; fi\nexec {real} "$@"\n'
    )
    wrapper.chmod(0o755)
    result = run_main(
        "verify",
        backup.path,
        "--passphrase-file",
        backup.passfile,
        env={"PATH": f"{bindir}:{os.environ['PATH']}"},
    )
    assert result.code == 5, result.text
    assert "aes-128-cbc" in result.err


# A `cat` for the test below: before feeding a chunk it rewrites, in the untarred
# folder, the file with the very bytes it was asked to feed (by then qrecover has
# checked that chunk's HMAC), logs both paths, and only then runs the real cat.
SWAPPING_CAT = """#!{python}
import os, sys
from pathlib import Path
folder, log, real = Path({folder!r}), Path({log!r}), {real!r}
for arg in [a for a in sys.argv[1:] if not a.startswith("-")]:
    data = Path(arg).read_bytes()
    same = [p for p in sorted(folder.rglob("*")) if p.is_file() and not p.is_symlink()
            and p.stat().st_size == len(data) and p.read_bytes() == data]
    if len(same) != 1:
        sys.exit(f"fed {{arg}}: {{len(same)}} files in the folder hold its bytes")
    with same[0].open("r+b") as f:
        f.write(bytes(b ^ 0xFF for b in data))
    with log.open("a") as f:
        f.write(f"{{arg}}\\t{{same[0].relative_to(folder)}}\\n")
os.execv(real, [real, *sys.argv[1:]])
"""


def test_folder_chunks_are_fed_from_private_copies(default_backup: Backup, tmp_path: Path) -> None:
    """A file in an untarred folder could change between its HMAC check and its use:
    what reaches openssl must be the copy that was checked.  Here every chunk is
    changed in the folder just after its check (by the cat that feeds it), and the
    restore is still byte for byte the source."""
    folder = tmp_path / "untarred"
    folder.mkdir()
    subprocess.run(["tar", "-i", "-xf", str(default_backup.path), "-C", str(folder)], check=True)
    before = {p: sha(p) for p in folder.rglob("*") if p.is_file()}
    log = tmp_path / "fed.log"
    bindir = tmp_path / "bin"
    bindir.mkdir()
    cat = bindir / "cat"
    real = shutil.which("cat")
    assert real is not None
    cat.write_text(SWAPPING_CAT.format(python=sys.executable, folder=str(folder), log=str(log),
                                       real=real))
    cat.chmod(0o755)
    out = tmp_path / "out"
    result = run_main(
        "-v",
        "restore",
        folder,
        "-o",
        out,
        "--vm",
        "work",
        "--passphrase-file",
        default_backup.passfile,
        env={"PATH": f"{bindir}:{os.environ['PATH']}"},
    )
    assert result.code == 0, result.text
    assert_restored(out, default_backup, ["work"])
    fed = [line.split("\t") for line in log.read_text().splitlines()]
    work_chunks = {
        name for stored in default_backup.manifest.files if stored.vm == "work"
        for name in stored.chunk_names()
    }
    assert work_chunks <= {swapped for _, swapped in fed}, fed  # every one was changed
    for path, swapped in fed:
        assert sha(folder / swapped) != before[folder / swapped], swapped
        assert Path(folder) not in Path(path).parents and "/.qrecover-" in path, path
    logged = [line for line in result.err.splitlines() if line.startswith("+ cat ")]
    assert logged
    assert all(str(folder) not in line and "/.qrecover-" in line for line in logged), logged


def test_version() -> None:
    from qrecover import __version__

    result = run_main("--version")
    assert result.code == 0, result.text
    assert result.out.strip() == f"qrecover {__version__}"
