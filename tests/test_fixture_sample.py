"""The committed sample backup (the README's first command) restores exactly."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from conftest import ROOT, run_main

from qrecover.compat import removeprefix

SAMPLE = ROOT / "fixtures" / "sample-backup"
PASSFILE = ROOT / "fixtures" / "sample-backup.passphrase"
CONTENTS = ROOT / "fixtures" / "sample-backup.contents.json"


def test_sample_backup_restores_as_recorded(tmp_path: Path) -> None:
    info = run_main("info", SAMPLE, "--json", "--passphrase-file", PASSFILE)
    assert info.code == 0, info.text
    dest = {
        vm["backup_path"]: (
            "dom0-home/" + vm["backup_path"].split("/")[1] if vm["name"] == "dom0" else vm["name"]
        )
        for vm in json.loads(info.out)["vms"]
    }
    out = tmp_path / "restored"
    result = run_main("restore", SAMPLE, "--output", out, "--passphrase-file", PASSFILE)
    assert result.code == 0, result.text
    entries = json.loads(CONTENTS.read_text())
    assert len(entries) > 20
    for entry in entries:
        name: str = entry["name"]
        prefix = next(p for p in dest if name == p or name.startswith(p + "/"))
        rest = removeprefix(name[len(prefix) :].lstrip("/"), "./")
        rest = "" if rest == "." else rest
        path = out / dest[prefix] / rest if rest else out / dest[prefix]
        if entry["type"] == "file":
            assert path.is_file(), name
            data = path.read_bytes()
            assert len(data) == entry["size"], name
            assert hashlib.sha256(data).hexdigest() == entry["sha256"], name
        elif entry["type"] == "dir":
            assert path.is_dir(), name
        elif entry["type"] == "symlink":
            assert path.is_symlink(), name
    # the marker text the fixture README points at, inside work's private.img
    image = (out / "work" / "private.img").read_bytes()
    marker = b"qrecover-sample: the quick brown fox restored from work/private.img"
    assert image[2359296 : 2359296 + len(marker)] == marker
