"""What R4.3's writer adds (issue 16 item 5): ``vmN/notes.txt`` and the ``empty`` placeholder.

R4.3's qubes/backup.py stores a qube's ``notes.txt`` (its free-text notes,
``/var/lib/qubes/*/NAME/notes.txt``) beside its volumes and firewall.xml,
and for a qube with no file at all the zero-byte ``/run/qubes/empty`` as
``vmN/empty``, only so that the qube's folder is in the backup.  The backups
here come from make_backup_v4.py with ``r43=True``, which does the same.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Any

import pytest
from conftest import PASSPHRASE, Backup, assert_restored, gen, gen4, run_main, sha

# its fixtures build something big: all its tests on one worker, so it is built once
pytestmark = pytest.mark.xdist_group("test_r43")

NOTES = "Bank login: use the hardware key.\nÜnïcödé second line\n"


def _build(root: Path, **options: Any) -> Backup:
    vms, home = gen.make_sample_tree(root / "tree", image_mb=2)
    work = next(v for v in vms if v.name == "work")
    (work.source / "notes.txt").write_text(NOTES, encoding="utf-8")
    empty = root / "tree" / "no-files"
    empty.mkdir()
    vms.append(gen.VmSpec("disp-empty", 21, "QubesAppVm", "fedora-23", empty))
    passfile = root / "passphrase"
    passfile.write_text(PASSPHRASE + "\n", encoding="utf-8")
    path = root / "qubes-backup-r43"
    manifest = gen4.make_backup_v4(
        path, PASSPHRASE, vms, dom0_home=home, workdir=root, r43=True, **options
    )
    return Backup(path, passfile, manifest, vms, home)


@pytest.fixture(scope="module")
def r43(tmp_path_factory: pytest.TempPathFactory) -> Backup:
    return _build(tmp_path_factory.mktemp("r43"))


NAMED = ["work", "untrusted", "sys-net", "fedora-23", "standalone", "dom0"]


def test_the_writer_stores_notes_and_the_placeholder(r43: Backup) -> None:
    names = [f.name for f in r43.manifest.files]
    assert "vm7/notes.txt" in names and "vm21/empty" in names
    assert not any(n.startswith("vm21/") and n != "vm21/empty" for n in names)


def test_restore_gives_notes_and_an_empty_folder(r43: Backup, tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = run_main("restore", r43.path, "--passphrase-file", r43.passfile, "--output", out)
    assert result.code == 0, result.text
    assert_restored(out, r43, NAMED)
    assert (out / "work" / "notes.txt").read_text(encoding="utf-8") == NOTES
    assert (out / "disp-empty").is_dir() and list((out / "disp-empty").iterdir()) == []
    assert "vm21/empty -> " in result.out


def test_verify_and_info_name_the_qube_without_files(r43: Backup) -> None:
    result = run_main("verify", r43.path, "--passphrase-file", r43.passfile)
    assert result.code == 0, result.text
    assert "vm21/empty" in result.out and "vm7/notes.txt" in result.out
    info = run_main("info", r43.path, "--passphrase-file", r43.passfile)
    assert info.code == 0 and "disp-empty" in info.out


def test_script_gives_the_same_layout(r43: Backup, tmp_path: Path) -> None:
    out = tmp_path / "out"
    script = tmp_path / "recover.sh"
    result = run_main("script", r43.path, "--passphrase-file", r43.passfile, "--output", out)
    assert result.code == 0, result.text
    script.write_text(result.out, encoding="utf-8")
    env = {**os.environ, "backup_pass": PASSPHRASE}
    run = subprocess.run(["dash", str(script)], env=env, capture_output=True, check=False)
    assert run.returncode == 0, run.stderr.decode(errors="replace")
    assert (out / "work" / "notes.txt").read_text(encoding="utf-8") == NOTES
    assert (out / "disp-empty").is_dir() and list((out / "disp-empty").iterdir()) == []


@pytest.mark.parametrize(
    ("data", "said"),
    [
        (b"not empty at all\n", "placeholder"),
        # qubes.xml says size 0 for such a qube; the placeholder still has a budget
        (b"\0" * (3 << 20), "decompression bomb"),
    ],
    ids=["data", "bomb"],
)
def test_a_placeholder_holding_data_fails_and_is_kept_partial(
    tmp_path: Path, data: bytes, said: str
) -> None:
    backup = _build(tmp_path, placeholder_data=data)
    out = tmp_path / "out"
    result = run_main("restore", backup.path, "--passphrase-file", backup.passfile, "--output", out)
    assert result.code == 4, result.text
    assert "vm21/empty" in result.text and said in result.text
    assert not (out / "disp-empty" / "empty").exists()
    assert (out / "disp-empty" / "empty.partial").is_file()
    for rel, source in backup.expected_files(["work"]).items():  # the rest is restored
        assert sha(out / rel) == sha(source), rel


def test_transcript_replays_the_same_layout(r43: Backup, tmp_path: Path) -> None:
    out = tmp_path / "out"
    transcript = tmp_path / "replay.sh"
    result = run_main(
        "restore", r43.path, "--passphrase-file", r43.passfile, "--output", out,
        "--vm", "disp-empty", "--vm", "work", "--transcript", transcript,
    )
    assert result.code == 0, result.text
    again = tmp_path / "again"
    again.mkdir()
    text = transcript.read_text(encoding="utf-8").replace(f"out={out}", f"out={again}")
    assert f"out={again}" in text
    transcript.write_text(text, encoding="utf-8")
    env = {**os.environ, "backup_pass": PASSPHRASE}
    run = subprocess.run(["dash", str(transcript)], env=env, capture_output=True, check=False)
    assert run.returncode == 0, run.stderr.decode(errors="replace")
    assert (again / "work" / "notes.txt").read_text(encoding="utf-8") == NOTES
    assert (again / "disp-empty").is_dir() and list((again / "disp-empty").iterdir()) == []
