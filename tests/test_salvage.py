"""restore --salvage: real backups (scripts/ generators, real openssl/scrypt/gzip/tar)
with one flipped bit, or one chunk cut out, in a VM's ext4 image.

The image holds one 3 MiB file of random bytes and a small one; chunks are 1 MiB,
so the image's inner archive spans four chunks and the damage lands in big.bin.
Format 2's chunks are the volumes (1020 KiB) of one GNU ``tar -M``, each
encrypted or gzipped on its own.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import ext4image
import make_backup as gen
import pytest
from conftest import Backup, MakeBackup, run_main
from helpers import spans

MIB = 1 << 20


@pytest.fixture(scope="session")
def vm_image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.mktemp("salvage-vm")
    tree = base / "tree"
    (tree / "home" / "user").mkdir(parents=True)
    (tree / "home" / "user" / "big.bin").write_bytes(hashlib.shake_256(b"big").digest(3 * MIB))
    (tree / "home" / "user" / "small.txt").write_text("hello\n")
    work = base / "work"
    work.mkdir()
    ext4image.make_ext4(tree, work / "private.img", 8)
    return work


def _backup(make: MakeBackup, work: Path, **options: Any) -> Backup:
    vms = [gen.VmSpec("work", 7, "QubesAppVm", None, work)]
    return make(vms=vms, dom0_home=None, chunk_size=MIB, **options)


def _backup2(make2: MakeBackup, work: Path, **options: Any) -> Backup:
    vms = [gen.VmSpec("work", 7, "QubesAppVm", None, work)]
    return make2(vms=vms, dom0_home=None, tape_length_kib=1020, **options)


def flipped(backup: Backup, member: str, at: int, dest: Path) -> Path:
    """A copy of the backup with one bit flipped at byte ``at`` of ``member``'s data."""
    data = bytearray(backup.path.read_bytes())
    data[spans(backup.path)[member][1] + at] ^= 0x04
    dest.write_bytes(data)
    return dest


def without(backup: Backup, member: str, dest: Path) -> Path:
    """A copy of the backup with ``member`` cut out (as if never written)."""
    data = backup.path.read_bytes()
    start, _, end = spans(backup.path)[member]
    dest.write_bytes(data[:start] + data[end:])
    return dest


def differing(a: Path, b: Path) -> list[int]:
    """The offsets where two files of one size differ."""
    x, y = a.read_bytes(), b.read_bytes()
    assert len(x) == len(y)
    step = 65536
    return [
        i
        for block in range(0, len(x), step)
        if x[block:block + step] != y[block:block + step]
        for i in range(block, min(block + step, len(x)))
        if x[i] != y[i]
    ]


def restore(bad: Path, backup: Backup, out: Path, *extra: str) -> Any:
    return run_main("restore", bad, "-o", out, "--passphrase-file", backup.passfile, *extra)


def _stored2(doc: dict[str, Any]) -> dict[str, Any]:
    """The image's entry (vm7/private.img, or appvms/work/private.img when the
    writer did not hide the VM's name)."""
    (image,) = [f for f in doc["files"] if f["stored"].endswith("private.img")]
    return image  # type: ignore[no-any-return]


def _inside(offsets: list[int], ranges: list[list[int]]) -> bool:
    return all(any(a <= o < b for a, b in ranges) for o in offsets)


def _check_without_salvage(bad: Path, backup: Backup, out: Path) -> None:
    """As before --salvage existed: exit 4, the image only as .partial, no SALVAGED.txt."""
    result = restore(bad, backup, out, "--json")
    assert result.code == 4, result.err
    assert not (out / "work" / "private.img").exists()
    assert (out / "work" / "private.img.partial").exists()
    assert not list(out.glob("SALVAGED*"))
    assert "nothing of it was used" in result.err and "SALVAGED" not in result.err
    doc = json.loads(result.out)
    (image,) = [f for f in doc["files"] if f["stored"] == "vm7/private.img"]
    assert image["status"] == "failed" and "salvage" not in image and "salvaged" not in doc


