"""``restore --resume``: the record a restore keeps inside DIR, and what a later
run skips because of it.

Every restore writes ``DIR/.restore-record-qrecover.json`` (the *record*): which
backup it is restoring (an identity taken only from authenticated data, see
:func:`identity`) and, per stored file, its owner, status and final paths with
their size and mtime.  The record is replaced atomically (temporary file in
DIR, fsync, rename, fsync DIR), and a stored file is recorded as ``placed``
only after its files and their folder are fsynced; a placement is recorded as
``placing`` (with the names it will take) just before the renames.  So after
a power cut or SIGKILL the record never claims more than is on disk.  A
restore that ends without any error removes its record: DIR then holds only
the restored files, and there is nothing to resume.

A run with ``--resume`` whose record names the same backup:

* skips every stored file recorded ``placed`` whose places are still there with
  the recorded size and mtime: its members are read through (the backup is a
  stream) but neither authenticated again, decrypted, decompressed nor
  extracted (format 4: no scrypt).  Its HMAC is not checked again, for
  format 3 either (there it would be cheap): it was checked when the file was
  placed, and damage now in a chunk of a file already on disk changes nothing
  about that file;
* counts a ``placing`` stored file whose recorded places all match as placed;
* redoes the rest of the selected VMs: what was recorded ``partial`` (its
  ``.partial`` entries, named by qrecover, are removed first, once every check
  passed) or not reached at all.  A ``placing`` one whose places do not match
  is left alone: redoing it then meets them as conflicts;
* removes the scratch folders a killed run left in DIR, but only folders named
  like qrecover's own (``.qrecover-XXXXXXXX``) that hold nothing but names
  qrecover gives its scratch files.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import re
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Dict, List, Literal, Protocol

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from qrecover.archive.members import QUBES_XML, Member, parse_member_name
from qrecover.context import Listener
from qrecover.errors import OutputError
from qrecover.events import QubesXmlWritten
from qrecover.formats.base import Format
from qrecover.output import Output, first_symlink, fsync_path, fsync_tree, tree_size
from qrecover.report import FileResult, Observer

if TYPE_CHECKING:
    from qrecover.inventory import Entity

# Not ".qrecover-...": that prefix is the scratch folders', which must never
# outlive a run; the record outlives a run that did not finish.
RECORD_NAME = ".restore-record-qrecover.json"
RECORD_VERSION = 1
MAX_RECORD = 64 * 1024 * 1024  # a record of a million stored files is far below this
# Names qrecover gives inside DIR: tempfile.mkdtemp(prefix=".qrecover-") (8 random
# characters) for scratch, inside it stage-N, plain-N, chunk-<member>, chunks-XXXXXXXX.
_SCRATCH_DIR = re.compile(r"\.qrecover-[a-z0-9_]{8}")
_SCRATCH_ENTRY = re.compile(
    r"(stage-[0-9]+|plain-[0-9]+|chunk-[A-Za-z0-9._-]+|chunks-[a-z0-9_]{8})"
)
# Temporary files of the record's and qubes.xml's atomic writes.
_TEMP_FILE = re.compile(r"\.(restore-record-qrecover\.json|qubes\.xml)\.[a-z0-9_]{8}")
_PARTIAL = re.compile(r".+\.partial(\.[0-9]+)?")


class Place(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    path: str  # relative to DIR
    size: int = Field(ge=0)
    mtime_ns: int


class StoredEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")
    owner: str
    status: Literal["placing", "placed", "partial"]
    chunks: int = Field(ge=0)
    places: List[Place]  # typing's: pydantic evaluates it (Python 3.8)


class RestoreRecord(BaseModel):
    model_config = ConfigDict(extra="forbid")
    qrecover_restore_record: Literal[1]
    backup: str = Field(pattern=r"^[0-9a-f]{64}$")
    format: int = Field(ge=1)  # the version of the backup's format
    files: Dict[str, StoredEntry]


class Members(Protocol):
    def peek(self) -> Member | None: ...
    def take(self) -> Member | None: ...

def identity(fmt: Format, header_raw: bytes, xml: bytes, xml_macs: Sequence[str]) -> str:
    """The backup's identity: a hash of authenticated data only, never of a path:
    the raw backup-header and backup-header.hmac, authenticated together, and
    what the format says tells it from any other (Format.identity)."""
    h = hashlib.sha256(b"qrecover backup identity 1\0")
    h.update(hashlib.sha256(header_raw).digest())
    h.update(fmt.identity(xml, xml_macs))
    return h.hexdigest()


def _safe_rel(rel: str) -> bool:
    parts = Path(rel).parts
    return bool(parts) and not Path(rel).is_absolute() and ".." not in parts


def _stat(path: Path) -> tuple[int, int]:
    return tree_size(path), path.lstat().st_mtime_ns


def load(path: Path) -> RestoreRecord:
    """Read a record; anything unreadable or malformed is an OutputError."""
    hint = f"move {path.name} out of the folder to restore without resuming"
    try:
        with path.open("rb") as f:
            data = f.read(MAX_RECORD + 1)
    except OSError as exc:
        raise OutputError(f"{path}: cannot read the restore record ({exc.strerror})",
                          hint=hint) from None
    if len(data) > MAX_RECORD:
        raise OutputError(f"{path}: not a qrecover restore record (larger than 64 MiB)", hint=hint)
    try:
        return RestoreRecord.model_validate_json(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "top level"
        raise OutputError(
            f"{path}: not a valid qrecover restore record ({where}: {first['msg']})", hint=hint
        ) from None


class Resume:
    """The record of this restore, and what an earlier one lets it skip."""

    def __init__(self, output: Output, record: RestoreRecord, keep: dict[str, StoredEntry],
                 resuming: bool, earlier: bool = False) -> None:
        self.output = output
        self.earlier = earlier  # resuming with a record of this same backup
        self.record = record
        self.keep = keep  # stored files placed by an earlier run, still intact
        self.resuming = resuming
        self.path = output.root / RECORD_NAME
        self.scratch: Path | None = None
        self.lock: int | None = None  # flock held on DIR until release(), at the run's end
        self.redo: list[StoredEntry] = []  # earlier entries of selected VMs to redo
        self.recorded: set[str] = set()  # every path the earlier record names
        self.emit: Listener = lambda event: None  # the run's (RunContext.emit)

    @classmethod
    def begin(cls, output: Output, resuming: bool, backup: str, version: int,
              scratch: Path | None, selected: Sequence[Entity]) -> Resume:
        """Check DIR's record (with --resume); nothing is removed yet (see clean)."""
        root = output.root
        lock = _lock(root)
        try:
            return cls._begin(output, resuming, backup, version, scratch, selected, lock)
        except BaseException:
            os.close(lock)  # refused: the folder is free again
            raise

    @classmethod
    def _begin(cls, output: Output, resuming: bool, backup: str, version: int,
               scratch: Path | None, selected: Sequence[Entity], lock: int) -> Resume:
        root = output.root
        record = RestoreRecord(qrecover_restore_record=1, backup=backup, format=version, files={})
        path = root / RECORD_NAME
        if resuming and not os.path.lexists(path) and os.path.lexists(root / QUBES_XML):
            raise OutputError(
                f"{root}: nothing to resume: it holds no restore record (a restore that "
                "ends without error removes it, so this folder may be complete already)",
                hint="check the folder, or restore into another --output folder",
            )
        if not resuming or not os.path.lexists(path):
            fresh = cls(output, record, {}, resuming)
            fresh.lock = lock
            return fresh
        if path.is_symlink() or not path.is_file():
            raise OutputError(f"{path}: not a regular file; refusing to read it as a record")
        earlier = load(path)
        if earlier.backup != backup:
            raise OutputError(
                f"{root}: holds the record of a restore of another backup "
                f"(record: {earlier.backup[:16]}, this backup: {backup[:16]}); "
                "refusing to resume into it",
                hint="give the backup that was being restored, or another --output folder",
            )
        keep: dict[str, StoredEntry] = {}
        chosen = {e.name for e in selected}
        resume = cls(output, record, keep, resuming, earlier=True)
        resume.scratch = scratch
        resume.lock = lock
        for stored, entry in earlier.files.items():
            # "placing": recorded with the staged files' size and mtime, which the
            # rename keeps; if they all match, the placement was complete.
            if entry.status != "partial" and all(_intact(root, p) for p in entry.places):
                keep[stored] = entry.model_copy(update={"status": "placed"})
                record.files[stored] = keep[stored]
            elif entry.owner not in chosen:
                record.files[stored] = entry  # not redone now: its leftovers stay
            else:
                resume.redo.append(entry)
        resume.recorded = {p.path for e in earlier.files.values() for p in e.places}
        return resume

    def release(self) -> None:
        """Let another restore into DIR (the run has ended, its scratch gone)."""
        if self.lock is not None:
            os.close(self.lock)
            self.lock = None

    def clean(self) -> None:
        """Once every check passed: remove the leftovers of what is redone."""
        if self.earlier:
            _clean_scratch(self.output.root, self.scratch)
            for entry in self.redo:
                _drop_leftovers(self.output.root, entry)

    # -- before the stored files --------------------------------------------

    def excused(self, path: Path) -> bool:
        """Under --resume: is this existing path the earlier run's own work?"""
        if not self.earlier:
            return False
        rel = os.path.relpath(path, self.output.root)
        if rel in self.recorded or rel == QUBES_XML:
            return rel != QUBES_XML or (path.is_file() and not path.is_symlink())
        if path.is_file() and not path.is_symlink() and _PARTIAL.fullmatch(path.name):
            # left but not recorded (full disk): kept; a new one goes beside it
            return True
        if not path.is_dir() or path.is_symlink():
            return False
        return all(self.excused(child) for child in path.iterdir())

    def write_xml(self, xml: bytes) -> None:
        """Write DIR/qubes.xml, unless the earlier run already wrote these bytes."""
        target = self.output.root / QUBES_XML
        same = False
        if self.earlier and target.is_file() and not target.is_symlink():
            with target.open("rb") as f:
                same = f.read(len(xml) + 1) == xml
        self.clean()
        if not same:
            self.emit(QubesXmlWritten(self.output.write_file(QUBES_XML, xml)))
        self._save()

    # -- each stored file ---------------------------------------------------

    def keeps(self, stored: str) -> bool:
        return stored in self.keep

    def read_through(self, members: Members, stored: str, owner: str,
                     observer: Observer) -> FileResult:
        """Take a kept stored file's members without using their bytes."""
        result = FileResult(stored, owner, kept=True)
        observer.file_started(stored, owner)
        while (member := members.peek()) is not None:
            name = parse_member_name(member.name)
            if name is None or name.stored != stored:
                break
            members.take()  # the stream skips its bytes, unused
            observer.data_read(stored, member.size)
            if not name.is_hmac:
                result.chunks += 1
                result.stored_bytes += member.size
        entry = self.keep[stored]
        result.places = [self.output.root / p.path for p in entry.places]
        result.restored_bytes = sum(p.size for p in entry.places)
        observer.file_done(result)
        return result

    def placing(self, stored: str, owner: str, entries: Sequence[Path], folder: Path) -> None:
        """Just before the renames: the names this stored file is about to take,
        with the staged files' size and mtime (made durable first)."""
        places = []
        for entry in entries:
            fsync_tree(entry)
            size, mtime = _stat(entry)
            rel = os.path.relpath(folder / entry.name, self.output.root)
            places.append(Place(path=rel, size=size, mtime_ns=mtime))
        self.record.files[stored] = StoredEntry(owner=owner, status="placing", chunks=0,
                                                places=places)
        self._save()

    def placed(self, result: FileResult) -> None:
        """After a stored file is placed (or kept partial): make it durable, record it."""
        places: list[Place] = []
        for path in result.places:
            with contextlib.suppress(OSError):
                fsync_tree(path)
                size, mtime = _stat(path)
                places.append(Place(path=os.path.relpath(path, self.output.root),
                                    size=size, mtime_ns=mtime))
        for folder in {p.parent for p in result.places}:
            with contextlib.suppress(OSError):
                fsync_path(folder)
        status: Literal["placed", "partial"] = "placed" if result.ok else "partial"
        self.record.files[result.stored] = StoredEntry(
            owner=result.owner, status=status, chunks=result.chunks, places=places
        )
        self._save()

    def finished(self) -> None:
        """Everything selected is restored: if every recorded stored file is
        placed too (--vm may have left others), the record has done its work."""
        if any(e.status != "placed" for e in self.record.files.values()):
            return
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        fsync_path(self.output.root)

    def _save(self) -> None:
        """Replace the record atomically: temp file, fsync, rename, fsync DIR."""
        root = self.output.root
        data = self.record.model_dump_json(indent=1).encode() + b"\n"
        fd, tmp = tempfile.mkstemp(prefix=f"{RECORD_NAME}.", dir=root)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
            fsync_path(root)
        except BaseException as exc:  # a signal too: no temporary file left behind
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            if isinstance(exc, OSError):
                raise OutputError(f"{self.path}: cannot write the restore record "
                                  f"({exc.strerror})") from None
            raise


