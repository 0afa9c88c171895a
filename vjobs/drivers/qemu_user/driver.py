"""The qemu_user driver: no daemon, one QEMU process per VM, confined when vjobs is root (vjobs/drivers/qemu_user/confine.py).

Site settings (``[drivers.qemu_user]``): ``binary``, ``accel`` (``tcg`` default, ``kvm``, or ``auto``: KVM
when a real guest boots under it on this host, else TCG), ``machine`` (``q35`` default, ``microvm``, ``pc``),
``tb_size_mib``, ``run_as`` (the user QEMU runs as when vjobs is root; default ``vjobs-qemu``), ``template``
(start each job's guest from a saved, pre-booted template instead of booting a kernel, see template.py;
``"auto"``, the default: for the built-in guest image; ``true``: for the site's own boot images too;
``false``: never; a job that cannot use one boots cold).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time

from qemu.qmp.legacy import QEMUMonitorProtocol

from vjobs.drivers import probecache
from vjobs.drivers.qemu_user import qemu
from vjobs.drivers.bootcheck import boot_check
from vjobs.drivers.qemu_user.confine import confinement_for
from vjobs.guest.console import ConsoleLog
from vjobs.drivers.contract import VM, Capabilities, Check, Driver, Stop, VMSpec
from vjobs.errors import DiskFull, VMError
from vjobs.drivers.qemu_user import template

KVM_DEVICE = "/dev/kvm"
KVM_BOOT_DEADLINE_S = 15.0  # a healthy KVM host boots the built-in guest in well under a second
QMP_CONNECT_TIMEOUT_S = 15.0
QEMU_LOG_MAX_BYTES = 1 << 20


class QemuUserDriver(Driver):
    def _setting(self, key: str, default):
        return self.settings.get(key, default)

    @property
    def binary(self) -> str:
        return self._setting("binary", qemu.DEFAULT_BINARY)

    def version(self) -> str | None:
        try:  # asked once per binary and host boot (vjobs/drivers/probecache.py)
            return probecache.remember("qemu-version", self.binary, qemu.version, self.host)
        except (OSError, subprocess.SubprocessError):
            return None

    def probe(self) -> Capabilities:
        found = shutil.which(self.binary)
        if not found:
            return Capabilities(self.name, False, f"{self.binary} not found on PATH: install qemu-system-x86",
                                checks=(Check("binary", False, f"{self.binary} not on PATH"),))
        version = self.version()
        if version is None:
            return Capabilities(self.name, False, f"{found} -version fails: the QEMU install is broken",
                                checks=(Check("binary", False, f"{found} -version failed"),))
        checks = [Check("binary", True, f"{found}: {version}"), self._network_check()]
        accel, why = self._choose_acceleration(checks)
        usable = accel is not None
        reason = f"{version}, {accel} acceleration" if usable else why
        return Capabilities(self.name, usable, reason, acceleration=accel, acceleration_reason=why,
                            hypervisor=version, read_only_disks=True, disk_formats=("raw", "qcow2"),
                            network=checks[1].ok, max_vcpus=os.cpu_count(), checks=tuple(checks))

    def _network_check(self) -> Check:
        """A job that asks for a network gets QEMU's user-mode stack, if this QEMU was built with it."""
        return _user_network_check(shutil.which(self.binary) or self.binary)

    def _choose_acceleration(self, checks: list[Check]) -> tuple[str | None, str]:
        wanted = self._setting("accel", "tcg")
        if wanted == "tcg":
            return "tcg", "TCG (software emulation) as configured: works everywhere, slower CPU"
        kvm_check = self._kvm_check()
        checks.append(kvm_check)
        if kvm_check.ok:
            return "kvm", f"KVM: {kvm_check.detail}"
        if wanted == "auto":
            return "tcg", f"TCG, because KVM is not usable: {kvm_check.detail}"
        return None, f"KVM acceleration was asked for (accel = \"kvm\") but is not usable: {kvm_check.detail}"

    def _kvm_check(self) -> Check:
        if not os.access(KVM_DEVICE, os.R_OK | os.W_OK):
            return Check("kvm", False, f"{KVM_DEVICE} is missing or not read-writable by uid {os.getuid()}")
        key = f"qemu_user-{self._setting('machine', 'q35')}-kvm"
        return boot_check(self.host, key, lambda spec: self._new_vm(spec, "kvm", allow_template=False),
                          KVM_BOOT_DEADLINE_S)

    def _firmware(self) -> str | None:
        wanted = self._setting("firmware", "seabios")
        if wanted == "qboot":
            return str(qemu.QBOOT)
        return None if wanted == "seabios" else wanted  # else a -bios file the site names

    def create(self, spec: VMSpec) -> VM:
        accel = self._setting("accel", "tcg")
        if accel != "tcg":
            accel = "kvm" if self._kvm_check().ok else "tcg"
        return self._new_vm(spec, accel)

    def _new_vm(self, spec: VMSpec, accel: str, allow_template: bool = True) -> "QemuUserVM":
        machine = qemu.QemuMachine(self._setting("machine", "q35"), accel, self._setting("tb_size_mib", qemu.DEFAULT_TB_SIZE_MIB),
                                   self._firmware())
        run_as = self._setting("run_as", None)
        wanted = self._setting("template", "auto")
        if allow_template and wanted:
            why_not = template.eligible(spec, machine, wanted)
            if why_not is None:
                recipe = template.recipe_for(spec, machine, f"{shutil.which(self.binary)} {self.version()}")
                store = template.TemplateStore(self.host.cache_dir, self.host.progress)
                return TemplateVM(spec, self.binary, machine, run_as, store, recipe)
            return QemuUserVM(spec, self.binary, machine, run_as, start={"mode": "cold", "why": why_not})
        return QemuUserVM(spec, self.binary, machine, run_as)


