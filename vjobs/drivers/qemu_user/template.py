"""Pre-booted templates: a guest whose agent is up and waiting, saved once, restored for each job.

A cold start boots a kernel for every job (about 2 s under TCG). A template is that boot done once: QEMU
boots the image with ``vjobs.template`` on the kernel command line and a virtio-scsi controller but no
disks; the agent loads its modules, says "template ready" and waits for an io disk. vjobs then pauses the
guest and saves it: its RAM, which QEMU kept in a memfd of vjobs' (``share=on``), into the file ``ram``, and
QEMU's migration stream without that RAM (``x-ignore-shared``: only the devices, a third of a megabyte) into
``state``. A job's QEMU maps the RAM copy-on-write, from a sealed copy that every job of the account shares
(vjobs/drivers/qemu_user/shared_ram.py), loads the devices (``-incoming``), gets the job's disks hot-plugged
onto the SCSI bus (a virtio-scsi event: no PCI hot-plug, no firmware), and the agent, which was waiting for
exactly that, runs the job.

One template per (QEMU, machine, acceleration, memory, vCPUs, kernel, initramfs, command line): the cache
entry ``templates/FAMILY-KEY`` (vjobs/host/cache.py), KEY hashing all of those by content, so a new image or QEMU
makes a new template and the old one is removed as any stale build is. Nothing of a job is ever in a
template: it is saved before any job's disk exists, each job's QEMU reads the state read-only and gets the
RAM sealed. Its files are checked as any image a VM gets (vjobs/images/checked.py): their sums, taken when the
template was saved, are in its manifest; each job opens the state and stand-ins once, checks them, and gives
QEMU those descriptors; the RAM's keeper checks the RAM against the same manifest when it loads it.

Restored guests start from the same RAM, so the same kernel random-number state: the agent mixes entropy
from the host into the pool and forces the kernel to reseed before anything else runs (the job's io disk
carries the entropy; vjobs-reseed does the ioctl), and sets its clock from the RTC.

Any failure here (no template can be made, the restore fails, the agent does not come up quickly) is not
the job's: the VM falls back to a cold boot and the result says why (provenance ``start``).
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

from vjobs.drivers.contract import CheckedFile, CheckedFiles, VMSpec, check_unchanged
from vjobs.drivers.qemu_user import qemu, ram_keeper, shared_ram
from vjobs.drivers.standins import STAND_INS, write_stand_ins
from vjobs.drivers.templates import RESTORE_DEADLINE_S, Recipe, install, saved_state, template_cmdline, why_not_template
from vjobs.errors import ImageError, VMError
from vjobs.guest.console import ConsoleLog
from vjobs.guest.protocol import AGENT_UP_MARKER, TEMPLATE_READY_MARKER
from vjobs.host.cache import CacheHold
from vjobs.images.store import build_once

FORMAT = 5  # of the saved state, its stand-ins and its manifest; a change makes every template anew
CONTROLLER = "vjobs-scsi"
MACHINES = ("q35", "pc")  # a PCI bus for the SCSI controller; microvm has none
BUILD_DEADLINE_S = 30.0  # one cold boot of the template guest (~2 s), on a loaded host
SAVE_DEADLINE_S = 60.0
MIGRATION_BANDWIDTH = 1 << 40  # bytes/s: no limit in practice (the disk's speed is the limit)
POLL_S = 0.002  # QMP questions while QEMU loads the state (~30 ms): each a fraction of a millisecond
RAM = "ram"  # the guest's RAM, beside ``state`` and the stand-ins
IGNORE_SHARED = [{"capability": "x-ignore-shared", "state": True}]  # the stream leaves out RAM that is a file's


def recipe_for(spec: VMSpec, machine: qemu.QemuMachine, qemu_identity: str) -> Recipe:
    boot = spec.boot
    return Recipe(qemu=qemu_identity, machine=machine.name, accel=machine.accel, tb_size_mib=machine.tb_size_mib,
                  firmware=machine.firmware, memory_mib=spec.memory_mib, vcpus=spec.vcpus,
                  kernel_sha256=boot.kernel.sha256(), initramfs_sha256=boot.initramfs.sha256(), cmdline=boot.cmdline,
                  format=FORMAT)


def eligible(spec: VMSpec, machine: qemu.QemuMachine, setting: bool | str) -> str | None:
    """Why this VM cannot start from a template, or None when it can (vjobs/drivers/templates.py)."""
    no_bus = f"machine {machine.name} has no PCI bus for the template's SCSI controller"
    return why_not_template(spec, setting, None if machine.name in MACHINES else no_bus)


def controller_args() -> list[str]:
    return ["-device", f"virtio-scsi-pci,id={CONTROLLER}"]


def scsi_disk(index: int) -> dict:
    """The job's disk ``index`` as the template's guest gets it: one SCSI target per disk, in the spec's order
    (the agent finds them by content anyway); hot-plugged, or on a saved guest's restore, on the command line."""
    return {"driver": "scsi-hd", "bus": f"{CONTROLLER}.0", "drive": f"disk{index}", "id": f"vjobs-disk{index}",
            "channel": 0, "scsi-id": index, "lun": 0}


