"""qubes.xml: which VMs a backup holds, and where their files are stored.

Only VMs with ``backup_content="True"`` have data in the backup; their
``backup_path`` (``vm7`` when names were hidden, ``appvms/work`` otherwise,
``dom0-home/USER`` for dom0) is the prefix of their stored files.  Every name
and path read here ends up in a file system path, so each is validated.

Two forms exist: R2/R3's ``<QubesVmCollection>`` with one element per VM and
attributes, and R4's ``<qubes><domains><domain class="AppVM">`` with
``<property name="name">`` and the features ``backup-content``,
``backup-path`` (``vm7/``, with a slash) and ``backup-size``.  Both give the
same entities.
"""

from __future__ import annotations

import dataclasses
import re
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from dataclasses import dataclass

from qrecover.archive.members import validate_stored_name
from qrecover.compat import removeprefix, removesuffix
from qrecover.errors import BackupError, UsageError

DOM0 = "dom0"
DOM0_HOME = "dom0-home"
MAX_XML = 64 * 1024 * 1024

# Qubes' own rule for VM names (qubes.utils / qvm-create), a little wider.
VM_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_.-]{0,63}$")
_USER_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}$")
# Names that would collide with what qrecover itself writes into DIR.
_RESERVED = {"qubes.xml", DOM0_HOME}

_R3_TYPES = {
    "QubesAdminVm": "AdminVM",
    "QubesAppVm": "AppVM",
    "QubesTemplateVm": "TemplateVM",
    "QubesNetVm": "NetVM",
    "QubesProxyVm": "ProxyVM",
    "QubesHVm": "HVM",
    "QubesTemplateHVm": "TemplateHVM",
    "QubesDisposableVm": "DispVM",
}


@dataclass(frozen=True)
class Entity:
    """Something a user can restore: one VM's files, or dom0's home."""

    name: str  # the VM's name; "dom0" for dom0's home
    type: str  # AppVM, TemplateVM, NetVM, ... ("AdminVM" for dom0)
    template: str | None
    backup_path: str
    size: int
    dest: str  # where it lands inside the output folder: "work", "dom0-home/user"
    r4: bool = False  # listed in an R4 qubes.xml (format 4)

    def required_stored(self) -> str | None:
        """The stored file Qubes' writer always wrote for this entity, if known.

        dom0's home is one stored file.  R2-R3.2 stored a template as its
        whole folder (``vm3/.``) and every other VM with at least its
        ``private.img``; R4 stores volumes, and an ``empty`` placeholder for
        a VM without any, so there only "some file of it" can be required.
        """
        if self.name == DOM0:
            return self.backup_path
        if self.r4:
            return None
        if "Template" in self.type:
            return self.backup_path + "/."
        return self.backup_path + "/private.img"

    def owns(self, stored: str) -> bool:
        return stored == self.backup_path or stored.startswith(self.backup_path + "/")

    def as_json(self) -> dict[str, object]:
        return {
            "name": self.name,
            "type": self.type,
            "template": self.template,
            "backup_path": self.backup_path,
            "size": self.size,
        }


@dataclass(frozen=True)
class Inventory:
    entities: tuple[Entity, ...]

    def names(self) -> list[str]:
        return [e.name for e in self.entities]

    def owner(self, stored: str) -> Entity | None:
        for entity in self.entities:
            if entity.owns(stored):
                return entity
        return None

    def select(
        self, names: Sequence[str], exclude: Sequence[str] = (), skip_dom0_home: bool = False
    ) -> tuple[Entity, ...]:
        """The entities named (all when none are), less those excluded, as
        qvm-backup-restore's VM names, ``--exclude`` and ``--skip-dom0-home``.

        Unknown names are a usage error listing the backup's names, and so is
        a selection that leaves nothing.
        """
        known = {e.name: e for e in self.entities}
        available = ", ".join(self.names()) or "(none)"
        for option, given in (("", names), ("--exclude: ", exclude)):
            unknown = [n for n in given if n not in known]
            if unknown:
                raise UsageError(
                    f"{option}not in this backup: {', '.join(unknown)}; available: {available}"
                )
        if skip_dom0_home and DOM0 in names:
            raise UsageError("--vm dom0 and --skip-dom0-home ask for opposite things")
        chosen = tuple(known[n] for n in dict.fromkeys(names)) if names else self.entities
        if not exclude and not skip_dom0_home:
            return chosen
        dropped = {*exclude, *([DOM0] if skip_dom0_home else [])}
        left = tuple(e for e in chosen if e.name not in dropped)
        if not left:
            raise UsageError(f"nothing left to restore once excluded; available: {available}")
        return left


def refuse_dtd(data: bytes) -> None:
    # qubes.xml never had a DTD; a DOCTYPE or ENTITY here can only be an
    # attack on the parser (billion laughs, external entities).
    head = data.upper()
    if b"<!DOCTYPE" in head or b"<!ENTITY" in head:
        raise BackupError("qubes.xml: contains a DOCTYPE/ENTITY declaration; refused")


def _size(value: str | None) -> int:
    if value is None or not value.isdigit():
        return 0
    return int(value)


