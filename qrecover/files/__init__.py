"""The stage after extraction: the user's files out of a restored ``private.img``.

The recovery page ends with ``sudo mount -o loop private.img``: root, and a
kernel mount of a file system from a backup that may come from a compromised
machine.  Instead, e2fsprogs' ``debugfs`` reads the image as a plain file, in
user space, read-only (``-c``: catastrophic mode, which opens the file
system read-only and does not even read the bitmaps):

1. the image's type is checked in Python first (ext2/3/4 superblock magic;
   a partition table or another format gets a message saying what it is):
   :mod:`qrecover.files.image`;
2. the tree below each PATH is listed with ``ls -p <INODE>``, a directory
   level per ``debugfs`` run (:mod:`qrecover.files.debugfs` builds the
   requests, runs them and parses the answers), and every name is checked
   (:mod:`qrecover.files.listing`): a damaged or crafted name means nothing
   is copied;
3. ``rdump <INODE> .`` then copies the tree into a private staging folder
   inside the output folder; the staged tree is compared with the listing,
   set-uid/set-gid bits are dropped, and the tree is moved into place, or
   kept as ``NAME.partial`` if anything failed (:mod:`qrecover.files.copy`).

:mod:`qrecover.files.command` holds ``qrecover files`` and ``restore
--files`` as plain functions behind the typer commands.  The modules import
each other in that order only: image, debugfs, listing, copy, command.
"""

from __future__ import annotations

from qrecover.files.copy import CopyResult, FilesRequest, copy_files, list_trees, open_image
from qrecover.files.debugfs import (
    debugfs_batch_argv,
    debugfs_ls_argv,
    debugfs_rdump_argv,
    find_debugfs,
    parse_ls,
    printf_argv,
    split_batch,
)
from qrecover.files.image import check_image, read_partitions
from qrecover.files.listing import DEFAULT_PATH, Entry, PathNotFound, Tree, dest_name, show

__all__ = [
    "DEFAULT_PATH",
    "CopyResult",
    "Entry",
    "FilesRequest",
    "PathNotFound",
    "Tree",
    "check_image",
    "copy_files",
    "debugfs_batch_argv",
    "debugfs_ls_argv",
    "debugfs_rdump_argv",
    "dest_name",
    "find_debugfs",
    "list_trees",
    "open_image",
    "parse_ls",
    "printf_argv",
    "read_partitions",
    "show",
    "split_batch",
]
