"""The programs a run needs, looked for before anything is read past the header."""

from __future__ import annotations

from qrecover.errors import MissingProgramError, ProgramFailed
from qrecover.formats.base import Format
from qrecover.runner import CommandLog, control, which


def check_programs(fmt: Format, gunzip: str, extractor: str, log: CommandLog) -> None:
    """tar (GNU tar: sparse VM images), the extractor, cat, and the format's own."""
    needed = ["tar", extractor, "cat", *fmt.programs(gunzip)]
    for program in needed:
        which(program)
    try:
        version = control("tar", "--version", log=log)
    except ProgramFailed:  # busybox's tar, for one, has no --version
        version = ""
    if "GNU tar" not in version:
        raise MissingProgramError(
            "tar is not GNU tar (needed for sparse VM images)",
            hint="install GNU tar (package 'tar') and put it first on PATH",
        )
    fmt.check_programs(log)
