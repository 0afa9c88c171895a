"""The qemu_user driver: no daemon, one QEMU process per VM, confined when vjobs is root (vjobs/drivers/qemu_user/confine.py).

Site settings (``[drivers.qemu_user]``): ``binary``, ``accel`` (``tcg`` default, ``kvm``, or ``auto``: KVM
when a real guest boots under it on this host, else TCG), ``machine`` (``q35`` default, ``microvm``, ``pc``),
``tb_size_mib``, ``run_as`` (the user QEMU runs as when vjobs is root; default ``vjobs-qemu``), ``template``
(start each job's guest from a saved, pre-booted template instead of booting a kernel, see template.py;
``"auto"``, the default: for the built-in guest image; ``true``: for the site's own boot images too;
``false``: never; a job that cannot use one boots cold), ``template_ram_idle_s`` (how long a template's RAM
stays in memory, held by its keeper, with no job starting from it; shared_ram.py).
"""

from __future__ import annotations

import dataclasses
import os
import resource
import shutil
import socket
import subprocess
import time
from pathlib import Path

from qemu.qmp.legacy import QEMUMonitorProtocol

from vjobs.drivers import probecache
from vjobs.drivers.bootcheck import boot_check
from vjobs.drivers.contract import (VM, Capabilities, Channel, Check, CheckedFile, Driver, HostContext, Stop, VMSpec,
                                    check_disk_formats, check_unchanged, destroyed_on_failure)
from vjobs.drivers.qemu_user import qemu, saved_guest, shared_ram, template
from vjobs.drivers.qemu_user.confine import Confinement, confinement_for
from vjobs.drivers.standins import KERNEL
from vjobs.errors import ImageError, VMError
from vjobs.guest.console import ConsoleLog

KVM_DEVICE = "/dev/kvm"
KVM_BOOT_DEADLINE_S = 15.0  # a healthy KVM host boots the built-in guest in well under a second
QMP_CONNECT_TIMEOUT_S = 15.0
QEMU_LOG_MAX_BYTES = 1 << 20
FORMATS = ("raw", "qcow2")  # QEMU is told each disk's format (vjobs/drivers/qemu_user/qemu.py)


