"""What every test server shares: its daemons die with the test run, and are ended by their PIDs."""

from __future__ import annotations

import ctypes
import signal
import subprocess
from typing import Iterable

_PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """A ``preexec_fn``: no server outlives a killed test run (strictly: the thread that started it)."""
    ctypes.CDLL(None).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def end_processes(processes: Iterable[subprocess.Popen], sig: int = signal.SIGTERM, grace_s: float = 10) -> None:
    """Send ``sig`` to each one still running, give them ``grace_s`` to go, SIGKILL the rest; all reaped."""
    processes = list(processes)
    for process in processes:
        if process.poll() is None:
            process.send_signal(sig)
    for process in processes:
        try:
            process.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