class QemuUserVM(VM):
    def __init__(self, spec: VMSpec, binary: str, machine: qemu.QemuMachine, run_as: str | None = None,
                 start: dict | None = None):
        super().__init__(spec)
        self.start_record = start or {"mode": "cold"}
        self.binary = binary
        self.machine = machine
        self.run_as = run_as
        self.process: subprocess.Popen | None = None
        self.monitor: QEMUMonitorProtocol | None = None
        self.shutdown_reason: str | None = None
        self.sockets: list[socket.socket] = []
        self.qemu_log: ConsoleLog | None = None  # QEMU's own messages, bounded as the console is

    def start(self) -> None:
        self.launch(cmdline=self.spec.boot.cmdline, disks=self.spec.disks)
        self.monitor.cmd("cont")

    def launch(self, *, cmdline: str, disks, extra=(), max_file_bytes: int | None = None,
               kernel=None, initramfs=None) -> None:
        """Start QEMU paused with its console, its log and its monitor connected. ``extra`` gets the
        ``PassedFiles`` to add options to (a template's devices, ``-incoming``); ``kernel`` and ``initramfs``
        replace the spec's (a restore's stand-ins)."""
        spec = self.spec
        confinement = confinement_for(self.run_as, network=spec.network, kvm=self.machine.accel == "kvm",
                                      max_file_bytes=max_file_bytes or _largest_writable_disk(spec))
        console, console_for_qemu = socket.socketpair()
        monitor, monitor_for_qemu = socket.socketpair()
        self.sockets = [console, monitor]
        files = qemu.PassedFiles()
        try:
            argv = qemu.qemu_argv(binary=self.binary, name=spec.name, vcpus=spec.vcpus,
                                  memory_mib=spec.memory_mib, kernel=kernel or spec.boot.kernel,
                                  initramfs=initramfs or spec.boot.initramfs, cmdline=f"{cmdline} console=ttyS0",
                                  disks=disks, machine=self.machine, files=files, console=console_for_qemu,
                                  monitor=monitor_for_qemu, network=spec.network,
                                  extra=extra(files) if callable(extra) else extra)
            self.process = qemu.spawn(argv, files, confinement)
        finally:
            files.close()  # QEMU holds its own copies now; ours would keep its sockets open after it dies
        spec.console.follow(lambda: console.recv(65536))
        if self.qemu_log is not None:
            self.qemu_log.close()  # a start before this one (a template that failed): its log is complete
        self.qemu_log = ConsoleLog(spec.workdir / "qemu.log", QEMU_LOG_MAX_BYTES, what="QEMU's messages",
                                   setting="the qemu.log limit")
        self.qemu_log.follow(lambda: self.process.stdout.read1(65536), name="qemu-log")
        self.monitor = self._connect_monitor(monitor)

    def provenance(self) -> dict:
        return {"start": self.start_record}

    def _connect_monitor(self, sock: socket.socket) -> QEMUMonitorProtocol:
        """Greet QEMU's monitor over its socket pair; a QEMU that exits at start (a bad option) closes it."""
        monitor = QEMUMonitorProtocol(sock)
        try:
            monitor.connect()
            return monitor
        except Exception as exc:  # ConnectError, wrapping EOF: QEMU is gone
            monitor.close()
            self.process.wait(QMP_CONNECT_TIMEOUT_S)
            raise VMError(f"QEMU exited at start: {self.log_tail() or exc}", code="hypervisor_failed") from exc

    def wait_until_stopped(self, deadline: float) -> Stop:
        while self.shutdown_reason is None:
            if self.process.poll() is not None:
                self._next_event(0.2)  # what QEMU said just before it exited
                break
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return Stop.DEADLINE
            self._next_event(min(remaining, 0.5))
        self.process.wait()
        return Stop.POWEROFF if self.shutdown_reason == "guest-shutdown" else Stop.CRASH

    def _next_event(self, wait: float) -> bool:
        """Wait up to ``wait`` s for a QMP event; False when the monitor is closed."""
        try:
            event = self.monitor.pull_event(wait=wait)
        except TimeoutError:
            return True
        except Exception:  # EOF or a reset socket: QEMU has exited
            return False
        if event and event.get("event") == "BLOCK_IO_ERROR" and event.get("data", {}).get("nospace"):
            # QEMU paused the guest: a writable disk's file system on the host is full (sparse files grow)
            raise DiskFull(f"the host file system under {self.spec.workdir.parent} is full: the guest's "
                           f"{event['data'].get('device') or 'disk'} could not grow; free space or move work_dir")
        if event and event.get("event") == "SHUTDOWN":
            self.shutdown_reason = event.get("data", {}).get("reason", "unknown")
        elif event and event.get("event") == "GUEST_PANICKED":
            self.shutdown_reason = "guest-panic"
        return True

    def fetch_disk(self, disk):
        return disk.path  # QEMU wrote straight into the host file

    def destroy(self) -> None:
        self.stop_qemu()
        if self.qemu_log is not None:
            self.qemu_log.close()

    def stop_qemu(self) -> None:
        """Kill QEMU and let go of its monitor and sockets; its log stays open for a next start."""
        if self.process is not None:
            qemu.kill(self.process)
        if self.monitor is not None:
            try:
                self.monitor.close()
            except Exception:
                pass  # the other end is gone: nothing to close politely
            self.monitor = None
        for sock in self.sockets:
            sock.close()
        self.sockets = []

    def log_tail(self) -> str:
        if self.qemu_log is None:
            return ""
        if self.process is not None and self.process.poll() is not None:
            self.qemu_log.close()  # QEMU is gone: all it said is in
        return self.qemu_log.last(500).decode(errors="replace").strip()


