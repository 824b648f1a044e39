"""Outer member names: validation, chunk parsing, numeric order."""

from __future__ import annotations

import io
import logging
import re
import subprocess
import tarfile
from pathlib import Path

import pytest

from qrecover.archive.container import FolderSource, StreamSource, open_source
from qrecover.archive.members import ChunkName, follows, parse_member_name
from qrecover.errors import BackupError
from qrecover.magic import compression_of


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


# -- the outer archive's reader (qrecover.archive.tarstream, qrecover.archive.sources) --------


def _tar(members: list[tuple[str, bytes]], fmt: int = tarfile.PAX_FORMAT) -> bytes:
    """Members as Qubes appended them: each its own small archive."""
    out = b""
    for name, data in members:
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w", format=fmt) as tar:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        out += buf.getvalue()
    return out


def _members(path: Path | list[Path]) -> list[tuple[str, bytes]]:
    paths = [str(p) for p in path] if isinstance(path, list) else [str(path)]
    source = open_source(paths)
    assert isinstance(source, StreamSource)
    return [(m.name, m.read_all(1 << 20)) for m in source.members()]


MEMBERS = [("backup-header", b"version=3\n"), ("backup-header.hmac", b"x" * 700),
           ("qubes.xml.000", b"q" * 3000), ("qubes.xml.000.hmac", b"h" * 130),
           ("vm7/" + "p" * 120 + ".000", b"d" * 5000)]


@pytest.mark.parametrize("fmt", [tarfile.PAX_FORMAT, tarfile.GNU_FORMAT, tarfile.USTAR_FORMAT])
def test_reader_reads_concatenated_archives(fmt: int, tmp_path: Path) -> None:
    members = MEMBERS if fmt != tarfile.USTAR_FORMAT else MEMBERS[:4]
    path = tmp_path / "b"
    path.write_bytes(_tar(members, fmt))
    assert _members(path) == members


def test_reader_reads_pieces_as_one(tmp_path: Path) -> None:
    data = _tar(MEMBERS)
    pieces = []
    for i in range(0, len(data), 1024):  # boundaries mid-member and between members
        pieces.append(tmp_path / f"p{i:06d}")
        pieces[-1].write_bytes(data[i:i + 1024])
    assert _members(pieces) == MEMBERS


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "empty (0 bytes)"),
        (bytes(5000), "zero-filled (5000 bytes of zeros)"),
        (bytes(1024) + b"PK\x03\x04" + bytes(600), "1024 bytes of zeros; what follows is a zip"),
        (b"PK\x03\x04" + bytes(600), "it is a zip archive"),
        (b"!<arch>\n" + bytes(100), "an ar archive"),
        (b"070701" + bytes(100), "a cpio archive"),
        (b"Salted__" + bytes(100), "encrypted with openssl enc"),
        (b"hello, world\n" * 50, "it starts like text"),
        (bytes(range(256)) * 4, "it starts with the bytes 00 01 02 03"),
    ],
)
def test_reader_names_what_is_not_a_tar(data: bytes, message: str, tmp_path: Path) -> None:
    path = tmp_path / "b"
    path.write_bytes(data)
    with pytest.raises(BackupError, match=re.escape(message)):
        _members(path)


def test_reader_steps_over_garbage_between_members(tmp_path: Path) -> None:
    """Garbage where a header should be is stepped over (``tar -i``), to the
    next member header, and recorded once as one damaged range."""
    before = _tar(MEMBERS[:2])
    data = before + b"\x01" * 512 + _tar(MEMBERS[2:])
    path = tmp_path / "b"
    path.write_bytes(data)
    source = open_source([str(path)])
    assert isinstance(source, StreamSource)
    got = [(m.name, m.read_all(1 << 20), m.after_damage) for m in source.members()]
    assert [(n, d) for n, d, _ in got] == MEMBERS
    (damage,) = source.damage.ranges
    # from the end of the last member read (its archive's zeros) to the next header
    assert damage.end == len(before) + 512
    assert damage.start <= len(before) < damage.end
    assert "a broken tar header" in damage.what[0]
    assert got[2][2] is damage and all(d is None for _, _, d in got[:2] + got[3:])


