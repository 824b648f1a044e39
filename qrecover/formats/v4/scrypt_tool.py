"""Format 4's authentication and decryption stage: the ``scrypt`` utility.

Qubes R4 encrypted *and* authenticated every chunk separately with
``scrypt enc``, under the passphrase ``BACKUPID!NAME.NNN!PASSPHRASE``
(``backup-header!PASSPHRASE`` for ``backup-header.hmac``, the encrypted copy
of the header).  ``scrypt dec`` checks the chunk's HMAC only at the end of
the file and may write plaintext before it knows the chunk is bad, so each
chunk is decrypted into a private scratch file and used only once scrypt has
exited 0.

The passphrase never is in scrypt's argv: scrypt >= 1.3 reads it from an
environment variable (``--passphrase env:backup_pass``) and scrypt 1.2.1
from its stdin (``-P``), which qrecover fills from a private pipe.  scrypt
1.2.0 and older only read a terminal; they are refused.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from qrecover.errors import MissingProgramError, UsageError
from qrecover.runner import (
    PASS_ENV,
    CommandLog,
    Pipeline,
    Stage,
    StageResult,
    control,
    log_command,
    which,
)

# Every file written by `scrypt enc` starts with these bytes (format version 0).
SCRYPT_MAGIC = b"scrypt\x00"
# What the passphrase is prefixed with for the header's encrypted copy.
HEADER_PREFIX = "backup-header!"
# A pipe holds at least this much without a reader, so the -P passphrase is
# written before scrypt starts without any risk of blocking.
_PIPE_SAFE = 4096

PassphraseStyle = Literal["env", "stdin"]


def is_scrypt_file(data: bytes) -> bool:
    """Does ``data`` start like a file written by ``scrypt enc``?"""
    return data.startswith(SCRYPT_MAGIC)


@dataclass(frozen=True)
class ScryptTool:
    """The installed scrypt, and how the passphrase reaches it."""

    style: PassphraseStyle


def detect_scrypt(log: CommandLog = log_command) -> ScryptTool:
    """Find scrypt and how it can take a passphrase without a terminal.

    Its usage text (printed for ``--help``, on stderr) lists the options:
    ``--passphrase method:arg`` since 1.3.0, ``-P`` since 1.2.1.
    """
    which("scrypt")
    # scrypt --help prints its usage on stderr and exits 1.
    usage = control("scrypt", "--help", with_stderr=True, log=log, ok_codes=(0, 1))
    if "--passphrase" in usage:
        return ScryptTool("env")
    if re.search(r"(^|[\s\[])-P([\]\s]|$)", usage):
        return ScryptTool("stdin")
    raise MissingProgramError(
        "the installed scrypt is too old: scrypt >= 1.2.1 is needed "
        "(older versions read the passphrase only from a terminal)",
        hint="install a newer package 'scrypt' (Debian >= 10 and Fedora ship one)",
    )


def chunk_prefix(backup_id: str, chunk: str) -> str:
    """What precedes the passphrase for a chunk: ``BACKUPID!vm7/private.img.000!``."""
    return f"{backup_id}!{chunk}!"


def dec_stage(tool: ScryptTool, infile: str, outfile: str) -> Stage:
    """``scrypt dec`` of ``infile`` into ``outfile`` (pure: no program is run)."""
    if tool.style == "env":
        return Stage(
            ("scrypt", "dec", "--passphrase", f"env:{PASS_ENV}", infile, outfile),
            secret_env=(PASS_ENV,),
        )
    return Stage(("scrypt", "dec", "-P", infile, outfile))


def render_dec(tool: ScryptTool, infile: str, outfile: str, prefix: str) -> str:
    """The shell form of a ``scrypt dec`` run, as a person would replay it.

    The prefix (``backup-header!`` or ``BACKUPID!NAME.NNN!``) is single-quoted,
    so bash's history expansion never sees its ``!``; the passphrase itself
    stays in ``$backup_pass``.
    """
    return render_stage(tool, dec_stage(tool, infile, outfile), prefix)


def render_stage(tool: ScryptTool, stage: Stage, prefix: str) -> str:
    """:func:`render_dec` of a stage built already (with ``-M`` and ``-t``, say)."""
    secret = f'{shlex.quote(prefix)}"${PASS_ENV}"'
    if tool.style == "env":
        return f"{PASS_ENV}={secret} {stage.render()}"
    return f"printf '%s\\n' {secret} | {stage.render()}"


def decrypt_file(
    tool: ScryptTool,
    infile: Path,
    outfile: Path,
    secret: str,
    shown: str | None = None,
    log: CommandLog = log_command,
) -> StageResult:
    """Run ``scrypt dec infile outfile`` with ``secret`` as its passphrase.

    Returns scrypt's result; the caller uses ``outfile`` only if it is ok.
    ``shown``: how it is logged (see :func:`render_dec`).
    """
    stage = dec_stage(tool, str(infile), str(outfile))
    pipeline, read_end = dec_pipeline(tool, stage, secret, log, shown)
    try:
        (result,) = pipeline.start().wait()
    finally:
        if read_end >= 0:
            os.close(read_end)
    return result


def dec_pipeline(
    tool: ScryptTool, stage: Stage, secret: str, log: CommandLog = log_command,
    shown: str | None = None,
) -> tuple[Pipeline, int]:
    """``stage``'s pipeline, not started, given ``secret`` the way ``tool`` takes
    it; and the read end of the pipe that holds it (-1: none), the caller's to
    close once scrypt has exited."""
    if tool.style == "env":
        return Pipeline([stage], stdin=subprocess.DEVNULL, secrets={PASS_ENV: secret},
                        shown=shown, log=log), -1
    line = (secret + "\n").encode("utf-8")
    if len(line) > _PIPE_SAFE:
        raise UsageError("the passphrase is too long for scrypt -P (over 4000 bytes)")
    read_end, write_end = os.pipe()
    try:
        os.write(write_end, line)
    finally:
        os.close(write_end)
    return Pipeline([stage], stdin=read_end, shown=shown, log=log), read_end
