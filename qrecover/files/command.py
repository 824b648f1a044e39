"""``qrecover files`` and ``restore --files`` as plain functions behind typer.

Each returns the exit code; errors that stop the whole command are raised
as :class:`QrecoverError` for the CLI's one handler.  Lines for the user:
``COPIED``/``FAILED``/``FILES`` on stdout, notes and failures on stderr.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

from qrecover.errors import EXIT_BACKUP, EXIT_OK, EXIT_OUTPUT, QrecoverError, UsageError
from qrecover.files.copy import CopyResult, FilesRequest, copy_files, list_trees
from qrecover.files.damaged import name_damaged
from qrecover.files.image import find_volume, image_table, table_lines
from qrecover.files.listing import DEFAULT_PATH, PathNotFound, show
from qrecover.messages import err
from qrecover.output import first_symlink
from qrecover.units import human_bytes

if TYPE_CHECKING:
    from qrecover.report import Report


def _say(out: TextIO, line: str = "") -> None:
    out.write(line + "\n")
    out.flush()


def print_copy(result: CopyResult, out: TextIO) -> None:
    """One PATH done: its notes on stderr, ``COPIED`` or ``FAILED`` on ``out``."""
    for skipped in result.skipped:
        err(f"note: skipped special file {skipped}: not copied")
    if result.ok:
        _say(
            out,
            f"COPIED    {show(result.path)} -> {result.place} ({result.files} file(s), "
            f"{result.folders} folder(s), {result.links} symlink(s), {human_bytes(result.bytes)})",
        )
    else:
        kept = f" (kept as {result.place})" if result.place else ""
        _say(out, f"FAILED    {show(result.path)}: {result.error}{kept}")


def restore_files(report: Report, output: Path, force: bool, *, out: TextIO) -> int:
    """After a restore: each restored VM's home files into DIR/<vm>/files/."""
    failed: list[str] = []
    trouble = False
    for entity in report.selected:
        if entity.name == "dom0":
            continue
        image = output / entity.dest / "private.img"
        results = [f for f in report.files if f.owner == entity.name]
        if not results or not all(f.ok for f in results):
            if results:
                err(f"{entity.name}: not restored completely; its files are not copied")
            continue
        # What the backup restored is data: private.img or files/ could be
        # symbolic links it made. Never read or write through one.
        link = first_symlink(output, Path(entity.dest) / "files") or first_symlink(
            output, Path(entity.dest) / "private.img"
        )
        if link is not None:
            message = f"{link} is a symbolic link (made by the backup?); not followed"
            _say(out, f"FAILED    {entity.name}: {message}")
            failed.append(f"{entity.name}: {message}")
            continue
        if not image.is_file():
            continue
        _say(out, f"FILES     {entity.name:<16} {image}:{DEFAULT_PATH}")
        if any(f.salvage is not None for f in results):
            name_damaged(image)  # the restore's exit is 4 already
        try:
            copied = copy_files(
                FilesRequest(image, (DEFAULT_PATH,), image.parent / "files", force),
                lambda result: print_copy(result, out),
            )
        except PathNotFound:
            err(f"note: {entity.name}: no {DEFAULT_PATH} in its private.img; nothing to copy")
            continue
        except QrecoverError as exc:
            hint = f" ({exc.hint})" if exc.hint else ""
            _say(out, f"FAILED    {entity.name}: {exc.message}{hint}")
            failed.append(f"{entity.name}: {exc.message}")
            trouble = trouble or exc.exit_code == EXIT_OUTPUT
            continue
        for result in copied:
            if not result.ok:
                failed.append(f"{entity.name}: {result.error}")
                trouble = trouble or result.output_trouble
    if failed:
        err(f"copying files out of {len(failed)} image(s) failed:")
        for failure in failed:
            err(f"  {failure}")
        return EXIT_OUTPUT if trouble else EXIT_BACKUP
    return EXIT_OK


def files_command(
    image: Path,
    output: Path | None,
    paths: Sequence[str],
    list_only: bool,
    force: bool,
    partition: int | None = None,
    *,
    out: TextIO,
) -> int:
    """``qrecover files``: copy each PATH of ``image`` into ``output``, or list it."""
    request = FilesRequest(image, tuple(paths) or (DEFAULT_PATH,), output, force, partition)
    if output is None and not list_only:
        raise UsageError("--output DIR is needed to copy files (or use --list)")
    damaged = name_damaged(image) if image.is_file() else 0  # restore --salvage's record
    if list_only:
        code = list_files(request, out, bool(paths))
        return EXIT_BACKUP if damaged and code == EXIT_OK else code
    results = copy_files(request, lambda result: print_copy(result, out))
    failures = [r for r in results if not r.ok]
    if not failures:
        return EXIT_BACKUP if damaged else EXIT_OK
    err(f"{len(failures)} of {len(results)} PATH(s) failed:")
    for failure in failures:
        err(f"  {show(failure.path)}: {failure.error}")
    return EXIT_OUTPUT if any(r.output_trouble for r in failures) else EXIT_BACKUP


def list_partitions(request: FilesRequest, out: TextIO, paths_given: bool) -> bool:
    """A whole-disk image's partitions (stdout), the one read marked; False if it has none.

    Its notes go to stderr; without a PATH, how to list a partition's files too.
    """
    table = image_table(request.image)
    if table is None:
        return False
    chosen, error = None, None
    try:
        chosen = find_volume(request.image, request.partition).partition
    except QrecoverError as exc:
        error = exc
    for line in table_lines(request.image, table, chosen):
        _say(out, line)
    for note in table.notes:
        err(f"note: {request.image}: {note}")
    if error is not None and (paths_given or request.partition is not None):
        raise error
    if not paths_given:
        number = chosen.number if chosen is not None else "N"
        err(f"note: to list a partition's files: qrecover files {request.image} "
            f"--partition {number} --list /")
    return True


def list_files(request: FilesRequest, out: TextIO, paths_given: bool = True) -> int:
    """``qrecover files --list``: the tree below each PATH on stdout, problems on stderr.

    A whole-disk image's partition table comes first; without a PATH it is all.
    """
    if list_partitions(request, out, paths_given):
        if not paths_given:
            return EXIT_OK
        _say(out)
    code = EXIT_OK
    for tree in list_trees(request):
        # Sorted by path, so each folder's contents follow it.
        for entry in sorted(tree.entries, key=lambda e: os.fsencode(e.image_path).split(b"/")):
            mode = stat.filemode(entry.mode)
            size = "-" if entry.kind == "dir" else str(entry.size)
            suffix = "/" if entry.kind == "dir" and entry.image_path != "/" else ""
            out.write(f"{mode} {size:>12}  {show(entry.image_path)}{suffix}\n")
        out.flush()
        for problem in tree.problems:
            err(f"problem: {problem}")
            code = EXIT_BACKUP
    return code
