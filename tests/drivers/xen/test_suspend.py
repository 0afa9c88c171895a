"""xen checkpoints (vjobs/drivers/xen/suspended.py): XAPI's VM.suspend and VM.resume through the driver, a
restore as a new VM created Suspended, and the stand-in's power-state rules for them, as XAPI defines them."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import XenAPI

from vjobs.config.job import load_job
from vjobs.config.site import site_from_dict
from vjobs.drivers.contract import Disk, HostContext, SavedGuest, Stop, VMSpec, deadline_in
from vjobs.drivers.registry import load_driver
from vjobs.events import Events
from vjobs.guest.console import ConsoleLog
from vjobs.guest.disks import prepare_disks
from vjobs.guest.streams import LiveStreams
from vjobs.host.cache import CacheHold
from vjobs.host.identity import new_owner
from vjobs.images.checked import CheckedFile

COUNTING = ["sh", "-c", "i=0; while [ $i -lt 60 ]; do i=$((i+1)); echo $i; sleep 0.3; done"]


class Guest:
    """One VM of the xen driver with its live channel read into ``folder``/stdout (the core's LiveStreams)."""

    def __init__(self, driver, spec: VMSpec, folder: Path):
        self.vm = driver.create(spec)
        self.folder = folder

    def start(self) -> "Guest":
        self.vm.start()
        self.follow()
        return self

    def follow(self) -> None:
        self.streams = LiveStreams(self.folder, 1 << 20)
        self.streams.follow(self.vm.guest_channel())

    def counts(self) -> list[int]:
        return [int(line) for line in (self.folder / "stdout").read_text().split()]

    def wait_for_count(self, at_least: int, within_s: float = 120) -> None:
        deadline = time.monotonic() + within_s
        while time.monotonic() < deadline:
            if len(self.counts()) >= at_least:
                return
            time.sleep(0.2)
        raise AssertionError(f"the payload counted to {self.counts()[-1:]} only")


@pytest.fixture
def xen_guest_parts(xen_settings, make_job, built_boot, checked_files, cache_dir, tmp_path):
    """A driver and the spec of a guest that counts on its stdout, disks built as the core builds them."""
    host = HostContext(cache_dir=cache_dir, work_dir=tmp_path, boot_id="test", default_boot_image=lambda: built_boot,
                       cache_hold=CacheHold(), checked_files=checked_files)
    driver = load_driver("xen", site_from_dict({"drivers": {"xen": xen_settings}}), host)
    job = load_job(make_job(COUNTING))
    disks = prepare_disks(job, tmp_path / "disks", cache_dir, "squashfs", Events(), hold=host.cache_hold,
                          files=checked_files, sync_interval_s=0)

    def spec(name: str, job_disks=None, restore=None) -> VMSpec:
        folder = tmp_path / name
        folder.mkdir()
        return VMSpec(name=f"vjobs-{name}", vcpus=1, memory_mib=256, boot=built_boot,
                      disks=job_disks or disks.all(), console=ConsoleLog(folder / "console.log", 1 << 20),
                      network=False, owner=new_owner("t1"), workdir=folder, restore=restore)
    return driver, spec


@pytest.mark.vm
def test_a_suspended_guest_resumes_and_a_restored_one_counts_on(xen_guest_parts, xapi_standin, tmp_path):
    driver, spec = xen_guest_parts
    first = Guest(driver, spec("first"), tmp_path / "first").start()
    try:
        first.wait_for_count(3)
        (tmp_path / "periodic").mkdir()
        first.vm.save_guest(tmp_path / "periodic", deadline_in(300))  # a periodic checkpoint: saved, then on
        first.vm.resume()
        seen = len(first.counts())
        first.wait_for_count(seen + 3)

        saved_folder = tmp_path / "saved"
        saved_folder.mkdir()
        identity = first.vm.save_guest(saved_folder, deadline_in(300))
        assert driver.restore_problem(identity) is None
        copies = []
        for disk in first.vm.spec.disks:
            if disk.readonly:
                copies.append(disk)
            else:
                copy = tmp_path / f"copy-{disk.role}"
                copy.write_bytes(first.vm.fetch_disk(disk).read_bytes())
                copies.append(Disk(disk.role, copy, disk.format, readonly=False))
        time.sleep(1)
        before = first.counts()
    finally:
        first.vm.destroy()
    files = {path.name: CheckedFile.open(path, path.name) for path in saved_folder.iterdir()}
    second = Guest(driver, spec("second", tuple(copies), SavedGuest(files, identity)), tmp_path / "second")
    try:
        assert not second.vm.agent_started()
        second.start()
        assert second.vm.agent_started()
        assert second.vm.wait_until_stopped(deadline_in(180)) is Stop.POWEROFF
        second.streams.close()
        after = second.counts()
    finally:
        second.vm.destroy()
        for file in files.values():
            file.close()
    counted = before + after  # the last second's count comes with the results (the core's), not live
    assert counted == list(range(1, len(counted) + 1)) and len(counted) >= 55, (before[-3:], after[:3], counted[-1])


def test_restore_problem_names_the_cpu_that_differs(xen_guest_parts, xapi_standin):
    driver, _ = xen_guest_parts
    identity = {"cpu": {"vendor": "AuthenticAMD", "features": "078bfbff-80d82203"}, "domain_type": "pv", "xen": ""}
    assert driver.restore_problem(identity) is None
    host = xapi_standin.calls.host
    xapi_standin.store.modify("host", host, cpu_info={**xapi_standin.store.get("host", host)["cpu_info"],
                                                      "vendor": "GenuineIntel"})
    assert "vendor AuthenticAMD" in driver.restore_problem(identity) and "GenuineIntel" in driver.restore_problem(identity)


@pytest.fixture
def xapi(xapi_standin):
    session = XenAPI.Session(xapi_standin.url)
    session.xenapi.login_with_password("root", "pool-secret", "2.0", "test")
    yield session.xenapi
    session.xenapi.session.logout()


def test_suspend_and_resume_need_the_power_states_xapi_names(xapi):
    vm = xapi.VM.create({"name_label": "halted", "memory_static_max": str(256 << 20), "VCPUs_max": "1",
                         "PV_kernel": "/nonexistent"})
    with pytest.raises(XenAPI.Failure) as suspend:
        xapi.VM.suspend(vm)
    assert suspend.value.details == ["VM_BAD_POWER_STATE", vm, "running", "halted"]
    with pytest.raises(XenAPI.Failure) as resume:
        xapi.VM.resume(vm, False, False)
    assert resume.value.details == ["VM_BAD_POWER_STATE", vm, "suspended", "halted"]
    xapi.VM.destroy(vm)


def test_a_vm_is_created_suspended_only_with_its_suspend_image_and_boot_record(xapi):
    record = {"name_label": "suspended", "memory_static_max": str(256 << 20), "VCPUs_max": "1",
              "PV_kernel": "/nonexistent", "power_state": "Suspended"}
    with pytest.raises(XenAPI.Failure) as refused:
        xapi.VM.create(record)
    assert refused.value.details[0] == "VM_BAD_POWER_STATE" and refused.value.details[2:] == ["halted", "suspended"]
    sr = xapi.SR.get_by_name_label("vjobs-sr")[0]
    image = xapi.VDI.create({"name_label": "image", "SR": sr, "virtual_size": "512", "type": "suspend"})
    vm = xapi.VM.create({**record, "suspend_VDI": image, "last_booted_record": "{}",
                         "last_boot_CPU_flags": {"vendor": "AuthenticAMD", "features": "0"}})
    assert xapi.VM.get_power_state(vm) == "Suspended"
    with pytest.raises(XenAPI.Failure) as start:
        xapi.VM.start(vm, False, False)
    assert start.value.details == ["VM_BAD_POWER_STATE", vm, "halted", "suspended"]
    xapi.VM.hard_shutdown(vm)  # as XAPI: the suspend image goes with it
    assert xapi.VM.get_power_state(vm) == "Halted" and image not in xapi.VDI.get_all()
    xapi.VM.destroy(vm)