def _salvaged(bad: Path, backup: Backup, out: Path) -> tuple[Any, dict[str, Any], str]:
    result = restore(bad, backup, out, "--salvage", "--json")
    assert result.code == 4, result.err
    assert "FAILED AUTHENTICATION" in result.err and "UNVERIFIED" in result.err
    assert "SALVAGED (unverified)" in result.err  # the summary table's status
    # the damage summary: not the hint to use --salvage, which was used
    assert "placed with --salvage, its damaged chunks used UNVERIFIED" in result.err
    assert "restore with --salvage" not in result.err
    doc = json.loads(result.out)
    image = _stored2(doc)
    assert image["status"] == "salvaged"
    assert doc["salvaged"] == str(out / "SALVAGED.txt")
    text = (out / "SALVAGED.txt").read_text()
    assert "WARNING" in text and f"{image['stored']}: placed" in text
    assert "work/private.img" in text
    return result, image["salvage"], text


def _damaged_listed(image: Path, tmp_path: Path) -> None:
    """`files` names big.bin (the damage lies in it), not small.txt; and, as an
    independent look, copying shows exactly big.bin changed."""
    listed = run_main("files", image, "--list", "/")
    assert listed.code == 4, listed.err
    assert "DAMAGED   /home/user/big.bin" in listed.err
    assert "small.txt" not in listed.err.split("DAMAGED", 1)[1]
    copied = run_main("files", image, "-o", tmp_path / "copy")
    assert copied.code == 4 and "DAMAGED   /home/user/big.bin" in copied.err
    user = tmp_path / "copy" / "user"
    assert (user / "small.txt").read_text() == "hello\n"
    assert (user / "big.bin").read_bytes() != hashlib.shake_256(b"big").digest(3 * MIB)


def test_format3_flipped_bit(make: MakeBackup, vm_image: Path, tmp_path: Path) -> None:
    backup = _backup(make, vm_image, compression=None)
    bad = flipped(backup, "vm7/private.img.001", 500_000, tmp_path / "bad")
    _check_without_salvage(bad, backup, tmp_path / "plain")
    out = tmp_path / "out"
    _, salvage, text = _salvaged(bad, backup, out)
    assert [c["chunk"] for c in salvage["chunks"]] == ["vm7/private.img.001"]
    assert salvage["chunks"][0]["reason"] == "HMAC mismatch" and salvage["exact"] is True
    (entry,) = salvage["files"]
    assert entry["path"] == "work/private.img" and entry["from_byte"] is None
    diffs = differing(out / "work" / "private.img", vm_image / "private.img")
    # CBC: the flipped bit garbles its 16-byte block and flips one bit in the next
    assert diffs and diffs[-1] - diffs[0] < 32 and diffs[0] // 16 * 16 + 32 > diffs[-1]
    assert _inside(diffs, entry["ranges"])
    (a, b), = entry["ranges"]
    assert f"work/private.img: UNVERIFIED bytes {a}-{b - 1} (exact" in text
    # the ranges are the chunk's (1 MiB of ciphertext, one block more): not the whole image
    assert MIB <= b - a <= MIB + 32
    _damaged_listed(out / "work" / "private.img", tmp_path)


def test_format4_flipped_bit_is_one_byte(
    make4: MakeBackup, vm_image: Path, tmp_path: Path
) -> None:
    backup = _backup(make4, vm_image, compression=None)
    bad = flipped(backup, "vm7/private.img.001.enc", 300_000, tmp_path / "bad")
    _check_without_salvage(bad, backup, tmp_path / "plain")
    out = tmp_path / "out"
    result, salvage, _ = _salvaged(bad, backup, out)
    assert [c["chunk"] for c in salvage["chunks"]] == ["vm7/private.img.001.enc"]
    assert "scrypt" in salvage["chunks"][0]["reason"]
    diffs = differing(out / "work" / "private.img", vm_image / "private.img")
    assert len(diffs) == 1  # scrypt wrote the whole plaintext: exactly the flipped byte
    (entry,) = salvage["files"]
    assert _inside(diffs, entry["ranges"])
    assert sum(b - a for a, b in entry["ranges"]) == MIB  # one chunk's plaintext
    assert "SALVAGED  work" in result.err  # the file's line says it (stdout under --json)
    _damaged_listed(out / "work" / "private.img", tmp_path)
    with_files = restore(bad, backup, tmp_path / "with-files", "--salvage", "--files")
    assert with_files.code == 4, with_files.err
    assert "DAMAGED   /home/user/big.bin" in with_files.err
    copied = tmp_path / "with-files" / "work" / "files" / "user"
    assert (copied / "small.txt").read_text() == "hello\n"


