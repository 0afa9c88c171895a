"""Holders: vjobs processes in miniature for the admission tests (tests/host/test_admission*.py). A holder asks
``vjobs.host.admission.admitted`` for its share, as a job's vjobs does before its VM starts, and holds it; no VM
boots. It runs as root with this checkout's Python, or as a test account with the account's own vjobs
(vjobs.testing.accounts), and so is this module run as a script::

    python -m vjobs.testing.admission_holders DOCUMENT JOB_ID VCPUS MEMORY_MIB HOLD

DOCUMENT is the site as JSON; HOLD is ``stdin`` (until its stdin is closed) or seconds. What it says:

- on stderr, ``admitted``'s progress messages (waiting for room, an account's budget of its own);
- on stdout, ``admitted <budget folder>`` once it holds its share, then, when it let go of it,
  ``held [start, end]`` (CLOCK_MONOTONIC, the same for every process: tests compare the holders' times);
- or ``refused <code> <message>`` on stdout, and exit status 3, when admission refused it.
"""

from __future__ import annotations

import json
import os
import select
import subprocess
import sys
import time
from pathlib import Path

from vjobs.testing.accounts import Account

REFUSED_EXIT = 3


def main(argv: list[str]) -> int:
    from vjobs.config.site import site_from_dict
    from vjobs.errors import AdmissionRefused
    from vjobs.host.admission import admitted

    document, job_id, vcpus, memory_mib, hold = argv
    site = site_from_dict(json.loads(document), source="test site")
    try:
        with admitted(job_id, int(vcpus), int(memory_mib), site,
                      lambda message: print(message, file=sys.stderr, flush=True)) as share:
            start = time.monotonic()
            print("admitted", share.path, flush=True)
            if hold == "stdin":
                sys.stdin.readline()
            else:
                time.sleep(float(hold))
            end = time.monotonic()
    except AdmissionRefused as refused:
        print("refused", refused.code, refused, flush=True)
        return REFUSED_EXIT
    print("held", json.dumps([start, end]), flush=True)
    return 0


class AdmissionHolders:
    """Starts holders; on leaving the ``with`` block, any still running is killed (by its pid) and every one
    waited for."""

    def __init__(self) -> None:
        self.started: list[subprocess.Popen] = []

    def start(self, document: dict, job_id: str, vcpus: int, memory_mib: int, *, hold: str = "stdin",
              account: Account | None = None) -> subprocess.Popen:
        """A holder of ``vcpus`` and ``memory_mib`` for job ``job_id`` under the site ``document``: as
        ``account`` with its virtualenv's vjobs, or, with None, as this process's user with this checkout.
        Its stdin, stdout and stderr are pipes, in text mode."""
        arguments = ["-m", __name__, json.dumps(document), job_id, str(vcpus), str(memory_mib), hold]
        pipes = dict(stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        if account is None:
            process = subprocess.Popen([sys.executable, *arguments], env=_with_this_checkout(), **pipes)
        else:
            process = account.popen([account.python, *arguments], **pipes)
        self.started.append(process)
        return process

    def __enter__(self) -> AdmissionHolders:
        return self

    def __exit__(self, *exc_info) -> None:
        for process in self.started:
            if process.poll() is None:
                process.kill()
            process.wait()


def said(process: subprocess.Popen, timeout: float = 30.0) -> str | None:
    """The holder's next line on stdout, stripped, or None when it said nothing within ``timeout``."""
    ready, _, _ = select.select([process.stdout], [], [], timeout)
    return process.stdout.readline().strip() if ready else None


def _with_this_checkout() -> dict[str, str]:
    """This process's environment, with the vjobs it imported first on ``PYTHONPATH`` (whatever the
    interpreter has installed, or the folder the holder starts in)."""
    import vjobs

    source = str(Path(vjobs.__file__).resolve().parent.parent)
    return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [source, os.environ.get("PYTHONPATH")]))}


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
