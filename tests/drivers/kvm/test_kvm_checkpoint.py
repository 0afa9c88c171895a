"""kvm's checkpoints (vjobs/drivers/kvm/saved_guest.py), through the driver as the core drives it: a job's guest
boots with the job's disks, is saved in the middle of its payload, and continues, either in the same VM
(``resume``, a periodic checkpoint) or in a new one restored from copies of its disks in another folder (a
resume elsewhere); its results come back through the core's collection path (``read_results``).

Run as root here; ``test_kvm_accounts.py`` runs this module as an ordinary account in group ``libvirt``, whose
saved state libvirtd (root) must still leave readable to it."""

from __future__ import annotations

import dataclasses
import os
import shutil
from pathlib import Path

import pytest

from vjobs.api import host_context
from vjobs.config.job import load_job
from vjobs.drivers.contract import SavedGuest, Stop, VMSpec, deadline_in
from vjobs.drivers.kvm import KvmDriver
from vjobs.errors import CheckpointError
from vjobs.events import Events
from vjobs.guest.collect import read_results
from vjobs.guest.console import ConsoleLog
from vjobs.guest.disks import prepare_disks
from vjobs.guest.protocol import AGENT_UP_MARKER

pytestmark = [pytest.mark.vm, pytest.mark.libvirt]

STEPS = 12
# A count in a shell variable, one line a second, on stdout (the results) and on the console (to watch it),
# then a line from the release (a read-only disk: the restored domain gets its checked descriptor too).
COUNT = (f'i=0; while [ $i -lt {STEPS} ]; do i=$((i + 1)); echo "count $i"; echo "count $i" > /dev/console; '
         'sleep 1; done; cat /opt/release/greeting')
SAVE_AT = b"count 3\r\n"
DEADLINE_S = 180.0


class CountingJob:
    """The counting payload's disks and the specs of the VMs that run it, each in a folder of its own."""

    def __init__(self, site, make_job, boot, tmp_path: Path):
        self.host = host_context(site)
        self.driver = KvmDriver(dict(site.drivers["kvm"]), self.host)
        self.boot, self.tmp_path = boot, tmp_path
        self.job = load_job(make_job(["sh", "-c", COUNT], release={"greeting": "hello\n"},
                                           walltime_s=600))
        folder = self._folder("job")
        self.disks = prepare_disks(self.job, folder, self.host.cache_dir, site.release_format, Events(),
                                   hold=self.host.cache_hold, files=self.host.checked_files).all()
        self.vms = []

    def _folder(self, name: str) -> Path:
        folder = self.tmp_path / name
        folder.mkdir(mode=0o700)
        return folder

    def spec(self, name: str, disks, restore: SavedGuest | None = None) -> VMSpec:
        from vjobs.host.identity import new_owner

        owner = new_owner(self.job.id)
        return VMSpec(name=f"vjobs-{self.job.id}-{owner.run_id}", vcpus=1, memory_mib=256, boot=self.boot,
                      disks=tuple(disks), console=ConsoleLog(self.tmp_path / f"{name}.console.log",
                                                             markers=(AGENT_UP_MARKER, SAVE_AT)),
                      network=False, owner=owner, workdir=self._folder(name), restore=restore)

    def started(self, spec: VMSpec):
        vm = self.driver.create(spec)
        self.vms.append(vm)
        vm.start()
        return vm

    def saved_midway(self, vm, name: str) -> SavedGuest:
        """``vm``'s guest saved into a new folder once it has counted to 3."""
        assert vm.spec.console.wait_for(SAVE_AT, DEADLINE_S), vm.spec.console.last(2000)
        folder = self._folder(name)
        identity = vm.save_guest(folder, deadline_in(DEADLINE_S))
        files = {path.name: self.host.checked_files.open(path, f"saved {path.name}") for path in folder.iterdir()}
        return SavedGuest(files, identity)

    def copies_of_disks(self, vm, name: str):
        """The disks as the saved guest expects them, the writable ones copied into a new folder."""
        folder = self._folder(name)
        copies = []
        for disk in vm.spec.disks:
            if not disk.readonly:
                copy = shutil.copyfile(vm.fetch_disk(disk), folder / disk.path.name)
                disk = dataclasses.replace(disk, path=Path(copy))
            copies.append(disk)
        return copies

    def counted(self, vm) -> list[str]:
        """The payload's stdout, from the results on its io disk once the guest powered off."""
        assert vm.wait_until_stopped(deadline_in(DEADLINE_S)) is Stop.POWEROFF, vm.spec.console.last(2000)
        io = next(disk for disk in vm.spec.disks if disk.role == "io")
        results = read_results(vm.fetch_disk(io), vm.spec.workdir / "results", io.path.stat().st_size)
        assert results.exit_code == 0, results.status
        return results.stdout.read_text().splitlines()

    def close(self) -> None:
        for vm in self.vms:
            vm.destroy()
            vm.spec.console.close()
        self.host.checked_files.close()
        self.host.cache_hold.release()


