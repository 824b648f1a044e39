"""``qrecover files BACKUP --vm NAME [PATH...] --output DIR``: files straight from a backup.

The VM's image is restored by the restore engine itself (the same pass as
``qrecover restore --vm NAME``: every chunk authenticated before anything of
it is decrypted), told to restore that one stored file only
(:attr:`Request.only`; an R2-R3.2 template is stored as one archive of its
whole folder, which is then restored whole).  It lands, sparse, in a private
scratch folder made inside DIR (``DIR/.qrecover-image-XXXXXXXX``, mode 0700),
so that the space it needs is DIR's disk's, checked against the size
qubes.xml gives for the VM before any of its data is read: too little free
space stops the run with exit 6 before anything is restored.  The files are
then copied out of the image as ``qrecover files IMAGE`` does, and the
scratch folder with the image is removed, whatever happened, signals too.
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

from qrecover.commands import PassOptions, Reading, _finish, _run, _showing
from qrecover.console import Console
from qrecover.errors import BackupError, DiskFull, OutputError, UsageError, WouldOverwrite
from qrecover.events import InventoryRead, Mode
from qrecover.files.command import files_command
from qrecover.files.copy import _force_rmtree
from qrecover.files.debugfs import find_debugfs
from qrecover.files.listing import DEFAULT_PATH, dest_name
from qrecover.inventory import Entity
from qrecover.output import Output, first_symlink
from qrecover.report import Request
from qrecover.units import human_bytes

IMAGES = {"private": "private.img", "root": "root.img"}
SCRATCH_PREFIX = ".qrecover-image-"


class _SpaceCheck:
    """Says what the image will take, and refuses when DIR's disk cannot hold it."""

    def __init__(self, scratch: Path, image: str, console: Console) -> None:
        self.console = console
        self.scratch = scratch
        self.image = image
        self.entity: Entity | None = None

    def __call__(self, event: object) -> None:
        """A listener of the run: told when qubes.xml is read, before any VM data is."""
        if not isinstance(event, InventoryRead):
            return
        (entity,) = event.selected
        self.entity = entity
        free = shutil.disk_usage(self.scratch).free
        where = f"private scratch in {self.scratch.parent}"
        if entity.size <= 0:
            self.console.say(
                f"IMAGE     {entity.name}: restoring its {self.image} into {where} "
                f"(qubes.xml gives no size; {human_bytes(free)} free); removed when done"
            )
            return
        self.console.say(
            f"IMAGE     {entity.name}: restoring its {self.image} into {where}: needs up to "
            f"{human_bytes(entity.size)} (qubes.xml's size of the VM), {human_bytes(free)} "
            "free; removed when done"
        )
        if entity.size > free:
            raise DiskFull(
                f"{self.scratch.parent}: {human_bytes(free)} free, but {entity.name}'s "
                f"{self.image} may need up to {human_bytes(entity.size)}; nothing was restored",
                hint="choose an --output on a disk with more free space",
            )


def files_from_backup(
    backup: str,
    vm: str,
    image: str,
    paths: Sequence[str],
    output: Path,
    force: bool,
    partition: int | None,
    list_only: bool,
    passphrase_file: Path | None,
    transcript: Path | None = None,
    explain: bool = False,
    *,
    console: Console,
    other_copies: Sequence[str] = (),
) -> int:
    name = IMAGES[image]
    find_debugfs()  # missing: stop now, not after restoring the image
    out = Output(output, force)
    out.prepare()
    wanted = [dest_name(p) for p in (paths or (DEFAULT_PATH,))]
    if not list_only and not force and (existing := out.conflicts(wanted)):
        raise WouldOverwrite(
            f"would overwrite {existing[0]}", hint="choose another --output, or use --force"
        )
    try:
        scratch = Path(tempfile.mkdtemp(prefix=SCRATCH_PREFIX, dir=out.root))
    except OSError as exc:
        raise OutputError(f"{out.root}: cannot create a scratch folder ({exc.strerror})") from None
    try:
        check = _SpaceCheck(scratch, name, console)
        checks = PassOptions(
            reading=Reading(backup=(backup,), passphrase_file=passphrase_file, vms=(vm,)),
            transcript=transcript, explain=explain, other_copies=tuple(other_copies),
        )
        request = Request(Mode.RESTORE, (vm,), scratch, only=(name,),
                          other_copies=tuple(other_copies))
        with _showing(console, Mode.RESTORE, checks, scratch) as shown:
            report, elapsed = _run(console, checks.reading, request, [*shown.listeners, check])
            shown.finished(report)
        if not report.ok:
            return _finish(console, Mode.RESTORE, report, elapsed)
        entity = check.entity
        assert entity is not None
        restored = scratch / entity.dest / name
        # What the backup restored is data: never read through a link it made.
        link = first_symlink(scratch, Path(entity.dest) / name)
        if link is not None:
            raise BackupError(f"{vm}: its {name} was restored as a symbolic link; not followed")
        if not restored.is_file():
            held = ", ".join(f.stored for f in report.files) or "nothing"
            raise BackupError(
                f"{vm}: the backup holds no {name} for it (it holds: {held})",
                hint="a template or standalone VM also has --image root" if image == "private"
                else "only templates and standalone VMs have a root.img",
            )
        return files_command(restored, output, paths, list_only, force, partition,
                             out=console.out)
    finally:
        _force_rmtree(scratch)
        if out.created:
            with contextlib.suppress(OSError):
                out.root.rmdir()  # only if we made it and nothing landed


def check_options(vm: str | None, image: str | None, passphrase_file: Path | None,
                  transcript: Path | None, explain: bool, other_copy: bool = False) -> None:
    """The backup's options make sense only with --vm."""
    if vm is not None:
        if image is not None and image not in IMAGES:
            raise UsageError(f"--image {image}: choose private or root")
        return
    given = [opt for opt, value in (("--image", image), ("--passphrase-file", passphrase_file),
                                    ("--transcript", transcript)) if value is not None]
    given += ["--explain"] if explain else []
    given += ["--other-copy"] if other_copy else []
    if given:
        raise UsageError(f"{given[0]} reads a backup: give --vm NAME with the BACKUP")


__all__ = ["IMAGES", "check_options", "files_from_backup"]
