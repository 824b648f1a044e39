"""Format 4 pieces without a backup: header model, chunk names, scrypt argv."""

from __future__ import annotations

import shlex
import subprocess
from pathlib import Path

import pytest

from qrecover.archive.container import FolderSource
from qrecover.archive.members import ChunkName, parse_member_name
from qrecover.compat import removesuffix
from qrecover.errors import BackupError
from qrecover.formats import parse_header
from qrecover.formats.v4 import BackupHeaderV4
from qrecover.formats.v4.scrypt_tool import ScryptTool, dec_stage, is_scrypt_file, render_dec
from qrecover.runner import PASS_ENV

R4 = (
    b"version=4\nencrypted=True\ncompressed=True\ncompression-filter=gzip\n"
    b"hmac-algorithm=scrypt\nbackup-id=20230405T123455-1234\n"
)


def test_r4_header_parses() -> None:
    header = parse_header(R4)
    assert isinstance(header, BackupHeaderV4)
    assert header.backup_id == "20230405T123455-1234"
    assert header.filter == "gzip"
    assert header.fields()["hmac-algorithm"] == "scrypt"
    uncompressed = parse_header(R4.replace(b"compressed=True", b"compressed=False"))
    assert uncompressed.filter is None  # R4 names gzip even then


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ((b"hmac-algorithm=scrypt", b"hmac-algorithm=SHA512"), "scrypt"),
        ((b"backup-id=20230405T123455-1234\n", b""), "backup-id"),
        ((b"backup-id=20230405T123455-1234", b"backup-id=-x"), "backup-id"),
        ((b"backup-id=20230405T123455-1234", b"backup-id=" + b"1" * 200), "backup-id"),
        ((b"compression-filter=gzip", b"compression-filter=sh"), "compression"),
        ((b"version=4", b"version=5"), "version 5"),
        ((b"version=4", b"version=40"), "version 40"),
    ],
)
def test_r4_header_refused(change: tuple[bytes, bytes], message: str) -> None:
    with pytest.raises(BackupError, match=message):
        parse_header(R4.replace(*change))


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("qubes.xml.000.enc", ChunkName("qubes.xml", 0, is_enc=True)),
        ("vm7/private.img.012.enc", ChunkName("vm7/private.img", 12, is_enc=True)),
        ("vm7/private.img.1000.enc", ChunkName("vm7/private.img", 1000, is_enc=True)),
        ("dom0-home/user.000.enc", ChunkName("dom0-home/user", 0, is_enc=True)),
    ],
)
def test_enc_chunk_names(name: str, expected: ChunkName) -> None:
    parsed = parse_member_name(name)
    assert parsed == expected
    assert expected.name == name
    assert expected.data_name == removesuffix(name, ".enc")


@pytest.mark.parametrize(
    "name",
    ["vm7/private.img.000.enc.hmac", "vm7/private.img.000.hmac.enc", "../x.000.enc", "x.01.enc"],
)
def test_bad_enc_shapes_refused(name: str) -> None:
    with pytest.raises(BackupError):
        parse_member_name(name)


def test_folder_order_is_numeric_for_enc(tmp_path: Path) -> None:
    (tmp_path / "vm7").mkdir()
    for name in ("backup-header", "backup-header.hmac", "qubes.xml.000.enc"):
        (tmp_path / name).write_bytes(b"x")
    for i in (1000, 999, 2, 10):
        (tmp_path / "vm7" / f"private.img.{i:03d}.enc").write_bytes(b"x")
    names = [m.name for m in FolderSource(tmp_path).members()]
    assert names == [
        "backup-header",
        "backup-header.hmac",
        "qubes.xml.000.enc",
        "vm7/private.img.002.enc",
        "vm7/private.img.010.enc",
        "vm7/private.img.999.enc",
        "vm7/private.img.1000.enc",
    ]


def test_scrypt_dec_argv_never_holds_the_passphrase() -> None:
    env = dec_stage(ScryptTool("env"), "in.enc", "out")
    assert env.argv == ("scrypt", "dec", "--passphrase", f"env:{PASS_ENV}", "in.enc", "out")
    assert env.secret_env == (PASS_ENV,)
    stdin = dec_stage(ScryptTool("stdin"), "in.enc", "out")
    assert stdin.argv == ("scrypt", "dec", "-P", "in.enc", "out")
    assert stdin.secret_env == ()


@pytest.mark.parametrize("style", ["env", "stdin"])
def test_rendered_scrypt_command_replays_in_sh(style: str) -> None:
    """The logged command, pasted into a shell with $backup_pass set, passes scrypt
    the passphrase R4 used: the '!' is single-quoted (no history expansion)."""
    line = render_dec(ScryptTool(style), "x.enc", "x.out", "ID-1!vm7/x.000!")  # type: ignore[arg-type]
    assert "'ID-1!vm7/x.000!'" in line
    # Replace scrypt by a function printing what it got, and run the line in sh.
    script = (
        'scrypt() { if [ "$3" = "env:backup_pass" ]; then printf "%s" "$backup_pass"; '
        'else IFS= read -r p; printf "%s" "$p"; fi; }\n'
        f"backup_pass='s3cret ü'\n{line}\n"
    )
    got = subprocess.run(["sh", "-c", script], capture_output=True, text=True, check=True)
    assert got.stdout == "ID-1!vm7/x.000!s3cret ü"
    assert "s3cret" not in line and shlex.split(line)


def test_scrypt_magic() -> None:
    assert is_scrypt_file(b"scrypt\x00\x0a" + bytes(10))
    assert not is_scrypt_file(b"(stdin)= abcdef")