def device_option(properties: dict) -> str:
    """A ``scsi_disk`` (a device_add's arguments) as a ``-device`` option."""
    rest = ",".join(f"{key}={value}" for key, value in properties.items() if key != "driver")
    return f"{properties['driver']},{rest}"


def state_bytes_limit(spec: VMSpec) -> int:
    """QEMU's file-size limit while it saves: the stream holds at most the guest's RAM and device state."""
    return (spec.memory_mib + 64) << 20


@dataclass(frozen=True)
class SavedTemplate:
    """A template as one job's QEMU gets it: its files opened and checked against its manifest's sums."""

    name: str  # its cache entry's, FAMILY-KEY
    state: CheckedFile  # the migration stream, for ``-incoming``: the devices, not the RAM
    kernel: CheckedFile  # the stand-ins for -kernel and -initrd (write_stand_ins)
    initramfs: CheckedFile
    ram: Path  # the guest's RAM, which its keeper loads, checks against ``ram_sum`` and seals (shared_ram.py)
    ram_sum: str  # ram_keeper.copy_pages' sum
    ram_bytes: int

    @classmethod
    def open(cls, folder: Path, files: CheckedFiles) -> SavedTemplate:
        manifest = json.loads((folder / "manifest.json").read_text())
        sums = manifest["sha256"]
        state, kernel, initramfs = (files.verified(folder / name, f"the template {folder.name}", sums[name])
                                    for name in ("state", *STAND_INS))
        ram = manifest["ram"]
        return cls(folder.name, state, kernel, initramfs, folder / RAM, ram["sum"], int(ram["bytes"]))

    def check_unchanged(self) -> None:
        for file in (self.state, self.kernel, self.initramfs):
            file.check_unchanged()


