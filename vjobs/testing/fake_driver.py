"""A driver for tests that boots nothing: each VM does what the test's callable says, and the container runs
its whole real lifecycle around it (disks built, admission, boot wait and retry, results read off the io disk,
teardown, result.json). httpx's ``MockTransport(handler)`` is the model: one callable, no subclass per
scenario::

    driver = FakeDriver(run=lambda spec: FakeOutcome(exit_code=3, stdout=b"hello\\n", outputs={"out/a": b"1"}))
    result = vjobs.run(job, site=site, driver=driver)
    assert result.exit_code == 3 and driver.vms[0].destroyed

``run(spec)`` is called in ``create`` for each VM (one per boot attempt) with the ``VMSpec`` the core built;
what it raises, ``create`` raises (a hypervisor refusing the definition). The ``FakeOutcome`` it returns says
what the guest does: whether its agent reports in, how it stops, what it writes onto the io disk as the agent
would (a tar: ``vjobs/status``, ``vjobs/stdout``, ``vjobs/stderr``, ``work/<output>``, vjobs/guest/collect.py
reads it), and which contract method raises what. ``probe()`` gives the verdict (default: usable).

A fake guest takes no time: its agent's marker is on the console as soon as it starts, and ``Stop.DEADLINE``
means that the deadline the core gave has passed. Each ``FakeVM`` records the contract calls it got, in order.
"""

from __future__ import annotations

import io
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

from vjobs.drivers.contract import VM, Capabilities, Disk, Driver, HostContext, Stop, VMSpec
from vjobs.guest.protocol import AGENT_UP_MARKER, PAYLOAD_MARKER


@dataclass(frozen=True)
class FakeOutcome:
    """What one fake guest does, from its start to its stop."""

    exit_code: int = 0  # the payload's exit status, in vjobs/status
    stdout: bytes = b""
    stderr: bytes = b""
    outputs: Mapping[str, bytes] = field(default_factory=dict)  # path under the working directory -> bytes
    status: Mapping[str, str] = field(default_factory=dict)  # more status lines (e.g. {"error": "overlay_failed"})
    writes_results: bool = True  # False: the guest stops before its agent writes anything (a crash)
    reports_in: bool = True  # False: the agent's marker never comes through the console (a boot that hangs)
    stop: Stop = Stop.POWEROFF  # what wait_until_stopped returns once the guest ran
    console: bytes = b""  # what the guest writes on its console before its agent reports in
    raises: Mapping[str, BaseException] = field(default_factory=dict)  # "start", "wait_until_stopped",
    # "fetch_disk" or "destroy" -> the exception that VM method raises (each time it is called)


class FakeDriver(Driver):
    """``settings`` and ``host`` as every driver gets them (neither is needed: a pinned ``Driver`` object is used
    as it is); ``probe``: the verdict; ``run``: a VMSpec's ``FakeOutcome``, called once per VM created."""

    name = "fake"

    def __init__(self, settings: Mapping[str, Any] | None = None, host: HostContext | None = None, *,
                 probe: Callable[[], Capabilities] | None = None,
                 run: Callable[[VMSpec], FakeOutcome] | None = None):
        super().__init__(settings or {}, host)
        self._probe = probe or (lambda: Capabilities(self.name, True, "fake driver: boots nothing",
                                                     hypervisor="fake"))
        self._run = run or (lambda spec: FakeOutcome())
        self.vms: list[FakeVM] = []  # every VM created, in order

    def probe(self) -> Capabilities:
        return self._probe()

    def create(self, spec: VMSpec) -> FakeVM:
        outcome = self._run(spec)
        self.vms.append(FakeVM(spec, outcome))
        return self.vms[-1]


class FakeVM(VM):
    def __init__(self, spec: VMSpec, outcome: FakeOutcome):
        super().__init__(spec)
        self.outcome = outcome
        self.calls: list[str] = []  # the contract methods called on this VM, in order
        self.started = False

    @property
    def destroyed(self) -> bool:
        return "destroy" in self.calls

    def _called(self, method: str) -> None:
        self.calls.append(method)
        if method in self.outcome.raises:
            raise self.outcome.raises[method]

    def start(self) -> None:
        self._called("start")
        self.started = True
        self.spec.console.write(self.outcome.console)
        if self.outcome.reports_in:
            self.spec.console.write(AGENT_UP_MARKER + b"\n" + PAYLOAD_MARKER + b"\n")

    def wait_until_stopped(self, deadline: float) -> Stop:
        self._called("wait_until_stopped")
        if not (self.started and self.outcome.reports_in):
            return Stop.DEADLINE  # still booting, and never getting anywhere
        if self.outcome.stop is Stop.DISK_FULL:  # the hypervisor paused it: the host could not grow its disk
            self.full_disk = io_disk(self.spec).path
            return Stop.DISK_FULL
        if self.outcome.stop is not Stop.DEADLINE and self.outcome.writes_results:
            write_results(io_disk(self.spec).path, self.outcome)
        return self.outcome.stop

    def fetch_disk(self, disk: Disk) -> Path:
        self._called("fetch_disk")
        return disk.path

    def destroy(self) -> None:
        self._called("destroy")


def io_disk(spec: VMSpec) -> Disk:
    return next(disk for disk in spec.disks if disk.role == "io")


def write_results(path: Path, outcome: FakeOutcome) -> None:
    """Overwrite the io disk with the results, as the guest agent does: a tar at its start, zeros after it."""
    status = {"exit_code": str(outcome.exit_code), **outcome.status}
    members = {"vjobs/status": "".join(f"{key}={value}\n" for key, value in status.items()).encode(),
               "vjobs/stdout": outcome.stdout, "vjobs/stderr": outcome.stderr,
               **{f"work/{name}": data for name, data in outcome.outputs.items()}}
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.GNU_FORMAT) as archive:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    results = buffer.getvalue()
    with open(path, "r+b") as disk:
        size = disk.seek(0, io.SEEK_END)
        disk.seek(0)
        disk.write(results)
        disk.truncate(len(results))  # no byte of the job tar is left after the results ...
        disk.truncate(max(size, len(results)))  # ... and the disk keeps its size, reading as zeros
