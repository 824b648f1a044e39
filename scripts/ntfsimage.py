#!/usr/bin/env python3
"""Build NTFS images for tests: a Windows qube's ``private.img`` (MBR, one NTFS partition).

``mkntfs`` (ntfs-3g) formats a plain file; the folder given is then copied
in through ntfs-3g's FUSE driver, mounted as root for the moment of the copy
(only this test writer mounts anything, never qrecover), and the image is
wrapped in an MBR table by :func:`ext4image.make_partitioned` with type 0x07,
as Windows partitions a disk.  Stdlib only; never imports qrecover.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import ext4image

__all__ = ["NTFS_TYPE", "NotMountable", "make_ntfs", "make_windows_private"]

NTFS_TYPE = 0x07


class NotMountable(RuntimeError):
    """ntfs-3g could not mount here (not root, or no /dev/fuse)."""


def _program(name: str) -> str:
    found = shutil.which(name, path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin")
    if found is None:
        raise RuntimeError(f"{name} not found: install ntfs-3g")
    return found


def make_ntfs(source: Path, image: Path, size_mb: int) -> Path:
    """An NTFS file system in ``image`` holding a copy of ``source`` (times kept)."""
    with image.open("wb") as f:
        f.truncate(size_mb * 1024 * 1024)
    subprocess.run(
        [_program("mkntfs"), "-q", "-F", "-f", "-L", "windows", str(image)],
        check=True, capture_output=True,
    )
    with tempfile.TemporaryDirectory() as where:
        proc = subprocess.run([_program("ntfs-3g"), str(image), where],
                              capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise NotMountable(proc.stderr.strip() or "ntfs-3g failed")
        try:
            shutil.copytree(source, where, dirs_exist_ok=True, symlinks=True)
            for dirpath, dirnames, filenames in os.walk(source):
                for name in [*dirnames, *filenames]:
                    src = Path(dirpath) / name
                    dst = Path(where) / src.relative_to(source)
                    st = src.lstat()
                    os.utime(dst, ns=(st.st_atime_ns, st.st_mtime_ns), follow_symlinks=False)
        finally:
            subprocess.run(["umount", where], check=True)
    return image


def make_windows_private(source: Path, image: Path, size_mb: int = 8) -> Path:
    """A Windows qube's private.img: an MBR disk whose one NTFS partition holds ``source``."""
    fs = image.with_name(image.name + ".ntfs")
    make_ntfs(source, fs, size_mb)
    ext4image.make_partitioned(image, fs, NTFS_TYPE)
    fs.unlink()
    return image


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("image", type=Path, help="the disk image to write")
    parser.add_argument("--from", dest="source", type=Path, required=True)
    parser.add_argument("--size-mb", type=int, default=8)
    args = parser.parse_args(argv)
    make_windows_private(args.source, args.image, args.size_mb)
    return 0


if __name__ == "__main__":
    sys.exit(main())