def test_format4_missing_chunk_is_zeros(
    make4: MakeBackup, vm_image: Path, tmp_path: Path
) -> None:
    backup = _backup(make4, vm_image, compression=None)
    bad = without(backup, "vm7/private.img.001.enc", tmp_path / "bad")
    plain = restore(bad, backup, tmp_path / "plain")
    assert plain.code == 4 and "chunk missing" in plain.err
    assert not (tmp_path / "plain" / "work" / "private.img").exists()
    out = tmp_path / "out"
    _, salvage, _ = _salvaged(bad, backup, out)
    (chunk,) = salvage["chunks"]
    assert chunk["chunk"] == "vm7/private.img.001.enc" and chunk["zero_filled"] is True
    (entry,) = salvage["files"]
    diffs = differing(out / "work" / "private.img", vm_image / "private.img")
    assert diffs and _inside(diffs, entry["ranges"])
    restored = (out / "work" / "private.img").read_bytes()
    assert all(restored[o] == 0 for o in diffs)  # the gap is zeros, nothing else moved


def test_compressed_from_byte_n_on(make: MakeBackup, vm_image: Path, tmp_path: Path) -> None:
    backup = _backup(make, vm_image, compression="gzip")
    bad = flipped(backup, "vm7/private.img.001", 300_000, tmp_path / "bad")
    out = tmp_path / "out"
    _, salvage, text = _salvaged(bad, backup, out)
    assert salvage["exact"] is False
    (entry,) = salvage["files"]
    n = entry["from_byte"]
    assert n is not None and n > 0
    assert f"work/private.img: from byte {n} on, UNVERIFIED" in text
    restored = (out / "work" / "private.img").read_bytes()
    original = (vm_image / "private.img").read_bytes()
    assert restored[:n] == original[:n]  # everything before N is as stored
    if len(restored) < len(original):  # the decompressor stopped at the damage: said
        assert salvage["cut"] and "CUT SHORT" in text
        assert f"work/private.img: {len(restored)} bytes as restored (cut there)" in text


def test_salvage_never_bypasses_the_header(
    make: MakeBackup, vm_image: Path, tmp_path: Path
) -> None:
    backup = _backup(make, vm_image, compression=None)
    wrong = tmp_path / "wrong"
    wrong.write_text("not the passphrase\n")
    result = run_main("restore", backup.path, "-o", tmp_path / "out", "--passphrase-file",
                      wrong, "--salvage")
    assert result.code == 3, result.err
    assert not (tmp_path / "out").exists()


def test_salvage_never_bypasses_qubes_xml(
    make: MakeBackup, vm_image: Path, tmp_path: Path
) -> None:
    backup = _backup(make, vm_image, compression=None)
    bad = flipped(backup, "qubes.xml.000", 100, tmp_path / "bad")
    result = restore(bad, backup, tmp_path / "out", "--salvage")
    assert result.code == 4 and "qubes.xml" in result.err and "HMAC mismatch" in result.err
    assert not (tmp_path / "out" / "work").exists()
    assert not list((tmp_path / "out").glob("SALVAGED*"))


def test_format4_damaged_scrypt_header_is_zeros(
    make4: MakeBackup, vm_image: Path, tmp_path: Path
) -> None:
    """A bit flipped in a chunk's scrypt header: scrypt writes nothing, so the
    chunk's plaintext size (its size less scrypt's 128 bytes) of zeros stands in."""
    backup = _backup(make4, vm_image, compression=None)
    bad = flipped(backup, "vm7/private.img.001.enc", 50, tmp_path / "bad")
    out = tmp_path / "out"
    _, salvage, _ = _salvaged(bad, backup, out)
    (chunk,) = salvage["chunks"]
    assert chunk["reason"].endswith(f"fed as {MIB} zero bytes")
    (entry,) = salvage["files"]
    diffs = differing(out / "work" / "private.img", vm_image / "private.img")
    restored = (out / "work" / "private.img").read_bytes()
    assert diffs and _inside(diffs, entry["ranges"]) and all(restored[o] == 0 for o in diffs)


# -- format 2: each chunk a volume of GNU tar -M ------------------------------------

VOLUME = 1020 * 1024


