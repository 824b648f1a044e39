"""What the engine did, step by step: plain data, no rendering.

The engine emits one event per step of the recovery procedure as it
happens, through its run's :class:`~qrecover.context.RunContext`: one
stream, which every listener of the run reads.  The renderers
(qrecover.render: ``--transcript``, ``--explain``) turn them into words,
asking the run's format (qrecover.formats) for what differs; the per-file
lines and the live line (qrecover.file_lines, qrecover.progress) follow the
pass's progress in them.  The
commands a ``-v`` log shows are logged where they run (qrecover.runner) or
where they are done in-process (the format's HMAC checks), not here.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Union

from qrecover.inventory import Entity, Inventory
from qrecover.runner import Stage

if TYPE_CHECKING:
    from qrecover.formats.base import Format
    from qrecover.report import FileResult

class Mode(str, enum.Enum):
    """What a run does with the backup: each command's own name."""

    INFO = "info"  # qrecover info: the header and qubes.xml, no stored file read
    SCRIPT = "script"  # qrecover script: the same, for the plan the script prints
    KIT = "kit"  # qrecover kit: the same, for RECOVERY.txt
    VERIFY = "verify"  # every stored file read, checked and listed, nothing written
    RESTORE = "restore"  # ... and extracted into DIR

    def __str__(self) -> str:  # its word, on every Python (3.12 changed mixed-in enums)
        return self.value

    @property
    def plans_only(self) -> bool:
        """Stops once the plan is made: reads no stored file but qubes.xml."""
        return self in (Mode.INFO, Mode.SCRIPT, Mode.KIT)

    @property
    def done_word(self) -> str:
        """What became of a good stored file: ``verified`` or ``restored``."""
        return "restored" if self is Mode.RESTORE else "verified"


class SinkKind(str, enum.Enum):
    """Where a stored file's inner archive goes (qrecover.plan.Sink)."""

    CAPTURE = "capture"  # kept whole in memory: qubes.xml
    LIST = "list"  # listed (tar -t): verify, and what a restore does not write
    EXTRACT = "extract"  # extracted into a private staging folder, then placed

    def __str__(self) -> str:  # its word, on every Python (3.12 changed mixed-in enums)
        return self.value


@dataclass(frozen=True)
class HeaderVerified:
    """The header is authenticated and parsed: ``fmt`` is the format that runs."""

    fmt: Format


@dataclass(frozen=True)
class InventoryRead:
    """qubes.xml read: the VMs in the backup and those selected."""

    inventory: Inventory
    selected: tuple[Entity, ...]


@dataclass(frozen=True)
class ChunkChecked:
    """The format's per-chunk check ran on ``member``: passed (``error`` None,
    and the chunk goes on), or failed, and nothing of it was used."""

    member: str
    size: int
    error: str | None = None


@dataclass(frozen=True)
class ChunkBorrowed:
    """BACKUP's ``member`` was missing or bad (``problem``); it was taken from
    the other copy ``copy`` (``command``: how), where the format's check passed."""

    member: str
    size: int
    copy: str
    command: str
    problem: str


@dataclass(frozen=True)
class PipelineStarted:
    """One stored file's pipeline (decrypt | decompress | untar, as the format says)."""

    stored: str
    owner: str
    stages: tuple[Stage, ...]
    kind: SinkKind
    staging: Path | None = None  # the private folder tar extracts into
    folder: str = ""  # output-relative folder the extracted entries go to
    placeholder: bool = False  # R4.3's vmN/empty: restored as the empty folder


@dataclass(frozen=True)
class ChunkSalvaged:
    """restore --salvage: ``member`` failed its check (``reason``) and is fed
    all the same (``zero_filled``: it was missing, and ``size`` zero bytes
    stand for it)."""

    stored: str
    member: str
    size: int
    reason: str
    zero_filled: bool = False


@dataclass(frozen=True)
class ChunkFed:
    """A checked chunk is being fed into its stored file's pipeline."""

    stored: str
    member: str
    path: Path


@dataclass(frozen=True)
class FileFinished:
    """A stored file is done: restored (or listed), or failed."""

    stored: str
    owner: str
    error: str | None
    places: tuple[Path, ...] = ()
    restored_bytes: int = 0


@dataclass(frozen=True)
class QubesXmlWritten:
    path: Path


# The pass's progress: what the live line and the per-file lines show
# (qrecover.file_lines.Printer); the engine tells them through its RunContext.


@dataclass(frozen=True)
class FileStarted:
    """The pass reached a stored file's first chunk."""

    stored: str
    owner: str


@dataclass(frozen=True)
class DataRead:
    """``nbytes`` of the backup read (a chunk read and checked, or skipped by --resume)."""

    stored: str
    nbytes: int


@dataclass(frozen=True)
class ChunksInFlight:
    """Format 4: how many chunks' scrypt dec run now."""

    chunks: int


@dataclass(frozen=True)
class FileDone:
    """A stored file is done, and this is all that became of it."""

    result: FileResult


# typing's Union and Callable: runtime aliases, which Python 3.8 cannot subscript otherwise
Event = Union[
    HeaderVerified,
    InventoryRead,
    ChunkChecked,
    ChunkSalvaged,
    ChunkBorrowed,
    PipelineStarted,
    ChunkFed,
    FileFinished,
    QubesXmlWritten,
    FileStarted,
    DataRead,
    ChunksInFlight,
    FileDone,
]
EventListener = Callable[[Event], None]


def about(stored: str, error: str) -> str:
    """``STORED: what went wrong``, naming the stored file once (most errors
    already start with it)."""
    return error if error.startswith(f"{stored}:") else f"{stored}: {error}"
