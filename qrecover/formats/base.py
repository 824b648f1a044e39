"""What a backup format answers, so that the engine and the renderers need not know it.

A format is one object (``Format``), made by authenticating the header, and
its words (``Words``, the renderers' side: the recovery page's procedure,
declared once with its step numbers (qrecover.procedure), sh fragments,
narration; each format's words class extends :class:`PageWords`).  The
engine (qrecover.engine) asks the format:

- ``programs`` / ``check_programs``: what must be installed, checked up front;
- ``owns_chunk``: whether a chunk name has this format's shape;
- ``read_chunk``: take one chunk off the stream (with what belongs to it,
  such as format 3's ``.hmac``) into private scratch, returning a
  :class:`PendingChunk`;
- ``PendingChunk.complete``: the per-chunk step (format 3: nothing left, the
  HMAC was computed while reading; format 4: ``scrypt dec``), giving a
  :class:`ChunkOutcome`: a plaintext to feed, or why not;
- ``stream_stages``: what the fed chunks of a stored file go through before
  tar (``openssl enc -d | gzip -d``, or ``gzip -d``).

How each format fills these in:

- Format 3: ``read_chunk`` copies the chunk and its ``.hmac`` into scratch,
  computing the HMAC while copying; nothing is left for ``complete``;
  ``stream_stages`` is ``openssl enc -d`` and the decompressor.
- Format 4 (qrecover.formats.v4): ``complete`` is ``scrypt dec``, which
  authenticates and decrypts at once; ``chunk_works`` runs several at once
  in a bounded pool and hands outcomes back strictly in chunk order, across
  stored files; its ``Recognition.head_start`` begins qubes.xml's key
  derivation while the header's runs.
- Format 2 (qrecover.formats.v2): the chunk and its ``.hmac`` as in format 3;
  ``complete`` runs the per-chunk ``openssl enc -d`` or ``gzip -d`` into
  scratch; ``stream_stages`` is empty and ``own_feed`` gives the stored
  file's ``tar -M``, fed each plaintext as one volume.
- Format 1 (qrecover.formats.v1): a folder, no header.  ``formats.detect``
  finds it and its ``members`` stand for the outer archive; ``read_chunk``
  copies nothing and checks nothing (``checked`` stays False), and its
  outcome's ``feeder`` (``tar -c``) takes the place of ``cat``, so the guard
  and ``tar -x`` see an inner archive as for the other formats.  Its verdict
  says that nothing was authenticated.

``read_chunk`` is the only step that touches the stream, so it stays
sequential; ``complete`` reads and writes only its own scratch files and
returns plain data (no events, no shared state), so scratch is bounded by the
pool's size (:class:`ChunkWorks`; the formats but 4 complete each chunk
:class:`InOrder`).
"""

from __future__ import annotations

import typing
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Generic, Protocol, TypeVar, runtime_checkable

from qrecover.archive.members import ChunkName, Member
from qrecover.errors import QrecoverError
from qrecover.header import Header
from qrecover.hmacs import Digest
from qrecover.procedure import Procedure, Step
from qrecover.runner import CommandLog, Pipeline, Stage
from qrecover.stages.sparse import Extent

if TYPE_CHECKING:
    from qrecover.inventory import Entity, Inventory


@dataclass
class ChunkOutcome:
    """What became of one chunk: a plaintext to feed, or why not.

    ``checked``: the format's check ran on the chunk, so renderers tell it
    (with ``reason`` when it failed); a chunk that could not even be checked
    (its ``.hmac`` missing) is only a failure.
    """

    plain: Path | None = None
    owned: bool = False  # the plaintext is a scratch file, deleted once fed
    error: QrecoverError | None = None
    checked: bool = False
    reason: str | None = None
    mac: str = ""  # the HMAC that authenticated it (format 3), part of a backup's identity
    feeder: Stage | None = None  # what writes the chunk into the pipeline, if not cat PATH
    # restore --salvage only: why the chunk could not be authenticated; its
    # ``plain`` is fed on all the same (qrecover.salvage)
    unverified: str | None = None


