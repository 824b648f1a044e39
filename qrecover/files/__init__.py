"""The stage after extraction: the user's files out of a restored VM image.

The recovery page ends with ``sudo mount -o loop private.img``: root, and a
kernel mount of a file system from a backup that may come from a compromised
machine.  Instead, the image is read as a plain file, in user space,
read-only, and nothing is ever mounted:

1. what the image holds is found in Python first
   (:mod:`qrecover.files.image`): an ext2/3/4 or NTFS file system, or a
   whole disk whose GPT or MBR partition table is parsed there (bounded
   reads) to read one partition through its byte offset; anything else
   gets a message saying what it is;
2. the tree below each PATH is listed a folder level at a time, by e2fsprogs'
   ``debugfs -c`` (``ls -p <INODE>``; ``IMAGE?offset=N`` for a partition:
   :mod:`qrecover.files.debugfs`) or, for NTFS, The Sleuth Kit's ``fls``
   (:mod:`qrecover.files.ntfs`), and every name is checked
   (:mod:`qrecover.files.listing`): a damaged or crafted name means nothing
   is copied;
3. the tree is copied into a private staging folder inside the output folder
   (``rdump <INODE> .``, or ``icat`` per file for NTFS); the staged tree is
   compared with the listing, set-uid/set-gid bits are dropped, and the tree
   is moved into place, or kept as ``NAME.partial`` if anything failed
   (:mod:`qrecover.files.copy`).

:mod:`qrecover.files.command` holds ``qrecover files IMAGE`` and ``restore
--files``, :mod:`qrecover.files.from_backup` ``qrecover files BACKUP --vm
NAME`` (the image restored by the restore engine into scratch, then read).
The modules import each other in that order only: partitions, image, debugfs, ntfs,
listing, copy, command, from_backup.
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
from qrecover.files.image import check_image, find_volume, read_partitions
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
    "find_volume",
    "list_trees",
    "open_image",
    "parse_ls",
    "printf_argv",
    "read_partitions",
    "show",
    "split_batch",
]