def test_reader_steps_over_a_megabyte_of_zeros_in_a_file(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Megabytes of zeros after members: in a file, looked past (ddrescue's
    unreadable sectors); what follows is read, and the zeros are damage.  At
    the end of the file they are where the backup ends (a raw copy on a larger
    disk), with a note."""
    # an earlier cli.main in this worker stopped "qrecover" propagating to the root
    # logger, where caplog listens on the pytest that Python 3.8 has
    monkeypatch.setattr(logging.getLogger("qrecover"), "propagate", True)
    path = tmp_path / "b"
    head = _tar(MEMBERS[:2])
    path.write_bytes(head + bytes(2 << 20) + _tar(MEMBERS[2:]))
    source = open_source([str(path)])
    assert isinstance(source, StreamSource)
    assert [(m.name, m.read_all(1 << 20)) for m in source.members()] == MEMBERS
    (damage,) = source.damage.ranges
    assert damage.end == len(head) + (2 << 20) and damage.start <= len(head)
    assert "bytes of zeros where members should be" in damage.what[0]
    path.write_bytes(_tar(MEMBERS) + bytes(2 << 20))
    with caplog.at_level("WARNING", logger="qrecover"):
        assert _members(path) == MEMBERS
    assert "taken as the end of the backup" in caplog.text
    path.write_bytes(bytes(2 << 20) + _tar(MEMBERS))
    with pytest.raises(BackupError, match="zero-filled: more than 1048576 bytes of zeros"):
        _members(path)


def test_truncated_member_is_an_eof_for_the_engine(tmp_path: Path) -> None:
    data = _tar(MEMBERS)
    path = tmp_path / "b"
    path.write_bytes(data[: data.find(b"d" * 100) + 100])
    source = open_source([str(path)])
    got = []
    with pytest.raises(BackupError, match=r"truncated backup\): it ends at byte"):
        for member in source.members():
            got.append(member.name)
            member.read_all(1 << 20)
    assert got == [n for n, _ in MEMBERS]


@pytest.mark.parametrize(
    ("prev", "name", "ok"),
    [
        ("backup-header", "backup-header.hmac", True),
        ("backup-header", "qubes.xml.000", False),
        ("backup-header.hmac", "qubes.xml.000", True),
        ("backup-header.hmac", "qubes.xml.000.enc", True),
        ("qubes.xml.000", "qubes.xml.000.hmac", True),
        ("qubes.xml.000", "qubes.xml.001", False),
        ("vm7/private.img.004.hmac", "vm7/private.img.005", True),
        ("vm7/private.img.004.hmac", "vm9/icon.png.000", True),
        ("vm7/private.img.004.hmac", "vm7/private.img.006", False),
        ("vm7/private.img.004.hmac", "vm7/private.img.005.hmac", False),
        ("vm7/private.img.004.enc", "vm7/private.img.005.enc", True),
        ("vm7/private.img.004.enc", "vm7/private.img.007.enc", False),
    ],
)
def test_follows_is_the_order_qubes_wrote(prev: str, name: str, ok: bool) -> None:
    assert follows(prev, name) is ok


@pytest.mark.parametrize(("head", "name"), [(b"\x1f\x8b\x08", "gzip"), (b"BZh9", "bzip2"),
                                            (b"\xfd7zXZ\x00", "xz"), (b"\x28\xb5\x2f\xfd", "zstd")])
def test_compression_told_by_magic(head: bytes, name: str) -> None:
    comp = compression_of(head + bytes(10))
    assert comp is not None and comp.name == name
    assert compression_of(b"BZhx") is None  # "BZh" and not a block size: not bzip2


def test_member_larger_than_any_chunk_is_refused(tmp_path: Path) -> None:
    block = bytearray(_tar([("vm7/private.img.000", b"")], tarfile.USTAR_FORMAT)[:512])
    block[124:136] = b"%011o\0" % (300 << 20)  # 300 MiB declared
    block[148:156] = b" " * 8
    block[148:156] = b"%06o\0 " % sum(block)
    path = tmp_path / "b"
    path.write_bytes(_tar(MEMBERS[:2]) + bytes(block) + bytes(4096))
    with pytest.raises(BackupError, match="declares 314572800 bytes, more than any chunk"):
        _members(path)


def test_folder_chunk_larger_than_any_chunk_is_refused(tmp_path: Path) -> None:
    for name in ("backup-header", "backup-header.hmac"):
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "vm7").mkdir()
    with (tmp_path / "vm7" / "private.img.000").open("wb") as f:
        f.truncate(300 << 20)  # sparse: costs no disk
    with pytest.raises(BackupError, match="more than any chunk Qubes writes"):
        list(FolderSource(tmp_path).members())


def test_short_first_piece_is_named(tmp_path: Path) -> None:
    data = _tar(MEMBERS)
    (tmp_path / "a").write_bytes(data[-1024:])
    (tmp_path / "b").write_bytes(data[:2048])
    with pytest.raises(BackupError, match="is shorter than the next piece"):
        open_source([str(tmp_path / "a"), str(tmp_path / "b")])


def test_a_damaged_pax_header_before_backup_header_is_stepped_over(tmp_path: Path) -> None:
    """The first member's PAX header (GNU tar --posix writes one, as for Qubes)
    zeroed or garbled: its ustar header, in the first record, still names
    backup-header; read from there, the damage recorded."""
    stage = tmp_path / "stage"
    (stage / "vm7").mkdir(parents=True)
    members = [("backup-header", b"version=3\n"), ("backup-header.hmac", b"x" * 70),
               ("vm7/p.000", b"d" * 900)]
    data = bytearray()
    for name, content in members:
        (stage / name).write_bytes(content)
        data += subprocess.run(["tar", "-cO", "--posix", "-C", str(stage), name],
                               capture_output=True, check=True).stdout
    assert data[156:157] == b"x"  # a PAX header first
    for damage in (bytes(512), b"\x07" * 512):
        data[0:512] = damage
        path = tmp_path / "b"
        path.write_bytes(bytes(data))
        source = open_source([str(path)])
        assert isinstance(source, StreamSource)
        assert [(m.name, m.read_all(1 << 20)) for m in source.members()] == members
        (found,) = source.damage.ranges
        assert found.start == 0 and found.end == 1024, found