class PendingChunk(Protocol):
    """A chunk read off the stream, whose per-chunk step is still to run."""

    def complete(self) -> ChunkOutcome: ...


@dataclass(frozen=True)
class Completed:
    """A chunk's outcome, handed back by :class:`ChunkWorks` in chunk order."""

    member: str
    size: int
    outcome: ChunkOutcome


class ChunkWorks(Protocol):
    """Where the engine runs the per-chunk step: in order, perhaps several at once.

    The engine calls :meth:`admit` before it reads the next chunk off the
    stream (so scratch stays bounded), :meth:`submit` once it has, and
    :meth:`drain` at the end of each stored file; every call returns the
    outcomes that are ready, strictly in chunk order, each exactly once.
    :meth:`close` stops every child and removes the works' scratch.
    """

    # Set by the engine when other copies may replace a failed chunk: the
    # chunks after a failed one are still completed (not cancelled).
    keep_going: bool

    @property
    def in_flight(self) -> int: ...

    def admit(self) -> list[Completed]: ...

    def submit(self, pending: PendingChunk, member: str, size: int) -> list[Completed]: ...

    def drain(self) -> list[Completed]: ...

    def close(self) -> None: ...


class InOrder:
    """One chunk at a time: each is completed as soon as it is submitted."""

    in_flight = 0
    keep_going = False

    def admit(self) -> list[Completed]:
        return []

    def submit(self, pending: PendingChunk, member: str, size: int) -> list[Completed]:
        return [Completed(member, size, pending.complete())]

    def drain(self) -> list[Completed]:
        return []

    def close(self) -> None:
        pass


class ChunkStore(Protocol):
    """What the engine lends a format to read one chunk of one stored file."""

    @property
    def passphrase(self) -> str: ...

    @property
    def log(self) -> CommandLog: ...

    @property
    def salvage(self) -> bool:
        """restore --salvage: a chunk that fails its check is used anyway."""
        ...

    def copy(self, member: Member, digest: Digest | None) -> tuple[Path, bool, str]:
        """The chunk in private scratch (or in place, for a folder and no digest),
        whether it is ours to delete, and its HMAC's hex digest under ``digest``;
        raises Truncated."""
        ...

    def scratch_file(self) -> Path: ...

    def drop(self, path: Path, owned: bool) -> None: ...


class MemberStream(Protocol):
    """The outer archive's members, one at a time."""

    def peek(self) -> Member | None: ...

    def take(self) -> Member | None: ...


class OwnFeed(Protocol):
    """A stored file's extraction that the format feeds itself, each plaintext
    whole (format 2: one volume of ``tar -M`` each; qrecover.formats.v2.volumes),
    instead of ``cat`` feeding the chunks into one stream."""

    pipeline: Pipeline  # started with the first plaintext
    shown: tuple[Stage, ...]  # what a --transcript replays instead

    @property
    def rebuilt(self) -> str | None:
        """--salvage: what was rebuilt to feed the last (unverified) plaintext."""
        ...

    def feed(self, path: Path, owned: bool, member: str, salvaged: bool = False) -> bool:
        """Give it one plaintext; True once the pipeline was started by it."""
        ...

    def close(self) -> QrecoverError | None: ...

    def kill(self) -> None: ...


