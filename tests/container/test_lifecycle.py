"""The VM execution container's lifecycle (vjobs/container/lifecycle.py) around VMs that boot nothing
(vjobs.testing.fake_driver): whatever fails in whichever phase, teardown runs, every VM created is destroyed, a
result is always written, nothing is left behind; what a guest writes on its io disk comes back as its results."""

from __future__ import annotations

import hashlib

import pytest

import vjobs
from vjobs.drivers.contract import Capabilities, Stop
from vjobs.errors import VMError
from vjobs.testing.fake_driver import FakeDriver, FakeOutcome


@pytest.fixture
def site(make_site, fake_image):
    return make_site(images={"fake": fake_image}, boot_timeout_s=0.3)


def run(job_path, site, driver, tmp_path):
    return vjobs.run(job_path, site=site, driver=driver, outdir=tmp_path / "out")


def failing(error: BaseException):
    """A callable that raises ``error``, for ``FakeDriver(run=...)`` and ``probe=...``."""
    def fail(*_args):
        raise error
    return fail


def scripted_failure(method: str) -> VMError:
    return VMError(f"scripted failure in {method}", code=f"fail_{method}")


def each_vm_destroyed_last(driver: FakeDriver) -> bool:
    return bool(driver.vms) and all(vm.calls[-1] == "destroy" for vm in driver.vms)


def test_results_the_guest_writes_come_back(make_job, site, tmp_path, assert_clean_host):
    outcome = FakeOutcome(exit_code=3, stdout=b"to stdout\n", stderr=b"to stderr\n",
                          outputs={"out/deep/a.txt": b"42\n"})
    driver = FakeDriver(run=lambda spec: outcome)
    result = run(make_job(["true"], image="fake", outputs=["out"]), site, driver, tmp_path)
    assert (result.status, result.exit_code, result.driver) == ("failed", 3, "fake")
    assert (tmp_path / "out" / "stdout").read_bytes() == b"to stdout\n"
    assert (tmp_path / "out" / "stderr").read_bytes() == b"to stderr\n"
    assert result.outputs == [{"path": "out/deep/a.txt", "size": 3, "sha256": hashlib.sha256(b"42\n").hexdigest()}]
    assert (tmp_path / "out" / "outputs" / "out" / "deep" / "a.txt").read_bytes() == b"42\n"
    assert [vm.calls for vm in driver.vms] == [["start", "wait_until_stopped", "fetch_disk", "destroy"]]


@pytest.mark.parametrize("method", ["create", "start", "wait_until_stopped", "fetch_disk"])
def test_failure_in_any_phase_tears_down_and_writes_a_result(method, make_job, site, tmp_path, assert_clean_host):
    error = scripted_failure(method)
    outcome = FakeOutcome(raises={method: error})
    driver = FakeDriver(run=failing(error) if method == "create" else lambda spec: outcome)
    result = run(make_job(["true"], image="fake", inputs={"a": "1"}), site, driver, tmp_path)
    assert result.status == "vm_error"
    assert result.error["code"] == f"fail_{method}"
    if method == "create":
        assert driver.vms == []  # nothing to destroy
    else:
        assert each_vm_destroyed_last(driver)
    assert vjobs.Result.read(tmp_path / "out" / "result.json").status == "vm_error"


def test_probe_crash_is_a_driver_verdict_not_a_traceback(make_job, site, tmp_path, assert_clean_host):
    driver = FakeDriver(probe=failing(RuntimeError("scripted probe crash")))
    result = run(make_job(["true"], image="fake"), site, driver, tmp_path)
    assert result.status == "vm_error"
    assert result.error["code"] == "no_usable_driver"
    assert "scripted probe crash" in result.error["message"]


def test_boot_timeout_retries_once_then_vm_error(make_job, site, tmp_path, assert_clean_host):
    driver = FakeDriver(run=lambda spec: FakeOutcome(reports_in=False, console=b"[    0.1] booting\n"))
    result = run(make_job(["true"], image="fake"), site, driver, tmp_path)
    assert result.error["code"] == "boot_timeout" and "booting" in result.error["message"]
    assert len(driver.vms) == 2 and each_vm_destroyed_last(driver)
    assert result.provenance["boot_attempts"] == 2


