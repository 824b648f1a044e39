"""qrecover kit's pyz on other Pythons: made with wheels for several when the package
index answers (else the offline path, which must say so), refused in one line with
exit 5 on a Python it cannot serve, before anything is imported."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

from conftest import ROOT, run_main

from qrecover.pyz_guard import Target, describe, guard_source, install_guard
from qrecover.pyz_wheels import index_unreachable, manylinux_fits, parse_targets, wheel_fits

SAMPLE = ROOT / "fixtures" / "sample-backup"
PASSFILE = ROOT / "fixtures" / "sample-backup.passphrase"
PYENV = Path(os.environ.get("PYENV_ROOT", "/root/.pyenv")) / "versions"
MACHINE = os.uname().machine
HERE = Target(sys.version_info[1], MACHINE)


def pyenv_pythons() -> dict[str, Path]:
    """X.Y -> interpreter, of the pyenv CPythons on this machine (none: empty)."""
    found: dict[str, Path] = {}
    for folder in sorted(PYENV.glob("[23].*")) if PYENV.is_dir() else []:
        exe = folder / "bin" / "python"
        match = re.match(r"^(\d+\.\d+)\.\d+$", folder.name)
        if match and exe.exists():
            found[match.group(1)] = exe
    return found


def run_pyz(python: Path | str, pyz: Path, *args: str | Path, home: Path
            ) -> subprocess.CompletedProcess[str]:
    """``env -i python -S [-I] PYZ ARGS`` (Python 2 has no -I)."""
    isolate = [] if "/2." in str(python) else ["-I"]
    home.mkdir(exist_ok=True)
    return subprocess.run(
        [str(python), "-S", *isolate, str(pyz), *map(str, args)],
        env={"PATH": "/usr/bin:/bin", "HOME": str(home)}, capture_output=True, text=True,
        timeout=300, check=False,
    )


def assert_refused(proc: subprocess.CompletedProcess[str], needs: str) -> None:
    """Exit 5, one line naming what it needs and recover.sh, nothing else."""
    assert proc.returncode == 5, (proc.returncode, proc.stderr)
    assert proc.stdout == ""
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith(f"qrecover.pyz needs {needs}; this is "), lines[0]
    assert "recover.sh beside it, which needs no Python" in lines[0]


def fake_pyz(path: Path, targets: list[Target]) -> Path:
    """A zip laid out as shiv's (a ``_bootstrap`` package), whose bootstrap prints a
    word: the guard is the real one (install_guard), so this shows what it lets on."""
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("__main__.py", "import _bootstrap\n_bootstrap.bootstrap()\n")
        archive.writestr("_bootstrap/__init__.py",
                         "def bootstrap():\n    print('bootstrapped')\n")
    install_guard(path, targets)
    return path


def test_guard_lets_the_served_python_through(tmp_path: Path) -> None:
    pyz = fake_pyz(tmp_path / "ok.pyz", [HERE, Target(HERE.minor, "aarch64")])
    proc = run_pyz(sys.executable, pyz, home=tmp_path / "home")
    assert proc.returncode == 0 and proc.stdout == "bootstrapped\n", proc.stderr


def test_guard_refuses_another_version_or_machine(tmp_path: Path) -> None:
    other = [Target(HERE.minor + 1, MACHINE), Target(HERE.minor, "s390x")]
    pyz = fake_pyz(tmp_path / "other.pyz", other)
    assert_refused(run_pyz(sys.executable, pyz, home=tmp_path / "home"), describe(other))
    with zipfile.ZipFile(pyz) as archive:  # the guard replaced shiv's __main__.py
        assert archive.read("__main__.py").decode() == guard_source(other)


def test_targets_described_and_parsed() -> None:
    every = parse_targets([], ["x86_64", "aarch64"])
    assert every is not None and len(every) == 12
    assert describe(every) == ("CPython 3.8-3.13 on x86_64 or aarch64 Linux "
                               "(glibc 2.17 or later)")
    assert describe([Target(8, "x86_64"), Target(13, "x86_64")]).startswith(
        "CPython 3.8 and 3.13 on x86_64 Linux")
    assert parse_targets([], []) is None
    bad = run_main("kit", SAMPLE, "-o", "/nonexistent/kit", "--python", "3.7")
    assert bad.code == 2 and "--python 3.7: qrecover runs on CPython 3.8 or later" in bad.err


def test_wheel_names_matched_to_targets() -> None:
    name = "pydantic_core-2.27.2-cp38-cp38-manylinux_2_17_aarch64.manylinux2014_aarch64.whl"
    assert wheel_fits(name, "pydantic-core", "2.27.2", Target(8, "aarch64"))
    assert not wheel_fits(name, "pydantic-core", "2.27.2", Target(8, "x86_64"))
    assert not wheel_fits(name, "pydantic-core", "2.27.2", Target(9, "aarch64"))
    assert not wheel_fits(name, "pydantic-core", "2.27.1", Target(8, "aarch64"))
    assert not manylinux_fits("manylinux_2_28_x86_64", "x86_64")  # needs a newer glibc
    assert not manylinux_fits("musllinux_1_1_x86_64", "x86_64")
    assert manylinux_fits("manylinux2014_x86_64", "x86_64")


def test_pyz_refused_by_old_pythons(tmp_path: Path) -> None:
    """The offline pyz (this Python only) on every other Python there is here: pyenv's
    2.7 to 3.13, the one line and exit 5 each time; with no pyenv, this interpreter
    on a copy whose guard serves another version."""
    kit = tmp_path / "kit"
    made = run_main("kit", SAMPLE, "-o", kit, "--passphrase-file", PASSFILE, "--offline")
    assert made.code == 0, made.text
    pyz = kit / "qrecover.pyz"
    needs = describe([HERE])
    assert f"runs on: {needs}" in made.err
    assert f"Runs on: {needs} ONLY: made offline" in (kit / "RECOVERY.txt").read_text()
    others = {v: exe for v, exe in pyenv_pythons().items() if v != HERE.version}
    for version, exe in others.items():
        assert_refused(run_pyz(exe, pyz, "--version", home=tmp_path / version), needs)
    if not others:
        elsewhere = tmp_path / "elsewhere.pyz"
        shutil.copyfile(pyz, elsewhere)
        install_guard(elsewhere, [Target(HERE.minor + 1, MACHINE)])
        assert_refused(run_pyz(sys.executable, elsewhere, home=tmp_path / "h"),
                       describe([Target(HERE.minor + 1, MACHINE)]))


def test_kit_downloads_for_other_pythons(tmp_path: Path) -> None:
    """With the index reachable: a kit for the oldest and newest pyenv Pythons other
    than this one (3.8 and 3.13) on this machine restores with each and refuses
    this one.  Offline: the kit
    says so and its pyz holds this Python's parts only."""
    pythons = pyenv_pythons()
    usable = sorted((v for v in pythons if v.startswith("3.") and int(v[2:]) >= 8
                     and v != HERE.version), key=lambda v: int(v[2:]))
    wanted = ([usable[0], usable[-1]] if len(usable) >= 2
              else [v for v in ("3.8", "3.13", "3.12") if v != HERE.version][:2])
    kit = tmp_path / "kit"
    args = [a for v in wanted for a in ("--python", v)]
    made = run_main("kit", SAMPLE, "-o", kit, "--passphrase-file", PASSFILE, *args,
                    "--arch", MACHINE)
    assert made.code == 0, made.text
    pyz = kit / "qrecover.pyz"
    text = (kit / "RECOVERY.txt").read_text()
    with zipfile.ZipFile(pyz) as archive:
        compiled = sorted(n.rsplit("/", 1)[-1] for n in archive.namelist() if n.endswith(".so"))
    why = index_unreachable()
    if why is None:  # online: downloaded wheels for exactly the targets asked for
        serves = [Target.parse(v, MACHINE) for v in wanted]
        assert f"runs on: {describe(serves)}" in made.err and "OFFLINE" not in made.err
        assert f"Runs on: {describe(serves)}." in text
        assert [n.split(".")[1] for n in compiled] == sorted(t.tag for t in serves)
        for version in wanted:
            if version in pythons:
                proc = run_pyz(pythons[version], pyz, "info", SAMPLE, "--passphrase-file",
                               PASSFILE, home=tmp_path / version)
                assert proc.returncode == 0, proc.stderr
                assert "standalone" in proc.stdout + proc.stderr
        assert_refused(run_pyz(sys.executable, pyz, "--version", home=tmp_path / "h"),
                       describe(serves))
    else:  # offline: said in the output and RECOVERY.txt, this Python only
        assert "OFFLINE" in made.err and "could not be reached" in made.err, made.err
        assert f"Runs on: {describe([HERE])} ONLY: made offline" in text
        assert [n.split(".")[1] for n in compiled] == [HERE.tag]
        proc = run_pyz(sys.executable, pyz, "--version", home=tmp_path / "h")
        assert proc.returncode == 0 and proc.stdout.startswith("qrecover "), proc.stderr