def test_format2_flipped_bit_differs_only_in_the_damaged_bytes(
    make2: MakeBackup, vm_image: Path, tmp_path: Path
) -> None:
    """Encrypted, uncompressed: one flipped bit in the middle volume.  Without
    --salvage nothing changes; with it the image is placed, differing from the
    original only inside the range told (exactly the volume's bytes)."""
    backup = _backup2(make2, vm_image)
    bad = flipped(backup, "vm7/private.img.001", 500_000, tmp_path / "bad")
    _check_without_salvage(bad, backup, tmp_path / "plain")
    out = tmp_path / "out"
    _, salvage, text = _salvaged(bad, backup, out)
    (chunk,) = salvage["chunks"]
    assert chunk["chunk"] == "vm7/private.img.001" and chunk["reason"] == "HMAC mismatch"
    assert chunk["stream_bytes"] == [VOLUME, 2 * VOLUME] and salvage["exact"] is True
    (entry,) = salvage["files"]
    assert entry["path"] == "work/private.img" and not entry["layout_unverified"]
    (a, b), = entry["ranges"]
    assert b - a == VOLUME - 512  # the volume less its continuation header
    diffs = differing(out / "work" / "private.img", vm_image / "private.img")
    # CBC: the flipped bit garbles its 16-byte block and flips one bit in the next
    assert diffs and diffs[-1] - diffs[0] < 32 and _inside(diffs, entry["ranges"])
    assert f"work/private.img: UNVERIFIED bytes {a}-{b - 1} (exact" in text
    _damaged_listed(out / "work" / "private.img", tmp_path)


def test_format2_missing_volume_is_zeros_and_tar_reads_on(
    make2: MakeBackup, vm_image: Path, tmp_path: Path
) -> None:
    """Unencrypted, uncompressed: a volume cut out whole.  Zeros of a volume's
    size stand in; its continuation header, which tar needs to read the next
    volumes, is rebuilt; everything outside the volume's range is as stored."""
    backup = _backup2(make2, vm_image, encrypted=False)
    member = "appvms/work/private.img.002"
    bad = without(backup, member, tmp_path / "bad")
    data = bad.read_bytes()  # and its .hmac
    start, _, end = spans(bad)[f"{member}.hmac"]
    bad.write_bytes(data[:start] + data[end:])
    plain = restore(bad, backup, tmp_path / "plain")
    assert plain.code == 4 and not (tmp_path / "plain" / "work" / "private.img").exists()
    out = tmp_path / "out"
    _, salvage, text = _salvaged(bad, backup, out)
    (chunk,) = salvage["chunks"]
    assert chunk["chunk"] == member and chunk["zero_filled"] is True
    assert "continuation (M) header is all zeros: rebuilt" in chunk["reason"]
    assert salvage["cut"] is None
    (entry,) = salvage["files"]
    diffs = differing(out / "work" / "private.img", vm_image / "private.img")
    restored = (out / "work" / "private.img").read_bytes()
    assert diffs and _inside(diffs, entry["ranges"]) and all(restored[o] == 0 for o in diffs)
    (a, b), = entry["ranges"]
    assert b - a == VOLUME - 512
    # the volume after the gap (the last) was read: the image is whole
    assert len(restored) == (vm_image / "private.img").stat().st_size
    assert "rebuilt" in text


def test_format2_compressed_volume_derailed(
    make2: MakeBackup, vm_image: Path, tmp_path: Path
) -> None:
    """Unencrypted, gzip per volume: a bit flipped in the deflate stream of the
    middle volume derails gzip before it writes anything.  What it wrote, then
    zeros to the size its trailer states, stand for the volume; the volumes
    after it are verified again, so the range told ends with the volume."""
    backup = _backup2(make2, vm_image, encrypted=False, compressed=True)
    member = "appvms/work/private.img.001"
    bad = flipped(backup, member, 40, tmp_path / "bad")
    out = tmp_path / "out"
    _, salvage, text = _salvaged(bad, backup, out)
    (chunk,) = salvage["chunks"]
    assert chunk["reason"].startswith("HMAC mismatch; gzip exited 1")
    assert "zero bytes fed after them" in chunk["reason"]
    (entry,) = salvage["files"]
    restored = (out / "work" / "private.img").read_bytes()
    original = (vm_image / "private.img").read_bytes()
    assert len(restored) == len(original)
    diffs = differing(out / "work" / "private.img", vm_image / "private.img")
    assert diffs and _inside(diffs, entry["ranges"])
    (a, b), = entry["ranges"]
    assert restored[:a] == original[:a] and restored[b:] == original[b:]
    assert "gzip exited 1" in text


