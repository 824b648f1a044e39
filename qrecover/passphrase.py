"""Where the passphrase comes from: a file, the environment, or the terminal."""

from __future__ import annotations

import getpass
import os
from pathlib import Path

from qrecover import signals
from qrecover.compat import removesuffix
from qrecover.errors import UsageError

ENV_VAR = "QRECOVER_PASSPHRASE"


def _has_terminal() -> bool:
    try:
        fd = os.open("/dev/tty", os.O_RDWR | os.O_NOCTTY)
    except OSError:
        return False
    os.close(fd)
    return True


def get_passphrase(passphrase_file: Path | None) -> str:
    """``--passphrase-file`` (first line), else ``$QRECOVER_PASSPHRASE``, else a prompt.

    The prompt reads the terminal itself (``/dev/tty``), never standard
    input, which may be the backup.
    """
    if passphrase_file is not None:
        try:
            raw = passphrase_file.read_bytes()
        except OSError as exc:
            raise UsageError(f"--passphrase-file {passphrase_file}: {exc.strerror}") from None
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise UsageError(f"--passphrase-file {passphrase_file}: not UTF-8 text") from None
        line = removesuffix(text.split("\n", 1)[0], "\r")
        if not line:
            raise UsageError(f"--passphrase-file {passphrase_file}: the first line is empty")
        return line
    from_env = os.environ.get(ENV_VAR)
    if from_env:
        return from_env
    if not _has_terminal():
        raise UsageError(
            f"no passphrase: use --passphrase-file FILE or set {ENV_VAR} "
            "(there is no terminal to ask on)"
        )
    try:
        with signals.raising():  # Ctrl-C at the prompt stops at once
            entered = getpass.getpass("Backup passphrase: ")
    except EOFError:
        raise UsageError("no passphrase entered") from None
    if not entered:
        raise UsageError("no passphrase entered")
    return entered
