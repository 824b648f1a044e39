"""A pass's first steps: the header taken off the backup and authenticated
(and each other copy's compared with it), and the programs checked."""

from __future__ import annotations

from qrecover import formats
from qrecover.archive.members import HEADER, HEADER_HMAC, Members
from qrecover.context import RunContext
from qrecover.errors import BackupError, MissingProgramError, ProgramFailed
from qrecover.events import HeaderVerified
from qrecover.fallback import Copies
from qrecover.formats.base import Format
from qrecover.header import MAX_HEADER
from qrecover.runner import CommandLog, control, which


def read_header(
    members: Members, label: str, passphrase: str, ctx: RunContext, copies: Copies
) -> tuple[Format, bytes]:
    """The authenticated format, and the header's raw bytes with its HMAC's
    (part of the backup's identity; empty for R2-Beta3, which wrote none)."""
    if members.peek() is None and members.error is None:
        raise BackupError("the backup is empty (no members): not a Qubes backup")
    first = members.require("backup-header")
    if first.name != HEADER and (bare := formats.headerless(first.name)) is not None:
        ctx.emit(HeaderVerified(bare))  # none to verify: qubes.xml.000's HMAC is first
        return bare, b""
    members.take()
    if first.name != HEADER:
        name = first.name.encode("ascii", "backslashreplace").decode()[:80]
        raise BackupError(formats.packed_hint(name) or (  # a packed format-1 folder?
            f"{label}: does not start with backup-header (found {name!r}): "
            "not a Qubes backup of format 2, 3 or 4"
        ))
    data = first.read_all(MAX_HEADER)
    second = members.require("backup-header.hmac")
    if second.name != HEADER_HMAC:
        raise BackupError("backup-header.hmac is missing: the header cannot be verified")
    members.take()
    hmac_text = second.read_all(formats.MAX_HEADER_HMAC)
    fmt = formats.authenticate(data, hmac_text, passphrase, ctx.command)
    ctx.emit(HeaderVerified(fmt))
    # Each other copy: the same header, authenticated: before anything is used from it.
    copies.check_header(
        data, hmac_text, lambda d, m: formats.authenticate(d, m, passphrase, ctx.command)
    )
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
