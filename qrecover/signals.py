"""How SIGINT (Ctrl-C) and SIGTERM stop a run, and that they always do.

The handler raises (KeyboardInterrupt for SIGINT, :class:`Interrupted` for
SIGTERM) so that every pipeline is killed and the scratch removed on the way
out.  Python runs a handler wherever the main thread is, and where it is a
weakref callback or a ``__del__`` (the garbage collector at work), the
exception is printed as "ignored" and lost: the run would go on to its end as
if the signal never came.  So the handler also records the signal, and the
run asks again where it can stop cleanly (each member of the backup, each
program started, the end of the command): :func:`check` raises it again.

The record is the process's, as a signal is: it stops every run in it.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from pathlib import Path
from types import FrameType

from qrecover.errors import EXIT_SIGTERM, Interrupted


class _Received:
    signum: int | None = None


def _raise(signum: int) -> None:
    if signum == signal.SIGINT:
        raise KeyboardInterrupt
    raise Interrupted(signum, EXIT_SIGTERM)


def _on_signal(signum: int, frame: FrameType | None) -> None:
    _Received.signum = signum
    _raise(signum)


def install() -> None:
    """Handle SIGTERM, and SIGINT unless it is ignored (a job started in the
    background with ``&``); forget a signal an earlier run in this process got."""
    _Received.signum = None
    signal.signal(signal.SIGTERM, _on_signal)
    if signal.getsignal(signal.SIGINT) is not signal.SIG_IGN:
        signal.signal(signal.SIGINT, _on_signal)


def check() -> None:
    """Raise the signal's exception again if one came (its first raise may
    have been lost); only in the main thread, where the handler runs."""
    if _Received.signum is not None and threading.current_thread() is threading.main_thread():
        _raise(_Received.signum)


def children_of(pid: int) -> list[int]:
    """The processes ``pid`` started that still run (or are not yet reaped)."""
    found: list[int] = []
    with contextlib.suppress(OSError):
        for task in Path(f"/proc/{pid}/task").iterdir():
            with contextlib.suppress(OSError, ValueError):
                found += [int(c) for c in (task / "children").read_text().split()]
    return found


def kill_children() -> None:
    """SIGKILL every child of this process, when a signal stops the run: also one
    caught being started (Popen waiting for its exec), never recorded."""
    for pid in children_of(os.getpid()):
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)


def join(thread: threading.Thread, timeout: float | None = None) -> None:
    """``thread.join()``, or nothing if the thread was never marked started:
    what a signal's exception does when it leaves ``Thread.start()`` early (the
    run is being stopped, and what the thread works for is killed)."""
    with contextlib.suppress(RuntimeError):  # "cannot join thread before it is started"
        thread.join(timeout)
