"""Format 1 (Qubes R1, R2-Beta1/Beta2): a plain folder; nothing can be authenticated.

R1's ``qvm-backup`` copied /var/lib/qubes's files into a folder with
``cp -rp`` (qrecover.formats.v1_folder): no header, no HMAC, no encryption,
no compression.  R2's restore told it by ``qubes.xml`` in the backup
location; qrecover does the same: a folder holding ``qubes.xml`` and no
``backup-header``.

Every stored file still goes through the pipeline of the other formats:
``tar -c --sparse`` reads it from the folder (links stored as links, never
followed; holes kept), the guard screens that archive exactly as it screens
a decrypted one (names under the stored file's path, no device node or
FIFO, bounded size), and ``tar -x`` extracts it into private staging,
moved into place once every stage exited 0.  The per-chunk step has
nothing to check, and says so: ``checked`` stays False, and the verdict,
``info`` and the warning before a run say that nothing was authenticated.
"""

from __future__ import annotations

import hashlib
import os
import re
import xml.etree.ElementTree as ET
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from qrecover.archive.container import FolderSource
from qrecover.archive.members import QUBES_XML, ChunkName, Member
from qrecover.archive.tarheaders import BLOCK, header_name, kind_of, readable
from qrecover.errors import BackupError, StoredFileError
from qrecover.formats.base import (
    ChunkOutcome,
    ChunkStore,
    ChunkWorks,
    InOrder,
    MemberStream,
    PendingChunk,
    Recognition,
    StreamFed,
)
from qrecover.formats.v1_folder import KNOWN, Scan, path_is_safe, qubes_xml_file, scan_folder
from qrecover.inventory import (
    MAX_XML,
    VM_NAME,
    Entity,
    Inventory,
    checked_inventory,
    dom0_entity,
    refuse_dtd,
    vm_entity,
)
from qrecover.runner import CommandLog, Stage

VERSION = 1
WRITTEN_BY = "Qubes R1 (and R2-Beta1/Beta2)"
BACKUP_HEADER = "backup-header"
WARNING = (
    "format 1 (Qubes R1) has no HMAC and no encryption: nothing in this backup can be "
    "authenticated; it is read as the folder holds it now (names, links, special files "
    "and sizes are still checked)"
)
QUBES_BASE = "/var/lib/qubes"
# The first names of R1's tree (what a packed format-1 folder starts with).
TREE = (QUBES_XML, *KNOWN)
# R1's dir_path: /var/lib/qubes/{appvms,servicevms,vm-templates}/NAME, nothing else.
_DIR_PATH = re.compile(
    r"^/var/lib/qubes/(?P<rel>(appvms|servicevms|vm-templates)/[A-Za-z0-9_+-][A-Za-z0-9_.+-]*)/?"
)
# R1's classes, and R2-Beta1/Beta2's HVMs (R2 final wrote format 3).
_TYPES = {
    "QubesAppVm": "AppVM",
    "QubesTemplateVm": "TemplateVM",
    "QubesNetVm": "NetVM",
    "QubesProxyVm": "ProxyVM",
    "QubesHVm": "HVM",
    "QubesTemplateHVm": "TemplateHVM",
    "QubesDisposableVm": "DispVM",
}


def claims(root: Path) -> bool:
    """A folder holding ``qubes.xml`` (even as a link, to refuse it clearly) and
    no ``backup-header``: R2's own test for format 1; or one of R1's folders
    and no header, to say that its qubes.xml is missing."""
    # qubes.xml.000: an untarred backup of format 2 or 3 (R2-Beta3 wrote no header)
    if any(os.path.lexists(root / name) for name in (BACKUP_HEADER, f"{QUBES_XML}.000")):
        return False
    return any(os.path.lexists(root / name) for name in TREE)


def read_stage(root: Path, stored: str) -> Stage:
    """How a stored file leaves the folder: ``tar -c``, which stores a link as a
    link (it follows none, not even the one it is named), keeps holes with
    ``--sparse``, and stores a FIFO or device node as such, for the guard to
    drop.  ``--`` and the stored name's checked shape: no option can slip in."""
    return Stage(("tar", "-c", "--sparse", "-f", "-", "-C", str(root), "--", stored))


@dataclass(frozen=True)
class HeaderV1:
    """What stands for a header: format 1 has none, so it says that."""

    version: int = VERSION
    compressed: bool = False
    filter: str | None = None

    def fields(self) -> dict[str, object]:
        return {
            "version": self.version,
            "backup-header": "none",
            "hmac": "none",
            "encrypted": False,
            "compressed": False,
        }


