"""Every backup format, behind one seam (see base.py): the registry, and detection.

Each format module declares how it is recognised (its ``RECOGNISED``, a
:class:`~qrecover.formats.base.Recognition`), and :data:`FORMATS` lists them
in the order they are tried.  The header cannot be trusted before it is
authenticated, and each format authenticates it its own way, so a format
with a header is decided by the *shape* of ``backup-header`` and its
``.hmac`` (:func:`authenticate`): a ``.hmac`` written by ``scrypt enc`` is
format 4, a header naming no ``version`` is format 2's (Qubes R2 wrote four
keys and no version), anything else must be a format-3 HMAC line.  Only once
authenticated is the header parsed (:func:`parse_header`, with the model of
the version it names), and that version must be the one it was
authenticated as.  What is recognised before any header (:func:`detect`): a
folder with no header (format 1), a stream with no header starting with
``qubes.xml.000`` (R2-Beta3's), a format-1 folder packed into a tar (refused).

Adding a format is adding a module here and a line to ``FORMATS``: nothing
outside this package names a format or branches on its version.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import overload

from qrecover.errors import BackupError
from qrecover.formats import v1, v1_words, v2, v3, v3_words, v4
from qrecover.formats.base import Format, HeaderlessFormat, HeadStart, Recognition, Words
from qrecover.formats.v2 import words as v2_words
from qrecover.formats.v4 import words as v4_words
from qrecover.header import Header, split_header, validate
from qrecover.hmacs import MAX_HMAC_FILE
from qrecover.inventory import Inventory, parse_inventory
from qrecover.runner import CommandLog, log_command

# The largest backup-header.hmac any format has.
MAX_HEADER_HMAC = max(v4.MAX_HEADER_HMAC, MAX_HMAC_FILE)


# Every format, in the order it is tried (format 3's header claims whatever
# the others' did not, so it comes after them).
FORMATS: tuple[Recognition, ...] = (
    v4.RECOGNISED,
    v2.RECOGNISED,
    v3.RECOGNISED,
    v1.RECOGNISED,
)
_MODELS: dict[int, type[v3.BackupHeader] | type[v4.BackupHeaderV4]] = {
    v3.VERSION: v3.BackupHeader,
    v4.VERSION: v4.BackupHeaderV4,
}


@overload
def detect(*, paths: Sequence[str]) -> None: ...
@overload
def detect(*, source: object) -> HeaderlessFormat | None: ...
@overload
def detect(*, first: str, refuse_packed: bool = False) -> Format | None: ...


def detect(
    *,
    paths: Sequence[str] = (),
    source: object = None,
    first: str | None = None,
    refuse_packed: bool = False,
) -> Format | None:
    """The backup's format as far as it is told before any header is
    authenticated, from what is known of BACKUP so far, the ways each format
    declares (its ``RECOGNISED``) tried in the registry's order:

    - ``paths``, BACKUP as given: one plain tar file holding a format's folder
      is refused (BackupError), before any passphrase is asked;
    - ``source``, BACKUP opened: a folder of a format with no header (format
      1), read with no passphrase;
    - ``first``, the first member of a stream that does not start with
      backup-header: a format that wrote none (R2-Beta3's); with
      ``refuse_packed``, a format's folder packed into it is refused.

    None: the format is the one that authenticates the header (:func:`authenticate`).
    """
    one_file = len(paths) == 1 and paths[0] != "-" and os.path.isfile(paths[0])
    for kind in FORMATS:
        found: Format | None = None
        if one_file and kind.packed_file is not None:
            _refuse(kind.packed_file(paths[0]))
        if source is not None and kind.folder is not None:
            found = kind.folder(source)
        if first is not None and kind.first_member is not None:
            found = kind.first_member(first)
        if found is not None:
            return found
    for kind in FORMATS:
        if first is not None and refuse_packed and kind.packed is not None:
            _refuse(kind.packed(first))
    return None


def _refuse(why: str | None) -> None:
    if why is not None:
        raise BackupError(why)


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
    """Authenticate ``backup-header`` with ``backup-header.hmac``, then parse it,
    as the first format of the registry whose shape they have.

    Raises AuthenticationError (exit 3) when the passphrase does not
    authenticate the header, BackupError (exit 4) for a malformed header or
    one naming a version that is not the one it was authenticated as.
    """
    kind = _by_header(header, header_hmac)
    assert kind.authenticate is not None  # a format found by its header authenticates it
    return kind.authenticate(header, header_hmac, passphrase, log, parse_header)


def _by_header(header: bytes, header_hmac: bytes) -> Recognition:
    """The first format of the registry whose header shape these have."""
    return next(k for k in FORMATS if k.header is not None and k.header(header, header_hmac))


def head_start(header: bytes, header_hmac: bytes) -> HeadStart | None:
    """What the format of this (not yet authenticated) header begins while it is
    authenticated (qrecover.opening), if anything."""
    return _by_header(header, header_hmac).head_start


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


__all__ = [
    "Format",
    "Words",
    "authenticate",
    "detect",
    "notes",
    "parse_header",
    "read_inventory",
    "unauthenticated",
    "words",
]
