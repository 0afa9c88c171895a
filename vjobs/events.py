"""Public events of a job's run: what a progress display, a benchmark or a reliability campaign observes,
instead of patching vjobs' private names. httpx's ``event_hooks`` are the model::

    def note(event: vjobs.Event) -> None:
        print(event.name, event.subject, event.elapsed_s)

    vjobs.run("job.json", event_hooks={"phase_started": [note], "phase_ended": [note], "progress": [note]})

Events, each an ``Event`` passed to every hook registered under its name, in the job's own thread:

``phase_started`` / ``phase_ended``
    the container enters / leaves one of ``PHASES`` (``subject``). ``phase_ended`` carries ``elapsed_s`` and,
    when the phase ended by an exception, ``error`` (its type's name). The phase timings in ``result.json`` are
    the sums of these ``elapsed_s`` per phase (a retried boot enters ``attach`` and ``boot`` twice).
``step_started`` / ``step_ended``
    a step inside a phase (``subject``, one of ``STEPS``; ``detail`` says which one where there are several,
    e.g. the tool a ``tool`` step runs).
``progress``
    a line for a person (``subject``): what ``vjobs run`` prints on stderr.
``usage``
    while the payload runs, about every ``sync_interval_s``: what it uses in the guest, measured there
    (``usage``: a dict of vjobs/guest/collect.py's ``USAGE_FIGURES``: cpu_user_s, cpu_system_s,
    memory_current_mib, memory_peak_mib, processes, processes_peak, io_read_bytes, io_write_bytes,
    workdir_mib; any may be missing). ``subject`` is "guest". A pilot's runner feeds its monitors from it.

A hook must return quickly and should not raise: an exception from a hook is a bug in the caller and ends the
job as any bug does (``internal_error``). A hook may end the process (a kill campaign does exactly that).
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Mapping

#: The container's phases, in the order a job goes through them (vjobs/container/lifecycle.py).
#: ``stage_in`` and ``stage_out`` run only for jobs that stage; ``attach`` and ``boot`` once per boot attempt.
PHASES = ("probe", "prepare", "stage_in", "admission", "attach", "boot", "run", "collect", "stage_out",
          "teardown", "finish")

#: The steps inside phases that vjobs reports: the points where a process killed at that moment leaves
#: something behind for ``vjobs gc`` (a half-built image, a VM, a job folder).
STEPS = (
    "deep_probe",         # probe: a driver boots the built-in guest to see whether its acceleration works
    "release_image",      # prepare: the release's or a read-only bind's image is built (cached by content)
    "inputs_disk",        # prepare: the image of the job's inputs is built (jobs with inputs only)
    "scratch_disk",       # prepare: the working directory's disk is built
    "io_disk",            # prepare: the disk that carries the job in and its results out
    "tool",               # prepare: a host tool runs (detail: its name, e.g. mksquashfs)
    "vm_create",          # attach: the driver defines the VM and attaches its disks
    "vm_start",           # boot: the driver starts it
    "shared_vdi",         # attach (xen): a read-only disk is found in, or uploaded to, the pool (detail: its role)
    "vdi_upload",         # attach (xen): a disk is uploaded
    "vdi_download",       # collect (xen): the io disk is downloaded
    "sync_round",         # run: a sync round of the payload's files is applied on the host (vjobs/guest/sync.py)
    "checkpoint",         # run: the VM is saved into the checkpoint folder, detail "periodic" or "final"
    "checkpoint_disks",   # prepare (a resumed job): its checkpoint's disks copied and checked, images found
    "fetch_disk",         # collect: the driver hands over the io disk as the guest left it
    "publish",            # collect: the results move into the output folder
    "vm_destroy",         # teardown: the driver kills the VM and removes what it made
    "save_console",       # teardown: the console logs become the job's console.log
    "remove_job_folder",  # teardown: the job's folder under work_dir is removed
)

EVENT_NAMES = ("phase_started", "phase_ended", "step_started", "step_ended", "progress", "usage")

Hook = Callable[["Event"], None]
EventHooks = Mapping[str, Iterable[Hook]]


@dataclass(frozen=True)
class Event:
    name: str  # one of EVENT_NAMES
    subject: str  # the phase, the step, or the progress message
    job_id: str = ""
    detail: str = ""  # which one of several steps of a kind (a tool's name)
    at: float = 0.0  # time.monotonic() when it happened
    elapsed_s: float | None = None  # *_ended: how long the phase or step took
    error: str | None = None  # *_ended: the type of the exception that ended it, if one did
    usage: Mapping[str, float] | None = None  # usage: the figures


class Events:
    """The hooks of one run, and the one way vjobs emits events to them."""

    def __init__(self, hooks: EventHooks | None = None, job_id: str = ""):
        hooks = dict(hooks or {})
        unknown = sorted(set(hooks) - set(EVENT_NAMES))
        if unknown:
            raise ValueError(f"unknown event name(s) {', '.join(unknown)} in event_hooks; vjobs emits "
                             f"{', '.join(EVENT_NAMES)}")
        self.hooks = {name: list(hooks.get(name, ())) for name in EVENT_NAMES}
        self.job_id = job_id

    def subscribe(self, name: str, hook: Hook) -> None:
        if name not in self.hooks:
            raise ValueError(f"unknown event name {name!r}; vjobs emits {', '.join(EVENT_NAMES)}")
        self.hooks[name].append(hook)

    def emit(self, name: str, subject: str, **fields) -> None:
        if not self.hooks[name]:
            return
        event = Event(name, subject, job_id=self.job_id, at=time.monotonic(), **fields)
        for hook in self.hooks[name]:
            hook(event)

    def progress(self, message: str) -> None:
        self.emit("progress", message)

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        with self._span("phase", name, "", PHASES):
            yield

    @contextlib.contextmanager
    def step(self, name: str, detail: str = "") -> Iterator[None]:
        with self._span("step", name, detail, STEPS):
            yield

    @contextlib.contextmanager
    def _span(self, kind: str, name: str, detail: str, known: tuple[str, ...]) -> Iterator[None]:
        if name not in known:  # a typo here would silently blind every observer
            raise ValueError(f"vjobs emits no {kind} {name!r}; the {kind}s are {', '.join(known)}")
        started = time.monotonic()
        self.emit(f"{kind}_started", name, detail=detail)
        error = None
        try:
            yield
        except BaseException as exc:
            error = type(exc).__name__
            raise
        finally:
            self.emit(f"{kind}_ended", name, detail=detail, elapsed_s=time.monotonic() - started, error=error)


def check_targets(phases: Iterable[str] = (), steps: Iterable[str] = ()) -> None:
    """Raise ``ValueError`` naming any phase or step that vjobs does not emit: for an observer (a campaign
    that aims kills at steps) that must fail loudly rather than wait for an event that never comes."""
    missing = [f"phase {p!r}" for p in phases if p not in PHASES] + [f"step {s!r}" for s in steps if s not in STEPS]
    if missing:
        raise ValueError(f"vjobs does not emit {', '.join(missing)}; phases: {', '.join(PHASES)}; "
                         f"steps: {', '.join(STEPS)}")
