"""The container's boot ends when the guest agent's marker comes through the console (ConsoleLog.wait_for, tested
in tests/guest/test_console.py), or when the console ends because the guest died first: a boot failure, not a
timeout. The VMs here have a pipe for a console, which the test writes to."""

from __future__ import annotations

import os
import threading

import pytest

import vjobs
from vjobs.drivers.contract import VM, Capabilities, Driver, Stop

LONG = 300.0  # a boot timeout no test waits out


class PipeConsoleVM(VM):
    """A VM whose console is a pipe (followed as a hypervisor's stream is) and that is 'running' until the
    test closes the pipe; ``agent_started`` is the default one, from the console."""

    def __init__(self, spec, driver):
        super().__init__(spec)
        self.driver = driver
        self.read_end, self.write_end = os.pipe()
        self.stopped = threading.Event()
        self.stop_asks: list[float] = []

    def start(self):
        self.spec.console.follow(lambda: os.read(self.read_end, 4096))
        self.driver.script(self)

    def wait_until_stopped(self, deadline):
        self.stop_asks.append(deadline)
        return self.driver.stop if self.stopped.is_set() else Stop.DEADLINE

    def fetch_disk(self, disk):
        return disk.path

    def destroy(self):
        for fd in (self.write_end, self.read_end):
            try:
                os.close(fd)
            except OSError:
                pass


class PipeConsoleDriver(Driver):
    name = "pipe-console"

    def __init__(self, script, stop=Stop.POWEROFF):
        super().__init__({}, None)
        self.script, self.stop = script, stop
        self.vms: list[PipeConsoleVM] = []

    def probe(self):
        return Capabilities(self.name, True, "test")

    def create(self, spec):
        self.vms.append(PipeConsoleVM(spec, self))
        return self.vms[-1]


@pytest.fixture
def site(make_site, fake_image):
    return make_site(images={"fake": fake_image}, boot_timeout_s=LONG, boot_retries=0)


def test_the_boot_ends_when_the_agent_speaks(make_job, site, tmp_path, assert_clean_host):
    def speak_later(vm):
        def speak():
            os.write(vm.write_end, b"[    0.1] booting\nvjobs-agent: up\n")
            vm.stopped.set()  # and the job is over at once: the run phase finds the guest powered off
        threading.Timer(0.2, speak).start()

    driver = PipeConsoleDriver(speak_later)
    result = vjobs.run(make_job(["true"], image="fake"), site=site, driver=driver, outdir=tmp_path / "out")
    # booted once, ran, and stopped: then no results on the (fake) disk, an error of the collect phase
    assert result.provenance["boot_attempts"] == 1 and result.error["code"] == "no_results"


def test_a_guest_that_dies_before_its_agent_is_a_boot_failure_not_a_timeout(make_job, site, tmp_path,
                                                                              assert_clean_host):
    def die_later(vm):
        def die():
            os.write(vm.write_end, b"Kernel panic - not syncing: VFS\n")
            vm.stopped.set()
            os.close(vm.write_end)  # QEMU exits: its console closes
            vm.write_end = -1
        threading.Timer(0.2, die).start()

    driver = PipeConsoleDriver(die_later, stop=Stop.CRASH)
    result = vjobs.run(make_job(["true"], image="fake"), site=site, driver=driver, outdir=tmp_path / "out")
    assert result.error["code"] == "boot_failed" and "Kernel panic" in result.error["message"]
