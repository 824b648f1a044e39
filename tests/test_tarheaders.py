"""The one tar-header parser (qrecover.archive.tarheaders): numbers, checksum, names
and PAX records read as GNU tar reads them; GNU tar itself is the judge."""

from __future__ import annotations

import io
import random
import subprocess
import tarfile
from pathlib import Path

import pytest
from make_backup import randbytes

from qrecover.archive.tarheaders import (
    BLOCK,
    Extended,
    TarError,
    checksum_ok,
    header_name,
    is_ustar,
    number,
    pax_records,
)


def _one(name: str, data: bytes, fmt: int = tarfile.GNU_FORMAT) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tar:
        info = tarfile.TarInfo(name)
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _sum(block: bytearray, signed: bool) -> None:
    """Store the block's checksum, summed over unsigned or signed bytes."""
    block[148:156] = b" " * 8
    total = sum(b - 256 if signed and b >= 128 else b for b in block)
    block[148:156] = b"%06o\0 " % total


def _record(key: str, value: str) -> bytes:
    """One PAX record, its length counting its own digits."""
    body = f" {key}={value}\n".encode()
    length = len(body) + len(str(len(body)))
    length += len(str(length)) - len(str(len(body)))
    return str(length).encode() + body


def _gnu_tar_lists(archive: bytes, tmp_path: Path) -> list[str]:
    path = tmp_path / "a.tar"
    path.write_bytes(archive)
    done = subprocess.run(["tar", "-tf", str(path)], capture_output=True, check=True)
    return done.stdout.decode("utf-8", "surrogateescape").splitlines()


@pytest.mark.parametrize(
    ("field", "value"),
    [
        (b"00000000644\0", 0o644),
        (b"     644\0\0\0\0", 0o644),  # leading spaces
        (b"644 \0junk\0\0\0", 0o644),  # ended by a space: what follows is not read
        (b"\0" * 12, 0),
        (b"\x80" + bytes(5) + (12 << 30).to_bytes(6, "big"), 12 << 30),  # base-256, 12 GiB
        (b"\xff" * 11 + b"\xfe", -2),  # base-256, negative (an mtime before 1970)
    ],
)
def test_numbers_read_as_gnu_tar_reads_them(field: bytes, value: int) -> None:
    assert number(field) == value


@pytest.mark.parametrize(
    "field",
    [
        b"\x81" + bytes(11),  # neither 0x80 nor 0xFF: GNU tar reads no base-256 here
        b"-7\0",  # Python's int() would take these four; GNU tar does not
        b"+7\0",
        b"0o7\0",
        b"7_7\0",
        b"1238\0",
    ],
)
def test_what_gnu_tar_would_not_read_is_refused(field: bytes) -> None:
    with pytest.raises(TarError):
        number(field)


def test_checksum_summed_signed_is_a_header_as_for_gnu_tar(tmp_path: Path) -> None:
    """Old tars summed the header's bytes as signed chars; GNU tar reads both
    sums.  The guard used to take only the unsigned one (the outer archive's
    reader took both): such a header was "damaged" to it."""
    name = "vm7/apps/caf\u00e9-\u00fc"  # bytes >= 0x80 in the name: the two sums differ
    block = bytearray(_one(name, b"data")[:BLOCK])
    unsigned = bytes(block)
    _sum(block, signed=True)
    assert bytes(block) != unsigned
    archive = bytes(block) + _one(name, b"data")[BLOCK:]
    assert _gnu_tar_lists(archive, tmp_path) == [name]
    assert checksum_ok(bytes(block)) and is_ustar(bytes(block))
    assert checksum_ok(unsigned)
    broken = bytearray(block)
    broken[0] ^= 1
    assert not checksum_ok(bytes(broken))
    assert not checksum_ok(bytes(block[:148]) + b"\0" * 8 + bytes(block[156:]))  # no checksum


def test_the_prefix_field_only_in_a_posix_ustar_header(tmp_path: Path) -> None:
    """An old GNU header keeps the access time where ustar keeps the prefix:
    the guard used to join it to the name, GNU tar does not."""
    block = bytearray(_one("vm7/apps/a", b"x")[:BLOCK])
    assert block[257:263] == b"ustar "  # GNU's magic
    block[345:357] = b"14000000000\0"  # an access time
    _sum(block, signed=False)
    assert _gnu_tar_lists(bytes(block) + _one("a", b"x")[BLOCK:], tmp_path) == ["vm7/apps/a"]
    assert header_name(bytes(block)) == "vm7/apps/a"
    posix = _one("vm7/" + "d" * 120 + "/file", b"x", tarfile.USTAR_FORMAT)[:BLOCK]
    assert header_name(posix) == "vm7/" + "d" * 120 + "/file"


def test_pax_path_wins_over_a_gnu_long_name_and_the_header() -> None:
    ext = Extended()
    ext.add(b"L", b"long/name\0")
    block = _one("short", b"")[:BLOCK]
    assert ext.name(block) == "long/name"
    ext.add(b"x", _record("path", "p/q/r"))
    assert ext.name(block) == "p/q/r"
    ext.add(b"x", _record("GNU.sparse.name", "s/t"))
    assert ext.name(block) == "s/t" and ext.sparse
    assert Extended().name(block) == "short"


def test_a_pax_size_record_overrides_the_size_field() -> None:
    archive = _one("vm7/" + "n" * 120, b"abc", tarfile.PAX_FORMAT)
    ext = Extended.of([archive[: 2 * BLOCK]])
    assert "path" in ext.pax
    ext.add(b"x", _record("size", "99"))
    assert ext.size(archive[2 * BLOCK : 3 * BLOCK]) == 99
    ext.add(b"x", _record("size", "9x"))
    with pytest.raises(TarError):
        ext.size(archive[2 * BLOCK : 3 * BLOCK])


def test_is_ustar_on_real_and_random_blocks() -> None:
    block = _one("vm7/private.img.000", b"")[:BLOCK]
    assert is_ustar(block)
    assert not is_ustar(block[:100] + b"X" + block[101:])
    rng = random.Random(3)
    assert not any(is_ustar(randbytes(rng, BLOCK)) for _ in range(2000))


def test_pax_records_are_strict() -> None:
    assert pax_records(b"13 path=abcd\n") == {"path": "abcd"}
    assert pax_records(_record("path", "ab\ncd/efg")) == {"path": "ab\ncd/efg"}  # by length
    for bad in (b"12 path=abcd\n", b"13 path=abcdX", b"x path=a\n", b"9 pathab\n"):
        with pytest.raises(TarError):
            pax_records(bad)
