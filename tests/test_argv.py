"""Argv builders are pure: what would run, without running anything."""

from __future__ import annotations

import shlex
from pathlib import Path

from qrecover.formats import parse_header
from qrecover.formats.v3 import decrypt_stage
from qrecover.runner import PASS_ENV, render_pipeline
from qrecover.stages.decompress import decompress_stage
from qrecover.stages.extract import extract_stage, list_stage, qubes_xml_stage

BASE = b"version=3\nhmac-algorithm=SHA512\n"


def header(extra: bytes) -> bytes:
    return BASE + extra


def test_decrypt_uses_md5_and_env_never_pass() -> None:
    h = parse_header(header(b"crypto-algorithm=aes-256-cbc\nencrypted=True\ncompressed=True\n"))
    stage = decrypt_stage(h)
    assert stage is not None
    assert stage.argv == (
        "openssl",
        "enc",
        "-d",
        "-aes-256-cbc",
        "-md",
        "md5",
        "-pass",
        f"env:{PASS_ENV}",
    )
    assert stage.secret_env == (PASS_ENV,)
    assert not any(a.startswith("pass:") for a in stage.argv)


def test_unencrypted_has_no_decrypt_stage() -> None:
    h = parse_header(header(b"encrypted=False\ncompressed=False\n"))
    assert decrypt_stage(h) is None
    assert decompress_stage(h) is None


def test_decompressors() -> None:
    for name, argv in [("gzip", ("gzip", "-d")), ("bzip2", ("bzip2", "-d")), ("xz", ("xz", "-d"))]:
        h = parse_header(
            header(f"encrypted=True\ncompressed=True\ncompression-filter={name}\n".encode())
        )
        stage = decompress_stage(h)
        assert stage is not None and stage.argv == argv


def test_extract_and_list() -> None:
    stage = extract_stage(Path("/out dir/stage"), 1)
    assert stage.argv[:4] == ("tar", "-x", "-f", "-")
    assert "--strip-components=1" in stage.argv and "--no-same-owner" in stage.argv
    assert shlex.split(stage.render()) == list(stage.argv)
    assert list_stage().argv == ("tar", "-t", "-f", "-")
    assert qubes_xml_stage().argv[-1] == "qubes.xml"


def test_render_pipeline_round_trips_through_shlex() -> None:
    h = parse_header(header(b"encrypted=True\ncompressed=True\ncompression-filter=bzip2\n"))
    stages = [s for s in (decrypt_stage(h), decompress_stage(h)) if s is not None]
    stages.append(extract_stage(Path("/tmp/Grüße ünd spaces"), 2))
    text = render_pipeline(stages, stdin="/tmp/a b.000")
    parts = [shlex.split(p) for p in text.split(" < ")[0].split(" | ")]
    assert [tuple(p) for p in parts] == [s.argv for s in stages]
