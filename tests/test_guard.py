"""The inner-archive guard, on tar streams made by GNU tar and by Python's tarfile."""

from __future__ import annotations

import io
import os
import subprocess
import tarfile
import threading
from pathlib import Path

import pytest

from qrecover.stages.guard import TarGuard, outside


def screen(
    data: bytes, prefix: str = "vm7/apps", limit: int | None = None
) -> tuple[TarGuard, bytes]:
    src_r, src_w = os.pipe()
    dst_r, dst_w = os.pipe()
    guard = TarGuard(src_r, dst_w, limit, "vm7/apps", prefix=prefix)
    thread = threading.Thread(target=guard.run)
    thread.start()

    def feed() -> None:
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(src_w, view) :]
        except BrokenPipeError:
            pass
        finally:
            os.close(src_w)

    feeder = threading.Thread(target=feed)
    feeder.start()
    out = bytearray()
    while block := os.read(dst_r, 1 << 16):
        out += block
    os.close(dst_r)
    thread.join()
    feeder.join()
    return guard, bytes(out)


def entry(name: str, kind: bytes = tarfile.REGTYPE, linkname: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, linkname
    return info


def build(
    entries: list[tuple[tarfile.TarInfo, bytes | None]], fmt: int = tarfile.GNU_FORMAT
) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tar:
        for info, data in entries:
            if data is not None:
                info.size = len(data)
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return buf.getvalue()


def names(stream: bytes) -> list[str]:
    with tarfile.open(fileobj=io.BytesIO(stream)) as tar:
        return [i.name for i in tar]


@pytest.mark.parametrize("fmt", [tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_devices_and_fifos_are_dropped_everything_else_passes(fmt: int) -> None:
    long = "vm7/apps/" + "x" * 150 + "/fifo"
    data = build(
        [
            (entry("vm7/apps", tarfile.DIRTYPE), None),
            (entry("vm7/apps/null", tarfile.CHRTYPE), None),
            (entry("vm7/apps/sda", tarfile.BLKTYPE), None),
            (entry("vm7/apps/fifo", tarfile.FIFOTYPE), None),
            (entry(long, tarfile.FIFOTYPE), None),
            (entry("vm7/apps/ok.desktop"), b"[Desktop Entry]\n" * 100),
            (entry("vm7/apps/link", tarfile.SYMTYPE, "/usr/share/x"), None),
        ],
        fmt,
    )
    guard, out = screen(data)
    assert guard.error is None
    assert names(out) == ["vm7/apps", "vm7/apps/ok.desktop", "vm7/apps/link"]
    assert len(guard.skipped) == 4
    assert any("FIFO" in s for s in guard.skipped) and any(long in s for s in guard.skipped)
    with tarfile.open(fileobj=io.BytesIO(out)) as tar:
        f = tar.extractfile("vm7/apps/ok.desktop")
        assert f is not None and f.read() == b"[Desktop Entry]\n" * 100


def test_gnu_tar_sparse_archive_passes_unchanged(tmp_path: Path) -> None:
    image = tmp_path / "private.img"
    with image.open("wb") as f:
        f.truncate(64 << 20)
        f.seek(5 << 20)
        f.write(os.urandom(100_000))
        f.seek(40 << 20)
        f.write(b"tail data")
    made = subprocess.run(
        [
            "tar",
            "-Pc",
            "--sparse",
            "-C",
            str(tmp_path),
            "--xform",
            "s:^private.img:vm7/\\0:",
            "private.img",
        ],
        capture_output=True,
        check=True,
    ).stdout
    guard, out = screen(made, prefix="vm7/private.img")
    assert guard.error is None and out == made


@pytest.mark.parametrize(
    ("entries", "message"),
    [
        ([(entry("vm7/apps/../../escape"), b"x")], "outside"),
        ([(entry("/etc/cron.d/x"), b"x")], "outside"),
        ([(entry("vm8/other"), b"x")], "outside"),
        ([(entry("vm7/appsX/y"), b"x")], "outside"),
        ([(entry("vm7/apps/h", tarfile.LNKTYPE, "/etc/shadow"), None)], "hard link"),
        ([(entry("vm7/apps/h", tarfile.LNKTYPE, "vm7/../etc"), None)], "hard link"),
    ],
)
def test_names_outside_the_stored_file_are_refused(
    entries: list[tuple[tarfile.TarInfo, bytes | None]], message: str
) -> None:
    guard, out = screen(build(entries))
    assert guard.error is not None and message in guard.error
    assert out == b""


def test_symlink_claiming_data_is_refused() -> None:
    # A link header with a size would let guard and tar disagree on where
    # the next header is: refused.
    info = entry("vm7/apps/l", tarfile.SYMTYPE, "x")
    block = bytearray(info.tobuf(format=tarfile.GNU_FORMAT))
    block[124:136] = b"00000001000\0"
    chk = sum(block[:148]) + 256 + sum(block[156:512])
    block[148:156] = b"%06o\0 " % chk
    guard, _ = screen(bytes(block) + bytes(512) + bytes(1024))
    assert guard.error is not None and "claims data" in guard.error


def test_size_limit_cuts_the_stream() -> None:
    data = build([(entry("vm7/apps/big"), bytes(4 << 20))])
    guard, out = screen(data, limit=1 << 20)
    assert guard.error is not None and "decompression bomb" in guard.error
    assert len(out) <= (1 << 20) + (1 << 20)


def test_damaged_header_is_refused() -> None:
    data = bytearray(build([(entry("vm7/apps/a"), b"abc")]))
    data[0] ^= 0xFF
    guard, _ = screen(bytes(data))
    assert guard.error is not None and "damaged header" in guard.error


def test_outside() -> None:
    assert not outside("vm3/./root.img", "vm3/.")
    assert not outside("vm3/./", "vm3/.")
    assert not outside("dom0-home/user/.bashrc", "dom0-home/user")
    assert outside("dom0-home/username/x", "dom0-home/user")
    assert outside("vm3/../x", "vm3/.")


def test_writing_through_a_symlink_is_refused() -> None:
    data = build([
        (entry("vm7/apps", tarfile.DIRTYPE), None),
        (entry("vm7/apps/l", tarfile.SYMTYPE, "/etc"), None),
        (entry("vm7/apps/l/cron.d/x"), b"x"),
    ])
    guard, _ = screen(data)
    assert guard.error is not None and "written through 'vm7/apps/l'" in guard.error


def test_folder_replacing_a_link_is_refused() -> None:
    data = build([
        (entry("vm7/apps/l", tarfile.SYMTYPE, "/etc"), None),
        (entry("vm7/apps/l", tarfile.DIRTYPE), None),
    ])
    guard, _ = screen(data)
    assert guard.error is not None and "replaces a file or link" in guard.error


def test_gnu_sparse_1_0_member_is_judged_by_its_real_name(tmp_path: Path) -> None:
    # What Qubes R4 wrote: PAX headers with GNU sparse 1.0, GNU tar making the same.
    image = tmp_path / "private.img"
    with image.open("wb") as f:
        f.truncate(8 << 20)
        f.seek(1 << 20)
        f.write(os.urandom(5000))
    made = subprocess.run(["tar", "-c", "--format=posix", "--sparse", "--sparse-version=1.0",
                           "-C", str(tmp_path), "--xform", "s:^private.img:vm7/\\0:",
                           "private.img"], capture_output=True, check=True).stdout
    assert b"GNUSparseFile" in made
    guard, out = screen(made, prefix="vm7/private.img")
    assert guard.error is None and out == made
    guard, _ = screen(made, prefix="vm8/private.img")
    assert guard.error is not None and "'vm7/private.img'" in guard.error


def test_archive_cut_at_a_member_boundary_is_refused() -> None:
    # GNU tar itself accepts this silently; a lost last chunk would go unseen.
    whole = build([(entry("vm7/apps/a"), b"x" * 600), (entry("vm7/apps/b"), b"y" * 10)])
    cut = whole[: 512 + 1024]  # a's header and data, no end-of-archive blocks
    guard, _ = screen(cut)
    assert guard.error is not None and "end-of-archive" in guard.error
    guard, out = screen(whole)
    assert guard.error is None and out == whole


def _resum(block: bytearray, signed: bool) -> bytes:
    block[148:156] = b" " * 8
    block[148:156] = b"%06o\0 " % sum(b - 256 if signed and b >= 128 else b for b in block)
    return bytes(block)


def test_header_summed_signed_passes_as_gnu_tar_reads_it(tmp_path: Path) -> None:
    """The guard took only the unsigned checksum, the outer archive's reader
    both; GNU tar reads both, so the one parser does."""
    archive = bytearray(build([(entry("vm7/apps/caf\u00e9"), b"abc")]))
    archive[:512] = _resum(archive[:512], signed=True)
    guard, out = screen(bytes(archive))
    assert guard.error is None and out[:512] == archive[:512]
    subprocess.run(["tar", "-x", "-f", "-", "-C", str(tmp_path)], input=out, check=True)
    assert (tmp_path / "vm7/apps/caf\u00e9").read_bytes() == b"abc"


def test_size_in_base_256_gnu_tar_cannot_read_is_refused() -> None:
    """A first byte other than 0x80 or 0xFF is no base-256 number for GNU tar;
    the guard used to read it as one (a huge size)."""
    archive = bytearray(build([(entry("vm7/apps/a"), b"abc")]))
    archive[124:136] = b"\x81" + bytes(10) + b"\x03"
    archive[:512] = _resum(archive[:512], signed=False)
    guard, _ = screen(bytes(archive))
    assert guard.error is not None and "malformed header (size field)" in guard.error
