"""Outer member names: validation, chunk parsing, numeric order."""

from __future__ import annotations

from pathlib import Path

import pytest

from qrecover.container import ChunkName, FolderSource, parse_member_name
from qrecover.errors import BackupError


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("qubes.xml.000", ChunkName("qubes.xml", 0)),
        ("qubes.xml.000.hmac", ChunkName("qubes.xml", 0, True)),
        ("vm7/private.img.012", ChunkName("vm7/private.img", 12)),
        ("vm7/private.img.999.hmac", ChunkName("vm7/private.img", 999, True)),
        ("vm7/private.img.1000", ChunkName("vm7/private.img", 1000)),
        ("vm7/private.img.12345", ChunkName("vm7/private.img", 12345)),
        ("vm3/..000", ChunkName("vm3/.", 0)),
        ("vm3/..001.hmac", ChunkName("vm3/.", 1, True)),
        ("vm-templates/fedora-23/..000", ChunkName("vm-templates/fedora-23/.", 0)),
        (
            "appvms/work/whitelisted-appmenus.list.000",
            ChunkName("appvms/work/whitelisted-appmenus.list", 0),
        ),
        ("dom0-home/user.000", ChunkName("dom0-home/user", 0)),
    ],
)
def test_chunk_names(name: str, expected: ChunkName) -> None:
    assert parse_member_name(name) == expected
    assert expected.name == name


def test_header_members_are_not_chunks() -> None:
    assert parse_member_name("backup-header") is None
    assert parse_member_name("backup-header.hmac") is None


@pytest.mark.parametrize(
    "name",
    [
        "/etc/passwd.000",
        "../x.000",
        "vm7/../../etc/x.000",
        "vm7/./x.000",
        "vm7//x.000",
        "vm7/private.img",
        "vm7/private.img.1",
        "vm7/private.img.0001",
        "vm7/priv\nate.img.000",
        "vm7/priv\x1bate.img.000",
        "vm7/prïvate.img.000",
        "a/b/c/d.000",
        ".hidden.000",
        "..000",
        "x" * 600 + ".000",
    ],
)
def test_hostile_or_foreign_names_refused(name: str) -> None:
    with pytest.raises(BackupError):
        parse_member_name(name)


def test_folder_order_is_numeric_and_pairs_hmacs(tmp_path: Path) -> None:
    names = ["backup-header", "backup-header.hmac", "qubes.xml.000", "qubes.xml.000.hmac"]
    for i in (0, 1, 2, 999, 1000, 1001):
        names += [f"vm7/private.img.{i:03d}", f"vm7/private.img.{i:03d}.hmac"]
    names += ["vm3/..000", "vm3/..000.hmac"]
    for name in names:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"x")
    got = [m.name for m in FolderSource(tmp_path).members()]
    assert got[:4] == names[:4]
    assert got.index("vm7/private.img.999") < got.index("vm7/private.img.1000")
    assert got.index("vm7/private.img.1000") + 1 == got.index("vm7/private.img.1000.hmac")
    assert got.index("vm7/private.img.002") < got.index("vm7/private.img.999")
    assert sorted(got) == sorted(names)