def test_every_vm_created_is_destroyed_when_the_retry_cannot_create_one(make_job, site, tmp_path,
                                                                        assert_clean_host):
    """The first VM hangs at boot; defining the second fails: the first is destroyed, and no destroy is asked
    of a VM that does not exist."""
    attempts = iter([lambda: FakeOutcome(reports_in=False), failing(scripted_failure("create"))])
    driver = FakeDriver(run=lambda spec: next(attempts)())
    result = run(make_job(["true"], image="fake"), site, driver, tmp_path)
    assert result.error["code"] == "fail_create"
    assert len(driver.vms) == 1 and each_vm_destroyed_last(driver)


def test_walltime_kills_the_vm(make_job, site, tmp_path, assert_clean_host):
    driver = FakeDriver(run=lambda spec: FakeOutcome(stop=Stop.DEADLINE))
    result = run(make_job(["sleep", "100"], image="fake", walltime_s=0.1), site, driver, tmp_path)
    assert result.status == "timeout"
    assert result.exit_code is None
    assert each_vm_destroyed_last(driver)


def test_guest_that_stops_without_results_is_a_vm_error(make_job, site, tmp_path, assert_clean_host):
    driver = FakeDriver(run=lambda spec: FakeOutcome(stop=Stop.CRASH, writes_results=False))
    result = run(make_job(["true"], image="fake"), site, driver, tmp_path)
    assert result.status == "vm_error"
    assert result.error["code"] == "guest_crashed"


def test_an_agent_error_is_the_jobs_error_with_its_meaning(make_job, site, tmp_path, assert_clean_host):
    outcome = FakeOutcome(status={"error": "overlay_failed", "detail": "no tmpfs"})
    result = run(make_job(["true"], image="fake"), site, FakeDriver(run=lambda spec: outcome), tmp_path)
    assert result.status == "vm_error" and result.error["code"] == "overlay_failed"
    assert "could not put its overlay over the base image (no tmpfs)" in result.error["message"]


def test_a_destroy_that_fails_is_recorded_not_raised(make_job, site, tmp_path, assert_clean_host):
    outcome = FakeOutcome(raises={"destroy": VMError("the hypervisor went away")})
    result = run(make_job(["true"], image="fake"), site, FakeDriver(run=lambda spec: outcome), tmp_path)
    assert result.status == "vm_error" and result.error["code"] == "teardown_failed"
    assert "the hypervisor went away" in result.error["message"]
    assert vjobs.Result.read(tmp_path / "out" / "result.json").error["code"] == "teardown_failed"


def test_cancel_during_wait_tears_down(make_job, site, tmp_path, assert_clean_host):
    driver = FakeDriver(run=lambda spec: FakeOutcome(raises={"wait_until_stopped": KeyboardInterrupt()}))
    result = run(make_job(["true"], image="fake"), site, driver, tmp_path)
    assert result.status == "cancelled"
    assert each_vm_destroyed_last(driver)


def test_unusable_pinned_driver(make_job, site, tmp_path, assert_clean_host):
    driver = FakeDriver(probe=lambda: Capabilities("fake", False, "scripted: not here"))
    result = run(make_job(["true"], image="fake"), site, driver, tmp_path)
    assert result.error["code"] == "no_usable_driver"
    assert "pinned driver 'fake'" in result.error["message"]


def test_a_guest_disk_that_could_not_grow_is_disk_full_in_the_cores_words(make_job, site, tmp_path,
                                                                          assert_clean_host):
    driver = FakeDriver(run=lambda spec: FakeOutcome(stop=Stop.DISK_FULL))
    result = run(make_job(["true"], image="fake"), site, driver, tmp_path)
    assert result.status == "setup_error" and result.error["code"] == "disk_full"
    full = driver.vms[0].full_disk
    assert full is not None and str(full) in result.error["message"] and "free space" in result.error["message"]
    assert driver.vms[0].calls[-1] == "destroy"