@dataclass(frozen=True)
class _Ready:
    outcome: ChunkOutcome

    def complete(self) -> ChunkOutcome:
        return self.outcome


@dataclass
class Format1(StreamFed):
    """A Qubes R1 backup folder."""

    root: Path
    version = VERSION
    written_by = WRITTEN_BY
    verdict = (
        "read completely, but NOTHING was authenticated (format 1 has no HMAC and "
        "no encryption)"
    )
    warning = WARNING
    header: HeaderV1 = field(default_factory=HeaderV1)
    absent: list[str] = field(default_factory=list)  # in qubes.xml, no folder here
    unlisted: list[str] = field(default_factory=list)  # a VM's folder here, not in qubes.xml
    _scan: Scan | None = None

    @property
    def authenticated_with(self) -> str:
        return "nothing (format 1 has no header and no HMAC)"

    @property
    def notes(self) -> list[str]:
        """What a run says without failing: VMs R1 did not back up, stray entries."""
        notes = list(self.scan.notes)
        if self.absent:
            notes.append(
                "in qubes.xml but not in this folder, so not in the backup (R1 backed up "
                "only some VMs): " + ", ".join(self.absent)
            )
        if self.unlisted:
            notes.append(
                "in this folder but not in its qubes.xml, so restored under the folder's "
                "name (its type and template are unknown): " + ", ".join(self.unlisted)
            )
        return notes

    @property
    def scan(self) -> Scan:
        if self._scan is None:
            self._scan = scan_folder(self.root)
        return self._scan

    def programs(self, gunzip: str = "gzip") -> list[str]:
        return []

    def check_programs(self, log: CommandLog) -> None:
        return None

    def stream_stages(self, gunzip: str = "gzip") -> list[Stage]:
        return []  # tar -c's archive goes to the guard and tar -x as it is

    def owns_chunk(self, name: ChunkName) -> bool:
        return not name.is_enc and not name.is_hmac

    def chunk_works(
        self, passphrase: str, scratch: Path, log: CommandLog, jobs: int | None
    ) -> ChunkWorks:
        return InOrder()

    def identity(self, xml: bytes, xml_macs: Sequence[str]) -> bytes:
        """Nothing is authenticated: qubes.xml itself is all that tells two
        folders apart (each stored file is still checked by size and mtime)."""
        return b"\0format 1 qubes.xml\0" + hashlib.sha256(xml).digest()

    def members(self) -> Iterator[Member]:
        """qubes.xml, then every stored file, each as its one chunk ``NAME.000``."""
        size = qubes_xml_file(self.root)
        if size > MAX_XML:
            raise BackupError(f"{self.root / QUBES_XML}: larger than any real qubes.xml")
        yield Member(f"{QUBES_XML}.000", size, path=self.root / QUBES_XML)
        for stored, nbytes in self.scan.stored.items():
            yield Member(f"{stored}.000", nbytes, path=self.root / stored)

    def read_chunk(
        self, store: ChunkStore, member: Member, name: ChunkName, members: MemberStream
    ) -> PendingChunk:
        """Nothing to copy or check: ``tar -c`` reads the stored file when it is fed."""
        path, owned, _ = store.copy(member, None)
        problem = path_is_safe(self.root, name.stored)
        if problem is not None:
            return _Ready(ChunkOutcome(error=StoredFileError(problem)))
        return _Ready(ChunkOutcome(plain=path, owned=owned,
                                   feeder=read_stage(self.root, name.stored)))

    def inventory(self, data: bytes) -> tuple[Inventory, list[str]]:
        """The VMs of R1's qubes.xml whose folders are here, and dom0's home;
        with the problems the folder's scan found."""
        if len(data) > MAX_XML:
            raise BackupError("qubes.xml: larger than any real qubes.xml")
        refuse_dtd(data)
        try:
            root = ET.fromstring(data)
        except ET.ParseError as exc:
            raise BackupError(f"qubes.xml: not well-formed XML ({exc})") from None
        if root.tag != "QubesVmCollection":
            raise BackupError(
                f"qubes.xml: unexpected root element <{root.tag[:40]}> (R1's qubes.xml "
                "is a QubesVmCollection)"
            )
        scan = self.scan
        by_qid = {e.get("qid"): e.get("name") for e in root}
        entities: list[Entity] = []
        for elem in root:
            if elem.tag == "QubesAdminVm":
                continue  # dom0's home is the folder under dom0-home
            name = elem.get("name") or ""
            rel = _backup_path(name, elem.get("dir_path") or "")
            if rel not in scan.folders:
                self.absent.append(name if VM_NAME.match(name) else repr(name[:40]))
                continue
            template = by_qid.get(elem.get("template_qid") or "")
            if template is not None and not VM_NAME.match(template):
                template = None  # only ever shown
            vm_type = _TYPES.get(elem.tag, "?")
            size = sum(n for s, n in scan.stored.items() if s.startswith(rel + "/"))
            entities.append(vm_entity(name, vm_type, template, rel, size))
        entities += self._unlisted(entities)
        if scan.dom0 is not None:
            try:
                entities.append(dom0_entity(scan.dom0, scan.stored[scan.dom0]))
            except BackupError as exc:
                scan.problems.append(f"{exc}; dom0's home not restored")
        return checked_inventory(entities), list(scan.problems)


    def _unlisted(self, listed: list[Entity]) -> list[Entity]:
        """The VMs' folders qubes.xml does not list: the data is there and named
        (and nothing in format 1 is authenticated anyway), so each is restored
        under its folder's name, with a note; a name already taken is skipped."""
        scan = self.scan
        paths = {e.backup_path for e in listed}
        names = {e.name for e in listed}
        found: list[Entity] = []
        for rel in sorted(scan.folders - paths):
            kind, _, name = rel.partition("/")
            if name in names or not VM_NAME.match(name):
                scan.problems.append(f"{rel}: a VM folder not listed in qubes.xml, whose name "
                                     "is taken or not a VM name; skipped")
                continue
            size = sum(n for s, n in scan.stored.items() if s.startswith(rel + "/"))
            vm_type = {"vm-templates": "TemplateVM", "servicevms": "NetVM"}.get(kind, "AppVM")
            try:
                found.append(vm_entity(name, vm_type, None, rel, size))
            except BackupError as exc:
                scan.problems.append(f"{rel}: {exc}; skipped")
                continue
            names.add(name)
            self.unlisted.append(f"{name} ({rel})")
        return found


