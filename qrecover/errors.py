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

# The one table of exit codes: the README, --help and a test all read it.
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
    "DIR's restore record is broken or belongs to another backup), or a format-4 chunk "
    "needs more memory than this machine has available (restore on one with more RAM)",
    EXIT_SIGINT: "interrupted (SIGINT, Ctrl-C)",
    EXIT_SIGTERM: "terminated (SIGTERM)",
}


class QrecoverError(Exception):
    """Base of every error qrecover reports to the user.

    Its kind is its class, and its exit code an attribute of the instance's
    class (as in borg): whoever handles an error decides by type, never by
    matching its text.  ``consequence`` marks an error that only follows from
    another one (``cat`` writing into a pipeline that died), which the cause
    replaces when it is found.
    """

    exit_code = EXIT_INTERNAL
    consequence = False

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
    """The output side failed (would overwrite, not writable, no space).

    ``fatal``: every later stored file would fail the same way (a full,
    read-only or over-quota disk), so the run stops at once.
    """

    exit_code = EXIT_OUTPUT
    fatal = False


class WouldOverwrite(OutputError):
    """Files the run would replace exist, and --force was not given."""


class DiskFull(OutputError):
    """No space left, the quota reached, or a read-only file system."""

    fatal = True


class StoredFileError(BackupError):
    """One stored file could not be used: a damaged, missing or tampered chunk,
    or a stage that failed on what the backup held."""


class FeedFailed(BackupError):
    """``cat`` could not feed a chunk: usually because the pipeline it feeds died."""

    consequence = True


class ProgramFailed(MissingProgramError):
    """A short control command (``tar --version``, ``openssl enc -list``)
    exited non-zero: the program is there but does not work as needed."""

    def __init__(self, command: str, returncode: int, said: str) -> None:
        told = f": {said}" if said else ""
        super().__init__(
            f"`{command}` exited {returncode}{told}",
            hint="check that this program works (run it by hand)",
        )
        self.command = command
        self.returncode = returncode


class Interrupted(BaseException):
    """Raised from a signal handler so that clean-up runs on the way out.

    A BaseException, like KeyboardInterrupt, so that no handler for errors
    mistakes it for one.
    """

    def __init__(self, signum: int, exit_code: int) -> None:
        super().__init__(f"interrupted by signal {signum}")
        self.exit_code = exit_code
