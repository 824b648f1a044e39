"""How SIGINT (Ctrl-C) and SIGTERM stop a run: recorded, then acted on.

The handler only records the signal.  It raises nothing: an exception raised
by a handler lands wherever the main thread happens to be, and where that is
a garbage-collector or weakref callback, Python prints it as "ignored" and
drops it (the run then went on to its end); where it is ``Thread.start()`` or
``Popen()``, it leaves a thread not marked started or a child not recorded.

The run asks at its natural points, :func:`check`: each member of the backup,
each program started, the end of the command; and its waits are bounded so
that a wait is a natural point too (:func:`wait_readable`, :func:`wait_process`,
:func:`join`, :func:`wait_condition` wake every :data:`POLL` seconds and
check).  :func:`check` raises KeyboardInterrupt for SIGINT and
:class:`Interrupted` for SIGTERM, in the main thread only; the exception then
unwinds the run as any error does: pipelines killed, scratch removed, nothing
half-written placed.

Every program the run starts is the leader of a process group of its own
(``start_new_session``: it and whatever it starts, such as GNU tar's
new-volume script), registered here by the runner as it starts
(:func:`started`); a run that is stopped kills each group still there with
``killpg`` (:func:`kill_all`): no ``/proc`` scans for children.  A side
effect, wanted: Ctrl-C at a terminal reaches qrecover alone, which stops its
programs itself, in order, instead of racing them.

A process started with SIGINT ignored (a job started with ``&`` by a
non-interactive shell) keeps ignoring it, as every program should: its user
asked for it not to be stopped by the terminal's Ctrl-C.  SIGTERM is always
handled.
"""

from __future__ import annotations

import os
import select
import signal
import subprocess
import threading
import weakref
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from types import FrameType

from qrecover.errors import EXIT_SIGTERM, Interrupted

# How long any wait of the main thread lasts before it looks for a signal again.
POLL = 0.1

_received: list[int] = []  # the signals that came, in order (a list: appended to atomically)
_raised: list[bool] = []  # check() raised once: the run is unwinding, its clean-up waits
_raising = threading.local()  # set while the handler may raise (an interactive prompt)
_programs: weakref.WeakSet[subprocess.Popen[bytes]] = weakref.WeakSet()


def _on_signal(signum: int, frame: FrameType | None) -> None:
    _received.append(signum)
    if getattr(_raising, "on", False):
        _raise(signum)


def _raise(signum: int) -> None:
    if signum == signal.SIGINT:
        raise KeyboardInterrupt
    raise Interrupted(signum, EXIT_SIGTERM)


@contextmanager
def handled() -> Iterator[None]:
    """Handle SIGTERM, and SIGINT unless it is ignored, for one run; forget a
    signal an earlier run in this process got; put the handlers back after."""
    saved = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    _received.clear()
    _raised.clear()
    signal.signal(signal.SIGTERM, _on_signal)
    if saved[signal.SIGINT] is not signal.SIG_IGN:
        signal.signal(signal.SIGINT, _on_signal)
    try:
        yield
    finally:
        for signum, handler in saved.items():
            if handler is not None:
                signal.signal(signum, handler)
        _received.clear()  # outside a run, nothing is raised
        _raised.clear()


@contextmanager
def raising() -> Iterator[None]:
    """Around a wait that starts nothing and holds nothing (a passphrase typed
    at a terminal): there a signal raises at once, or the prompt would wait for
    Enter."""
    check()
    _raising.on = True
    try:
        yield
    finally:
        _raising.on = False


def check(again: bool = False) -> None:
    """Raise the first signal's exception if one came: once, so that the
    clean-up it unwinds to can wait for what it stops; and only in the main
    thread (the others end when what they serve is killed).  The command's
    end asks ``again``: raised before or not, a signal that came stops the
    command with its exit code, whatever caught the first raise."""
    if _received and (again or not _raised) and (
            threading.current_thread() is threading.main_thread()):
        _raised.append(True)
        _raise(_received[0])


def started(proc: subprocess.Popen[bytes]) -> None:
    """Record a program the runner started (the leader of its own group)."""
    _programs.add(proc)


def kill_group(proc: subprocess.Popen[bytes]) -> None:
    """SIGKILL ``proc`` and everything in its process group.  Only while it is
    not reaped: until then its pid, and so its group's id, cannot be reused."""
    if proc.returncode is None:
        with suppress(OSError):
            os.killpg(proc.pid, signal.SIGKILL)


def kill_all() -> None:
    """Stop every program of the run still there, with its group, and reap it."""
    for proc in list(_programs):
        kill_group(proc)
    for proc in list(_programs):
        with suppress(OSError, subprocess.TimeoutExpired):
            proc.wait(timeout=5)


def wait_readable(fd: int) -> None:
    """Return once ``fd`` (a pipe or terminal; a regular file always is) can be
    read without blocking, or raise the signal that came meanwhile."""
    while True:
        check()
        ready, _, _ = select.select([fd], [], [], POLL)
        if ready:
            return


def wait_process(proc: subprocess.Popen[bytes]) -> int:
    """``proc.wait()``, checking for a signal every :data:`POLL` seconds."""
    while True:
        check()
        with suppress(subprocess.TimeoutExpired):
            return proc.wait(timeout=POLL)


def join(thread: threading.Thread, timeout: float | None = None) -> None:
    """``thread.join(timeout)``, checking for a signal every :data:`POLL` seconds."""
    waited = 0.0
    while thread.is_alive() and (timeout is None or waited < timeout):
        check()
        thread.join(POLL)
        waited += POLL


def wait_condition(condition: threading.Condition) -> None:
    """``condition.wait()`` (its lock held), checking for a signal meanwhile:
    the caller looks again at what it waits for, as after any wake-up."""
    check()
    condition.wait(POLL)