class QemuUserDriver(Driver):
    def _setting(self, key: str, default):
        return self.settings.get(key, default)

    @property
    def binary(self) -> str:
        return self._setting("binary", qemu.DEFAULT_BINARY)

    def qemu_version(self) -> str | None:
        """``QEMU 7.2.19``, or None when the binary cannot say; asked once per binary and host boot
        (vjobs/drivers/probecache.py)."""
        try:
            return probecache.remember("qemu-version", self.binary, qemu.version, self.host)
        except (OSError, subprocess.SubprocessError):
            return None

    def collect_garbage(self, is_orphan) -> list[str]:
        """The keepers of this account's templates' RAM (shared_ram.py): ``vjobs gc`` leaves no process of
        vjobs running. Guests that run keep their RAM; the next job starts a keeper again."""
        keepers = self.host.cache_dir / "templates" / shared_ram.KEEPERS
        return [f"stopped the keeper of a template's RAM (pid {pid})" for pid in shared_ram.stop_keepers(keepers)]

    def probe(self) -> Capabilities:
        found = shutil.which(self.binary)
        version = self.qemu_version() if found else None
        if version is None:
            return self._broken_binary(found)
        network = _user_network_check(found, self.host)
        checks = [Check("binary", True, f"{found}: {version}"), network]
        accel, why = self._choose_acceleration(checks)
        # A network only some jobs ask for, and under accel = "auto" KVM (TCG stands in), inform but never decide.
        advisory = ("network", "kvm") if self._setting("accel", "tcg") == "auto" else ("network",)
        return Capabilities.from_checks(self.name, checks, f"{version}, {accel} acceleration", advisory=advisory,
                                        explain=lambda _kvm: why, acceleration=accel, acceleration_reason=why,
                                        hypervisor=version, read_only_disks=True, disk_formats=FORMATS,
                                        network=network.ok, max_vcpus=os.cpu_count())

    def _broken_binary(self, found: str | None) -> Capabilities:
        """No QEMU on PATH, or one that cannot say its version: the verdict says which, and what to do."""
        if found is None:
            check = Check("binary", False, f"{self.binary} not on PATH")
            advice = f"{self.binary} not found on PATH: install qemu-system-x86"
        else:
            check = Check("binary", False, f"{found} -version failed")
            advice = f"{found} -version fails: the QEMU install is broken"
        return Capabilities.from_checks(self.name, [check], "", explain=lambda _binary: advice)

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
        check_disk_formats(spec, FORMATS, self.name)
        return self._new_vm(spec, self._accel())

    def _accel(self) -> str:
        accel = self._setting("accel", "tcg")
        if accel != "tcg":
            accel = "kvm" if self._kvm_check().ok else "tcg"
        return accel

    def restore_problem(self, identity) -> str | None:
        try:
            machines = probecache.remember("qemu-machine-help", self.binary, lambda path: subprocess.run(
                [path, "-machine", "help"], capture_output=True, text=True, check=True, timeout=20).stdout,
                self.host)
        except (OSError, subprocess.SubprocessError) as exc:
            return f"cannot list this QEMU's machine types ({self.binary} -machine help): {exc}"
        return saved_guest.problem(identity, machines, self._accel())

    def _new_vm(self, spec: VMSpec, accel: str, allow_template: bool = True) -> "QemuUserVM":
        """The VM, attached (``QemuUserVM.attach``): nothing runs until ``start``."""
        vm = self._vm_for(spec, accel, allow_template)
        with destroyed_on_failure(vm):
            vm.attach()
        return vm

    def _vm_for(self, spec: VMSpec, accel: str, allow_template: bool) -> "QemuUserVM":
        machine = qemu.QemuMachine(self._setting("machine", "q35"), accel, self._setting("tb_size_mib", qemu.DEFAULT_TB_SIZE_MIB),
                                   self._firmware())
        run_as = self._setting("run_as", None)
        if spec.restore is not None:
            return RestoredVM(spec, self.binary, machine, run_as, qemu_identity=self.qemu_version())
        wanted = self._setting("template", "auto")
        if allow_template and wanted:
            why_not = template.eligible(spec, machine, wanted)
            if why_not is None:
                recipe = template.recipe_for(spec, machine, f"{shutil.which(self.binary)} {self.qemu_version()}")
                store = template.TemplateStore(self.host.cache_dir, self.host.cache_hold, self.host.checked_files,
                                               self.host.progress, self.host.shared_cache_dir,
                                               self._setting("template_ram_idle_s", shared_ram.DEFAULT_IDLE_S))
                return TemplateVM(spec, self.binary, machine, run_as, store, recipe,
                                  qemu_identity=self.qemu_version())
            return QemuUserVM(spec, self.binary, machine, run_as, start={"mode": "cold", "why": why_not},
                              qemu_identity=self.qemu_version())
        return QemuUserVM(spec, self.binary, machine, run_as, qemu_identity=self.qemu_version())


class Launch:
    """One start of QEMU, made ready by ``QemuUserVM.prepare`` before anything runs: the files QEMU gets as
    descriptors, our ends of its console, monitor and live-streams socket pairs, its confinement and its command
    line."""

    def __init__(self, confinement: Confinement):
        self.confinement = confinement
        self.files = qemu.PassedFiles()
        self.console, self.qemus_console = socket.socketpair()
        self.monitor, self.qemus_monitor = socket.socketpair()
        self.streams, self.qemus_streams = socket.socketpair()
        self.argv: list[str] = []
        self.incoming: str | None = None  # a restore's stream (``fd:N``), for ``migrate-incoming`` once QEMU runs

    def close(self) -> None:
        """Let go of a launch that will not run."""
        self.files.close()
        for sock in (self.console, self.qemus_console, self.monitor, self.qemus_monitor, self.streams,
                     self.qemus_streams):
            sock.close()  # QEMU's ends are no-ops once ``files`` took them