@pytest.fixture
def counting(kvm_site, make_job, built_boot, tmp_path):
    job = CountingJob(kvm_site, make_job, built_boot, tmp_path)
    yield job
    job.close()


EVERY_COUNT = [f"count {i}" for i in range(1, STEPS + 1)] + ["hello"]


def test_a_saved_guest_continues_elsewhere_without_a_gap_or_a_repeat(counting):
    first = counting.started(counting.spec("vm.1", counting.disks))
    saved = counting.saved_midway(first, "saved")
    assert set(saved.files) == {"state", "restore-kernel", "restore-initrd"}
    assert all(os.stat(file.fd).st_uid == os.getuid() for file in saved.files.values())  # vjobs' own, not libvirtd's
    identity = saved.identity
    assert identity["machine_type"].startswith("pc-q35-") and identity["virt_type"] == "qemu"
    assert (identity["vcpus"], identity["memory_mib"], identity["disks"]) == (1, 256, ["io", "scratch", "release"])
    assert counting.driver.restore_problem(identity) is None
    disks = counting.copies_of_disks(first, "disks")
    first.destroy()
    before = first.spec.console.last(1 << 20)
    assert b"count 3\r\n" in before and f"count {STEPS}\r\n".encode() not in before

    second = counting.started(counting.spec("vm.2", disks, restore=saved))
    assert second.agent_started()
    assert counting.counted(second) == EVERY_COUNT
    after = second.spec.console.last(1 << 20)
    assert b"count 1\r\n" not in after and f"count {STEPS}\r\n".encode() in after  # it went on, not over


def test_resume_lets_the_same_guest_go_on(counting):
    vm = counting.started(counting.spec("vm.1", counting.disks))
    counting.saved_midway(vm, "saved")
    vm.resume()
    assert counting.counted(vm) == EVERY_COUNT


def test_restore_problem_names_a_machine_type_this_host_lacks(counting):
    identity = {"hypervisor": "QEMU through libvirt", "libvirt": "9.0.0", "qemu": "1.0.0", "virt_type": "qemu",
                "machine_type": "pc-q35-0.1", "vcpus": 1, "memory_mib": 256, "disks": ["io", "scratch"]}
    problem = counting.driver.restore_problem(identity)
    assert problem and "machine type pc-q35-0.1" in problem
    newer = counting.driver.restore_problem({**identity, "qemu": "999.0.0"})
    assert newer and "newer" in newer and "999.0.0" in newer
    other = counting.driver.restore_problem({**identity, "virt_type": "kvm"})
    assert other and "virt_type 'kvm'" in other


def test_a_save_past_its_deadline_fails_and_the_guest_can_still_go_on(counting):
    vm = counting.started(counting.spec("vm.1", counting.disks))
    assert vm.spec.console.wait_for(SAVE_AT, DEADLINE_S)
    folder = counting._folder("saved")
    with pytest.raises(CheckpointError) as failure:
        vm.save_guest(folder, deadline_in(0))
    assert failure.value.code == "checkpoint_too_slow"
    vm.resume()
    assert counting.counted(vm) == EVERY_COUNT
