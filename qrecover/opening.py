"""A pass's first steps: the header taken off the backup and authenticated
(and each other copy's compared with it), and the programs checked.

With ``--other-copy``, a header that BACKUP lost (its member missing or
unreadable, its ``.hmac`` missing, or one that does not authenticate) is
taken from the first other copy where it authenticates with the passphrase,
and that is said; BACKUP's chunks are read on as always.  When no copy's
header authenticates either, BACKUP's own failure stands (a wrong
passphrase is still exit 3)."""

from __future__ import annotations

from collections.abc import Callable

from qrecover import formats
from qrecover.archive.members import HEADER, HEADER_HMAC, Member, Members
from qrecover.compat import removeprefix
from qrecover.context import RunContext
from qrecover.errors import (
    AuthenticationError,
    BackupError,
    MissingProgramError,
    ProgramFailed,
    QrecoverError,
)
from qrecover.events import HeaderVerified
from qrecover.fallback import Copies
from qrecover.formats.base import Format, Started
from qrecover.header import MAX_HEADER
from qrecover.runner import CommandLog, control, which


def read_header(
    members: Members, label: str, passphrase: str, ctx: RunContext, copies: Copies,
    notes: list[str] | None = None, jobs: int | None = None,
    started: list[Started] | None = None,
) -> tuple[Format, bytes]:
    """The authenticated format, and the header's raw bytes with its HMAC's
    (part of the backup's identity; empty for R2-Beta3, which wrote none).
    ``notes``: where a header taken from another copy is said.  ``started``:
    where work begun while the header is authenticated is put, for the
    caller to close when the run ends (``jobs`` 1: none is begun)."""
    if members.peek() is None and members.error is None:
        raise BackupError("the backup is empty (no members): not a Qubes backup")

    def authenticates(data: bytes, mac: bytes) -> Format:
        return formats.authenticate(data, mac, passphrase, ctx.command)

    try:
        first = members.require("backup-header")
    except QrecoverError as exc:  # the backup unreadable from its start
        found = _from_copies(copies, authenticates, exc.message, label, notes)
        if found is None:
            raise
        return _verified(found, ctx, copies, authenticates)
    if first.name != HEADER and (bare := formats.detect(first=first.name)) is not None:
        # R2-Beta3 wrote none; or the header was lost, and a copy still has it
        found = _from_copies(copies, authenticates, f"missing from {label} (it starts with "
                             f"{first.name})", label, notes)
        if found is not None:
            return _verified(found, ctx, copies, authenticates)
        ctx.emit(HeaderVerified(bare))  # none to verify: qubes.xml.000's HMAC is first
        return bare, b""
    early: Started | None = None
    try:
        data, hmac_text = _own_header(members, first, label, bool(copies))
        early = _head_start(members, data, hmac_text, passphrase, jobs, started)
        fmt = authenticates(data, hmac_text)
    except QrecoverError as exc:
        if early is not None:
            early.close()  # killed, its output removed: nothing of it is used
        why = (f"in {label} it does not authenticate with the passphrase (damaged)"
               if isinstance(exc, AuthenticationError) else exc.message)
        found = _from_copies(copies, authenticates, why, label, notes)
        if found is None:
            raise
        return _verified(found, ctx, copies, authenticates)
    return _verified((fmt, data, hmac_text), ctx, copies, authenticates)


def _head_start(
    members: Members, data: bytes, hmac_text: bytes, passphrase: str, jobs: int | None,
    started: list[Started] | None,
) -> Started | None:
    """What the format begins on the member after the header while the header is
    authenticated (format 4: qubes.xml's first chunk's key derivation, kept in
    private scratch, used only under the authenticated header's backup id)."""
    begin = formats.head_start(data, hmac_text)
    if started is None or begin is None:
        return None
    after = members.peek()
    early: Started | None = begin(after, data, hmac_text, passphrase, jobs) if after else None
    if early is not None:
        started.append(early)
    return early


def _own_header(members: Members, first: Member, label: str, copies: bool) -> tuple[bytes, bytes]:
    """BACKUP's backup-header and its .hmac, taken off the stream (not yet checked)."""
    if first.name == HEADER_HMAC and copies:  # its header lost in damage: a copy has it?
        members.take()
        raise BackupError(f"{label}: backup-header is missing (the backup starts with its "
                          ".hmac: the header lost in damage?)")
    if first.name != HEADER:
        name = first.name.encode("ascii", "backslashreplace").decode()[:80]
        formats.detect(first=name, refuse_packed=True)  # a packed format-1 folder?
        raise BackupError(f"{label}: does not start with backup-header (found {name!r}): "
                          "not a Qubes backup of format 2, 3 or 4")
    members.take()
    data = first.read_all(MAX_HEADER)
    second = members.require("backup-header.hmac")
    if second.name != HEADER_HMAC:
        raise BackupError("backup-header.hmac is missing: the header cannot be verified")
    members.take()
    return data, second.read_all(formats.MAX_HEADER_HMAC)


def _from_copies(
    copies: Copies, authenticates: Callable[[bytes, bytes], Format], why: str, label: str,
    notes: list[str] | None,
) -> tuple[Format, bytes, bytes] | None:
    """The header of the first other copy where it authenticates (said in
    ``notes``), or None: no copy given, or none authenticates."""
    for copy in copies.copies:
        data = copy.read(HEADER, MAX_HEADER)
        mac = copy.read(HEADER_HMAC, formats.MAX_HEADER_HMAC)
        if data is None or mac is None:
            continue
        try:
            fmt = authenticates(data, mac)
        except QrecoverError:
            continue
        why = removeprefix(removeprefix(why, f"{label}: "), f"{HEADER}: ")
        said = (f"{HEADER}: {why}; taken from the other copy {copy.label}, where it "
                "authenticates")
        if notes is not None:
            notes.append(said)
        return fmt, data, mac
    return None


def _verified(
    found: tuple[Format, bytes, bytes], ctx: RunContext, copies: Copies,
    authenticates: Callable[[bytes, bytes], Format],
) -> tuple[Format, bytes]:
    fmt, data, hmac_text = found
    ctx.emit(HeaderVerified(fmt))
    # Each other copy: the same header, authenticated: before anything is used from it.
    copies.check_header(data, hmac_text, authenticates)
    return fmt, data + b"\0" + hmac_text


def check_programs(fmt: Format, gunzip: str, extractor: str, log: CommandLog) -> None:
    """Every program the pass will run, found before it starts (and GNU tar's kind)."""
    for program in ["tar", extractor, "cat", *fmt.programs(gunzip)]:
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