class TemplateStore:
    """The templates in ``cache_dir/templates``; ``ensure`` makes one the first time a recipe is asked for.
    ``hold``: the job's hold on the cache (``HostContext.cache_hold``), which keeps the template it uses;
    ``files``: the job's open files (``HostContext.checked_files``), among which the template is opened.
    ``shared_cache_dir``: the administrator's cache, when this process is an account that only reads it
    (vjobs/host/roles.py): a template root made there is used first, never written; the account makes
    any other in its own ``cache_dir``, for its own jobs alone (guest memory is shared only when root made it)."""

    def __init__(self, cache_dir: Path, hold: CacheHold, files: CheckedFiles, progress=lambda message: None,
                 shared_cache_dir: Path | None = None, ram_idle_s: float = shared_ram.DEFAULT_IDLE_S):
        self.folder = cache_dir / "templates"
        self.keepers = self.folder / shared_ram.KEEPERS  # always the account's own: its keepers serve it alone
        self.ram_idle_s = ram_idle_s
        self.shared = shared_cache_dir / "templates" if shared_cache_dir else None
        self.hold = hold
        self.files = files
        self.progress = progress

    def ensure(self, recipe: Recipe, make_vm) -> SavedTemplate:
        """The saved guest for ``recipe``, made with ``make_vm(scratch)`` (a VM for the template guest) when
        there is none yet, opened and checked. Raises VMError when it cannot be made, failed within
        FAILURE_MEMORY_S, or its files are not what was saved."""
        name = f"{recipe.family}-{recipe.key}"
        folder = self.folder / name
        self.folder.mkdir(parents=True, exist_ok=True)
        failed_before = recipe.memo(self.folder).raise_if_recent()
        # root's, read-only; not one whose restore failed here before: this process then makes its own
        shared = self.shared and failed_before != "restore" and saved_state(self.shared / name, recipe, also=(RAM,))
        if shared and self.hold.use(shared.parent):
            return self._opened(recipe, shared.parent)

        def build(scratch: Path) -> Path:
            self.progress(f"template: booting a {recipe.family} guest once, to save it for the jobs after")
            output = scratch / "template"
            output.mkdir()
            started = time.monotonic()
            vm = make_vm(scratch)
            ram = save_template(vm, output / "state", output / RAM)
            write_stand_ins(vm.spec.boot.kernel, output)
            manifest = install(output, folder, recipe, self.folder, started, ram=ram)
            self.progress(f"template: {folder.name} saved in {manifest['made_s']} s ({ram['stored_bytes'] >> 20} "
                          f"MiB of RAM, {manifest['state_bytes'] >> 10} KiB of devices)")
            return folder / "state"

        try:
            # A template whose restore failed before is made anew, not trusted again.
            state = build_once(folder, "VM template", lambda: saved_state(folder, recipe, also=(RAM,)), build,
                               hold=self.hold, force=failed_before == "restore")
        except VMError as error:  # QEMU's or the template guest's failure; a site's setting (DriverError)
            self.remember_failure(recipe, f"making it failed: {error}", stage="make")  # would fail a cold
            raise  # boot the same way, and a full disk passes: neither says anything about templates
        return self._opened(recipe, state.parent)

    def _opened(self, recipe: Recipe, folder: Path) -> SavedTemplate:
        """The template in ``folder``, opened among the job's files and checked against its manifest's sums;
        one that is not what was saved is a failure of the template (made anew after FAILURE_MEMORY_S)."""
        try:
            return SavedTemplate.open(folder, self.files)
        except (OSError, ValueError, KeyError, ImageError) as error:
            self.remember_failure(recipe, f"its files are not what was saved: {error}")
            raise VMError(f"the template {folder.name} is damaged: {error}", code="template_failed") from error

    def shared_ram(self, saved: SavedTemplate) -> int:
        """A descriptor of ``saved``'s RAM as every job of this account maps it: sealed, from its keeper."""
        return shared_ram.memfd(saved.ram, saved.ram_sum, saved.ram_bytes, self.keepers, self.ram_idle_s)

    def remember_failure(self, recipe: Recipe, reason: str, stage: str = "restore") -> None:
        """Jobs of this shape boot cold for FAILURE_MEMORY_S instead of paying for the same failure each."""
        recipe.memo(self.folder).remember(reason, stage)


def save_template(vm, state: Path, ram: Path) -> dict:
    """Boot ``vm`` (a QemuUserVM for the template's spec) until its agent waits for a job, then save it: its
    RAM into ``ram``, its devices into ``state``. Returns the RAM's record for the manifest (``bytes``, ``sum``:
    ram_keeper.copy_pages', ``stored_bytes``)."""
    memory = os.memfd_create("vjobs-template-ram", os.MFD_CLOEXEC)
    try:
        os.ftruncate(memory, vm.spec.memory_mib << 20)
        vm.launch(vm.prepare(cmdline=template_cmdline(vm.spec), disks=(), extra=controller_args(),
                             max_file_bytes=state_bytes_limit(vm.spec), ram=qemu.GuestRam(memory, shared=True)))
        vm.monitor.cmd("cont")
        wait_for(lambda: vm.spec.console.saw(TEMPLATE_READY_MARKER), vm, BUILD_DEADLINE_S,
                  "the template guest to boot")
        vm.monitor.cmd("stop")
        with open(state, "wb") as output:
            vm.monitor.send_fd_scm(output.fileno())
        vm.monitor.cmd("getfd", fdname="state")
        unthrottled(vm)
        vm.monitor.cmd("migrate-set-capabilities", capabilities=IGNORE_SHARED)
        vm.monitor.cmd("migrate", uri="fd:state")
        wait_for(lambda: migration_done(vm), vm, SAVE_DEADLINE_S, "QEMU to save the template")
        vm.destroy()  # the guest's RAM is final only once QEMU is gone
        return write_ram(memory, ram)
    finally:
        os.close(memory)
        vm.destroy()
        vm.spec.console.close()