class Format(Protocol):
    """One backup format version, once its header is authenticated."""

    version: int
    written_by: str  # "Qubes R2-R3.2"
    verdict: str  # what a clean run says it checked: "all HMACs matched"
    # Each fed plaintext is one volume of a GNU multi-volume tar (format 2),
    # not a piece of one stream: tar -M reads them in turn.  Nothing outside
    # qrecover/formats/ branches on it (tests/test_layout.py): see own_feed.
    multi_volume: bool

    @property
    def header(self) -> Header: ...

    @property
    def authenticated_with(self) -> str: ...

    def programs(self, gunzip: str = "gzip") -> list[str]: ...

    def check_programs(self, log: CommandLog) -> None: ...

    def stream_stages(self, gunzip: str = "gzip") -> list[Stage]: ...

    def owns_chunk(self, name: ChunkName) -> bool: ...

    def identity(self, xml: bytes, xml_macs: Sequence[str]) -> bytes:
        """What, beside the raw header, tells this backup from any other
        (restore --resume; qrecover.resume.identity)."""
        ...

    def read_chunk(
        self, store: ChunkStore, member: Member, name: ChunkName, members: MemberStream
    ) -> PendingChunk: ...

    def chunk_works(
        self, passphrase: str, scratch: Path, log: CommandLog, jobs: int | None
    ) -> ChunkWorks:
        """Where this run's per-chunk steps run (``jobs``: the user's --jobs)."""
        ...

    def extract_with(self, chosen: str) -> str:
        """The extractor that runs where ``chosen`` (bsdtar or GNU tar) was picked."""
        ...

    def own_feed(self, tar: Stage, scratch: Path, limit: int | None, stored: str,
                 stdout: IO[bytes] | None, log: CommandLog,
                 layout: list[Extent] | None) -> OwnFeed | None:
        """The extraction of ``stored`` fed by the format itself, or None: its
        chunks are fed by ``cat`` into one stream (``stream_stages``, then ``tar``)."""
        ...


class StreamFed:
    """What a format whose chunks of a stored file make one stream answers
    (formats 1, 3 and 4): the extractor picked runs, and ``cat`` feeds it."""

    multi_volume = False

    def extract_with(self, chosen: str) -> str:
        return chosen

    def own_feed(self, tar: Stage, scratch: Path, limit: int | None, stored: str,
                 stdout: IO[bytes] | None, log: CommandLog,
                 layout: list[Extent] | None) -> OwnFeed | None:
        return None


class Started(Protocol):
    """Work a format started before its header authenticated (format 4: qubes.xml's
    key derivation); ``close`` stops it and removes what it wrote."""

    def close(self) -> None: ...


# (the member after the header, header, .hmac, passphrase, --jobs) -> the work begun;
# typing's Callable and Optional: a runtime alias, which CPython 3.8 must subscript
HeadStart = typing.Callable[[Member, bytes, bytes, str, typing.Optional[int]],
                            typing.Optional[Started]]


@dataclass(frozen=True)
class Recognition:
    """How a format is recognised, before anything of it is authenticated
    (qrecover.formats.detect, in the registry's order); each way is None
    where the format is not recognised that way."""

    version: int
    # (backup-header, backup-header.hmac), neither yet trusted: whether this
    # format authenticates them, where no format before it in the registry did
    header: Callable[[bytes, bytes], bool] | None = None
    # authenticate them: (header, .hmac, passphrase, log, parse) -> the format
    authenticate: Callable[
        [bytes, bytes, str, CommandLog, Callable[[bytes], Header]], Format
    ] | None = None
    # a stream that does not start with backup-header, by its first member
    first_member: Callable[[str], Format | None] | None = None
    # BACKUP given as a folder: the format it is, with no header to authenticate
    folder: Callable[[object], HeaderlessFormat | None] | None = None
    # the first member of a stream that holds this format's folder packed into a
    # tar: why it is refused (read only as the folder)
    packed: Callable[[str], str | None] | None = None
    # the same for BACKUP given as one file (its path), before any passphrase
    packed_file: Callable[[str], str | None] | None = None
    # what it begins on the member after its header while the header is
    # authenticated, used only once it is (format 4: qubes.xml's key derivation)
    head_start: HeadStart | None = None


@runtime_checkable
class HeaderlessFormat(Format, Protocol):
    """A format with no header to authenticate (format 1: a folder).  Found by
    the shape of BACKUP (``formats.detect``), it gives the members itself,
    reads qubes.xml its own way, and says why nothing can be authenticated;
    its ``authenticated_with`` says "nothing"."""

    warning: str  # said before a run, in info and in the summary

    @property
    def notes(self) -> list[str]: ...

    def members(self) -> Iterator[Member]: ...

    def inventory(self, xml: bytes) -> tuple[Inventory, list[str]]:
        """The VMs, and the problems found beside them (reported, not fatal)."""
        ...


