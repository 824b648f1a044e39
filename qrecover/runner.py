"""The one command runner: every external program starts here.

A :class:`Stage` is an argv plus the names of the environment variables that
carry the passphrase to it.  The argv that runs is the argv that is logged
(``+ shlex.join(argv)``, like ``set -x``), so what qrecover does and what it
shows for replay cannot drift apart.  The passphrase itself never is in an
argv: a stage that needs it reads it from an environment variable given to
that one child only (``openssl ... -pass env:backup_pass``).

Data moves between stages through OS pipes; the stderr of every stage is kept
(its first and last few KiB, in memory) so that a failure can be diagnosed
from all stages, not only the last one.  Short control commands (``tar --version``,
``openssl enc -list``) start here too (:func:`control`), and their non-zero
exit is an error (:class:`~qrecover.errors.ProgramFailed`), never ignored.
A program that is not found is told apart: :class:`MissingProgramError`
naming the package to install, before anything starts.

Every start is logged here, by :meth:`Pipeline.start`, through the pipeline's
``log`` (``+ shlex.join(argv)``; ``shown`` when the command is written for a
person, as scrypt's secret prefix is), so that no call site can forget to.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import shlex
import shutil
import subprocess
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Callable  # typing's: CommandLog is a runtime alias (3.8)

import sh

from qrecover import signals
from qrecover.compat import zip_strict
from qrecover.errors import MissingProgramError, ProgramFailed
from qrecover.packages import PACKAGES
from qrecover.stages.guard import TarGuard

log = logging.getLogger("qrecover")

F_SETPIPE_SZ = 1031  # fcntl.F_SETPIPE_SZ, named in Python >= 3.10 only on some builds
PIPE_SIZE = 1024 * 1024

# Environment variable through which a stage receives the passphrase.  The
# same name is used by the official recovery page's v4 steps and by the
# scripts qrecover writes, so a logged command can be replayed as it is.
PASS_ENV = "backup_pass"
# Variables that may carry the passphrase into qrecover; never passed on.
SECRET_ENV_NAMES = ("QRECOVER_PASSPHRASE", PASS_ENV)

def which(program: str) -> str:
    """Full path of ``program``, or a :class:`MissingProgramError` naming its package."""
    found = shutil.which(program)
    if found is None:
        package = PACKAGES.get(program, program)
        raise MissingProgramError(
            f"{program} not found on PATH",
            hint=f"install the package '{package}' (e.g. apt-get install {package.split()[0]})",
        )
    return found


def child_env(secrets: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment for a child: ours, minus anything secret, plus ``secrets``."""
    env = {k: v for k, v in os.environ.items() if k not in SECRET_ENV_NAMES}
    if secrets:
        env.update(secrets)
    return env


@dataclass(frozen=True)
class Stage:
    """One program of a pipeline: its argv and the env names that carry the secret."""

    argv: tuple[str, ...]
    secret_env: tuple[str, ...] = ()

    @property
    def program(self) -> str:
        return self.argv[0]

    def render(self) -> str:
        return shlex.join(self.argv)


def render_pipeline(
    stages: Sequence[Stage], stdin: str | None = None, stdout: str | None = None
) -> str:
    """The shell form of a pipeline, pasteable into sh/bash/dash."""
    text = " | ".join(stage.render() for stage in stages)
    if stdin is not None:
        text = f"{text} < {shlex.quote(stdin)}"
    if stdout is not None:
        text = f"{text} > {shlex.quote(stdout)}"
    return text


# How a command is logged: ``+ COMMAND`` on the ``qrecover`` logger (``-v``).
# A run passes its own (which first erases its progress line); the default
# only logs.
CommandLog = Callable[[str], None]


def log_command(command: str) -> None:
    log.info("+ %s", command)


# The exit status of a shell or wrapper that could not find a program.
NOT_FOUND = 127
# What a stage says when the output side failed, not the backup: the only
# place where qrecover reads meaning into another program's words.  The first
# group would fail every later stored file too (the run stops).
_FATAL_OUTPUT = (
    "No space left on device",
    "Disk quota exceeded",
    "Read-only file system",
    "Wrote only",  # GNU tar's short write, as on a disk that just filled up
)
_OUTPUT_TROUBLE = (*_FATAL_OUTPUT, "Permission denied", "Cannot write")  # GNU tar