class QemuUserVM(VM):
    layout = "virtio"  # how its disks are attached: what a restore of its saved guest must rebuild (saved_guest.py)
    memory_backend = False  # its RAM is a named backend (qemu.GuestRam, a template's): a restore names it so too

    def __init__(self, spec: VMSpec, binary: str, machine: qemu.QemuMachine, run_as: str | None = None,
                 start: dict | None = None, qemu_identity: str | None = None):
        super().__init__(spec)
        self.start_record = start or {"mode": "cold"}
        self.qemu_identity = qemu_identity  # "QEMU 7.2.19": a saved guest's identity names it
        self.binary = binary
        self.machine = machine
        self.run_as = run_as
        self.process: subprocess.Popen | None = None
        self.monitor: QEMUMonitorProtocol | None = None
        self.shutdown_reason: str | None = None
        self.sockets: list[socket.socket] = []
        self.streams: socket.socket | None = None  # our end of the live streams' port, once launched
        self.console_end: socket.socket | None = None  # our end of the console, once launched (vjobs writes
                                                       # nothing to it; the XAPI stand-in types on it)
        self.qemu_log: ConsoleLog | None = None  # QEMU's own messages, bounded as the console is
        self.prepared: Launch | None = None  # made by ``attach`` (in ``create``), run by ``start``

    def attach(self) -> None:
        """``create``'s part: the QEMU that boots the spec, prepared (``prepare``)."""
        self.prepared = self.prepare(cmdline=self.spec.boot.cmdline, disks=self.spec.disks)

    def start(self) -> None:
        self.launch(self.take_prepared())
        check_unchanged(self.spec)  # QEMU, paused, holds every file: the guest runs only on what was checked
        self.monitor.cmd("cont")

    def take_prepared(self) -> Launch:
        """The launch ``attach`` prepared, handed over once: whoever takes it runs it or closes it."""
        launch, self.prepared = self.prepared, None
        return launch

    def prepare(self, *, cmdline: str, disks, extra=(), max_file_bytes: int | None = None,
                kernel: CheckedFile | None = None, initramfs: CheckedFile | None = None,
                ram: qemu.GuestRam | None = None) -> Launch:
        """One start of QEMU, made ready without running anything: its confinement, every file it gets as a
        descriptor (the disks, sealed copies of the kernel and initramfs), its command line. ``extra``: more
        options, or a function of the ``PassedFiles`` that adds them (a template's devices, ``-incoming``);
        ``kernel`` and ``initramfs`` replace the spec's (a restore's stand-ins); ``ram``: where the guest's RAM
        lives, when not in QEMU's own memory (a template's)."""
        spec = self.spec
        launch = Launch(confinement_for(self.run_as, network=spec.network, kvm=self.machine.accel == "kvm",
                                        max_file_bytes=max_file_bytes or _largest_writable_disk(spec)))
        try:
            launch.argv = qemu.qemu_argv(
                binary=self.binary, name=spec.name, vcpus=spec.vcpus, memory_mib=spec.memory_mib,
                kernel=kernel or spec.boot.kernel, initramfs=initramfs or spec.boot.initramfs,
                cmdline=f"{cmdline} console=ttyS0", disks=disks, machine=self.machine, files=launch.files,
                console=launch.qemus_console, monitor=launch.qemus_monitor, streams=launch.qemus_streams,
                network=spec.network, ram=ram,
                extra=extra(launch.files) if callable(extra) else extra)
        except BaseException:
            launch.close()
            raise
        return launch

    def launch(self, launch: Launch) -> None:
        """Start a prepared QEMU, paused, with its console, its log and its monitor connected."""
        spec = self.spec
        console = self.console_end = launch.console
        self.streams = launch.streams
        self.sockets = [console, launch.monitor, launch.streams]
        try:
            self.process = qemu.spawn(launch.argv, launch.files, launch.confinement)
        finally:
            launch.files.close()  # QEMU holds its own copies now; ours would keep its sockets open after it dies
        spec.console.follow(lambda: console.recv(65536))
        if self.qemu_log is not None:
            self.qemu_log.close()  # a start before this one (a template that failed): its log is complete
        self.qemu_log = ConsoleLog(spec.workdir / "qemu.log", QEMU_LOG_MAX_BYTES, what="QEMU's messages",
                                   setting="the qemu.log limit")
        self.qemu_log.follow(lambda: self.process.stdout.read1(65536), name="qemu-log")
        self.monitor = self._connect_monitor(launch.monitor)

    def provenance(self) -> dict:
        return {"start": self.start_record}

    def guest_channel(self) -> Channel:
        channel = self.streams  # the virtio-serial port's host end, cold boot or restored template alike
        return Channel(read=lambda: channel.recv(65536), write=channel.sendall)

    def save_guest(self, folder: Path, deadline: float) -> dict:
        return saved_guest.save(self, folder, self.layout, deadline)

    def resume(self) -> None:
        self.monitor.cmd("cont")

    def restore_kernel(self) -> CheckedFile:
        """What a restore of this guest hands QEMU as its kernel's setup part (vjobs/drivers/standins.py)."""
        return self.spec.boot.kernel

    def restore_cmdline(self) -> str:
        """The kernel command line this guest was started with, for its restore's machine to be the same."""
        return self.spec.boot.cmdline

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
        while self.shutdown_reason is None and self.full_disk is None:
            if self.process.poll() is not None:
                self._next_event(0.2)  # what QEMU said just before it exited
                break
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return Stop.DEADLINE
            self._next_event(min(remaining, 0.5))
        if self.full_disk is not None:
            return Stop.DISK_FULL  # paused, not ended: destroy() ends it
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
            self.full_disk = self._disk_file(event["data"].get("node-name") or "")
        if event and event.get("event") == "SHUTDOWN":
            self.shutdown_reason = event.get("data", {}).get("reason", "unknown")
        elif event and event.get("event") == "GUEST_PANICKED":
            self.shutdown_reason = "guest-panic"
        return True

    def _disk_file(self, drive: str) -> Path:
        """The file behind one of QEMU's drives: ``diskN`` is the spec's Nth disk, cold or restored alike."""
        number = drive.removeprefix("disk")  # the node's name (vjobs/drivers/qemu_user/qemu.py drive_backends)
        if number.isdigit() and int(number) < len(self.spec.disks):
            return self.spec.disks[int(number)].path
        return self.spec.workdir  # a drive vjobs did not name: its writable disks all live on this file system

    def fetch_disk(self, disk):
        return disk.path  # QEMU wrote straight into the host file

    def destroy(self) -> None:
        if self.prepared is not None:  # created, never started
            self.take_prepared().close()
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


