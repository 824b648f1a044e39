"""qrecover kit: the pyz restores with a bare python3, recover.sh under dash, RECOVERY.txt
names every VM; both work copied away from the kit; no file holds the passphrase."""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import PASSPHRASE, ROOT, Backup, MakeBackup, run_cli

from qrecover.compat import removeprefix

# its fixtures build something big: all its tests on one worker, so it is built once
pytestmark = pytest.mark.xdist_group("test_kit")

SAMPLE = ROOT / "fixtures" / "sample-backup"
PASSFILE = ROOT / "fixtures" / "sample-backup.passphrase"
CONTENTS = ROOT / "fixtures" / "sample-backup.contents.json"
SAMPLE_PASS = PASSFILE.read_text(encoding="utf-8").splitlines()[0]


def bare_python() -> str:
    """A system python3 of the version the kit was packed for (its compiled part is
    that version's); else this interpreter, which -S -I cuts off from the venv too."""
    system = shutil.which("python3", path="/usr/bin:/bin")
    if system is not None:
        version = subprocess.run(
            [system, "-c", "import sys; print(sys.version_info[:2])"],
            capture_output=True, text=True, check=False,
        ).stdout.strip()
        if version == str(sys.version_info[:2]):
            return system
    return os.path.realpath(sys.executable)


def run_bare(
    pyz: Path, *args: str | Path, home: Path, cwd: Path
) -> subprocess.CompletedProcess[str]:
    """``env -i PATH=/usr/bin:/bin HOME=... python3 -S -I qrecover.pyz ARGS``."""
    return subprocess.run(
        [bare_python(), "-S", "-I", str(pyz), *map(str, args)],
        env={"PATH": "/usr/bin:/bin", "HOME": str(home)},
        cwd=cwd, capture_output=True, text=True, timeout=300, check=False,
    )


@pytest.fixture(scope="module")
def sample_kit(tmp_path_factory: pytest.TempPathFactory) -> Path:
    kit = tmp_path_factory.mktemp("kit") / "qrecover-kit"
    # offline: what is installed, for this Python (tests/test_kit_pythons.py downloads)
    result = run_cli("kit", SAMPLE, "--output", kit, "--passphrase-file", PASSFILE, "--offline")
    assert result.code == 0, result.text
    assert "OFFLINE" in result.err and "--offline given" in result.err
    return kit


def assert_sample_restored(out: Path) -> None:
    """Every member of the sample's inner archives is back, byte for byte."""
    info = run_cli("info", SAMPLE, "--json", "--passphrase-file", PASSFILE)
    dest = {
        vm["backup_path"]: (
            "dom0-home/" + vm["backup_path"].split("/")[1] if vm["name"] == "dom0" else vm["name"]
        )
        for vm in json.loads(info.out)["vms"]
    }
    entries = json.loads(CONTENTS.read_text())
    assert len(entries) > 20
    for entry in entries:
        name: str = entry["name"]
        prefix = next(p for p in dest if name == p or name.startswith(p + "/"))
        rest = removeprefix(name[len(prefix) :].lstrip("/"), "./")
        rest = "" if rest == "." else rest
        path = out / dest[prefix] / rest if rest else out / dest[prefix]
        if entry["type"] == "file":
            data = path.read_bytes()
            assert hashlib.sha256(data).hexdigest() == entry["sha256"], name
        elif entry["type"] == "dir":
            assert path.is_dir(), name
        elif entry["type"] == "symlink":
            assert path.is_symlink(), name
    assert (out / "qubes.xml").is_file()


def test_kit_holds_three_files_and_no_passphrase(sample_kit: Path) -> None:
    assert sorted(p.name for p in sample_kit.iterdir()) == [
        "RECOVERY.txt", "qrecover.pyz", "recover.sh"
    ]
    for path in sample_kit.iterdir():
        data = path.read_bytes()
        assert SAMPLE_PASS.encode() not in data, path.name
        assert SAMPLE_PASS.encode("utf-16-le") not in data, path.name


def test_pyz_restores_sample_with_bare_python(sample_kit: Path, tmp_path: Path) -> None:
    # Only the pyz, copied away from the kit, with a fresh HOME for shiv's cache.
    alone = tmp_path / "elsewhere"
    alone.mkdir()
    pyz = alone / "qrecover.pyz"
    shutil.copyfile(sample_kit / "qrecover.pyz", pyz)
    home = tmp_path / "home"
    home.mkdir()
    out = tmp_path / "restored"
    proc = run_bare(pyz, "restore", SAMPLE, "--output", out, "--passphrase-file", PASSFILE,
                    home=home, cwd=alone)
    assert proc.returncode == 0, proc.stderr
    assert_sample_restored(out)
    # shiv unpacked its packages under HOME, not into the kit or the venv
    assert any(home.glob(".shiv/qrecover.pyz_*/site-packages/pydantic_core"))


