"""The qemu_user driver: no daemon, one QEMU process per VM, confined when vjobs is root (vjobs/confine.py).

Site settings (``[drivers.qemu_user]``): ``binary``, ``accel`` (``tcg`` default, ``kvm``, or ``auto``: KVM
when a real guest boots under it on this host, else TCG), ``machine`` (``q35`` default, ``microvm``, ``pc``),
``tb_size_mib``, ``run_as`` (the user QEMU runs as when vjobs is root; default ``vjobs-qemu``).
"""

from __future__ import annotations

import functools
import os
import shutil
import socket
import subprocess
import time

from qemu.qmp.legacy import QEMUMonitorProtocol

from ... import qemu
from ...bootcheck import boot_check
from ...confine import confinement_for
from ...console import ConsoleLog
from ...driver import VM, Capabilities, Check, Driver, Stop, VMSpec
from ...errors import DiskFull, VMError

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
        try:
            return qemu.version(self.binary)
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
        return boot_check(self.host, key, lambda spec: self._new_vm(spec, "kvm"), KVM_BOOT_DEADLINE_S)

    def create(self, spec: VMSpec) -> VM:
        accel = self._setting("accel", "tcg")
        if accel != "tcg":
            accel = "kvm" if self._kvm_check().ok else "tcg"
        return self._new_vm(spec, accel)

    def _new_vm(self, spec: VMSpec, accel: str) -> "QemuUserVM":
        machine = qemu.QemuMachine(self._setting("machine", "q35"), accel, self._setting("tb_size_mib", 64))
        return QemuUserVM(spec, self.binary, machine, self._setting("run_as", None))


class QemuUserVM(VM):
    def __init__(self, spec: VMSpec, binary: str, machine: qemu.QemuMachine, run_as: str | None = None):
        super().__init__(spec)
        self.binary = binary
        self.machine = machine
        self.run_as = run_as
        self.process: subprocess.Popen | None = None
        self.monitor: QEMUMonitorProtocol | None = None
        self.shutdown_reason: str | None = None
        self.sockets: list[socket.socket] = []
        self.qemu_log: ConsoleLog | None = None  # QEMU's own messages, bounded as the console is

    def start(self) -> None:
        spec = self.spec
        confinement = confinement_for(self.run_as, network=spec.network, kvm=self.machine.accel == "kvm",
                                      max_file_bytes=_largest_writable_disk(spec))
        console, console_for_qemu = socket.socketpair()
        monitor, monitor_for_qemu = socket.socketpair()
        self.sockets = [console, monitor]
        files = qemu.PassedFiles()
        try:
            argv = qemu.qemu_argv(binary=self.binary, name=spec.name, vcpus=spec.vcpus,
                                  memory_mib=spec.memory_mib, kernel=spec.boot.kernel,
                                  initramfs=spec.boot.initramfs, cmdline=f"{spec.boot.cmdline} console=ttyS0",
                                  disks=spec.disks, machine=self.machine, files=files, console=console_for_qemu,
                                  monitor=monitor_for_qemu, network=spec.network)
            self.process = qemu.spawn(argv, files, confinement)
        finally:
            files.close()  # QEMU holds its own copies now; ours would keep its sockets open after it dies
        spec.console.follow(lambda: console.recv(65536))
        self.qemu_log = ConsoleLog(spec.workdir / "qemu.log", QEMU_LOG_MAX_BYTES, what="QEMU's messages",
                                   setting="the qemu.log limit")
        self.qemu_log.follow(lambda: self.process.stdout.read1(65536), name="qemu-log")
        self.monitor = self._connect_monitor(monitor)
        self.monitor.cmd("cont")

    def _connect_monitor(self, sock: socket.socket) -> QEMUMonitorProtocol:
        """Greet QEMU's monitor over its socket pair; a QEMU that exits at start (a bad option) closes it."""
        monitor = QEMUMonitorProtocol(sock)
        try:
            monitor.connect()
            return monitor
        except Exception as exc:  # ConnectError, wrapping EOF: QEMU is gone
            monitor.close()
            self.process.wait(QMP_CONNECT_TIMEOUT_S)
            raise VMError(f"QEMU exited at start: {self._qemu_log_tail() or exc}", code="hypervisor_failed") from exc

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
        if self.qemu_log is not None:
            self.qemu_log.close()

    def _qemu_log_tail(self) -> str:
        if self.qemu_log is None:
            return ""
        if self.process is not None and self.process.poll() is not None:
            self.qemu_log.close()  # QEMU is gone: all it said is in
        return self.qemu_log.last(500).decode(errors="replace").strip()


def _largest_writable_disk(spec: VMSpec) -> int:
    """QEMU's file-size limit: it writes nothing but its writable disks, whose sizes are fixed."""
    return max((disk.path.stat().st_size for disk in spec.disks if not disk.readonly), default=0) or 1 << 20


@functools.lru_cache(maxsize=None)  # a pilot that runs job after job asks its QEMU once
def _user_network_check(binary: str) -> Check:
    try:
        backends = subprocess.run([binary, "-netdev", "help"], capture_output=True, text=True,
                                  timeout=10).stdout.split()
    except (OSError, subprocess.SubprocessError) as exc:
        return Check("network", False, f"cannot list QEMU's network backends: {exc}")
    if "user" in backends:
        return Check("network", True, "user-mode networking (slirp) for jobs that ask for a network")
    return Check("network", False, "this QEMU has no user-mode networking (slirp): jobs get no network")