class RestoredVM(QemuUserVM):
    """A VM that continues a guest saved in a checkpoint (saved_guest.py), on the machine it was saved from."""

    def __init__(self, spec: VMSpec, binary: str, machine: qemu.QemuMachine, run_as: str | None,
                 qemu_identity: str | None = None):
        identity = spec.restore.identity
        machine = dataclasses.replace(machine, machine_type=identity["machine_type"], firmware=identity["firmware"])
        super().__init__(spec, binary, machine, run_as, start={"mode": "restored"}, qemu_identity=qemu_identity)
        self.layout = identity["layout"]
        self.memory_backend = identity.get("memory_backend", False)

    def attach(self) -> None:
        self.prepared = saved_guest.prepare(self)

    def start(self) -> None:
        saved_guest.restore(self, self.take_prepared())

    def agent_started(self) -> bool:
        return self.process is not None  # it was up when the guest was saved

    def restore_kernel(self) -> CheckedFile:
        return self.spec.restore.files[KERNEL]

    def restore_cmdline(self) -> str:
        return self.spec.restore.identity["cmdline"]


class TemplateVM(QemuUserVM):
    """A VM that starts from the saved template for its shape (template.py), made once by the first job that
    needs it; when anything about that fails, it boots cold instead and says why in ``provenance()``."""

    def __init__(self, spec: VMSpec, binary: str, machine: qemu.QemuMachine, run_as: str | None,
                 store: template.TemplateStore, recipe: template.Recipe, qemu_identity: str | None = None):
        super().__init__(spec, binary, machine, run_as, qemu_identity=qemu_identity)
        self.store, self.recipe = store, recipe
        self.template: template.SavedTemplate | None = None  # the saved guest ``start`` restores; None: cold

    def attach(self) -> None:
        """The template found, or made (a boot of its own, once per guest shape), and its restore prepared with
        the job's disks (``template.prepare_restore``); a cold boot prepared instead when either fails."""
        try:
            saved = self.store.ensure(self.recipe, self._template_vm)
        except Exception as error:  # whatever went wrong, it is not the job's: a cold boot still runs it
            self._prepare_cold(str(error) or type(error).__name__)
            return
        try:
            ram = self.store.shared_ram(saved)
        except Exception as error:  # no keeper: the template's RAM cannot be shared safely
            self._prepare_cold(f"restoring {saved.name} failed: {error or type(error).__name__}")
            return
        try:
            self.prepared = template.prepare_restore(self, saved, ram)
        except Exception as error:  # before QEMU ran (a site's run_as that does not exist, say): nothing the
            self._prepare_cold(f"restoring {saved.name} failed: {error or type(error).__name__}")
            return  # template did; a cold boot fails the same way and reports it
        finally:
            os.close(ram)  # the launch holds its own copy until QEMU has it
        self.template = saved

    def start(self) -> None:
        if self.template is None:
            super().start()
            return
        try:
            template.restore(self, self.take_prepared(), self.template)
            self.start_record = {"mode": "template", "template": self.template.name}
            self.layout = "scsi"
            self.memory_backend = True
            return
        except ImageError:  # a checked file changed before the guest ran: the job's refusal, not the template's
            raise
        except Exception as error:
            reason = f"restoring {self.template.name} failed: {error or type(error).__name__}"
            # Only a failure once QEMU ran says something about the template; one before would fail a cold
            # boot the same way, and that boot reports it.
            templates_fault = self.process is not None
        self.stop_qemu()
        if templates_fault:
            self.store.remember_failure(self.recipe, reason)
        self._prepare_cold(reason)
        super().start()

    def restore_kernel(self) -> CheckedFile:
        return self.template.kernel if self.layout == "scsi" else self.spec.boot.kernel

    def restore_cmdline(self) -> str:
        return template.template_cmdline(self.spec) if self.layout == "scsi" else self.spec.boot.cmdline

    def _prepare_cold(self, reason: str) -> None:
        self.template = None
        self.spec.console.write(f"\n[vjobs: starting from the template failed ({reason}); booting cold]\n".encode())
        self.start_record = {"mode": "cold", "fallback": reason}
        super().attach()

    def _template_vm(self, scratch) -> QemuUserVM:
        return QemuUserVM(template.template_spec(self.spec, scratch), self.binary, self.machine, self.run_as)


def _largest_writable_disk(spec: VMSpec) -> int:
    """QEMU's file-size limit: it writes nothing but its writable disks, whose sizes are fixed. A VM started
    with none gets its disks hot-plugged later (the XAPI stand-in's templates and their resumes), and each
    may be as large as a disk may be: no limit then (it opens no file of its own either way)."""
    return max((disk.path.stat().st_size for disk in spec.disks if not disk.readonly), default=0) \
        or resource.RLIM_INFINITY


def _user_network_check(binary: str, host: HostContext | None) -> Check:
    """A job that asks for a network gets QEMU's user-mode stack, if this QEMU was built with it."""
    try:  # asked once per binary and host boot (vjobs/drivers/probecache.py): a pilot runs job after job
        backends = probecache.remember("qemu-netdev-help", binary, lambda path: subprocess.run(
            [path, "-netdev", "help"], capture_output=True, text=True, check=True, timeout=10).stdout, host).split()
    except (OSError, subprocess.SubprocessError) as exc:
        return Check("network", False, f"cannot list QEMU's network backends: {exc}")
    if "user" in backends:
        return Check("network", True, "user-mode networking (slirp) for jobs that ask for a network")
    return Check("network", False, "this QEMU has no user-mode networking (slirp): jobs get no network")