@dataclass
class StageResult:
    stage: Stage
    returncode: int
    stderr: str

    @property
    def ok(self) -> bool:
        return self.returncode == 0

    @property
    def output_trouble(self) -> bool:
        """Did the stage fail on the output side (disk full, not writable)?"""
        return any(marker in self.stderr for marker in _OUTPUT_TROUBLE)

    @property
    def disk_full(self) -> bool:
        """Full, over quota or read-only: every later write would fail too."""
        return any(marker in self.stderr for marker in _FATAL_OUTPUT)

    def describe(self) -> str:
        """`openssl exited 1: bad decrypt` — the stage and the last line it said."""
        tail = first_meaningful_line(self.stderr)
        if self.stage.program == "igzip":  # it names its standard input "(null)"
            tail = tail.replace("file (null)", "its input").replace("(null)", "its input")
        if self.returncode < 0:
            what = f"{self.stage.program} was killed by signal {-self.returncode}"
        elif self.returncode == NOT_FOUND:
            what = f"{self.stage.program} exited {NOT_FOUND} (a program it runs was not found)"
        else:
            what = f"{self.stage.program} exited {self.returncode}"
        return f"{what}: {tail}" if tail else what


# Lines that say nothing about what went wrong: expected warnings, and
# summaries that hide the real error printed before them.
_EXPECTED_NOISE = (
    "deprecated key derivation used",  # OpenSSL 3 on `enc -md md5` without -pbkdf2
    "Using -iter or -pbkdf2 would be better",
    "Exiting with failure status due to previous errors",  # GNU tar
    "Removing leading",  # GNU tar, harmless rewrite of a name
)


def first_meaningful_line(text: str) -> str:
    """The first line that says what went wrong (later lines are consequences)."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    lines = [ln for ln in lines if not any(noise in ln for noise in _EXPECTED_NOISE)]
    return lines[0][:300] if lines else ""


class _StderrTail:
    """A stage's stderr, read by a thread into memory: its start (where the
    first error usually is) and its end, a few KiB each.  Never a file: the
    disk may be the very thing that is full."""

    KEEP = 8192

    def __init__(self, pipe: IO[bytes]) -> None:
        self._pipe = pipe
        self._head = bytearray()
        self._tail = bytearray()
        self._dropped = False
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        with self._pipe:
            while block := os.read(self._pipe.fileno(), 65536):
                room = self.KEEP - len(self._head)
                if room > 0:
                    self._head += block[:room]
                    block = block[room:]
                if block:
                    self._tail += block
                    if len(self._tail) > self.KEEP:
                        del self._tail[: len(self._tail) - self.KEEP]
                        self._dropped = True

    def text(self) -> str:
        signals.join(self._thread)
        gap = b"\n[...]\n" if self._dropped else b""
        return bytes(self._head + gap + self._tail).decode("utf-8", "replace")


@dataclass
class Pipeline:
    """Stages joined by OS pipes; started at once, waited for together."""

    stages: Sequence[Stage]
    stdin: int  # an fd; the caller keeps ownership
    stdout: int | IO[bytes] | None = None  # None: discard
    secrets: Mapping[str, str] = field(default_factory=dict)
    # Makes the in-process guard that screens the stream into the last stage
    # (tar); given the fds it reads from and writes to, which it then owns.
    guard: Callable[[int, int], TarGuard] | None = None
    cwd: Path | None = None  # where every stage runs (debugfs rdump writes relative to it)
    shown: str | None = None  # the logged form, when not the stages' shlex.join
    note: str = ""  # logged after the command, as a comment
    log: CommandLog = log_command
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)
    guarded: TarGuard | None = None
    _guard_thread: threading.Thread | None = None
    _stderrs: list[_StderrTail] = field(default_factory=list)

    def _start_guard(self, src: int) -> int:
        """Run the guard on ``src``; return the fd the last stage reads from."""
        assert self.guard is not None
        read_end, write_end = os.pipe()
        with contextlib.suppress(OSError):
            fcntl.fcntl(write_end, F_SETPIPE_SZ, PIPE_SIZE)
        self.guarded = self.guard(src, write_end)
        self._guard_thread = threading.Thread(target=self.guarded.run, daemon=True)
        self._guard_thread.start()
        return read_end

    def render(self) -> str:
        """The command as logged and as a person would replay it."""
        text = self.shown if self.shown is not None else render_pipeline(self.stages)
        if self.cwd is not None:
            text = f"(cd {shlex.quote(str(self.cwd))} && {text})"
        return f"{text}  # {self.note}" if self.note else text

    def start(self) -> Pipeline:
        # Resolve every program before starting any, so a missing one fails
        # cleanly instead of leaving half a pipeline running.
        paths = [which(stage.program) for stage in self.stages]
        signals.check()  # never a program started after a signal (qrecover.signals)
        self.log(self.render())
        prev = self.stdin
        try:
            for i, (stage, path) in enumerate(zip_strict(self.stages, paths)):
                last = i == len(self.stages) - 1
                if last and self.guard is not None:
                    # The guard owns what it reads: our pipe end, or a copy of the caller's.
                    prev = self._start_guard(prev if i > 0 else os.dup(prev))
                env = child_env({k: self.secrets[k] for k in stage.secret_env})
                out: int | IO[bytes] | None
                if last:
                    out = self.stdout if self.stdout is not None else subprocess.DEVNULL
                else:
                    out = subprocess.PIPE
                try:
                    proc = subprocess.Popen(
                        [path, *stage.argv[1:]],
                        stdin=prev,
                        stdout=out,
                        stderr=subprocess.PIPE,
                        env=env,
                        cwd=self.cwd,
                        close_fds=True,
                        # its own process group, killed whole (qrecover.signals)
                        start_new_session=True,
                    )
                except FileNotFoundError:  # gone since which() found it
                    raise MissingProgramError(f"{stage.program}: could not be started "
                                              f"({path} not found)") from None
                self.procs.append(proc)
                signals.started(proc)
                assert proc.stderr is not None
                self._stderrs.append(_StderrTail(proc.stderr))
                if i > 0 or (last and self.guard is not None):
                    # The child has its copy; ours would keep the pipe open.
                    os.close(prev)
                if not last:
                    assert proc.stdout is not None
                    prev = os.dup(proc.stdout.fileno())
                    proc.stdout.close()
                    # 1 MiB between stages instead of 64 KiB: fewer stalls and
                    # wake-ups (igzip writes 1 MiB at a time; scripts/bench).
                    with contextlib.suppress(OSError):
                        fcntl.fcntl(prev, F_SETPIPE_SZ, PIPE_SIZE)
        except BaseException:
            self.kill()
            raise
        return self

    def kill(self) -> None:
        """Kill every stage with what it started (its process group), and reap it."""
        for proc in self.procs:
            if proc.poll() is None:
                signals.kill_group(proc)
        for proc in self.procs:
            proc.wait()
        if self._guard_thread is not None:
            signals.join(self._guard_thread, timeout=5)

    def wait(self) -> list[StageResult]:
        """Every stage's result, in order; none if the pipeline never started."""
        results: list[StageResult] = []
        if not self.procs:
            return results
        for proc, stage, err in zip_strict(self.procs, self.stages, self._stderrs):
            code = signals.wait_process(proc)
            results.append(StageResult(stage, code, err.text()))
        if self._guard_thread is not None:
            signals.join(self._guard_thread)
        return results


