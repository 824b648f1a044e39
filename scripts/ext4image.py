#!/usr/bin/env python3
"""Build real ext4 images and partitioned disk images for tests, without root.

* :func:`make_ext4` runs ``mkfs.ext4 -d SRC -F IMG SIZE``, which copies a
  folder into a fresh ext4 file system in a plain file (no mount, no root);
* :func:`make_private_tree` writes the folder a Qubes VM's ``private.img``
  holds (it is mounted at ``/rw``: ``home/user/...``, ``config/``,
  ``usrlocal/``) with known content: names with spaces and non-ASCII, a
  symbolic link, nested folders, a file with a distinctive mtime and mode;
* :func:`make_partitioned` writes a disk image with an MBR partition table
  (like a template's ``root.img``) in Python, holding an ext4 partition.

Stdlib only; never imports qrecover (it is an independent fixture writer).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import struct
import subprocess
import sys
import uuid
import zlib
from pathlib import Path

__all__ = [
    "DISTINCT_MODE",
    "DISTINCT_MTIME",
    "PARTITION_OFFSET",
    "add_special_files",
    "debugfs_program",
    "make_ext4",
    "make_gpt",
    "make_hostile",
    "make_partitioned",
    "make_private_tree",
    "make_template_root",
    "mkfs_program",
]

# 1999-12-31 23:59:58 UTC, and a mode no default umask gives.
DISTINCT_MTIME = 946684798
DISTINCT_MODE = 0o640
TREE_MTIME = 1470279173  # 2016-08-04, the R3.2 era
SECTOR = 512
PARTITION_OFFSET = 2048 * SECTOR  # the first partition of a modern MBR disk


def _program(name: str) -> str:
    path = os.environ.get("PATH", "")
    for search in (path, f"{path}:/usr/sbin:/sbin"):
        found = shutil.which(name, path=search)
        if found:
            return found
    raise RuntimeError(f"{name} not found: install e2fsprogs")


def mkfs_program() -> str:
    """mkfs.ext4, looked up on PATH and in the sbin folders (e2fsprogs)."""
    return _program("mkfs.ext4")


def debugfs_program() -> str:
    return _program("debugfs")


def make_ext4(source: Path, image: Path, size_mb: int, label: str = "", features: str = "") -> Path:
    """Copy ``source`` into a new ext4 file system written to ``image``.

    ``-E root_owner`` makes the root folder belong to the caller, as ``-d``
    keeps the owners of the copied files (the caller's, without root).
    """
    argv = [mkfs_program(), "-q", "-F", "-t", "ext4", "-d", str(source)]
    argv += ["-E", f"root_owner={os.getuid()}:{os.getgid()}"]
    if label:
        argv += ["-L", label]
    if features:
        argv += ["-O", features]
    argv += [str(image), f"{size_mb}M"]
    env = {**os.environ, "E2FSPROGS_FAKE_TIME": str(TREE_MTIME)}
    proc = subprocess.run(argv, capture_output=True, env=env, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"mkfs.ext4 failed: {proc.stderr.decode(errors='replace').strip()}")
    return image


def _det(seed: str, size: int) -> bytes:
    return hashlib.shake_256(seed.encode()).digest(size)


def _write(path: Path, data: bytes | str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data.encode() if isinstance(data, str) else data)


def make_private_tree(root: Path, owner: str = "user") -> Path:
    """The content of a VM's private image (its ``/rw``), under ``root``."""
    root.mkdir(parents=True, exist_ok=True)
    home = root / "home" / owner
    _write(home / ".bashrc", "# .bashrc\nexport EDITOR=vi\n")
    _write(home / "Documents" / "Grüße aus Köln.txt", "Grüße - ünïcödé ✓ 日本語\n")
    _write(home / "Documents" / "tax return 2016.pdf", _det("pdf", 70_000))
    _write(home / "Documents" / "deep" / "er" / "still deeper" / "notes.md", "# notes\n" * 50)
    _write(home / "Pictures" / "holiday 'quoted' \"name\".jpg", _det("jpg", 150_000))
    _write(home / "Documents" / "empty file", b"")
    (home / "Downloads").mkdir()
    _write(home / "script.sh", "#!/bin/sh\necho hello\n")
    os.chmod(home / "script.sh", 0o750)
    secret = home / "Documents" / "old secret.txt"
    _write(secret, "written long ago\n")
    os.symlink("Documents/Grüße aus Köln.txt", home / "link to notes")
    os.symlink("../../../../../../etc/passwd", home / "escape-link")
    _write(root / "config" / "rc.local", "#!/bin/sh\n")
    _write(root / "usrlocal" / "bin" / "tool", "#!/bin/sh\n")
    for dirpath, dirnames, filenames in os.walk(root, topdown=False):
        for name in dirnames + filenames:
            os.utime(Path(dirpath) / name, (TREE_MTIME, TREE_MTIME), follow_symlinks=False)
        os.utime(dirpath, (TREE_MTIME, TREE_MTIME))
    os.chmod(secret, DISTINCT_MODE)
    os.utime(secret, (DISTINCT_MTIME, DISTINCT_MTIME))
    return root


def make_partitioned(image: Path, partition: Path, ptype: int = 0x83) -> Path:
    """A disk image with an MBR partition table whose one partition is ``partition``.

    The table is written in Python: one partition (0x83: Linux; 0x07: NTFS,
    as a Windows qube's private.img) starting at sector 2048, as
    fdisk/sfdisk would lay it out.
    """
    data_size = partition.stat().st_size
    sectors = (data_size + SECTOR - 1) // SECTOR
    entry = struct.pack("<B3sB3sII", 0, b"\xfe\xff\xff", ptype, b"\xfe\xff\xff", 2048, sectors)
    mbr = bytearray(SECTOR)
    mbr[440:444] = b"QRCV"  # disk signature
    mbr[446:462] = entry
    mbr[510:512] = b"\x55\xaa"
    with image.open("wb") as out, partition.open("rb") as src:
        out.write(mbr)
        out.seek(PARTITION_OFFSET)
        shutil.copyfileobj(src, out, 1 << 20)
        out.truncate(PARTITION_OFFSET + sectors * SECTOR)
    return image


# GPT partition type GUIDs (UEFI specification), as text.
GPT_EFI = "c12a7328-f81f-11d2-ba4b-00a0c93ec93b"
GPT_BIOS_BOOT = "21686148-6449-6e6f-744e-656564454649"
GPT_LINUX = "0fc63daf-8483-4772-8e79-3d69d8477de4"
GPT_ENTRIES = 128
GPT_ENTRY_SIZE = 128
# Where a template's root.img puts its partitions (in sectors): 1 EFI system,
# 2 BIOS boot, 3 the root file system; kept small here.
TEMPLATE_LAYOUT = ((2048, 2048, GPT_EFI, "EFI System"), (4096, 2048, GPT_BIOS_BOOT, "BIOS boot"))


def _gpt_header(lba: int, other: int, entries_lba: int, last_usable: int, disk_guid: bytes,
                entries_crc: int) -> bytes:
    fields = struct.pack(
        "<8sIIIIQQQQ16sQIII",
        b"EFI PART", 0x00010000, 92, 0, 0, lba, other, 34, last_usable, disk_guid,
        entries_lba, GPT_ENTRIES, GPT_ENTRY_SIZE, entries_crc,
    )
    crc = zlib.crc32(fields)
    return fields[:16] + struct.pack("<I", crc) + fields[20:]


def make_gpt(image: Path, partitions: list[tuple[int, int, str, str]], files: dict[int, Path],
             total_sectors: int | None = None) -> Path:
    """A GPT disk image, written from the UEFI specification in Python.

    ``partitions``: (first sector, sectors, type GUID, name) each; ``files``:
    partition number (from 1) -> a file whose bytes fill that partition.  A
    protective MBR, the primary header and entries, the data, and the backup
    entries and header in the last 33 sectors, as sgdisk/sfdisk write them.
    """
    end = max(first + count for first, count, _t, _n in partitions)
    total = total_sectors or end + 33
    entries = bytearray(GPT_ENTRIES * GPT_ENTRY_SIZE)
    for i, (first, count, kind, name) in enumerate(partitions):
        unique = hashlib.sha256(f"{image.name}-{i}".encode()).digest()[:16]
        entry = struct.pack("<16s16sQQQ72s", uuid.UUID(kind).bytes_le, unique, first,
                            first + count - 1, 0, name.encode("utf-16-le"))
        entries[i * GPT_ENTRY_SIZE : (i + 1) * GPT_ENTRY_SIZE] = entry
    crc = zlib.crc32(bytes(entries))
    guid = hashlib.sha256(image.name.encode()).digest()[:16]
    last_usable = total - 34
    mbr = bytearray(SECTOR)
    mbr[446:462] = struct.pack("<B3sB3sII", 0, b"\x00\x02\x00", 0xEE, b"\xff\xff\xff", 1,
                               min(total - 1, 0xFFFFFFFF))
    mbr[510:512] = b"\x55\xaa"
    with image.open("wb") as out:
        out.write(mbr)
        out.write(_gpt_header(1, total - 1, 2, last_usable, guid, crc).ljust(SECTOR, b"\0"))
        out.write(entries)
        for number, source in files.items():
            first, count, _k, _n = partitions[number - 1]
            if source.stat().st_size > count * SECTOR:
                raise ValueError(f"{source} does not fit partition {number}")
            out.seek(first * SECTOR)
            with source.open("rb") as src:
                shutil.copyfileobj(src, out, 1 << 20)
        out.seek((total - 33) * SECTOR)
        out.write(entries)
        backup = _gpt_header(total - 1, 1, total - 33, last_usable, guid, crc)
        out.write(backup.ljust(SECTOR, b"\0"))
        out.truncate(total * SECTOR)
    return image


def make_template_root(image: Path, root_fs: Path) -> Path:
    """A template's or standalone VM's root.img: EFI, BIOS boot, then ``root_fs`` as partition 3."""
    sectors = (root_fs.stat().st_size + SECTOR - 1) // SECTOR
    layout = [*TEMPLATE_LAYOUT, (6144, sectors, GPT_LINUX, "Root filesystem")]
    return make_gpt(image, layout, {3: root_fs})


def _debugfs_write(image: Path, requests: list[str]) -> None:
    """Change an image in place with ``debugfs -w`` (no root needed)."""
    proc = subprocess.run(
        [debugfs_program(), "-w", "-f", "-", str(image)],
        input="".join(r + "\n" for r in requests).encode(),
        capture_output=True,
        check=False,
    )
    err = [
        ln
        for ln in proc.stderr.decode(errors="replace").splitlines()
        if ln.strip() and not ln.startswith("debugfs ")
    ]
    if proc.returncode != 0 or err:
        raise RuntimeError(f"debugfs -w failed: {err}")


def add_special_files(image: Path, home: str = "/home/user") -> None:
    """A FIFO, a device node, a file owned by uid 1000 and a set-uid file, inside the image.

    mkfs.ext4 -d could only copy device nodes made as root; debugfs makes
    them in the image without root.
    """
    _debugfs_write(
        image,
        [
            # debugfs 1.47.0's mknod links the whole argument as one name into
            # the current folder (a name with '/'), so cd there first.
            f"cd {home}",
            "mknod pipe p",
            "mknod null-device c 1 3",
            f"sif {home}/script.sh uid 1000",
            f"sif {home}/script.sh gid 1000",
            f"sif {home}/.bashrc mode 0104755",
        ],
    )


# Names patched into a directory block by make_hostile: each replaces a
# placeholder of the same length that make_hostile_tree created.
HOSTILE_NAMES = {
    b"P" * 23: b"../../../../escaped.txt",  # climbs out of the copy's folder
    b"link-to-outsidf": b"link-to-outside",  # the same name as the symlink before it
}


def make_hostile(tree: Path, image: Path, size_mb: int = 8) -> Path:
    """An ext4 image whose /home/user holds names rdump would write outside with.

    Names are patched in the raw directory blocks, which is possible because
    the file system is made without metadata checksums (as older ones were).
    """
    home = tree / "home" / "user"
    home.mkdir(parents=True)
    _write(home / "fine.txt", "fine\n")
    os.symlink("../../../../outside-target", home / "link-to-outside")
    for placeholder in HOSTILE_NAMES:
        _write(home / placeholder.decode(), "written by a hostile image\n")
    make_ext4(tree, image, size_mb, features="^metadata_csum")
    data = bytearray(image.read_bytes())
    for placeholder, name in HOSTILE_NAMES.items():
        at = data.find(placeholder)
        if at < 0 or data.find(placeholder, at + 1) >= 0:
            raise RuntimeError(f"placeholder {placeholder!r} not found exactly once")
        data[at : at + len(name)] = name
    image.write_bytes(bytes(data))
    return image


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("image", type=Path, help="the ext4 image to write")
    parser.add_argument("--size-mb", type=int, default=16)
    parser.add_argument(
        "--from",
        dest="source",
        type=Path,
        help="folder to copy (default: a sample VM private tree)",
    )
    parser.add_argument(
        "--partitioned", type=Path, help="also write this MBR disk image holding it"
    )
    args = parser.parse_args(argv)
    source = args.source
    if source is None:
        source = args.image.with_name(args.image.name + ".tree")
        make_private_tree(source)
    make_ext4(source, args.image, args.size_mb)
    if args.partitioned:
        make_partitioned(args.partitioned, args.image)
    return 0


if __name__ == "__main__":
    sys.exit(main())