def _check_path(name: str, path: str) -> str:
    try:
        validate_stored_name(path)
    except ValueError as exc:
        raise BackupError(
            f"qubes.xml: VM {name!r} has an unsafe backup_path {path!r}: {exc}"
        ) from None
    if path.endswith("/.") or len(path.split("/")) > 2:
        raise BackupError(f"qubes.xml: VM {name!r} has an unexpected backup_path {path!r}")
    return path


def dom0_entity(path: str, size: int) -> Entity:
    _check_path(DOM0, path)
    user = path.split("/")[-1]
    if not path.startswith(DOM0_HOME + "/") or not _USER_NAME.match(user):
        raise BackupError(f"qubes.xml: dom0 has an unexpected backup_path {path!r}")
    return Entity(DOM0, "AdminVM", None, path, size, f"{DOM0_HOME}/{user}")


def vm_entity(name: str, vm_type: str, template: str | None, path: str, size: int) -> Entity:
    if not VM_NAME.match(name) or name in _RESERVED:
        raise BackupError(f"qubes.xml: refusing VM name {name[:80]!r}")
    _check_path(name, path)
    return Entity(name, vm_type, template, path, size, name)


# R4 stored features as text: True as "1" (or "True"), False as "".
_FALSE_TEXT = ("", "0", "false", "no", "off")


def _r4_entities(root: ET.Element) -> list[Entity]:
    """The entities of an R4 ``<qubes>`` qubes.xml."""
    domains = root.find("domains")
    if domains is None:
        raise BackupError("qubes.xml: <qubes> without <domains>: not an R4 qubes.xml")
    entities: list[Entity] = []
    for domain in domains.findall("domain"):
        props = {p.get("name"): p.text or "" for p in domain.findall("./properties/property")}
        feats = {f.get("name"): f.text or "" for f in domain.findall("./features/feature")}
        if feats.get("backup-content", "").strip().lower() in _FALSE_TEXT:
            continue
        # R4 writes the VM's folder in the backup with a trailing slash: "vm7/".
        path = removesuffix(feats.get("backup-path", ""), "/")
        size = _size(feats.get("backup-size"))
        klass = domain.get("class") or ""
        if klass == "AdminVM":
            entities.append(dom0_entity(path, size))
            continue
        name = props.get("name", "")
        template = props.get("template") or None
        if template is not None and not VM_NAME.match(template):
            template = None  # only ever shown; a strange one is not worth stopping for
        vm_type = klass if re.match(r"^[A-Za-z]{1,40}$", klass) else "?"
        entities.append(vm_entity(name, vm_type, template, path, size))
    return [dataclasses.replace(e, r4=True) for e in entities]


def parse_inventory(data: bytes) -> Inventory:
    """Parse qubes.xml (R2/R3 ``QubesVmCollection`` form, or R4 ``qubes`` form)."""
    if len(data) > MAX_XML:
        raise BackupError("qubes.xml: larger than any real qubes.xml")
    refuse_dtd(data)
    try:
        root = ET.fromstring(data)
    except ET.ParseError as exc:
        raise BackupError(f"qubes.xml: not well-formed XML ({exc})") from None
    if root.tag == "qubes":
        return checked_inventory(_r4_entities(root))
    if root.tag != "QubesVmCollection":
        raise BackupError(
            f"qubes.xml: unexpected root element <{root.tag[:40]}> "
            "(expected QubesVmCollection, the R2/R3 form, or qubes, the R4 form)"
        )
    by_qid: dict[str, str] = {}
    for elem in root:
        qid, name = elem.get("qid"), elem.get("name")
        if qid is not None and name is not None:
            by_qid[qid] = name
    entities: list[Entity] = []
    for elem in root:
        if elem.get("backup_content") != "True":
            continue
        name = elem.get("name") or ""
        path = elem.get("backup_path") or ""
        vm_type = _R3_TYPES.get(elem.tag, removeprefix(elem.tag, "Qubes"))
        if not re.match(r"^[A-Za-z]{1,40}$", vm_type):
            vm_type = "?"
        if elem.tag == "QubesAdminVm" or name == DOM0:
            entities.append(dom0_entity(path, _size(elem.get("backup_size"))))
            continue
        template = by_qid.get(elem.get("template_qid") or "")
        if template is not None and not VM_NAME.match(template):
            # Another element's name, never checked as that VM is not restored:
            # only ever shown, but shown in scripts too, so never as it is.
            template = None
        entities.append(vm_entity(name, vm_type, template, path, _size(elem.get("backup_size"))))
    return checked_inventory(entities)


def checked_inventory(entities: list[Entity]) -> Inventory:
    """No name or path twice, and no VM's files inside another's."""
    seen: set[str] = set()
    for entity in entities:
        for key in (entity.name, entity.backup_path):
            if key in seen:
                raise BackupError(f"qubes.xml: {key!r} appears twice")
            seen.add(key)
    for entity in entities:
        for other in entities:
            if other is not entity and other.owns(entity.backup_path):
                raise BackupError(
                    f"qubes.xml: backup_path {entity.backup_path!r} lies "
                    f"inside {other.backup_path!r}"
                )
    return Inventory(tuple(entities))