def _lock(root: Path) -> int:
    """One restore at a time per DIR: a second would take the first's scratch
    for a killed run's leftovers.  Released by Resume.release at the run's end."""
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        raise OutputError(f"{root}: another qrecover is restoring into this folder",
                          hint="wait for it to end, or choose another --output folder") from None
    return fd


def _intact(root: Path, place: Place) -> bool:
    """Is a recorded place still there as the earlier run left it?"""
    if not _safe_rel(place.path) or first_symlink(root, Path(place.path).parent) is not None:
        return False
    path = root / place.path
    try:
        return _stat(path) == (place.size, place.mtime_ns)
    except OSError:
        return False


def _drop_leftovers(root: Path, entry: StoredEntry) -> None:
    """Remove what a stored file to be redone left: its ``.partial`` entries."""
    for place in entry.places:
        if not _safe_rel(place.path) or first_symlink(root, Path(place.path).parent):
            continue
        path = root / place.path
        if entry.status == "partial" and not _PARTIAL.fullmatch(path.name):
            continue  # a final name beside the partial ones: never removed
        if entry.status != "partial":
            continue  # changed since (or never completed): left alone, a conflict if redone
        with contextlib.suppress(FileNotFoundError):
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink()


def _clean_scratch(root: Path, current: Path | None) -> None:
    """Remove scratch folders and temporary files a killed qrecover left in DIR,
    only when every name in them is one qrecover gives (never a user's files)."""
    for child in root.iterdir():
        if current is not None and child == current:
            continue
        if _TEMP_FILE.fullmatch(child.name) and child.is_file() and not child.is_symlink():
            child.unlink()
        elif (_SCRATCH_DIR.fullmatch(child.name) and child.is_dir() and not child.is_symlink()
              and child.lstat().st_uid == os.getuid()
              and all(_SCRATCH_ENTRY.fullmatch(e.name) for e in child.iterdir())):
            shutil.rmtree(child)
