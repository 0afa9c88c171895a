"""The boot ends when the guest agent's marker comes through the console: the wait for it is woken by the
marker itself (ConsoleLog.wait_for), or by the console's end when the guest dies first; it never polls."""

from __future__ import annotations

import os
import threading

import pytest

import vjobs
from vjobs.guest.console import ConsoleLog
from vjobs.drivers.contract import VM, Capabilities, Driver, Stop
from vjobs.guest.protocol import AGENT_UP_MARKER

UP = AGENT_UP_MARKER
LONG = 300.0  # a timeout no test waits out: a wait that is not woken fails the join below, long before


def waiting(log: ConsoleLog, marker: bytes = UP) -> tuple[threading.Thread, list]:
    answers: list = []
    thread = threading.Thread(target=lambda: answers.append(log.wait_for(marker, LONG)), daemon=True)
    thread.start()
    return thread, answers


def woken(thread: threading.Thread) -> bool:
    thread.join(30)
    return not thread.is_alive()


def test_the_marker_wakes_the_wait(tmp_path):
    log = ConsoleLog(tmp_path / "c.log", markers=(UP,))
    thread, answers = waiting(log)
    log.write(b"booting...\nvjobs-ag")
    log.write(b"ent: up\n")
    assert woken(thread) and answers == [True]
    log.close()


def test_a_marker_already_seen_returns_at_once(tmp_path):
    log = ConsoleLog(tmp_path / "c.log", markers=(UP,))
    log.write(b"vjobs-agent: up\n")
    assert log.wait_for(UP, LONG)
    log.close()


def test_the_end_of_the_followed_stream_wakes_the_wait(tmp_path):
    read_end, write_end = os.pipe()
    log = ConsoleLog(tmp_path / "c.log", markers=(UP,))
    log.follow(lambda: os.read(read_end, 4096))
    thread, answers = waiting(log)
    os.write(write_end, b"Kernel panic - not syncing\n")
    assert not log.ended
    os.close(write_end)  # the hypervisor closed the console: the guest is gone
    assert woken(thread) and answers == [False]
    assert log.ended and not log.wait_for(UP, LONG)  # and a later wait returns at once
    log.close()
    os.close(read_end)


def test_closing_the_log_wakes_the_wait(tmp_path):
    log = ConsoleLog(tmp_path / "c.log", markers=(UP,))
    thread, answers = waiting(log)
    log.close()
    assert woken(thread) and answers == [False]


def test_a_log_fed_by_write_does_not_end_before_it_is_closed(tmp_path):
    log = ConsoleLog(tmp_path / "c.log", markers=(UP,))
    log.write(b"hello")
    assert not log.ended and not log.wait_for(UP, 0.01)
    log.close()
    assert log.ended


def test_only_a_marker_the_log_looks_out_for_can_be_waited_for(tmp_path):
    log = ConsoleLog(tmp_path / "c.log")
    with pytest.raises(ValueError):
        log.wait_for(UP, 1)
    log.close()


# --- the container's boot wait, with VMs whose console is a pipe the test writes to -----------------------

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
