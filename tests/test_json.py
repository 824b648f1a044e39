"""verify --json / restore --json: one JSON document on stdout, the same exit codes;
a damaged chunk marks exactly its stored file as failed."""

from __future__ import annotations

import json
from pathlib import Path

from conftest import ROOT, run_main
from helpers import tampered_copy

SAMPLE = ROOT / "fixtures" / "sample-backup"
PASSFILE = ROOT / "fixtures" / "sample-backup.passphrase"


def test_verify_json_intact() -> None:
    result = run_main("verify", SAMPLE, "--json", "--passphrase-file", PASSFILE)
    assert result.code == 0, result.text
    doc = json.loads(result.out)  # stdout is the document and nothing else
    assert doc["verdict"] == "ok" and doc["exit_code"] == 0
    assert doc["header"]["version"] == 3 and doc["header"]["hmac-algorithm"] == "SHA512"
    assert len(doc["files"]) == 14
    for entry in doc["files"]:
        assert entry["status"] == "ok" and entry["error"] is None
        assert entry["chunks"] >= 1 and entry["stored_bytes"] > 0 and entry["vm"]
    by_vm = {e["vm"] for e in doc["files"]}
    assert by_vm == {vm["name"] for vm in doc["vms"]}
    # the human lines moved to stderr
    assert "verified 14 stored file(s)" in result.err


def test_verify_json_tampered_marks_only_its_file(tmp_path: Path) -> None:
    backup = tampered_copy(SAMPLE, tmp_path / "tampered-backup", "vm7/private.img.000", at=100)
    plain = run_main("verify", backup, "--passphrase-file", PASSFILE)
    result = run_main("verify", backup, "--json", "--passphrase-file", PASSFILE)
    assert result.code == plain.code == 4, result.text
    doc = json.loads(result.out)
    assert doc["verdict"] == "failed" and doc["exit_code"] == 4
    failed = [e for e in doc["files"] if e["status"] == "failed"]
    assert [e["stored"] for e in failed] == ["vm7/private.img"]
    assert failed[0]["vm"] == "work" and "HMAC" in failed[0]["error"]
    assert len([e for e in doc["files"] if e["status"] == "ok"]) == 13


def test_restore_json(tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = run_main("restore", SAMPLE, "-o", out, "--json", "--passphrase-file", PASSFILE)
    assert result.code == 0, result.text
    doc = json.loads(result.out)
    assert doc["command"] == "restore" and doc["verdict"] == "ok"
    work = next(e for e in doc["files"] if e["stored"] == "vm7/private.img")
    assert work["places"] == [str(out / "work" / "private.img")]
    assert work["restored_bytes"] == (out / "work" / "private.img").stat().st_size


def test_json_on_error_keeps_exit_code(tmp_path: Path) -> None:
    wrong = tmp_path / "wrong"
    wrong.write_text("not the passphrase\n")
    result = run_main("verify", SAMPLE, "--json", "--passphrase-file", wrong)
    assert result.code == 3, result.text
    doc = json.loads(result.out)
    assert doc["verdict"] == "error" and doc["exit_code"] == 3 and doc["problems"]


def test_json_refuses_dry_run(tmp_path: Path) -> None:
    result = run_main("restore", SAMPLE, "-o", tmp_path / "o", "--dry-run", "--json",
                      "--passphrase-file", PASSFILE)
    assert result.code == 2 and "--dry-run" in result.err
