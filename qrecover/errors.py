"""One error hierarchy; only the CLI boundary turns an error into an exit code."""

from __future__ import annotations

EXIT_OK = 0
EXIT_INTERNAL = 1
EXIT_USAGE = 2
EXIT_AUTH = 3
EXIT_BACKUP = 4
EXIT_MISSING_PROGRAM = 5
EXIT_OUTPUT = 6
EXIT_SIGINT = 130
EXIT_SIGTERM = 143

# The one table of exit codes: README, --help and a test all read it.
EXIT_CODES: dict[int, str] = {
    EXIT_OK: "success: everything selected was verified (and restored)",
    EXIT_INTERNAL: "internal error (a bug in qrecover; please report it)",
    EXIT_USAGE: "usage error (bad option, unknown VM name, no passphrase available)",
    EXIT_AUTH: "the passphrase does not authenticate the backup header "
    "(wrong passphrase or damaged header); nothing was written",
    EXIT_BACKUP: "the backup is damaged, truncated, tampered, malformed, unsupported "
    "or not a Qubes backup",
    EXIT_MISSING_PROGRAM: "a program qrecover needs is missing (the message names the package)",
    EXIT_OUTPUT: "output problem (would overwrite, no space, not writable; with --resume: "
    "DIR's restore record is broken or belongs to another backup)",
    EXIT_SIGINT: "interrupted (SIGINT, Ctrl-C)",
    EXIT_SIGTERM: "terminated (SIGTERM)",
}


class QrecoverError(Exception):
    """Base of every error qrecover reports to the user."""

    exit_code = EXIT_INTERNAL

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message


class UsageError(QrecoverError):
    exit_code = EXIT_USAGE


class AuthenticationError(QrecoverError):
    exit_code = EXIT_AUTH


class BackupError(QrecoverError):
    exit_code = EXIT_BACKUP


class MissingProgramError(QrecoverError):
    exit_code = EXIT_MISSING_PROGRAM


class OutputError(QrecoverError):
    exit_code = EXIT_OUTPUT


class Interrupted(BaseException):
    """Raised from a signal handler so that clean-up runs on the way out.

    A BaseException, like KeyboardInterrupt, so that no handler for errors
    mistakes it for one.
    """

    def __init__(self, signum: int, exit_code: int) -> None:
        super().__init__(f"interrupted by signal {signum}")
        self.exit_code = exit_code
