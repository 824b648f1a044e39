"""The decompression stage: every compression filter Qubes accepts, in one table.

Qubes' restore (qubesadmin/backup/restore.py) accepts ``gzip``, ``bzip2`` and
``xz`` always, and ``lzma``, ``pbzip2``, ``pigz``, ``zstd`` and ``zstdmt`` when
installed; its writer ran the filter as ``tar --use-compress-program=FILTER``
and wrote ``compression-filter=FILTER`` into the header.  R3.2's ``qvm-backup
-Z`` took any command, so a header may also say ``gzip -3`` (qubes-issues
#3865): that is read when the program is in the table and its one argument is
a compression level of that program, which decompression does not need.
Nothing from the header is ever passed on: the argv run is the table's.
"""

from __future__ import annotations

import re
import shutil
from dataclasses import dataclass
from typing import Protocol

from qrecover.runner import Stage, StageResult


@dataclass(frozen=True)
class Filter:
    """One compression filter a header may name."""

    argv: tuple[str, ...]  # what undoes it (the first word is looked for on PATH)
    package: str  # the Debian package that provides argv[0]
    # Programs that write the same bytes from the same stream, fastest first;
    # the first one installed runs instead of argv (empty: argv only).
    faster: tuple[str, ...] = ()
    # The arguments R3.2's -Z could have added that are only a level.
    levels: frozenset[str] = frozenset()


def _levels(low: int, high: int, *words: str) -> frozenset[str]:
    return frozenset({f"-{n}" for n in range(low, high + 1)} | set(words))


# Programs that undo gzip, fastest first.  Each writes the same bytes as
# ``gzip -d`` and checks the stream's CRC-32 and length the same way (a
# corrupted or cut stream: exit status 1).  ``igzip`` (Intel ISA-L, package
# isal) decompresses about 5x faster than gzip; ``pigz -d`` about 1.5x,
# with threads of its own for reading, checking and writing (scripts/bench).
GUNZIPS = ("igzip", "pigz", "gzip")
_GZIP_LEVELS = _levels(1, 9, "--fast", "--best")
_XZ_LEVELS = _levels(0, 9, "--fast", "--best")
_ZSTD_LEVELS = _levels(1, 19)

# Filter -> how it is undone.  pigz writes gzip data, pbzip2 bzip2 data
# (several streams, which bzip2 -d reads in turn), zstdmt (zstd -T0) zstd
# data; lzma is xz's legacy .lzma format.
FILTERS: dict[str, Filter] = {
    "gzip": Filter(("gzip", "-d"), "gzip", GUNZIPS, _GZIP_LEVELS),
    "pigz": Filter(("gzip", "-d"), "gzip", GUNZIPS, _GZIP_LEVELS),
    "bzip2": Filter(("bzip2", "-d"), "bzip2", levels=_GZIP_LEVELS),
    "pbzip2": Filter(("bzip2", "-d"), "bzip2", levels=_GZIP_LEVELS),
    "xz": Filter(("xz", "-d"), "xz-utils", levels=_XZ_LEVELS),
    "lzma": Filter(("xz", "--format=lzma", "-d"), "xz-utils", levels=_XZ_LEVELS),
    "zstd": Filter(("zstd", "-d", "-q"), "zstd", levels=_ZSTD_LEVELS),
    "zstdmt": Filter(("zstd", "-d", "-q"), "zstd", levels=_ZSTD_LEVELS),
}
# What the header's value may look like before it is judged (printable, so
# that the refusal can quote it); its meaning is checked by check_filter.
FILTER_TEXT = re.compile(r"^[ -~]{1,64}$")


def check_filter(value: str) -> str:
    """``PROGRAM`` or ``PROGRAM LEVEL``, normalised; ValueError for anything else."""
    words = value.lower().split(" ")
    program = words[0]
    if program not in FILTERS:
        raise ValueError(
            f"'{value}' is not an allowed compression filter (allowed: {', '.join(FILTERS)})"
        )
    spec = FILTERS[program]
    if len(words) == 1:
        return program
    if len(words) == 2 and words[1] in spec.levels:
        return f"{program} {words[1]}"
    raise ValueError(
        f"'{value}': only a compression level may follow {program} "
        f"(such as {program} -9); refused"
    )


def filter_program(value: str) -> str:
    """The filter's program (``gzip`` of ``gzip -3``)."""
    return value.split(" ")[0]


def pick_gunzip() -> str:
    """The fastest gzip decompressor on PATH (``gzip`` when none is: it is then
    reported missing like any other program)."""
    return next((name for name in GUNZIPS if shutil.which(name)), "gzip")


def pick_outer_gunzip() -> str:
    """The gzip decompressor for a backup compressed as a whole: pigz or gzip
    first, as they write everything they decoded before damage (the chunks in
    it are authenticated one by one, so it is all usable); igzip, measured,
    wrote nothing of a 0.9 MiB stream with one flipped bit."""
    return next((name for name in ("pigz", "gzip", "igzip") if shutil.which(name)), "gzip")


def only_bytes_after_it(result: StageResult) -> bool:
    """gzip's exit 2 after "decompression OK": the whole compressed stream came out,
    and bytes after it (garbage, or zeros of a larger disk) were ignored, as igzip
    and pigz ignore them without a word.  A warning, never damage of the backup."""
    return result.returncode == 2 and "decompression OK" in result.stderr


class Compressed(Protocol):
    @property
    def filter(self) -> str | None: ...


def decompress_stage(header: Compressed, gunzip: str = "gzip") -> Stage | None:
    """``gzip -d`` / ``bzip2 -d`` / ``zstd -d -q`` ...; None for an uncompressed backup.

    ``gunzip``: which program of :data:`GUNZIPS` undoes gzip data (the
    caller's :func:`pick_gunzip`); a backup written with ``pigz`` is gzip data.
    """
    if header.filter is None:
        return None
    spec = FILTERS[filter_program(header.filter)]
    if spec.faster:
        if gunzip not in spec.faster:
            raise ValueError(f"not a gzip decompressor: {gunzip}")
        return Stage((gunzip, "-d"))
    return Stage(spec.argv)