class TemplateVM(QemuUserVM):
    """A VM that starts from the saved template for its shape (template.py), made once by the first job that
    needs it; when anything about that fails, it boots cold instead and says why in ``provenance()``."""

    def __init__(self, spec: VMSpec, binary: str, machine: qemu.QemuMachine, run_as: str | None,
                 store: template.TemplateStore, recipe: template.Recipe):
        super().__init__(spec, binary, machine, run_as)
        self.store, self.recipe = store, recipe

    def start(self) -> None:
        try:
            state = self.store.ensure(self.recipe, self._template_vm)
        except Exception as error:  # whatever went wrong, it is not the job's: a cold boot still runs it
            self._boot_cold(str(error) or type(error).__name__)
            return
        try:
            template.restore(self, state)
            self.start_record = {"mode": "template", "template": state.parent.name}
            return
        except Exception as error:
            reason = f"restoring {state.parent.name} failed: {error or type(error).__name__}"
            # Only a failure once QEMU ran says something about the template; one before (a site's run_as
            # that does not exist, say) would fail a cold boot the same way, and that boot reports it.
            templates_fault = self.process is not None
        self.stop_qemu()
        if templates_fault:
            self.store.remember_failure(self.recipe, reason)
        self._boot_cold(reason)

    def _boot_cold(self, reason: str) -> None:
        self.stop_qemu()
        self.spec.console.write(f"\n[vjobs: starting from the template failed ({reason}); booting cold]\n".encode())
        self.start_record = {"mode": "cold", "fallback": reason}
        super().start()

    def _template_vm(self, scratch) -> QemuUserVM:
        return QemuUserVM(template.template_spec(self.spec, scratch), self.binary, self.machine, self.run_as)


def _largest_writable_disk(spec: VMSpec) -> int:
    """QEMU's file-size limit: it writes nothing but its writable disks, whose sizes are fixed."""
    return max((disk.path.stat().st_size for disk in spec.disks if not disk.readonly), default=0) or 1 << 20


def _user_network_check(binary: str) -> Check:
    try:  # asked once per binary and host boot (vjobs/drivers/probecache.py): a pilot runs job after job
        backends = probecache.remember("qemu-netdev-help", binary, lambda path: subprocess.run(
            [path, "-netdev", "help"], capture_output=True, text=True, check=True, timeout=10).stdout).split()
    except (OSError, subprocess.SubprocessError) as exc:
        return Check("network", False, f"cannot list QEMU's network backends: {exc}")
    if "user" in backends:
        return Check("network", True, "user-mode networking (slirp) for jobs that ask for a network")
    return Check("network", False, "this QEMU has no user-mode networking (slirp): jobs get no network")
