"""Every backup format, behind one seam (see base.py): detection and the registry.

The header cannot be trusted before it is authenticated, and each format
authenticates it its own way, so the format is decided by the *shape* of
``backup-header.hmac`` (:func:`detect`): a file written by ``scrypt enc``
is format 4, anything else must be a format-3 HMAC line.  Only once
authenticated is the header parsed (:func:`parse_header`, with the model of
the version it names), and that version must be the one it was
authenticated as.  A header authenticated by an HMAC line but naming no
``version`` is format 2's (Qubes R2 wrote four keys and no version); a
backup with no header at all, starting with ``qubes.xml.000``, is R2-Beta3's
(:func:`headerless`).

Adding a format is adding a module here and a line to ``_KINDS``: nothing
outside this package names a format or branches on its version.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from types import ModuleType
from typing import Protocol

from qrecover.errors import BackupError
from qrecover.formats import v1, v1_words, v2, v2_words, v3, v3_words, v4
from qrecover.formats.base import Format, HeaderlessFormat, Words
from qrecover.formats.v4 import words as v4_words
from qrecover.header import Header, split_header, validate
from qrecover.hmacs import MAX_HMAC_FILE
from qrecover.inventory import Inventory, parse_inventory
from qrecover.runner import CommandLog, log_command

# The largest backup-header.hmac any format has.
MAX_HEADER_HMAC = max(v4.MAX_HEADER_HMAC, MAX_HMAC_FILE)


class _Kind(Protocol):
    VERSION: int

    def claims(self, header_hmac: bytes) -> bool: ...

    def open_format(
        self,
        header: bytes,
        header_hmac: bytes,
        passphrase: str,
        log: CommandLog,
        parse: Callable[[bytes], Header],
    ) -> Format: ...


# Tried in this order; the last claims whatever the others did not.
_KINDS: tuple[ModuleType, ...] = (v4, v3)
_MODELS: dict[int, type[v3.BackupHeader] | type[v4.BackupHeaderV4]] = {
    v3.VERSION: v3.BackupHeader,
    v4.VERSION: v4.BackupHeaderV4,
}


def detect(header_hmac: bytes) -> ModuleType:
    """The format module whose ``backup-header.hmac`` has this shape."""
    return next(kind for kind in _KINDS if kind.claims(header_hmac))


def parse_header(data: bytes) -> Header:
    """Parse an authenticated header into the model of the version it names."""
    values = split_header(data)
    if "version" not in values:
        model = v2.header_model(values)
        if model is None:
            raise BackupError(
                "backup-header: no 'version' key (and not the four keys of format 2: "
                + ", ".join(v2.KEYS) + ")"
            )
        header: Header = validate(model, values)
        return header
    version = values["version"]
    if version == str(v2.VERSION):
        raise BackupError(
            "backup-header: names version=2, which no Qubes writer wrote (format 2's "
            "header has no version key)"
        )
    if not version.isdigit() or int(version) not in _MODELS:
        raise BackupError(
            f"backup-header: format version {version} is not supported "
            "(qrecover reads format 2, written by Qubes R2-Beta3 to R2, format 3, "
            "written by Qubes R2 to R3.2, and format 4, written by Qubes R4)"
        )
    versioned: Header = validate(_MODELS[int(version)], values)
    return versioned


def read_header(data: bytes, hmac_text: bytes, passphrase: bytes) -> v3.BackupHeader:
    """A format-3 header: authenticated by its HMAC, parsed, cross-checked."""
    return v3.read_header(data, hmac_text, passphrase, parse_header)


def authenticate(
    header: bytes, header_hmac: bytes, passphrase: str, log: CommandLog = log_command
) -> Format:
    """Authenticate ``backup-header`` with ``backup-header.hmac``, then parse it.

    Raises AuthenticationError (exit 3) when the passphrase does not
    authenticate the header, BackupError (exit 4) for a malformed header or
    one naming a version that is not the one it was authenticated as.
    """
    kind: _Kind = detect(header_hmac)
    if kind is v3 and not v2.names_version(header):
        kind = v2  # the same HMAC line; R2 (v2.1.39-63) wrote no version key
    return kind.open_format(header, header_hmac, passphrase, log, parse_header)


def headerless(first: str) -> Format | None:
    """The format of a backup whose first member ``first`` is not backup-header:
    R2-Beta3's, which starts with qubes.xml.000; None for anything else."""
    return v2.headerless(first)


def words(fmt: Format | None) -> Words:
    """What the renderers say for ``fmt`` (None: no header was verified, and a
    transcript of the run that stopped follows format 3's page)."""
    if isinstance(fmt, v1.Format1):
        return v1_words.Words1(fmt)
    if isinstance(fmt, v2.Format2):
        return v2_words.Words2(fmt)
    if isinstance(fmt, v4.Format4):
        return v4_words.Words4(fmt)
    if fmt is None or isinstance(fmt, v3.Format3):
        return v3_words.Words3(fmt)
    raise TypeError(f"no words for format {fmt.version}")


# -- format 1 (qrecover.formats.v1): a folder with no header ------------------


def folder_format(source: object) -> HeaderlessFormat | None:
    """The format of a backup that has no header to authenticate (a format-1
    folder: qubes.xml and no backup-header), else None."""
    return v1.open_folder(source)


def read_inventory(fmt: Format, xml: bytes, problems: list[str]) -> Inventory:
    """qubes.xml's VMs, as ``fmt`` reads them; the problems found beside them
    (format 1: what its folder's scan refused) are added to ``problems``."""
    if isinstance(fmt, HeaderlessFormat):
        inventory, found = fmt.inventory(xml)
        problems += found
        return inventory
    return parse_inventory(xml)


def unauthenticated(fmt: Format | None) -> str | None:
    """Why nothing of this backup can be authenticated, if nothing can."""
    return fmt.warning if isinstance(fmt, HeaderlessFormat) else None


def notes(fmt: Format | None) -> list[str]:
    """What a run says about the backup without failing (format 1: VMs it lacks)."""
    return fmt.notes if isinstance(fmt, HeaderlessFormat) else []


def packed_hint(first_member: str) -> str | None:
    """A tar archive with no header whose first file is one of R1's tree (qubes.xml,
    appvms/...): a format-1 folder someone packed; read only as the folder."""
    parts = [p for p in first_member.split("/") if p not in ("", ".")]
    if len(parts) > 1 and parts[1] in v1.TREE:
        parts = parts[1:]  # the folder itself (qubes-YYYY-MM-DD-HHMMSS) was packed
    if (len(parts) > 1 and parts[0] in v1.TREE[1:]) or parts == [v1.TREE[0]]:
        return (
            f"the backup starts with {first_member!r} and has no backup-header: this looks "
            "like a format-1 backup (Qubes R1) packed into an archive; unpack it "
            "(tar -xf FILE) and give qrecover the folder that holds qubes.xml"
        )
    return None


def refuse_packed_folder(backups: Sequence[str]) -> None:
    """Raise the packed-folder message when BACKUP is one plain tar file whose
    first file is one of R1's tree; checked before any passphrase is asked."""
    if len(backups) != 1 or backups[0] == "-" or not os.path.isfile(backups[0]):
        return
    first = v1.first_file(backups[0])
    hint = packed_hint(first) if first is not None else None
    if hint is not None:
        raise BackupError(hint)


__all__ = [
    "Format",
    "Words",
    "authenticate",
    "detect",
    "folder_format",
    "headerless",
    "notes",
    "parse_header",
    "read_inventory",
    "unauthenticated",
    "words",
]
