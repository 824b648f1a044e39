"""A signal always stops the run (qrecover/signals.py), even where Python loses
the handler's exception.

Python runs a signal handler wherever the main thread is.  Inside a garbage
collector callback or a weakref callback, what the handler raises is printed
as "Exception ignored" and dropped: before qrecover/signals.py, a SIGTERM or a
Ctrl-C that landed there was lost and the restore ran on to its end (exit 0
or 4, instead of 143 or 130).  Here the signal is raised inside a gc callback
during a real run in this process, so that its first raise is lost for sure.
"""

from __future__ import annotations

import gc
import signal
import sys
import threading
import weakref
from pathlib import Path
from typing import Any

import pytest
from conftest import Backup, run_main

from qrecover import signals
from qrecover.errors import EXIT_SIGINT, EXIT_SIGTERM, Interrupted


def _ours() -> bool:
    handler = signal.getsignal(signal.SIGTERM)
    return getattr(handler, "__module__", "") == "qrecover.signals"


@pytest.mark.parametrize(("signum", "code"), [(signal.SIGTERM, EXIT_SIGTERM),
                                              (signal.SIGINT, EXIT_SIGINT)])
def test_a_signal_raised_where_python_drops_it_still_stops_the_restore(
    default_backup: Backup, tmp_path: Path, signum: int, code: int,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    fired: list[int] = []
    dropped: list[type[BaseException]] = []  # what Python printed as "Exception ignored"
    monkeypatch.setattr(sys, "unraisablehook", lambda u: dropped.append(u.exc_type))

    def in_the_collector(phase: str, info: dict[str, Any]) -> None:
        # only once qrecover's handler is in place (cli.main installs it)
        if phase == "start" and not fired and _ours():
            fired.append(signum)
            signal.raise_signal(signum)  # the handler raises here, and gc drops it

    out = tmp_path / "out"
    gc.callbacks.append(in_the_collector)
    try:
        result = run_main("restore", default_backup.path, "--output", out,
                          "--passphrase-file", default_backup.passfile)
    finally:
        gc.callbacks.remove(in_the_collector)
    assert fired, "the collector never ran during the restore"
    assert result.code == code, result.text
    assert dropped == [Interrupted if signum == signal.SIGTERM else KeyboardInterrupt]
    assert not list(out.glob(".qrecover-*")), "scratch left"


def test_check_raises_a_signal_whose_raise_was_lost(monkeypatch: pytest.MonkeyPatch) -> None:
    dropped: list[type[BaseException]] = []
    monkeypatch.setattr(sys, "unraisablehook", lambda u: dropped.append(u.exc_type))
    saved = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        signals.install()
        signals.check()  # nothing came: nothing raised

        class Thing:
            pass

        thing = Thing()
        ref = weakref.ref(thing, lambda _: signal.raise_signal(signal.SIGTERM))
        del thing  # the callback runs, the handler raises in it, and it is dropped
        assert ref() is None and dropped == [Interrupted]
        with pytest.raises(Interrupted):
            signals.check()
        signals.install()  # a new run forgets it
        signals.check()
    finally:
        for signum, handler in saved.items():
            signal.signal(signum, handler)


def test_join_of_a_thread_a_signal_kept_from_starting() -> None:
    """A signal's exception can leave ``Thread.start()`` before the thread is marked
    started; the clean-up that then joins it must go on, not fail with an internal
    error (seen: exit 1 "cannot join thread before it is started" after SIGTERM)."""
    thread = threading.Thread(target=lambda: None)
    with pytest.raises(RuntimeError):
        thread.join()
    signals.join(thread)  # no error
    thread.start()
    signals.join(thread, timeout=5)
    assert not thread.is_alive()