def _backup_path(name: str, dir_path: str) -> str:
    """A VM's folder in the backup: its dir_path with /var/lib/qubes taken off."""
    match = _DIR_PATH.fullmatch(dir_path)
    if match is None or match.group("rel").endswith(("/.", "/..")):
        raise BackupError(
            f"qubes.xml: VM {name[:80]!r} has an unexpected dir_path {dir_path[:120]!r} "
            f"(R1 kept every VM in {QUBES_BASE}/appvms, servicevms or vm-templates); refused"
        )
    return match.group("rel")


def first_file(path: str) -> str | None:
    """The name of the first file in a plain tar file, past its folders' entries
    (none if it is not a plain ustar/GNU tar, or names it with a long header):
    enough to tell a packed format-1 folder before any passphrase is asked."""
    try:
        with open(path, "rb") as f:
            for _ in range(8):
                block = f.read(BLOCK)
                if len(block) < BLOCK or block[257:262] != b"ustar":
                    return None
                if kind_of(block) != b"5":  # past the folders' entries (no data follows them)
                    ordinary = kind_of(block) in (b"0", b"\0", b"1", b"2", b"7")  # files, links
                    return readable(header_name(block)) if ordinary else None
    except OSError:
        return None
    return None


def open_folder(source: object) -> Format1 | None:
    """The format-1 backup ``source`` is, if it is one."""
    if isinstance(source, FolderSource) and claims(source.root):
        return Format1(Path(os.path.abspath(source.root)))  # shown in commands
    return None


def packed_hint(first_member: str) -> str | None:
    """A tar archive with no header whose first file is one of R1's tree (qubes.xml,
    appvms/...): a format-1 folder someone packed; read only as the folder."""
    parts = [p for p in first_member.split("/") if p not in ("", ".")]
    if len(parts) > 1 and parts[1] in TREE:
        parts = parts[1:]  # the folder itself (qubes-YYYY-MM-DD-HHMMSS) was packed
    if (len(parts) > 1 and parts[0] in TREE[1:]) or parts == [TREE[0]]:
        return (
            f"the backup starts with {first_member!r} and has no backup-header: this looks "
            "like a format-1 backup (Qubes R1) packed into an archive; unpack it "
            "(tar -xf FILE) and give qrecover the folder that holds qubes.xml"
        )
    return None


def packed_file(path: str) -> str | None:
    """The same for BACKUP given as one plain tar file, told before any passphrase."""
    first = first_file(path)
    return packed_hint(first) if first is not None else None


# Found as a folder (qubes.xml, no backup-header), and refused packed into a tar.
RECOGNISED = Recognition(VERSION, folder=open_folder, packed=packed_hint,
                         packed_file=packed_file)
