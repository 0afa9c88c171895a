"""A job's public events (vjobs/events.py) carried on a pipe to another process: what a kill campaign reads
to know where vjobs was when it killed it.

The writer is a process of its own that does what ``vjobs run --site SITE --outdir OUTDIR JOB`` does, through
the public API, with hooks that write one line per event on the inherited descriptor FD::

    python -m vjobs.testing.event_pipe FD SITE OUTDIR JOB

Each line is ``MONOTONIC<TAB>KIND<TAB>TEXT``: ``phase NAME`` when a phase starts, ``sub STEP`` and
``endsub STEP`` around a step (``tool:mksquashfs`` for a step with a detail), ``progress MESSAGE``, and a
last ``phase exit`` once ``vjobs.run`` has returned. ``Timeline`` reads them in the reading process.
"""

from __future__ import annotations

import collections
import os
import sys
import threading
import time
from dataclasses import dataclass, field

EXIT = "exit"  # the last label: vjobs.run has returned, the process is on its way out
STARTUP = "startup"  # the label before the first event: the interpreter starts, vjobs is imported


def step_label(event) -> str:
    return f"{event.subject}:{event.detail}" if event.detail else event.subject


def main(argv: list[str] | None = None) -> int:
    fd_text, site, outdir, job = argv if argv is not None else sys.argv[1:]
    fd = int(fd_text)

    def say(kind: str, text: str) -> None:
        try:
            os.write(fd, f"{time.monotonic():.6f}\t{kind}\t{text}\n".encode())
        except OSError:
            pass  # the reader is gone: the run goes on as `vjobs run` would

    import vjobs

    hooks = {"phase_started": [lambda event: say("phase", event.subject)],
             "step_started": [lambda event: say("sub", step_label(event))],
             "step_ended": [lambda event: say("endsub", step_label(event))],
             "progress": [lambda event: say("progress", event.subject)]}
    result = vjobs.run(job, site=site, outdir=outdir, event_hooks=hooks)
    print(f"job {result.job_id}: {result.status} on {result.driver} in {result.timings.get('total', 0):.1f} s",
          flush=True)
    say("phase", EXIT)
    return result.exit_status()


@dataclass
class Timeline:
    """What one run said on its pipe, read by a thread as it comes (``read_from``)."""

    started: float
    lines: list[tuple[float, str, str]] = field(default_factory=list)  # (monotonic time, kind, text)
    done: bool = False
    changed: threading.Condition = field(default_factory=threading.Condition)

    def read_from(self, fd: int) -> threading.Thread:
        def pump():
            buffer = b""
            with open(fd, "rb", buffering=0) as pipe:
                while chunk := pipe.read(65536):
                    buffer += chunk
                    *complete, buffer = buffer.split(b"\n")
                    with self.changed:
                        for raw in complete:
                            parts = raw.decode(errors="replace").split("\t", 2)
                            if len(parts) == 3:
                                self.lines.append((float(parts[0]), parts[1], parts[2]))
                        self.changed.notify_all()
            with self.changed:
                self.done = True
                self.changed.notify_all()
        thread = threading.Thread(target=pump, daemon=True)
        thread.start()
        return thread

    def wait_done(self, timeout_s: float = 10) -> None:
        with self.changed:
            self.changed.wait_for(lambda: self.done, timeout=timeout_s)

    def labels(self, upto: int | None = None) -> list[tuple[float, str]]:
        """(time, label) at each change of where vjobs was: ``phase`` or ``phase/step/step...``."""
        changes, phase, stack = [], STARTUP, []
        for when, kind, text in self.lines[:upto]:
            if kind == "phase":
                phase, stack = text, []
            elif kind == "sub":
                stack.append(text)
            elif kind == "endsub":
                if text in stack:
                    del stack[len(stack) - 1 - stack[::-1].index(text):]
            else:
                continue
            label = "/".join([phase, *stack])
            if not changes or changes[-1][1] != label:
                changes.append((when, label))
        return changes

    def current(self) -> str:
        changes = self.labels()
        return changes[-1][1] if changes else STARTUP

    def durations(self, end: float) -> dict[str, float]:
        """Seconds spent in each label (summed over repeated visits)."""
        spent: dict[str, float] = collections.defaultdict(float)
        changes = [(self.started, STARTUP), *self.labels()]
        for (when, label), (after, _next) in zip(changes, changes[1:] + [(end, "")]):
            spent[label] += max(0.0, after - when)
        return dict(spent)

    def progress(self) -> list[str]:
        return [text for _when, kind, text in self.lines if kind == "progress"]


if __name__ == "__main__":
    sys.exit(main())