class PlannedVM(Protocol):
    """One VM of the plan (qrecover.plan.EntityPlan)."""

    @property
    def entity(self) -> Entity: ...

    @property
    def strip(self) -> int: ...

    @property
    def folder(self) -> str: ...


class PlanView(Protocol):
    """What a script is written from (qrecover.plan.Plan)."""

    @property
    def selected(self) -> tuple[Entity, ...]: ...

    def front(self) -> list[Stage]: ...

    def entities(self) -> Sequence[PlannedVM]: ...


class Narration(Protocol):
    """Where a format's narration goes (qrecover.render.explain.Narrator)."""

    def say(
        self, title: str, text: str, command: str | None = None, result: str = ""
    ) -> None: ...


class Words(Protocol):
    """What the renderers ask a format: its page, steps and sh fragments."""

    procedure: Procedure  # the page's steps, declared once (qrecover.procedure)

    @property
    def fmt(self) -> Format:
        """The format, once its header was verified."""
        ...

    def first_step(self, backup: str) -> str | None:
        """Step 1's command where it is not the page's ``tar -i -x`` of the backup
        (format 1: a folder, where nothing is untarred)."""
        ...

    def chunk_step(self, member: str) -> Step | None:
        """The step that checks the chunk ``member`` (None: no chunk is checked)."""
        ...

    # --transcript
    def transcript_preamble(
        self, mode: str, backup: str | None, output: Path | None, argv: tuple[str, ...]
    ) -> list[str]: ...
    def transcript_header(self) -> list[str]: ...
    def transcript_chunk(self, member: str, error: str | None) -> list[str]: ...
    def transcript_steps(self, stored: str) -> str: ...
    pipeline_intro: str  # the comment above a stored file's pipeline

    # --explain
    intro: str  # step 1: what the backup is (and how it is read, said by the narrator)
    def explain_header(self, out: Narration) -> None: ...
    def explain_chunk(
        self, out: Narration, member: str, size: int, error: str | None, first: bool
    ) -> None: ...
    def explain_pipeline(
        self, out: Narration, stored: str, stages: tuple[Stage, ...], kind: str
    ) -> None: ...
    def explain_inventory(
        self, out: Narration, names: str, chosen: str, selected: tuple[Entity, ...]
    ) -> None: ...

    # restore --dry-run
    def plan_title(self, backup: str) -> str: ...
    def plan_header_steps(self, gunzip: str) -> list[str]: ...
    def plan_entity(
        self, entity: Entity, files: str, pipeline: str, backup: str
    ) -> list[str]: ...
    def plan_footer(self) -> str: ...

    # qrecover kit (RECOVERY.txt)
    kit_releases: str
    def kit_programs(self) -> list[str]: ...
    def kit_by_hand(self, example: Entity | None) -> list[str]: ...

    # qrecover script
    def script(
        self, plan: PlanView, backup: str | None, output: Path, argv: tuple[str, ...]
    ) -> str: ...


F = TypeVar("F", bound=Format)


class PageWords(Generic[F]):
    """What every format's words share: the format they speak for (None
    before a header was verified: then only the page is asked), and what a
    format with nothing to say there says."""

    procedure: Procedure

    def __init__(self, fmt: F | None) -> None:
        self._fmt = fmt

    @property
    def fmt(self) -> F:
        assert self._fmt is not None, "a verified header"
        return self._fmt

    def first_step(self, backup: str) -> str | None:
        return None  # the page's tar -i -x of the backup

    def chunk_step(self, member: str) -> Step | None:
        return next((s for s in self.procedure.steps if s.per == "chunk"), None)

    def transcript_chunk(self, member: str, error: str | None) -> list[str]:
        return []  # no chunk is checked

    def explain_chunk(
        self, out: Narration, member: str, size: int, error: str | None, first: bool
    ) -> None:
        return None  # no chunk is checked

    def plan_header_steps(self, gunzip: str) -> list[str]:
        return []  # no header

    def kit_programs(self) -> list[str]:
        return []
