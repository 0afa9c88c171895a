"""The VM execution container's lifecycle, with a test driver that fails in each phase: teardown always
runs, a result is always written, nothing is left behind."""

from __future__ import annotations

import pytest

import vjobs
from vjobs.drivers.contract import VM, Capabilities, Driver, Stop
from vjobs.errors import VMError


class ScriptedVM(VM):
    """A VM that records the calls the container makes and fails where it is told to."""

    def __init__(self, spec, driver):
        super().__init__(spec)
        self.driver = driver

    def _maybe_fail(self, phase):
        self.driver.calls.append(phase)
        if self.driver.fail_in == phase:
            raise VMError(f"scripted failure in {phase}", code=f"fail_{phase}")

    def start(self):
        self._maybe_fail("start")

    def agent_started(self):
        return self.driver.agent_up

    def wait_until_stopped(self, deadline):
        self._maybe_fail("wait")
        return self.driver.stop

    def fetch_disk(self, disk):
        self._maybe_fail("fetch")
        return disk.path

    def destroy(self):
        self.driver.calls.append("destroy")


class ScriptedDriver(Driver):
    name = "scripted"

    def __init__(self, fail_in=None, stop=Stop.POWEROFF, agent_up=True, usable=True):
        super().__init__({}, None)
        self.fail_in, self.stop, self.agent_up, self.usable = fail_in, stop, agent_up, usable
        self.calls: list[str] = []

    def probe(self):
        if self.fail_in == "probe":
            raise RuntimeError("scripted probe crash")
        return Capabilities(self.name, self.usable, "scripted")

    def create(self, spec):
        self.calls.append("create")
        if self.fail_in == "create":
            raise VMError("scripted failure in create", code="fail_create")
        return ScriptedVM(spec, self)


@pytest.fixture
def site(make_site, fake_image):
    return make_site(images={"fake": fake_image}, boot_timeout_s=0.3)


def run(job_path, site, driver, tmp_path):
    return vjobs.run(job_path, site=site, driver=driver, outdir=tmp_path / "out")


@pytest.mark.parametrize("phase", ["create", "start", "wait", "fetch"])
def test_failure_in_any_phase_tears_down_and_writes_a_result(phase, make_job, site, tmp_path, assert_clean_host):
    driver = ScriptedDriver(fail_in=phase)
    result = run(make_job(["true"], image="fake", inputs={"a": "1"}), site, driver, tmp_path)
    assert result.status == "vm_error"
    assert result.error["code"] == f"fail_{phase}"
    if phase != "create":
        assert driver.calls[-1] == "destroy"
    assert vjobs.Result.read(tmp_path / "out" / "result.json").status == "vm_error"


def test_probe_crash_is_a_driver_verdict_not_a_traceback(make_job, site, tmp_path, assert_clean_host):
    result = run(make_job(["true"], image="fake"), site, ScriptedDriver(fail_in="probe"), tmp_path)
    assert result.status == "vm_error"
    assert result.error["code"] == "no_usable_driver"
    assert "scripted probe crash" in result.error["message"]


def test_boot_timeout_retries_once_then_vm_error(make_job, site, tmp_path, assert_clean_host):
    driver = ScriptedDriver(agent_up=False, stop=Stop.DEADLINE)
    result = run(make_job(["true"], image="fake"), site, driver, tmp_path)
    assert result.error["code"] == "boot_timeout"
    assert driver.calls.count("create") == 2
    assert result.provenance["boot_attempts"] == 2


def test_walltime_kills_the_vm(make_job, site, tmp_path, assert_clean_host):
    driver = ScriptedDriver(stop=Stop.DEADLINE)
    result = run(make_job(["sleep", "100"], image="fake", walltime_s=0.1), site, driver, tmp_path)
    assert result.status == "timeout"
    assert result.exit_code is None
    assert driver.calls[-1] == "destroy"


def test_guest_that_stops_without_results_is_a_vm_error(make_job, site, tmp_path, assert_clean_host):
    result = run(make_job(["true"], image="fake"), site, ScriptedDriver(stop=Stop.CRASH), tmp_path)
    assert result.status == "vm_error"
    assert result.error["code"] == "guest_crashed"


def test_cancel_during_wait_tears_down(make_job, site, tmp_path, assert_clean_host):
    class Interrupting(ScriptedDriver):
        def create(self, spec):
            vm = super().create(spec)
            vm.wait_until_stopped = lambda deadline: (_ for _ in ()).throw(KeyboardInterrupt())
            return vm
    driver = Interrupting()
    result = run(make_job(["true"], image="fake"), site, driver, tmp_path)
    assert result.status == "cancelled"
    assert driver.calls[-1] == "destroy"


def test_a_guest_disk_that_could_not_grow_is_disk_full_in_the_cores_words(make_job, site, tmp_path,
                                                                          assert_clean_host):
    class FillingDriver(ScriptedDriver):
        def create(self, spec):
            vm = super().create(spec)
            vm.full_disk = self.full_disk = spec.disks[0].path  # the hypervisor paused the guest: it could not grow
            return vm
    driver = FillingDriver(stop=Stop.DISK_FULL)
    result = run(make_job(["true"], image="fake"), site, driver, tmp_path)
    assert result.status == "setup_error" and result.error["code"] == "disk_full"
    assert str(driver.full_disk) in result.error["message"] and "free space" in result.error["message"]
    assert driver.calls[-1] == "destroy"


def test_unusable_pinned_driver(make_job, site, tmp_path, assert_clean_host):
    result = run(make_job(["true"], image="fake"), site, ScriptedDriver(usable=False), tmp_path)
    assert result.error["code"] == "no_usable_driver"
    assert "pinned driver 'scripted'" in result.error["message"]
