"""Runs a started stand-in VM as a real QEMU TCG guest, through vjobs' own qemu_user driver (loaded like any
plugin), so that the job really runs. One thread per VM does every QEMU operation (start, wait, suspend, kill):
QMP's client is bound to the thread that made it.

A suspend is qemu_user's ``save_guest`` (QEMU's migration to a file) into a folder, with the identity it
returned beside it (``IDENTITY``); a resume is a runner made with that folder (``restore_from``), which
qemu_user restores (its ``SavedGuest``). XAPI's own suspend image is a Xen save image; the stand-in's is this
folder, packed into the suspend VDI by calls.py.

A guest started with no disks gets a virtio-scsi controller, the stand-in's model of the PV bus a Xen guest
always has, onto which ``plug`` (XAPI's ``VBD.plug`` of a running VM) hot-plugs a disk with QMP's ``add-fd``,
``blockdev-add`` and ``device_add``: in the layout of qemu_user's templates (vjobs/drivers/qemu_user/template.py
``scsi_disk``), so that a suspend after it is restored with those disks."""

from __future__ import annotations

import contextlib
import json
import os
import queue
import re
import socket
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import Callable

from vjobs.config.site import SiteConfig
from vjobs.drivers.contract import BootImage, Disk, HostContext, Owner, SavedGuest, Stop, VMSpec
from vjobs.drivers.qemu_user import template as qemu_template
from vjobs.drivers.registry import load_driver
from vjobs.guest.console import ConsoleLog
from vjobs.host.cache import CacheHold
from vjobs.host.identity import boot_id
from vjobs.images.checked import CheckedFiles
from vjobs.testing.xapi_standin.model import CannotResume

START_TIMEOUT_S = 60.0
PLUG_TIMEOUT_S = 30.0
TICK_S = 0.02  # how often the runner's thread looks for work (a plug, a suspend) while the guest runs
SUSPEND_TIMEOUT_S = 600.0
IDENTITY = "identity.json"  # in a suspended guest's folder: what qemu_user's save_guest returned
# The stand-in plays dom0, whose console daemon streams everything; bounding what vjobs keeps is the xen
# driver's job, as it would be against a real pool, so the stand-in's own file is effectively unbounded.
DOM0_CONSOLE_BYTES = 1 << 40