def control(
    program: str,
    *args: str,
    with_stderr: bool = False,
    log: CommandLog = log_command,
    ok_codes: tuple[int, ...] = (0,),
) -> str:
    """Run a short control command (no secrets, small output); return its stdout.

    The sh package runs it (the data path never goes through sh: see
    PIPELINES.md), started and logged here like every other program.  Any
    exit status outside ``ok_codes`` raises :class:`ProgramFailed` (the
    caller catches it by type where a failure means something, as an
    OpenSSL too old for ``enc -list``); 127 is "not found".  ``with_stderr``
    adds what it printed on stderr (``scrypt --help`` prints its usage
    there, and exits 1).
    """
    stage = Stage((program, *args))
    path = which(program)  # a missing program is told apart before anything starts
    log(stage.render())
    done = sh.Command(path)(
        *args,
        _env=child_env(),
        _in=b"",  # nothing on its stdin
        _tty_out=False,  # sh would give it a terminal; a control command gets a pipe
        _ok_code=list(range(256)),  # every status is judged below, never ignored
        _return_cmd=True,
        _decode_errors="replace",
    )
    returncode = int(done.exit_code)
    text = bytes(done.stdout[: 1 << 20]).decode("utf-8", "replace")
    said = bytes(done.stderr[: 1 << 20]).decode("utf-8", "replace")
    if returncode not in ok_codes:
        if returncode == NOT_FOUND:
            raise MissingProgramError(f"{stage.render()}: not found (exit status 127)")
        raise ProgramFailed(stage.render(), returncode, first_meaningful_line(said))
    return text + said if with_stderr else text


def first_failure(results: Sequence[StageResult]) -> StageResult | None:
    """The stage that explains a failed pipeline.

    Downstream stages fail as a consequence of upstream ones (gzip reports
    "not in gzip format" and openssl then dies writing into a closed pipe),
    so prefer the most upstream stage that failed on its own: a stage killed
    by SIGPIPE or complaining about writing output is a consequence.
    """
    failed = [r for r in results if not r.ok]
    if not failed:
        return None
    return own_failure(failed) or failed[0]


def own_failure(results: Sequence[StageResult]) -> StageResult | None:
    """The most upstream stage that failed on its own, not as a consequence."""
    consequences = ("error writing output", "Broken pipe", "write error")
    for result in results:
        if result.ok or result.returncode == -13:  # SIGPIPE
            continue
        if any(c in result.stderr for c in consequences):
            continue
        return result
    return None
