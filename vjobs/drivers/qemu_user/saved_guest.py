"""A running job's guest saved into a checkpoint, and continued from one (vjobs/checkpoint/).

Saving is QEMU's migration stream, as for templates (template.py), but of a guest in the middle of its job:
QEMU stops the guest's CPUs, which drains its disks into their files, then writes the stream into a pipe that
vjobs reads into ``state``: the file is vjobs' user's (not the confined QEMU's), and is bounded by vjobs, not
by QEMU's file-size limit. Beside it go the stand-ins for ``-kernel`` and ``-initrd``
(vjobs/drivers/standins.py): the guest booted long ago, so a checkpoint carries no boot image.

A restore must build the same machine the guest was saved from, device for device: the versioned machine
type QEMU resolved (``q35`` is ``pc-q35-7.2`` in QEMU 7.2, and any later QEMU that still has that type may
load it), the same firmware, CPU count, memory, network card, disks in the same order on the same bus (a
cold boot's virtio-blk devices, or a template's SCSI disks, which were hot-plugged and now come on the
command line), and its live-streams port. All of that is the saved guest's ``identity``.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path
from typing import Any, Mapping

from qemu.qmp import QMPError

from vjobs.drivers.contract import check_unchanged
from vjobs.drivers.qemu_user import qemu, template
from vjobs.drivers.standins import INITRAMFS, KERNEL, write_stand_ins
from vjobs.errors import VMError

STATE = "state"
COPY_CHUNK = 1 << 20


def save(vm, folder: Path, layout: str, deadline: float) -> dict[str, Any]:
    """Stop ``vm``'s guest and write it into ``folder`` by ``deadline`` (else QEMU's save is cancelled and
    VMError raised); return its identity. ``layout``: how its disks are attached, ``"virtio"`` (a cold
    boot's) or ``"scsi"`` (a template's)."""
    try:
        return _save(vm, folder, layout, deadline)
    except QMPError as exc:  # its monitor went away: QEMU ended (killed from outside, or it crashed)
        raise VMError(f"QEMU ended while saving the guest ({type(exc).__name__}: {exc}): {vm.log_tail()}",
                      code="hypervisor_failed") from exc


def _save(vm, folder: Path, layout: str, deadline: float) -> dict[str, Any]:
    vm.monitor.cmd("stop")  # the guest's CPUs stop and its disks' writes are in their files
    reader, writer = os.pipe()
    try:
        vm.monitor.send_fd_scm(writer)
        vm.monitor.cmd("getfd", fdname="checkpoint")
    finally:
        os.close(writer)  # QEMU holds its own copy: the stream ends when QEMU closes it
    copier = _StreamCopy(reader, folder / STATE)
    template.unthrottled(vm)
    # all of the RAM: a template-started guest's is a file's (mapped copy-on-write) that a restore lacks
    vm.monitor.cmd("migrate-set-capabilities", capabilities=[{"capability": "x-ignore-shared", "state": False}])
    vm.monitor.cmd("migrate", uri="fd:checkpoint")
    try:
        template.wait_for(lambda: template.migration_done(vm), vm, deadline - time.monotonic(),
                          "QEMU to save the guest")
    except VMError:
        vm.monitor.cmd("migrate_cancel")  # QEMU closes the pipe: the copy ends
        raise
    finally:
        copier.join()
    write_stand_ins(vm.restore_kernel(), folder)
    return {"hypervisor": vm.qemu_identity, "machine_type": machine_type(vm), "accel": vm.machine.accel,
            "firmware": vm.machine.firmware, "vcpus": vm.spec.vcpus, "memory_mib": vm.spec.memory_mib,
            "network": vm.spec.network, "disks": [disk.role for disk in vm.spec.disks], "layout": layout,
            "memory_backend": vm.memory_backend, "cmdline": vm.restore_cmdline()}


def machine_type(vm) -> str:
    """The versioned machine QEMU runs (``pc-q35-7.2`` for ``q35``): what a restore must ask for."""
    option = qemu.MACHINES[vm.machine.name][0]
    for machine in vm.monitor.cmd("query-machines"):
        if machine.get("alias") == option:
            return machine["name"]
    return option  # no alias (microvm): the name is the type


class _StreamCopy:
    """The migration stream from a pipe into a new file of ours, in a thread (QEMU writes while we wait)."""

    def __init__(self, reader: int, target: Path):
        self.reader = reader
        self.target = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        self.error: OSError | None = None
        self.thread = threading.Thread(target=self._copy, name="checkpoint-stream", daemon=True)
        self.thread.start()

    def _copy(self) -> None:
        try:
            while os.splice(self.reader, self.target, COPY_CHUNK):
                pass
        except OSError as error:  # a full disk: the save fails, the previous checkpoint stays current
            self.error = error
        finally:
            os.close(self.reader)
            os.close(self.target)

    def join(self) -> None:
        self.thread.join()  # the pipe ends when QEMU's save completes or is cancelled
        if self.error is not None:
            raise self.error


def problem(identity: Mapping[str, Any], machines: str, accel: str) -> str | None:
    """Why this QEMU (``machines``: its ``-machine help``) cannot load a guest saved with ``identity``."""
    wanted = identity.get("machine_type", "")
    if not wanted or wanted.split(",")[0] not in machines.split():
        return (f"the guest was saved by {identity.get('hypervisor')} with machine type {wanted}, which this QEMU "
                "does not have: resume it where that QEMU (or one that keeps that machine type) is installed")
    if identity.get("accel") != accel:
        return (f"the guest was saved under {identity.get('accel')} acceleration and this host's qemu_user runs "
                f"{accel}: set [drivers.qemu_user] accel to match")
    firmware = identity.get("firmware")
    if firmware and not Path(firmware).is_file():
        return f"the guest was saved with the firmware {firmware}, which this host does not have"
    return None


def prepare(vm):
    """``vm``'s QEMU that continues ``vm.spec.restore``, prepared (nothing runs): the same machine, its disks
    as they were attached, the stream through ``-incoming``."""
    saved = vm.spec.restore
    identity = saved.identity
    if identity["vcpus"] != vm.spec.vcpus or identity["memory_mib"] != vm.spec.memory_mib \
            or identity["network"] != vm.spec.network or identity["disks"] != [d.role for d in vm.spec.disks]:
        raise VMError("the saved guest's shape (vCPUs, memory, network, disks) is not the job's: the checkpoint "
                      "does not belong to this job", code="checkpoint_mismatch")

    scsi = identity["layout"] == "scsi"

    def extra(files: qemu.PassedFiles) -> list[str]:
        # A cold boot's virtio disks come where the cold boot had them (``disks``: PCI slots follow the
        # order of the devices); a template's SCSI disks after its controller, as when they were hot-plugged.
        devices = template.controller_args() + qemu.drive_backends(vm.spec.disks, files) if scsi else []
        for index in range(len(vm.spec.disks) if scsi else 0):
            devices += ["-device", template.device_option(template.scsi_disk(index))]
        return devices + ["-incoming", f"fd:{files.add_file(saved.files[STATE])}"]

    return vm.prepare(cmdline=identity["cmdline"], disks=() if scsi else vm.spec.disks, extra=extra,
                      kernel=saved.files[KERNEL], initramfs=saved.files[INITRAMFS],
                      ram=qemu.GuestRam() if identity.get("memory_backend") else None)


def restore(vm, launch) -> None:
    """Run the prepared QEMU, wait until it has loaded the guest, and let the guest go on."""
    vm.launch(launch)
    template.wait_for(lambda: template.loaded(vm), vm, template.RESTORE_DEADLINE_S * 6, "QEMU to load the saved guest")
    check_unchanged(vm.spec)  # QEMU holds every file and has read the guest: it goes on only with what was checked
    for file in vm.spec.restore.files.values():
        file.check_unchanged()
    vm.monitor.cmd("cont")

