"""``qrecover files`` as a typer command: its options and help; the work is in
:mod:`qrecover.files.command` (an image) and :mod:`qrecover.files.from_backup`
(``--vm``).  Registered on the app by :mod:`qrecover.cli`.  No ``from __future__
import annotations``: typer evaluates the annotations, on 3.8 too."""

from pathlib import Path
from typing import List, Optional  # typer evaluates them: no X | None, list[str] (3.8)

import typer

from qrecover.compat import Annotated
from qrecover.console import Console
from qrecover.errors import UsageError
from qrecover.files.command import files_command
from qrecover.files.from_backup import check_options, files_from_backup
from qrecover.files.listing import DEFAULT_PATH
from qrecover.options import ExplainOpt, OtherCopyOpt, PassFileOpt, TranscriptOpt


def files(
    ctx: typer.Context,
    image: Annotated[
        Path,
        typer.Argument(
            help="A restored image: a private.img (an ext2/3/4 file system), a template's "
            "or standalone VM's root.img (a GPT disk), a Windows qube's private.img (an MBR "
            "disk with NTFS); with --vm, the backup file instead.",
            metavar="IMAGE|BACKUP",
        ),
    ],
    paths: Annotated[
        Optional[List[str]],
        typer.Argument(
            help=f"Folders or files inside the image to copy (default: {DEFAULT_PATH}; "
            "the image's root holds home/, config/ and usrlocal/). Each is copied into DIR "
            "under its last name: /home/user -> DIR/user; / -> DIR/rw.",
            metavar="PATH",
        ),
    ] = None,
    output: Annotated[
        Optional[Path],
        typer.Option("--output", "-o", help="Folder to copy into.", metavar="DIR"),
    ] = None,
    list_only: Annotated[
        bool,
        typer.Option(
            "--list",
            help="Print a whole-disk image's partitions (number, type, offset, size, file "
            "system found), then the tree below each PATH (stdout), instead of copying.",
        ),
    ] = False,
    partition: Annotated[
        Optional[int],
        typer.Option(
            "--partition",
            min=1,
            help="Read this partition of a whole-disk image (default: the first ext2/3/4 "
            "one, else the first NTFS one).",
            metavar="N",
        ),
    ] = None,
    force: Annotated[
        bool,
        typer.Option(
            "--force",
            help="Replace DIR/<name> if it exists (only once the new copy is complete).",
        ),
    ] = False,
    vm: Annotated[
        Optional[str],
        typer.Option(
            "--vm",
            help="Read this VM's image straight from the backup: it is restored into "
            "private scratch inside DIR (sparse; refused with exit 6 if the disk is too "
            "small), the files are copied out, and the image is removed.",
            metavar="NAME",
        ),
    ] = None,
    image_name: Annotated[
        Optional[str],
        typer.Option(
            "--image",
            help="With --vm: which image, 'private' (default: the VM's own files) or "
            "'root' (a template's or standalone VM's system).",
            metavar="private|root",
        ),
    ] = None,
    passphrase_file: PassFileOpt = None,
    other_copy: OtherCopyOpt = None,
    transcript: TranscriptOpt = None,
    explain: ExplainOpt = False,
) -> None:
    """Copy files out of a VM image, without root and without mounting anything.

    Uses e2fsprogs' debugfs read-only (-c) for ext2/3/4, through the partition's
    offset on a whole-disk image, and The Sleuth Kit (fls, icat) for NTFS:
    permissions and times are kept, symbolic links are copied as links and
    never followed, special files (devices, FIFOs, sockets) are skipped with a
    note.
    """
    check_options(vm, image_name, passphrase_file, transcript, explain, bool(other_copy))
    console = ctx.obj
    assert isinstance(console, Console)  # made by qrecover.cli's callback
    if vm is None:
        raise typer.Exit(files_command(image, output, paths or [], list_only, force, partition,
                                       out=console.out))
    if output is None:
        raise UsageError("--output DIR is needed with --vm (the image is restored inside it)")
    raise typer.Exit(
        files_from_backup(
            str(image), vm, image_name or "private", paths or [], output, force, partition,
            list_only, passphrase_file, transcript, explain, console=console,
            other_copies=other_copy or [],
        )
    )