def test_format2_damaged_member_header_cuts_and_says_so(
    make2: MakeBackup, vm_image: Path, tmp_path: Path
) -> None:
    """The first volume's inner tar header is damaged: tar cannot place
    anything, so nothing is placed, and the run says why (exit 4)."""
    backup = _backup2(make2, vm_image, encrypted=False)
    bad = flipped(backup, "appvms/work/private.img.000", 100, tmp_path / "bad")
    result = restore(bad, backup, tmp_path / "out", "--salvage", "--json")
    assert result.code == 4, result.err
    image = _stored2(json.loads(result.out))
    assert image["status"] == "failed" and "damaged header" in image["error"]
    assert not (tmp_path / "out" / "work" / "private.img").exists()


@pytest.mark.parametrize("fmt,damage", [(3, "flip"), (2, "flip"), (4, "flip"), (3, "cut"),
                                        (4, "cut")])
def test_transcript_and_explain_show_the_salvaged_chunk(
    fmt: int, damage: str, make: MakeBackup, make2: MakeBackup, make4: MakeBackup,
    vm_image: Path, tmp_path: Path,
) -> None:
    """--transcript feeds the salvaged chunk without its check (format 4: what
    scrypt wrote although it failed; a missing chunk: zeros of its size), with a
    comment saying why; replaying it puts the same bytes in place.  --explain
    gives the chunk one line, numbered as the format's step that checks it."""
    import subprocess

    from conftest import PASSPHRASE

    if fmt == 3:
        backup, step = _backup(make, vm_image, compression=None), "Step 4"
    elif fmt == 2:
        backup, step = _backup2(make2, vm_image), "Step 3"
    else:
        backup, step = _backup(make4, vm_image, compression=None), "Step 8"
    chunk = "vm7/private.img.001" + (".enc" if fmt == 4 else "")
    if damage == "flip":
        bad, why = flipped(backup, chunk, 500_000, tmp_path / "bad"), "HMAC mismatch"
        why = "scrypt exited 1" if fmt == 4 else why
    else:
        bad, why = without(backup, chunk, tmp_path / "bad"), "missing from the backup"
        if fmt == 3:  # its .hmac too
            data = bad.read_bytes()
            start, _, end = spans(bad)[f"{chunk}.hmac"]
            bad.write_bytes(data[:start] + data[end:])
    out, script = tmp_path / "out", tmp_path / "transcript.sh"
    result = restore(bad, backup, out, "--salvage", "--transcript", script, "--explain")
    assert result.code == 4, result.err
    assert f"* {step} - {chunk}: FAILED its check ({why}" in result.err
    assert "used UNVERIFIED because of --salvage" in result.err
    text = script.read_text()
    block = text.split(f"# chunk {chunk}: it FAILED its check ({why}", 1)[1]
    block = block.split("# chunk vm7/private.img.002", 1)[0]
    assert "used it UNVERIFIED because of --salvage" in block
    assert "feed vm7/private.img.001\n" in block and "check_hmac" not in block
    if fmt != 4:
        assert "check_hmac vm7/private.img.000" in text and "check_hmac vm7/private.img.002" in text
    placed = (out / "work" / "private.img").read_bytes()
    out.rename(tmp_path / "first-run")  # the replay makes the output folder again
    replay = subprocess.run(["sh", str(script)], capture_output=True, text=True,
                            env={**os.environ, "backup_pass": PASSPHRASE}, timeout=300)
    assert replay.returncode == 1 and "qrecover's run ended here" in replay.stderr
    assert (out / "work" / "private.img").read_bytes() == placed  # the same bytes again


def test_rebuilt_continuation_header_numbers_past_8_gib() -> None:
    """A rebuilt M header's size and offset fields hold a 20 GiB image's numbers
    as GNU tar writes them (base-256 from 8 GiB on), and read back."""
    from qrecover.archive.tarheaders import number
    from qrecover.formats.v2.volumes import _number

    for value in (0, 1044480, 8**11 - 1, 8**11, 20 << 30):
        field = _number(value)
        assert len(field) == 12 and number(field) == value
    assert _number(20 << 30)[0] == 0x80 and _number(512) == b"00000001000\0"