class GuestRunner:
    """``start()`` returns once QEMU runs (or raises what stopped it); ``on_halted(reason)`` is called from
    the runner's thread when the guest is gone: ``halted``, ``crashed`` or ``hard_shutdown`` (not after
    ``suspend``, which the caller reports). ``restore_from``: a folder ``suspend`` wrote, whose guest
    ``start`` continues instead of booting."""

    def __init__(self, name: str, vcpus: int, memory_mib: int, kernel: Path, ramdisk: Path, args: str,
                 disks: list[Disk], workdir: Path, on_halted: Callable[[str], None], restore_from: Path | None = None):
        workdir.mkdir(parents=True, exist_ok=True)
        # Xen's PV console is hvc0; the QEMU guest's is its serial port, which qemu_user names itself. qemu_user
        # also gives the guest its virtio-serial port for the live channel, which nobody reads here: the xen
        # driver's vjobs.streams=console sends the agent to the console, the one channel a real XAPI guest has.
        cmdline = re.sub(r"\bconsole=hvc0\b", "", args).strip()
        owner = Owner(job_id=name, pid=os.getpid(), boot_id=boot_id(), hostname=socket.gethostname(),
                      run_id=workdir.name[:8])
        self.workdir = workdir
        self.console = ConsoleLog(workdir / "console.log", DOM0_CONSOLE_BYTES)
        # What dom0 boots, opened as vjobs opens what its VMs get: the qemu_user driver takes nothing else.
        self.files = CheckedFiles(workdir / "cache")
        try:
            boot = BootImage(self.files.open(kernel, "PV_kernel"), self.files.open(ramdisk, "PV_ramdisk"), cmdline)
            disks = [replace(disk, file=self.files.open(disk.path, disk.role)) if disk.readonly else disk
                     for disk in disks]
            restore = self._saved_guest(restore_from) if restore_from else None
        except BaseException:
            self.files.close()
            raise
        self.spec = VMSpec(name=f"xapi-standin-{workdir.name[:8]}", vcpus=vcpus, memory_mib=memory_mib, boot=boot,
                           disks=tuple(disks), console=self.console, network=False, owner=owner, workdir=workdir,
                           restore=restore)
        self.on_halted = on_halted
        self.vm = None  # the qemu_user VM, once made
        self.started = threading.Event()
        self.stop_requested = threading.Event()
        self.start_error: BaseException | None = None
        self.suspend_into: Path | None = None  # asked of the runner's thread by ``suspend``
        self.suspended = threading.Event()
        self.suspend_error: BaseException | None = None
        self.plugs: queue.Queue[_Plug] = queue.Queue()  # asked of the runner's thread by ``plug``
        self.thread = threading.Thread(target=self._run, name=self.spec.name, daemon=True)

    def _saved_guest(self, folder: Path) -> SavedGuest:
        identity = json.loads((folder / IDENTITY).read_text())
        files = {path.name: self.files.open(path, path.name) for path in sorted(folder.iterdir())
                 if path.name != IDENTITY}
        return SavedGuest(files, identity)

    @property
    def console_log(self) -> Path:
        return self.console.path

    def start(self) -> None:
        self.thread.start()
        if not self.started.wait(START_TIMEOUT_S):
            self.hard_stop()
            raise RuntimeError("QEMU did not start")
        if self.start_error is not None:
            raise self.start_error

    def type_on_console(self, data: bytes) -> None:
        """Input for the guest's console (its serial port), as dom0's console daemon passes a client's on."""
        vm = self.vm
        if vm is not None and vm.console_end is not None:
            with contextlib.suppress(OSError):  # the guest is going
                vm.console_end.sendall(data)

    def suspend(self, folder: Path) -> None:
        """Save the running guest into ``folder`` (empty) and end its QEMU; returns once QEMU is gone. When
        saving fails the guest runs on and the failure is raised."""
        self.suspend_into = folder
        if not self.suspended.wait(SUSPEND_TIMEOUT_S):
            raise RuntimeError("QEMU did not save the guest in time")
        if self.suspend_error is not None:
            error, self.suspend_error = self.suspend_error, None
            self.suspended.clear()
            raise error
        self.thread.join(30)

    def plug(self, disk: Disk) -> None:
        """Hot-plug ``disk`` into the running guest, as its next SCSI disk; raises what QEMU answered."""
        request = _Plug(disk)
        self.plugs.put(request)
        if not request.done.wait(PLUG_TIMEOUT_S):
            raise RuntimeError("QEMU did not plug the disk in time")
        if request.error is not None:
            raise request.error

    def hard_stop(self) -> None:
        """Kill the guest and wait until the runner has reported it halted."""
        self.stop_requested.set()
        self.thread.join(30)

    def _run(self) -> None:
        workdir = self.spec.workdir
        host = HostContext(cache_dir=workdir / "cache", work_dir=workdir, boot_id=boot_id(),
                           default_boot_image=_no_default_image, checked_files=self.files,
                           cache_hold=CacheHold())  # holds nothing: a PV kernel of its own makes no template
        try:
            driver = load_driver("qemu_user", SiteConfig(), host)
            if self.spec.restore is not None and (problem := driver.restore_problem(self.spec.restore.identity)):
                raise CannotResume(problem)
            vm = self.vm = driver.create(self.spec)
            if not self.spec.disks and self.spec.restore is None:
                vm.take_prepared().close()  # the same QEMU, with the bus that disks are hot-plugged onto
                vm.prepared = vm.prepare(cmdline=self.spec.boot.cmdline, disks=(),
                                         extra=qemu_template.controller_args())
                vm.layout = "scsi"
            vm.start()
        except BaseException as exc:  # reported to VM.start's caller
            self.start_error = exc
            self.spec.console.close()
            self.files.close()
            self.started.set()
            return
        self.started.set()
        reason = "hard_shutdown"
        try:
            while not self.stop_requested.is_set():
                while not self.plugs.empty():
                    self._plug(vm, self.plugs.get())
                if self.suspend_into is not None and self._suspend(vm):
                    reason = "suspended"
                    break
                stop = vm.wait_until_stopped(time.monotonic() + TICK_S)
                if stop is not Stop.DEADLINE:
                    reason = "halted" if stop is Stop.POWEROFF else "crashed"
                    break
        finally:
            while not self.plugs.empty():
                request = self.plugs.get()
                request.error = RuntimeError("the guest is gone")
                request.done.set()
            vm.destroy()
            self.spec.console.close()
            self.files.close()
            if reason == "suspended":
                self.suspended.set()
            else:
                self.on_halted(reason)

    def _suspend(self, vm) -> bool:
        """On the runner's thread: the guest saved (True), or the failure kept for ``suspend`` and the guest
        running on (False)."""
        folder, self.suspend_into = self.suspend_into, None
        try:
            identity = vm.save_guest(folder, time.monotonic() + SUSPEND_TIMEOUT_S)
            (folder / IDENTITY).write_text(json.dumps(identity))
            return True
        except BaseException as error:
            self.suspend_error = error
            with contextlib.suppress(Exception):
                vm.resume()
            self.suspended.set()
            return False


    def _plug(self, vm, request: "_Plug") -> None:
        """On the runner's thread: the disk's file passed to QEMU, its block node and its SCSI device added."""
        disk, index = request.disk, len(vm.spec.disks)
        modes = (os.O_RDONLY,) if disk.readonly else (os.O_RDWR, os.O_RDONLY)
        fds = [os.open(disk.path, mode | os.O_CLOEXEC | os.O_NOFOLLOW) for mode in modes]
        try:
            fdset = None
            for fd in fds:
                vm.monitor.send_fd_scm(fd)
                answer = vm.monitor.cmd("add-fd", **({} if fdset is None else {"fdset-id": fdset}))
                fdset = answer["fdset-id"]
            node = {"node-name": f"disk{index}", "driver": disk.format, "read-only": disk.readonly,
                    "file": {"driver": "file", "filename": f"/dev/fdset/{fdset}"}}
            if not disk.readonly:
                node["cache"] = {"no-flush": True}
            vm.monitor.cmd("blockdev-add", **node)
            vm.monitor.cmd("device_add", **qemu_template.scsi_disk(index))
            # the guest's shape now: a suspend saves it with this disk, and a resume rebuilds it so
            vm.spec = self.spec = replace(vm.spec, disks=(*vm.spec.disks, disk))
        except BaseException as error:
            request.error = error
        finally:
            for fd in fds:
                os.close(fd)
            request.done.set()


class _Plug:
    def __init__(self, disk: Disk):
        self.disk = disk
        self.error: BaseException | None = None
        self.done = threading.Event()


def _no_default_image() -> BootImage:
    raise RuntimeError("the stand-in boots the VM's own PV kernel only")