def test_pyz_does_not_see_the_venv(sample_kit: Path, tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    proc = subprocess.run(
        [bare_python(), "-S", "-I", str(sample_kit / "qrecover.pyz"), "--version"],
        env={"PATH": "/usr/bin:/bin", "HOME": str(home)}, cwd=tmp_path,
        capture_output=True, text=True, check=False,
    )
    assert proc.returncode == 0 and proc.stdout.startswith("qrecover "), proc.stderr
    # the same interpreter without the pyz cannot import qrecover: nothing leaks in
    without = subprocess.run(
        [bare_python(), "-S", "-I", "-c", "import qrecover"],
        env={"PATH": "/usr/bin:/bin", "HOME": str(home)}, cwd=tmp_path,
        capture_output=True, text=True, check=False,
    )
    assert without.returncode != 0


def test_recover_sh_under_dash_restores_sample(sample_kit: Path, tmp_path: Path) -> None:
    alone = tmp_path / "elsewhere"
    alone.mkdir()
    script = alone / "recover.sh"
    shutil.copyfile(sample_kit / "recover.sh", script)
    out = tmp_path / "restored"
    text = script.read_text()
    line = "out=" + shlex.quote(str(sample_kit / "restored"))
    assert line + "\n" in text  # the setting RECOVERY.txt tells a person to edit
    script.write_text(text.replace(line + "\n", "out=" + shlex.quote(str(out)) + "\n"))
    proc = subprocess.run(
        ["dash", str(script)], env={"PATH": os.environ["PATH"], "backup_pass": SAMPLE_PASS},
        cwd=alone, capture_output=True, text=True, timeout=300, check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert_sample_restored(out)


def test_recovery_txt_names_every_vm_and_path(sample_kit: Path) -> None:
    text = (sample_kit / "RECOVERY.txt").read_text()
    info = run_cli("info", SAMPLE, "--json", "--passphrase-file", PASSFILE)
    vms = json.loads(info.out)["vms"]
    assert len(vms) >= 5
    lines = text.splitlines()
    for vm in vms:
        assert any(vm["name"] in line and vm["backup_path"] in line
                   and str(vm["size"]) in line for line in lines), vm
    assert "format 3" in text and "R3.2" in text
    for needed in ("-md md5", "sort -V", "EVERY chunk", "apt-get install", "dnf install",
                   "pacman -S", "python3 -S -I qrecover.pyz restore", "sh recover.sh",
                   "CPython 3."):
        assert needed in text, needed


def test_recovery_by_hand_step5_decrypts(sample_kit: Path, tmp_path: Path) -> None:
    """The by-hand decrypt line (-md md5, sort -V, -pass env:) really works."""
    text = (sample_kit / "RECOVERY.txt").read_text()
    start = text.index("     find vm")
    command = text[start : text.index(".dec", start) + 4].replace("\\\n", "")
    work = tmp_path / "work"
    work.mkdir()
    subprocess.run(["tar", "-i", "-xf", str(SAMPLE), "-C", str(work)], check=True)
    subprocess.run(["sh", "-c", command], cwd=work, check=True,
                   env={"PATH": os.environ["PATH"], "backup_pass": SAMPLE_PASS})
    dec = next(work.glob("*/*.dec"))
    listing = subprocess.run(["tar", "-tz", "-f", str(dec)], capture_output=True, check=True)
    assert listing.stdout.strip()


def test_kit_never_overwrites(sample_kit: Path) -> None:
    before = (sample_kit / "RECOVERY.txt").read_bytes()
    again = run_cli("kit", SAMPLE, "--output", sample_kit, "--passphrase-file", PASSFILE)
    assert again.code == 6, again.text
    assert "already holds" in again.err
    assert (sample_kit / "RECOVERY.txt").read_bytes() == before


def test_kit_for_format4(make4: MakeBackup, tmp_path: Path) -> None:
    backup: Backup = make4()
    kit = tmp_path / "kit4"
    result = run_cli("kit", backup.path, "-o", kit, "--passphrase-file", backup.passfile,
                     "--offline")
    assert result.code == 0, result.text
    text = (kit / "RECOVERY.txt").read_text()
    assert "format 4" in text and "R4" in text and "scrypt" in text
    assert "to a FILE" in text and "sort -V" in text
    info = run_cli("info", backup.path, "--json", "--passphrase-file", backup.passfile)
    for vm in json.loads(info.out)["vms"]:
        assert vm["name"] in text and vm["backup_path"] in text, vm
    for path in kit.iterdir():
        assert PASSPHRASE.encode() not in path.read_bytes(), path.name
    home = tmp_path / "home"
    home.mkdir()
    proc = run_bare(kit / "qrecover.pyz", "verify", backup.path, "--passphrase-file",
                    backup.passfile, home=home, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "every chunk authenticated by scrypt" in proc.stdout


def test_pyz_cache_follows_shiv_root(sample_kit: Path, tmp_path: Path) -> None:
    """What RECOVERY.txt tells a user whose home is read-only: SHIV_ROOT moves the cache
    (python3 -I ignores only PYTHON* variables)."""
    home = tmp_path / "home"
    home.mkdir()
    cache = tmp_path / "cache"
    proc = subprocess.run(
        [bare_python(), "-S", "-I", str(sample_kit / "qrecover.pyz"), "--version"],
        env={"PATH": "/usr/bin:/bin", "HOME": str(home), "SHIV_ROOT": str(cache)},
        cwd=tmp_path, capture_output=True, text=True, check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert any(cache.glob("qrecover.pyz_*/site-packages/qrecover/cli.py"))
    assert not (home / ".shiv").exists()
    assert "SHIV_ROOT=" in (sample_kit / "RECOVERY.txt").read_text()


def test_format4_by_hand_steps_restore(make4: MakeBackup, tmp_path: Path) -> None:
    """RECOVERY.txt's format-4 steps: each chunk decrypted by scrypt into a file under
    BACKUPID!NAME!PASSPHRASE (given with -P here), then step 5's line restores it."""
    backup: Backup = make4()
    kit = tmp_path / "kit4"
    made = run_cli("kit", backup.path, "-o", kit, "--passphrase-file", backup.passfile, "--offline")
    assert made.code == 0
    text = (kit / "RECOVERY.txt").read_text()
    start = text.index("  5. cat $(find ") + len("  5. ")
    command = " ".join(text[start : text.index("-C OUT", start) + 6].split())
    work = tmp_path / "work"
    out = tmp_path / "out"
    work.mkdir()
    out.mkdir()
    subprocess.run(["tar", "-i", "-xf", str(backup.path), "-C", str(work)], check=True)
    backup_id = next(
        line.split("=", 1)[1] for line in (work / "backup-header").read_text().splitlines()
        if line.startswith("backup-id=")
    )
    assert f"passphrase: {backup_id}!$n!PASSPHRASE" in text
    stored = command.split("-name '")[1].split(".[0-9]*")[0]
    folder = command.split("find ")[1].split()[0]
    for chunk in sorted((work / folder).glob(f"{stored}.*.enc")):
        name = str(chunk.relative_to(work))[: -len(".enc")]
        subprocess.run(
            ["scrypt", "dec", "-P", str(chunk), str(work / name)],
            input=f"{backup_id}!{name}!{PASSPHRASE}".encode(), check=True,
        )
    subprocess.run(["sh", "-c", command.replace("-C OUT", f"-C {shlex.quote(str(out))}")],
                   cwd=work, check=True)
    restored = out / folder / stored
    vm = next(v for v in json.loads(run_cli(
        "info", backup.path, "--json", "--passphrase-file", backup.passfile).out)["vms"]
        if v["backup_path"] == folder)
    expected = backup.expected_files([vm["name"]])[f"{vm['name']}/{stored}"]
    assert hashlib.sha256(restored.read_bytes()).hexdigest() == hashlib.sha256(
        expected.read_bytes()).hexdigest()


def test_kit_made_by_the_pyz_copies_it(sample_kit: Path, tmp_path: Path) -> None:
    """The pyz carries no shiv: its own kit command copies the pyz it runs from."""
    home = tmp_path / "home"
    home.mkdir()
    again = tmp_path / "again"
    proc = run_bare(sample_kit / "qrecover.pyz", "kit", SAMPLE, "--output", again,
                    "--passphrase-file", PASSFILE, home=home, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert (again / "qrecover.pyz").read_bytes() == (sample_kit / "qrecover.pyz").read_bytes()
    assert "CPython 3." in (again / "RECOVERY.txt").read_text()
