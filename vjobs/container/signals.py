"""How a signal ends a job: SIGTERM (a batch system's or a pilot's way to end it), SIGHUP and SIGINT cancel it,
and it still ends with its teardown done and a ``result.json`` that says ``cancelled``.

A signal can come at any moment, also while the interpreter is still importing vjobs, loading the job or
probing the host, before the job's container has taken the signals over. The command line holds the signals
as its first act (``early_signals_held``, before it imports the rest of vjobs), and a signal held so is
turned into the cancel as soon as the container runs (``SignalGuard.cancel_if_pending``). Only what comes
before Python has run a line of vjobs (some tens of milliseconds from exec) still kills it the default way;
no VM or file of the job exists then.

This module imports nothing of vjobs': the command line loads it before everything else.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from typing import Iterator

CANCELLING = (signal.SIGTERM, signal.SIGHUP, signal.SIGINT)
_held: list[str] = []  # the names of signals that came before a container took them over


@contextlib.contextmanager
def early_signals_held() -> Iterator[None]:
    """Until a container runs, note the cancelling signals instead of dying of them (main thread only); the
    previous handlers again after the block."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.signal(sig, _note) for sig in CANCELLING}
    try:
        yield
    finally:
        _held.clear()
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _note(signum, _frame) -> None:
    _held.append(signal.Signals(signum).name)


class Terminated(KeyboardInterrupt):
    """Raised in the main thread by a signal. A KeyboardInterrupt, not an Exception, so that no
    ``except Exception`` on the way (ours, asyncio's callback runner, a library's) can swallow it."""


class SignalGuard:
    """A cancelling signal raises ``Terminated`` in the main thread; after ``hold()`` (the teardown) further
    signals are ignored so that the teardown runs to its end.

    The raise alone is not enough: Python runs a signal handler between any two bytecodes, also inside a
    ``__del__`` or a weakref callback, and drops what it raises there (it prints "Exception ignored"). One job
    in the first 1,000-job accounts campaign ran on to its wall time so. So the signal is also remembered, and
    the container asks ``cancel_if_signalled`` at every phase and every second while it waits for the VM."""

    def __init__(self):
        self.holding = False
        self.deferring = False
        self.signalled: str | None = _held[0] if _held else None  # one that came while vjobs started up

    def handle(self, signum, _frame) -> None:
        if not self.holding:
            self.signalled = self.signalled or signal.Signals(signum).name
            if not self.deferring:
                raise Terminated(self.signalled)

    @contextlib.contextmanager
    def deferred(self) -> Iterator[None]:
        """A short call into a hypervisor's library (a wait of a fraction of a second) that an exception
        must not cut in half: an asyncio loop left with a task pending prints a traceback later, a socket
        is left mid-message. A signal that comes meanwhile cancels the job when the call returns."""
        self.deferring = True
        try:
            yield
        finally:
            self.deferring = False
        self.cancel_if_signalled()

    def hold(self) -> None:
        self.holding = True

    def cancel_if_signalled(self) -> None:
        """Raise ``Terminated`` for a signal that came and has not ended the job yet."""
        if self.signalled and not self.holding:
            raise Terminated(self.signalled)


@contextlib.contextmanager
def signals_cancel(also: tuple[str, ...] = ()) -> Iterator[SignalGuard]:
    """The container's hold on the cancelling signals for the job's life, and on ``also`` (names: a job with a
    checkpoint folder also ends, checkpointed, on the site's ``checkpoint_signal``); the previous handlers
    after it."""
    guard = SignalGuard()
    if threading.current_thread() is not threading.main_thread():
        yield guard  # only the main thread may own signal handlers; the caller's own handling applies
        return
    wanted = {*CANCELLING, *(signal.Signals[name] for name in also)}
    previous = {sig: signal.signal(sig, guard.handle) for sig in wanted}
    try:
        yield guard
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
