"""A signal always stops the run, at a natural point (qrecover/signals.py).

The handler only records the signal; the run raises it where it can stop
cleanly.  Before, the handler raised wherever the main thread was: inside a
garbage-collector or weakref callback Python printed that as "Exception
ignored" and dropped it, and the restore ran on to its end.  Here the signal
is raised inside a gc callback during a real run in this process.

These tests set SIGINT's disposition themselves: a test process started with
SIGINT ignored (a suite started with ``&`` from a non-interactive shell) passes
that on, and qrecover then rightly leaves SIGINT ignored
(:func:`test_sigint_ignored_when_started_so`).
"""

from __future__ import annotations

import gc
import signal
import sys
import weakref
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import Backup, run_main

from qrecover import signals
from qrecover.errors import EXIT_SIGINT, EXIT_SIGTERM, Interrupted


@pytest.fixture
def sigint_default() -> Iterator[None]:
    """SIGINT at Python's default (KeyboardInterrupt), whatever this process inherited."""
    saved = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, saved)


def _ours() -> bool:
    handler = signal.getsignal(signal.SIGTERM)
    return getattr(handler, "__module__", "") == "qrecover.signals"


def _restore_with_signal_in_gc(backup: Backup, out: Path, signum: int,
                               monkeypatch: pytest.MonkeyPatch) -> tuple[int, str, list[Any]]:
    """Restore in this process; ``signum`` is raised inside the garbage collector's
    first callback once qrecover's handler is in place."""
    fired: list[int] = []
    dropped: list[Any] = []  # what Python printed as "Exception ignored"
    monkeypatch.setattr(sys, "unraisablehook", lambda u: dropped.append(u.exc_type))

    def in_the_collector(phase: str, info: dict[str, Any]) -> None:
        if phase == "start" and not fired and _ours():
            fired.append(signum)
            signal.raise_signal(signum)

    gc.callbacks.append(in_the_collector)
    try:
        result = run_main("restore", backup.path, "--output", out,
                          "--passphrase-file", backup.passfile)
    finally:
        gc.callbacks.remove(in_the_collector)
    assert fired, "the collector never ran during the restore"
    return result.code, result.text, dropped


@pytest.mark.parametrize(("signum", "code"), [(signal.SIGTERM, EXIT_SIGTERM),
                                              (signal.SIGINT, EXIT_SIGINT)])
def test_a_signal_raised_inside_the_collector_stops_the_restore(
    default_backup: Backup, tmp_path: Path, signum: int, code: int,
    monkeypatch: pytest.MonkeyPatch, sigint_default: None,
) -> None:
    out = tmp_path / "out"
    got, text, dropped = _restore_with_signal_in_gc(default_backup, out, signum, monkeypatch)
    assert got == code, text
    assert dropped == []  # the handler raises nothing, so nothing can be dropped
    assert not list(out.glob(".qrecover-*")), "scratch left"
    assert "Traceback" not in text
    # the handlers the process had are back
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_sigint_ignored_when_started_so(default_backup: Backup, tmp_path: Path,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """Started with SIGINT ignored (``qrecover ... &`` in a script), qrecover keeps
    ignoring it, as a program should, and its restore ends normally."""
    saved = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        out = tmp_path / "out"
        got, text, _ = _restore_with_signal_in_gc(default_backup, out, signal.SIGINT,
                                                  monkeypatch)
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, saved)
    assert got == 0, text
    assert (out / "work" / "private.img").exists()


def test_check_raises_once_and_the_end_always(sigint_default: None) -> None:
    with signals.handled():
        signals.check()  # nothing came: nothing raised

        class Thing:
            pass

        thing = Thing()
        ref = weakref.ref(thing, lambda _: signal.raise_signal(signal.SIGTERM))
        del thing  # the handler runs inside the callback: it only records
        assert ref() is None
        with pytest.raises(Interrupted):
            signals.check()
        signals.check()  # raised once: the clean-up it unwinds to goes on
        with pytest.raises(Interrupted):
            signals.check(again=True)  # the command's end
    with signals.handled():  # a new run forgets it
        signals.check(again=True)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_raising_at_a_prompt(sigint_default: None) -> None:
    """Around a passphrase prompt a signal raises at once (the prompt would wait for Enter)."""
    with signals.handled(), pytest.raises(KeyboardInterrupt), signals.raising():
        signal.raise_signal(signal.SIGINT)
        pytest.fail("the prompt went on")