def write_ram(memory: int, ram: Path) -> dict:
    """The template guest's RAM (the memfd ``memory``) into the new file ``ram``, zero pages as holes."""
    size = os.fstat(memory).st_size
    target = os.open(ram, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    try:
        os.ftruncate(target, size)
        digest = ram_keeper.copy_pages(memory, size, target)
        stored = os.fstat(target).st_blocks * 512
    finally:
        os.close(target)
    return {"bytes": size, "sum": digest, "stored_bytes": stored}


def unthrottled(vm) -> None:
    """No bandwidth limit on QEMU's migration stream: its default (128 MiB/s, meant for a live migration over
    a network that the guest also uses) made a stopped 4 GiB guest take 29 s to save into a local file
    (docs/benchmarks.md, "Checkpoints")."""
    vm.monitor.cmd("migrate-set-parameters", **{"max-bandwidth": MIGRATION_BANDWIDTH})


def prepare_restore(vm, saved: SavedTemplate, ram: int):
    """``vm``'s QEMU that restores ``saved``, prepared (``vm.prepare``, nothing runs): its RAM mapped from
    ``ram`` (the sealed memfd, ``TemplateStore.shared_ram``) copy-on-write, the saved devices to come in through
    ``-incoming`` once ``restore`` has told QEMU to leave the RAM out, the stand-ins as kernel and initramfs,
    the job's disks as drive backends that ``restore`` hot-plugs once the guest is loaded."""
    spec = vm.spec
    incoming = []

    def extra(files: qemu.PassedFiles) -> list[str]:
        incoming.append(f"fd:{files.add_file(saved.state)}")
        return controller_args() + qemu.drive_backends(spec.disks, files) + ["-incoming", "defer"]

    launch = vm.prepare(cmdline=template_cmdline(spec), disks=(), extra=extra, kernel=saved.kernel,
                        initramfs=saved.initramfs, ram=qemu.GuestRam(ram, shared=False))
    launch.incoming = incoming[0]
    return launch


def restore(vm, launch, saved: SavedTemplate) -> None:
    """Run the restoring QEMU (``launch``, from ``prepare_restore``), hot-plug the job's disks, let the guest
    run, wait for the agent's "up"."""
    spec = vm.spec
    vm.launch(launch)
    vm.monitor.cmd("migrate-set-capabilities", capabilities=IGNORE_SHARED)
    vm.monitor.cmd("migrate-incoming", uri=launch.incoming)
    wait_for(lambda: loaded(vm), vm, RESTORE_DEADLINE_S, "QEMU to load the template")
    check_unchanged(spec)  # QEMU holds every file and has read the saved guest: it runs only what was checked
    saved.check_unchanged()
    for index, _disk in enumerate(spec.disks):
        vm.monitor.cmd("device_add", **scsi_disk(index))
    vm.monitor.cmd("cont")
    if not spec.console.wait_for(AGENT_UP_MARKER, RESTORE_DEADLINE_S):
        raise VMError(f"the restored agent did not say it was up within {RESTORE_DEADLINE_S:g} s: "
                      f"{vm.log_tail() or 'QEMU said nothing'}", code="template_failed")


def loaded(vm) -> bool:
    status = vm.monitor.cmd("query-status")["status"]
    if status in ("inmigrate", "prelaunch"):
        return False
    if status == "paused":
        return True
    raise VMError(f"the template did not load: QEMU says {status}", code="template_failed")


def migration_done(vm) -> bool:
    answer = vm.monitor.cmd("query-migrate")
    status = answer.get("status")
    if status in ("failed", "cancelled"):
        raise VMError(f"saving the template failed: {answer.get('error-desc', status)}", code="template_failed")
    return status == "completed"


def wait_for(ready, vm, deadline_s: float, what: str) -> None:
    deadline = time.monotonic() + deadline_s
    while not ready():
        if vm.process.poll() is not None:
            raise VMError(f"QEMU exited while waiting for {what}: {vm.log_tail() or 'no message'}",
                          code="template_failed")
        if time.monotonic() > deadline:
            raise VMError(f"waited {deadline_s:g} s for {what}", code="template_failed")
        time.sleep(POLL_S)


def template_spec(spec: VMSpec, scratch: Path) -> VMSpec:
    """The template guest's own spec: the job's shape, no disks, its own console and folder."""
    return dataclasses.replace(spec, name=f"{spec.name}-template", disks=(), network=False, workdir=scratch,
                               console=ConsoleLog(scratch / "console.log", markers=(TEMPLATE_READY_MARKER,)))

