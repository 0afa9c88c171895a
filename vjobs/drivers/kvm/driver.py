"""The kvm driver: each job runs in a transient libvirt domain, watched through libvirt's domain events.

``create`` defines the domain, hands libvirt the checked descriptors of its read-only disks
(``virDomainFDAssociate``, which needs a domain to hand them to), starts it paused (QEMU opens the disks then)
and undefines it at once, which leaves it transient: nothing of it outlives its QEMU. QEMU has connected to
vjobs' sockets for the console and the guest's live channel by then (``DomainSockets``); vjobs reads both itself.
``start`` checks that no checked file changed (``check_unchanged``) and resumes it. A domain a killed vjobs
left running, or left defined, is found by ``vjobs gc`` through its owner labels.

Checkpoints (saved_guest.py): ``save_guest`` pauses the domain and has libvirt write its memory into a file
of vjobs' user, QEMU staying up for ``resume``; a restored VM (``RestoredKvmVM``) is created the same way as a
cold one, but ``virDomainRestoreFlags`` starts it, paused, from a private copy of that file, under the name it
was saved with (libvirt allows no other) and this run's owner labels, disks and sockets.

Site settings (``[drivers.kvm]``): ``uri`` (``qemu:///system`` default, or ``qemu:///session``),
``virt_type`` (``kvm`` default, or ``qemu`` for TCG, as Nova's libvirt driver has it), ``machine`` (``q35``
default, or ``pc``; libvirt has no microvm).
"""

from __future__ import annotations

import contextlib
import os
import select
import shutil
import socket
import tempfile
import threading
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import libvirt

from vjobs.drivers.bootcheck import boot_check
from vjobs.drivers.contract import (VM, Capabilities, Channel, Check, CheckedFile, Disk, Driver, Stop, VMSpec,
                                    check_disk_formats, check_unchanged, destroyed_on_failure, first_failure)
from vjobs.drivers.kvm import connection, saved_guest, template
from vjobs.drivers.kvm.connection import libvirt_errors
from vjobs.drivers.kvm.domain import (CONSOLE_SOCKET, NAMESPACE_URI, STREAMS_SOCKET, DomainSettings, disk_fds,
                                      domain_xml, parse_owner, restored_xml, scsi_disk_xml, template_restored_xml,
                                      with_scsi_controller)
from vjobs.drivers.standins import INITRAMFS, KERNEL, write_stand_ins
from vjobs.drivers.templates import RESTORE_DEADLINE_S, STATE, why_not_template
from vjobs.errors import ImageError, VjobsError, VMError
from vjobs.guest.protocol import AGENT_UP_MARKER, TEMPLATE_READY_MARKER

# How long the deep probe waits for the built-in guest: a healthy KVM host boots it in well under a second;
# TCG through libvirt took about 4-5 s here (kernel decompression and boot, plus libvirt's start and stop).
BOOT_DEADLINE_S = {"kvm": 15.0, "qemu": 60.0}
ACCELERATION = {"kvm": "kvm", "qemu": "tcg"}
NETWORK = "default"  # the libvirt network a job that may use the network is attached to
RECONNECT_S = 30.0  # how long destroy() waits for a restarted libvirtd to answer again
CONSOLE_CONNECT_S = 10.0  # QEMU connects to its sockets before libvirt says the domain exists: a margin
SOCKET_PATH_MAX = 107  # bytes of a Unix socket's path (sun_path holds 108, with the NUL)
CONSOLE_TEMP_PREFIX = "vjobs-console-"  # + PID-: the sockets' folder when the VM's is too deep (gc knows it)
FORMATS = ("raw", "qcow2")  # named in the domain description (vjobs/drivers/kvm/domain.py)
ADVISORY = ("network",)  # a host without the network still runs every job that does not ask for one


class KvmDriver(Driver):
    @property
    def uri(self) -> str:
        return self.settings.get("uri", "qemu:///system")

    @property
    def virt_type(self) -> str:
        return self.settings.get("virt_type", "kvm")

    @property
    def machine(self) -> str:
        return self.settings.get("machine", "q35")

    @property
    def domain_settings(self) -> DomainSettings:
        return DomainSettings(virt_type=self.virt_type, machine=self.machine, network=NETWORK)

    def create(self, spec: VMSpec) -> VM:
        return self._create(spec, allow_template=True)

    def _create(self, spec: VMSpec, allow_template: bool) -> VM:
        check_disk_formats(spec, FORMATS, self.name)
        sockets = DomainSockets.for_vm(spec)
        wanted = self.settings.get("template", "auto")
        why_not = why_not_template(spec, wanted) if wanted else None
        if spec.restore is not None:
            vm: KvmVM = RestoredKvmVM(spec, self.uri, sockets)
        elif allow_template and wanted and why_not is None:
            vm = self._template_vm(spec, sockets)
        else:
            vm = KvmVM(spec, self.uri, cold_xml(spec, self.domain_settings, sockets), sockets,
                       start={"mode": "cold", "why": why_not} if why_not else None)
        with destroyed_on_failure(vm):
            vm.attach()
        return vm

    def _template_vm(self, spec: VMSpec, sockets: DomainSockets) -> KvmTemplateVM:
        """A VM that starts from a saved template domain of this account's pool (template.py)."""
        with connection.connection(self.uri) as conn, libvirt_errors("asking libvirt's versions", self.uri):
            versions = _version_parts(conn)
        recipe = template.recipe_for(spec, self.domain_settings, versions)
        pool = template.TemplatePool(self.host.cache_dir, self.host.cache_hold, self.host.checked_files,
                                     self.host.progress)
        return KvmTemplateVM(spec, self.uri, sockets, self.domain_settings, pool, recipe)

    def restore_problem(self, identity: Mapping[str, Any]) -> str | None:
        try:
            with connection.connection(self.uri) as conn, libvirt_errors("checking the saved guest", self.uri):
                versions = _version_parts(conn)
                machine = identity.get("machine_type")
                machines = {machine: _has_machine(conn, machine, self.virt_type)} if machine else {}
        except VjobsError as error:
            return f"cannot ask libvirt whether this host can continue the saved guest: {error}"
        return saved_guest.problem(identity, self.virt_type, versions, machines)

    # --- probe -------------------------------------------------------------------------------------------

    def probe(self) -> Capabilities:
        checks: list[Check] = []
        try:
            with connection.connection(self.uri) as conn, libvirt_errors("probe", self.uri):
                hypervisor = _versions(conn)
                checks.append(Check("libvirtd", True, f"{self.uri}: {hypervisor}"))
                checks.append(self._capabilities_check(conn))
                limits = self._domain_capabilities(conn, checks) if checks[-1].ok else {}
                network = _network_active(conn)
        except VjobsError as error:
            checks.append(Check("libvirtd", False, str(error)))
            return Capabilities.from_checks(self.name, checks, "")
        if all(check.ok for check in checks):
            checks.append(boot_check(self.host, f"kvm-{self.uri}-{self.virt_type}",
                                     lambda spec: self._create(spec, allow_template=False),
                                     BOOT_DEADLINE_S[self.virt_type]))
        return self._verdict(checks, hypervisor, network, limits)

    def _verdict(self, checks: list[Check], hypervisor: str, network: bool, limits: dict) -> Capabilities:
        failed = first_failure(checks, ADVISORY)
        accel = ACCELERATION[self.virt_type] if failed is None else None
        why = self._acceleration_reason(checks, failed)
        network_check = Check("network", network, f"libvirt network {NETWORK!r} is active: jobs that ask for a "
                                                  "network are attached to it" if network else
                              f"libvirt network {NETWORK!r} is not active: jobs that ask for a network are "
                              f"refused (`virsh net-start {NETWORK}` enables them)")
        return Capabilities.from_checks(self.name, [*checks, network_check], f"{hypervisor} at {self.uri}, {accel} "
                                        "acceleration", advisory=ADVISORY, explain=lambda _failed: why,
                                        acceleration=accel, acceleration_reason=why, hypervisor=hypervisor,
                                        read_only_disks=True, disk_formats=FORMATS, network=network, **limits)

    def _acceleration_reason(self, checks: list[Check], failed: Check | None) -> str:
        if self.virt_type == "qemu":
            what = "TCG (software emulation) through libvirt, as configured (virt_type = \"qemu\")"
            return f"{what}: {checks[-1].detail}" if failed is None else f"{what}, but {failed.detail}"
        if failed is None:
            return f"KVM: {checks[-1].detail}"
        advertised = " although libvirt advertises KVM" if checks[1].ok else ""
        return (f"KVM was asked for (virt_type = \"kvm\") but cannot run guests here{advertised}: "
                f"{failed.detail}; set [drivers.kvm] virt_type = \"qemu\" to use TCG through libvirt")

    def _capabilities_check(self, conn: libvirt.virConnect) -> Check:
        caps = ET.fromstring(conn.getCapabilities())
        types = sorted({domain.get("type") for domain in
                        caps.findall("./guest[os_type='hvm']/arch[@name='x86_64']/domain")})
        ok = self.virt_type in types
        detail = f"x86_64 hvm guests of domain types {', '.join(types) or 'none'}"
        if not ok:
            detail += f": no <domain type='{self.virt_type}'/> (for kvm: /dev/kvm missing or not usable by libvirtd)"
        return Check("capabilities", ok, detail)

    def _domain_capabilities(self, conn: libvirt.virConnect, checks: list[Check]) -> dict:
        try:
            caps = ET.fromstring(conn.getDomainCapabilities(None, "x86_64", self.machine, self.virt_type))
        except libvirt.libvirtError as exc:
            checks.append(Check("domain capabilities", False, f"machine {self.machine!r} under {self.virt_type}: "
                                                              f"{exc.get_error_message()}"))
            return {}
        buses = {value.text for value in caps.findall("./devices/disk/enum[@name='bus']/value")}
        max_vcpus = int(caps.find("vcpu").get("max", "1"))
        _model, host_mib, host_cpus, *_ = conn.getInfo()
        checks.append(Check("domain capabilities", "virtio" in buses,
                            f"machine {caps.findtext('machine')}, up to {max_vcpus} vCPUs, disk buses "
                            f"{', '.join(sorted(buses))}"))
        return {"max_vcpus": min(max_vcpus, host_cpus), "max_memory_mib": host_mib}

    # --- garbage -----------------------------------------------------------------------------------------

    def collect_garbage(self, is_orphan: Callable[[Mapping[str, str]], bool]) -> list[str]:
        removed = []
        with connection.connection(self.uri) as conn, libvirt_errors("gc", self.uri):
            for dom in conn.listAllDomains():
                labels = owner_labels(dom)
                if labels and is_orphan(labels):
                    _destroy_quietly(dom)
                    _undefine_quietly(dom)  # one a killed vjobs left defined, before it made it transient
                    removed.append(f"destroyed domain {dom.name()} on {self.uri} (job {labels.get('vjobs.job_id')}, "
                                   f"pid {labels.get('vjobs.pid')})")
        return removed


class KvmVM(VM):
    """One transient domain. Its own connection carries the event callbacks, so that closing it ends them."""

    def __init__(self, spec: VMSpec, uri: str, xml: str, sockets: DomainSockets, start: dict | None = None):
        super().__init__(spec)
        self.uri, self.xml, self.domain_sockets = uri, xml, sockets
        self.start_record = start or {"mode": "cold"}  # provenance: how the guest started
        self.name = spec.name  # the domain's; a restored guest keeps the one it was saved with
        self.conn: libvirt.virConnect | None = None
        self.dom: libvirt.virDomain | None = None
        self.callbacks: list[int] = []
        self.changed = threading.Condition()
        self.stop: Stop | None = None  # set by the event thread once the domain is gone
        self.reset = False  # the guest reset itself (a panic with panic=-1, or reboot)
        self.lost: str | None = None  # why the connection to libvirtd closed
        self.connections: dict[str, int] = {}  # QEMU's connection to each of its sockets, by the socket's name

    def attach(self) -> None:
        """``create``'s part: the domain, started paused (QEMU has opened the disks, the read-only ones through
        the checked descriptors), transient, and its console and live channel connected."""
        self.conn = connection.open_connection(self.uri)
        with libvirt_errors(f"starting domain {self.name}", self.uri):
            self.conn.registerCloseCallback(self._on_close, None)
            # Registered for every domain, before the domain exists: a guest that ends at once is not missed.
            self.callbacks = [
                self.conn.domainEventRegisterAny(None, libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE, self._on_lifecycle, None),
                self.conn.domainEventRegisterAny(None, libvirt.VIR_DOMAIN_EVENT_ID_REBOOT, self._on_reboot, None),
                self.conn.domainEventRegisterAny(None, libvirt.VIR_DOMAIN_EVENT_ID_IO_ERROR_REASON,
                                                 self._on_io_error, None)]
            # QEMU connects to its sockets as it starts, before its guest runs: listening first.
            with self.domain_sockets.listening() as listeners:
                self.dom = self.conn.defineXML(self._description())
                try:
                    for group, fd in disk_fds(self.spec).items():
                        self.dom.FDAssociate(group, [fd])  # for as long as this connection lives
                    self._run_paused()
                finally:
                    self.dom.undefine()  # transient once it runs; gone if it did not start
                for name, listener in listeners.items():  # one by one: _close closes those made, if one fails
                    self.connections[name] = DomainSockets.accept(listener, self.name)
            self.spec.console.follow(self._read_console)

    def _description(self) -> str:
        """The domain's description, for ``attach`` (which has the connection by then)."""
        return self.xml

    def _run_paused(self) -> None:
        """QEMU started, the guest not yet running."""
        self.dom.createWithFlags(libvirt.VIR_DOMAIN_START_PAUSED)

    def start(self) -> None:
        check_unchanged(self.spec)  # QEMU, paused, holds every file: the guest runs only on what was checked
        with libvirt_errors(f"starting domain {self.name}", self.uri):
            self.dom.resume()

    def provenance(self) -> dict[str, Any]:
        return {"start": self.start_record}

    # --- checkpoints (saved_guest.py) --------------------------------------------------------------------

    def save_guest(self, folder: Path, deadline: float) -> dict[str, Any]:
        with libvirt_errors(f"saving domain {self.name}", self.uri):
            return saved_guest.save(self.dom, folder, deadline, self._stand_in_source(), _version_parts(self.conn),
                                    [disk.role for disk in self.spec.disks])

    def resume(self) -> None:
        with libvirt_errors(f"resuming domain {self.name}", self.uri):
            self.dom.resume()

    def _stand_in_source(self) -> CheckedFile:
        """The kernel whose setup part the checkpoint's stand-in kernel is (saved_guest.py)."""
        return self.spec.boot.kernel

    def _read_console(self) -> bytes:
        """The next chunk the guest wrote to its serial port; b"" once the console is closed.

        vjobs reads the console itself rather than through libvirt's console stream: libvirtd 9.0 deadlocked for
        good (every thread waiting on a lock) when a client holding a console stream died while its domain was
        destroyed, virStreamAbort against virChrdevFree; the kill campaign hit it three times in ~250 kills."""
        return self._read(CONSOLE_SOCKET)

    def guest_channel(self) -> Channel:
        """The virtio-serial port ``vjobs.streams``, on a socket of its own, as the console is."""
        return Channel(read=lambda: self._read(STREAMS_SOCKET), write=self._write_channel)

    def _write_channel(self, data: bytes) -> None:
        """A line for the agent (the socket is non-blocking: a guest that reads nothing makes it an OSError)."""
        fd = self.connections.get(STREAMS_SOCKET)
        if fd is None:
            raise BrokenPipeError("the domain's live channel is closed")
        while data:
            data = data[os.write(fd, data):]

    def _read(self, socket_name: str) -> bytes:
        """The next chunk QEMU passed on from the guest on one of its sockets; b"" once it is closed."""
        while (fd := self.connections.get(socket_name)) is not None:
            with contextlib.suppress(InterruptedError, BlockingIOError):
                if select.select([fd], [], [], 0.5)[0]:
                    return os.read(fd, 65536)  # b"" once QEMU closed its side: the VM is gone
        return b""

    # --- waiting: the event thread records, the caller's thread waits --------------------------------------

    def wait_until_stopped(self, deadline: float) -> Stop:
        with self.changed:
            while self.stop is None and self.lost is None:
                if self.reset:
                    break
                if self.full_disk is not None:
                    return Stop.DISK_FULL  # paused, not ended: destroy() ends it
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return Stop.DEADLINE
                self.changed.wait(remaining)
        if self.stop is not None:
            return self.stop
        if self.lost is not None:
            raise VMError(f"lost the connection to libvirtd at {self.uri} while domain {self.name} ran "
                          f"({self.lost}): was libvirtd restarted or stopped? The domain is destroyed once libvirtd "
                          f"answers again; if it does not, {connection.START_ADVICE}", code="hypervisor_lost")
        # libvirt reports a reset under on_reboot=destroy exactly like a power-off, so the domain restarts on
        # a reset instead, and is destroyed here before the rebooted guest gets anywhere.
        self._destroy_domain()
        return self.wait_until_stopped(deadline)

    def _on_lifecycle(self, _conn, dom, event: int, detail: int, _opaque) -> None:
        if dom.name() != self.name:
            return
        stop = _stop_for(event, detail)
        if stop is not None:
            with self.changed:
                self.stop = Stop.CRASH if self.reset else stop
                self.changed.notify_all()

    def _on_reboot(self, _conn, dom, _opaque) -> None:
        if dom.name() == self.name:
            with self.changed:
                self.reset = True
                self.changed.notify_all()

    def _on_io_error(self, _conn, dom, path: str, _alias, _action, reason: str, _opaque) -> None:
        """QEMU paused the guest because a writable disk could not grow: the host file system is full."""
        if dom.name() == self.name and reason == "enospc":
            with self.changed:
                self.full_disk = Path(path)
                self.changed.notify_all()

    def _on_close(self, _conn, reason: int, _opaque) -> None:
        with self.changed:
            self.lost = _CLOSE_REASONS.get(reason, f"close reason {reason}")
            self.changed.notify_all()

    # --- the end ---------------------------------------------------------------------------------------

    def fetch_disk(self, disk: Disk):
        return disk.path  # QEMU, started by libvirtd on this host, wrote straight into the host file

    def destroy(self) -> None:
        if self.conn is None:
            return
        try:
            if self.dom is not None and self.stop is None:
                if self.lost is None:
                    self._destroy_domain()
                else:
                    self._destroy_after_reconnect()
        finally:
            self._close()

    def _destroy_domain(self) -> None:
        with libvirt_errors(f"destroying domain {self.name}", self.uri):
            _destroy_quietly(self.dom)

    def _destroy_after_reconnect(self) -> None:
        """libvirtd went away while the domain ran; a restarted libvirtd takes its running domains back."""
        give_up = time.monotonic() + RECONNECT_S
        while True:
            try:
                with connection.connection(self.uri) as conn, libvirt_errors("reconnecting", self.uri):
                    return self._destroy_ours(conn)
            except VMError as error:
                if time.monotonic() > give_up:
                    raise VMError(f"could not destroy domain {self.name}: {error}; `vjobs gc` removes it "
                                  "once libvirtd runs again", code="hypervisor_lost") from error
            time.sleep(0.5)  # bounded retry while a restarted libvirtd comes up: it sends no event before

    def _destroy_ours(self, conn: libvirt.virConnect) -> None:
        try:
            dom = conn.lookupByName(self.name)
        except libvirt.libvirtError as exc:
            if exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
                return
            raise
        if owner_labels(dom).get("vjobs.run_id") == self.spec.owner.run_id:
            _destroy_quietly(dom)

    def _close(self) -> None:
        connections, self.connections = self.connections, {}  # the reading threads see it within 0.5 s and stop
        for fd in connections.values():
            with contextlib.suppress(OSError):
                os.close(fd)
        conn, self.conn, self.dom = self.conn, None, None
        with contextlib.suppress(libvirt.libvirtError):
            for callback in self.callbacks:
                conn.domainEventDeregisterAny(callback)
            conn.unregisterCloseCallback()
        connection.close_quietly(conn)


class RestoredKvmVM(KvmVM):
    """A domain that continues a guest saved in a checkpoint (saved_guest.py): ``attach`` restores it paused
    from a private copy of its state, ``start`` lets it run on, its agent already up."""

    def __init__(self, spec: VMSpec, uri: str, sockets: DomainSockets):
        saved = spec.restore
        # libvirt takes paths only: private copies of the checked files, in the VM's own folder, as a cold
        # boot's kernel and initramfs are
        self.state = saved.files[saved_guest.STATE].private_copy(spec.workdir / saved_guest.STATE)
        self.kernel = saved.files[saved_guest.KERNEL].private_copy(spec.workdir / "kernel")
        self.initramfs = saved.files[saved_guest.INITRAMFS].private_copy(spec.workdir / "initramfs")
        super().__init__(spec, uri, "", sockets)
        self.started = False

    def _description(self) -> str:
        saved = self.conn.saveImageGetXMLDesc(str(self.state), 0)
        self.name = ET.fromstring(saved).findtext("name")
        self.xml = restored_xml(saved, self.spec, self.kernel, self.initramfs, self.domain_sockets.folder)
        return self.xml

    def _run_paused(self) -> None:
        # onto the domain just defined, which holds the read-only disks' descriptors; the description replaces
        # the one in the state file (new name, disks, sockets)
        self.conn.restoreFlags(str(self.state), self.xml, libvirt.VIR_DOMAIN_SAVE_PAUSED)

    def start(self) -> None:
        for file in self.spec.restore.files.values():
            file.check_unchanged()  # libvirt has read the state and the stand-ins: what was checked
        super().start()
        self.started = True

    def agent_started(self) -> bool:
        return self.started  # it was up when the guest was saved

    def provenance(self) -> dict[str, Any]:
        return {"start": {"mode": "restored"}}

    def _stand_in_source(self) -> CheckedFile:
        return self.spec.restore.files[saved_guest.KERNEL]


class KvmTemplateVM(KvmVM):
    """A domain restored from a free slot of the account's template pool (template.py), the job's disks
    hot-plugged while it is paused; the slot is the job's until ``destroy``. When anything about that fails, a
    cold boot instead, and ``provenance()`` says why. Its domain has the slot's name and the job's owner labels,
    which ``vjobs gc`` goes by."""

    def __init__(self, spec: VMSpec, uri: str, sockets: DomainSockets, settings: DomainSettings,
                 pool: template.TemplatePool, recipe: template.Recipe):
        super().__init__(spec, uri, "", sockets)
        self.settings, self.pool, self.recipe = settings, pool, recipe
        self.slot: template.Slot | None = None  # the saved domain ``start`` resumes; None: a cold boot
        self.restoring = False  # libvirt is restoring the slot: a failure now is the template's

    def attach(self) -> None:
        try:
            self.slot = self.pool.take(self.recipe, self._make_template)
        except Exception as error:  # whatever went wrong, it is not the job's: a cold boot still runs it
            self._attach_cold(str(error) or type(error).__name__)
            return
        self.name = self.slot.domain
        try:
            super().attach()
        except ImageError:
            raise  # a checked file changed: the job's refusal, not the template's
        except Exception as error:
            self._fall_back(f"restoring {self.slot.name} failed: {error or type(error).__name__}", self.restoring)
        self.restoring = False

    def _description(self) -> str:
        if self.slot is None:
            return super()._description()  # booting cold
        self.restoring = True  # libvirt reads the saved state from here on: a failure is the template's
        _remove_leftover(self.conn, self.name)  # under the slot's lock: a killed job's domain of the slot
        saved = self.conn.saveImageGetXMLDesc(str(self.slot.state.path), 0)
        if ET.fromstring(saved).findtext("name") != self.slot.domain:
            raise VMError(f"the template {self.slot.name} holds another domain than {self.slot.domain}",
                          code="template_failed")
        # libvirt relabels (chowns) a kernel and initramfs while the domain runs: private copies of the stand-ins
        # (21 KiB and 512 bytes), as a cold boot's, not the template's own files
        kernel = self.slot.kernel.private_copy(self.spec.workdir / KERNEL)
        initramfs = self.slot.initramfs.private_copy(self.spec.workdir / INITRAMFS)
        self.xml = template_restored_xml(saved, self.spec, kernel, initramfs, self.domain_sockets.folder)
        return self.xml

    def _run_paused(self) -> None:
        """The slot's guest restored paused onto the domain just defined (which holds the read-only disks'
        descriptors), then the job's disks hot-plugged: libvirt refuses a restore with disks the save lacked."""
        if self.slot is None:
            super()._run_paused()  # booting cold
            return
        self.conn.restoreFlags(str(self.slot.state.path), self.xml, libvirt.VIR_DOMAIN_SAVE_PAUSED)
        for index, disk in enumerate(self.spec.disks):
            source = _checked_link(disk, self.spec.workdir / f"disk{index}") if disk.readonly else disk.path
            self.dom.attachDeviceFlags(scsi_disk_xml(index, disk, source), libvirt.VIR_DOMAIN_AFFECT_LIVE)

    def start(self) -> None:
        if self.slot is None:
            super().start()
            return
        try:
            self.slot.check_unchanged()  # libvirt has read the state: what was checked
        except ImageError as error:
            self._fall_back(f"the template {self.slot.name} changed: {error}", templates_fault=True)
            super().start()
            return
        super().start()  # the job's files checked too, then resumed
        if self.spec.console.wait_for(AGENT_UP_MARKER, RESTORE_DEADLINE_S):
            self.start_record = {"mode": "template", "template": self.slot.name}
            return
        self._fall_back(f"restoring {self.slot.name} failed: the restored agent did not say it was up within "
                        f"{RESTORE_DEADLINE_S:g} s", templates_fault=True)
        super().start()

    def _fall_back(self, reason: str, templates_fault: bool) -> None:
        """End the template's domain, let go of its slot, and prepare a cold boot."""
        self.destroy()
        if templates_fault:
            self.recipe.memo(self.pool.folder).remember(reason)
        self._attach_cold(reason)

    def _attach_cold(self, reason: str) -> None:
        self.slot = None
        self.spec.console.write(f"\n[vjobs: starting from the template failed ({reason}); booting cold]\n".encode())
        self.start_record = {"mode": "cold", "fallback": reason}
        self.name, self.stop, self.reset, self.lost = self.spec.name, None, False, None
        self.domain_sockets = DomainSockets.for_vm(self.spec)  # the first ones were removed once QEMU connected
        self.xml = cold_xml(self.spec, self.settings, self.domain_sockets)
        KvmVM.attach(self)

    def destroy(self) -> None:
        try:
            super().destroy()
        finally:
            if self.slot is not None:
                self.slot.release()  # after its domain is gone: the next job may restore it then
                self.slot = None

    def _stand_in_source(self) -> CheckedFile:
        return self.slot.kernel if self.start_record.get("mode") == "template" else self.spec.boot.kernel

    def _make_template(self, output: Path, domain: str) -> None:
        """Boot the template guest as ``domain`` until its agent waits for a job, and save it into ``output``
        (its state, made as this account's file, and the stand-ins)."""
        spec = template.template_spec(self.spec, domain, output.parent)
        sockets = DomainSockets.for_vm(spec)
        vm = KvmVM(spec, self.uri, with_scsi_controller(cold_xml(spec, self.settings, sockets)), sockets)
        try:
            with connection.connection(self.uri) as conn:
                _remove_leftover(conn, domain)
            vm.attach()
            vm.start()
            if not spec.console.wait_for(TEMPLATE_READY_MARKER, template.BUILD_DEADLINE_S):
                raise VMError(f"the template guest did not say it was ready within {template.BUILD_DEADLINE_S:g} s",
                              code="template_failed")
            with libvirt_errors(f"saving the template domain {domain}", self.uri):
                vm.dom.suspend()
                vm.dom.save(str(saved_guest.claim(output / STATE)))
            write_stand_ins(spec.boot.kernel, output)
        finally:
            vm.destroy()
            spec.console.close()


def cold_xml(spec: VMSpec, settings: DomainSettings, sockets: DomainSockets) -> str:
    """The description of a domain that boots ``spec``. libvirt takes no descriptor for a kernel or initramfs:
    copies made from the checked ones, in the VM's own folder, readable by vjobs' user alone (and by QEMU, to
    which libvirt lends them)."""
    kernel = spec.boot.kernel.private_copy(spec.workdir / "kernel")
    initramfs = spec.boot.initramfs.private_copy(spec.workdir / "initramfs")
    return domain_xml(spec, settings, kernel, initramfs, sockets.folder)


def _checked_link(disk: Disk, target: Path) -> Path:
    """A path in the VM's own folder (vjobs' user's alone) to the very file vjobs checked and holds open, for
    libvirt, which takes only a path on a hot-plug: a hard link to the descriptor's file, which a rename or
    replacement of the original path cannot change; where that cannot be (another file system), a private
    copy made from the descriptor. ``check_unchanged`` afterwards still refuses a file written meanwhile."""
    try:
        os.link(f"/proc/self/fd/{disk.file.fd}", target, follow_symlinks=True)
    except OSError:
        disk.file.private_copy(target)
    return target


def _remove_leftover(conn: libvirt.virConnect, name: str) -> None:
    """A vjobs domain named ``name`` that a killed job left (the caller holds the lock that proves it is not
    another live job's): destroyed, and undefined if it was left defined."""
    try:
        dom = conn.lookupByName(name)
    except libvirt.libvirtError as exc:
        if exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
            return
        raise
    if owner_labels(dom):
        _destroy_quietly(dom)
        _undefine_quietly(dom)


@dataclass(frozen=True)
class DomainSockets:
    """The sockets a domain's serial port (the console) and its virtio-serial port (the live streams) connect
    to and vjobs listens on, there only while the domain is created: in the VM's folder, or, when a path there
    is longer than a Unix socket takes (a long work_dir and job id), in a private folder of the system's
    temporary folder (``own_folder``), named with this process's pid so that ``vjobs gc`` removes one that a
    vjobs killed meanwhile left. QEMU, libvirt's user (root here), reaches either; no other account does: both
    folders are vjobs' user's alone (0700: vjobs/host/folders.py, ``mkdtemp``)."""

    folder: Path
    own_folder: bool = False

    NAMES = (CONSOLE_SOCKET, STREAMS_SOCKET)

    @classmethod
    def for_vm(cls, spec: VMSpec) -> DomainSockets:
        longest = max(cls.NAMES, key=len)
        if len(os.fsencode(spec.workdir / longest)) <= SOCKET_PATH_MAX:
            return cls(spec.workdir)
        return cls(Path(tempfile.mkdtemp(prefix=f"{CONSOLE_TEMP_PREFIX}{os.getpid()}-")), own_folder=True)

    @contextlib.contextmanager
    def listening(self) -> Iterator[dict[str, socket.socket]]:
        """Listening on each socket (by its name) for the domain's QEMU while the domain is created; then the
        sockets' files are removed (the connections QEMU made live on without them)."""
        listeners: dict[str, socket.socket] = {}
        try:
            for name in self.NAMES:
                listener = listeners[name] = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                listener.bind(str(self.folder / name))
                listener.listen(1)
            yield listeners
        finally:
            for listener in listeners.values():
                listener.close()
            self.remove()

    @staticmethod
    def accept(listener: socket.socket, domain: str) -> int:
        """The connection QEMU made as it started (libvirt returns once QEMU runs, so it is there, or never
        is), as a descriptor a reading thread reads. Only the live channel's is written to (the host's one
        request, ``sync``; the console gets no input), and none is ever shut down halfway: QEMU takes an end
        of its input for the end of the device."""
        listener.settimeout(CONSOLE_CONNECT_S)
        try:
            connection, _ = listener.accept()
        except TimeoutError:
            socket_name = Path(listener.getsockname()).name
            raise VMError(f"the QEMU of domain {domain} did not connect to its {socket_name} within "
                          f"{CONSOLE_CONNECT_S:g} s", code="boot_failed") from None
        connection.setblocking(False)
        return connection.detach()

    def remove(self) -> None:
        if self.own_folder:
            shutil.rmtree(self.folder, ignore_errors=True)
        else:
            for name in self.NAMES:
                (self.folder / name).unlink(missing_ok=True)


_CLOSE_REASONS = {libvirt.VIR_CONNECT_CLOSE_REASON_ERROR: "connection error",
                  libvirt.VIR_CONNECT_CLOSE_REASON_EOF: "libvirtd closed the connection",
                  libvirt.VIR_CONNECT_CLOSE_REASON_KEEPALIVE: "libvirtd stopped answering keepalives",
                  libvirt.VIR_CONNECT_CLOSE_REASON_CLIENT: "closed by vjobs"}


def _stop_for(event: int, detail: int) -> Stop | None:
    """The ``Stop`` a lifecycle event means, or None while the domain still runs."""
    if event == libvirt.VIR_DOMAIN_EVENT_CRASHED:
        return Stop.CRASH
    if event != libvirt.VIR_DOMAIN_EVENT_STOPPED:
        return None
    # STOPPED_DESTROYED that vjobs did not ask for: someone killed QEMU; FAILED: QEMU died
    return Stop.POWEROFF if detail == libvirt.VIR_DOMAIN_EVENT_STOPPED_SHUTDOWN else Stop.CRASH


def owner_labels(dom: libvirt.virDomain) -> dict[str, str]:
    """vjobs' owner labels of a domain; empty for a domain that is not vjobs'."""
    try:
        return parse_owner(dom.metadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT, NAMESPACE_URI))
    except libvirt.libvirtError as exc:
        if exc.get_error_code() in (libvirt.VIR_ERR_NO_DOMAIN_METADATA, libvirt.VIR_ERR_NO_DOMAIN):
            return {}
        raise


def _destroy_quietly(dom: libvirt.virDomain) -> None:
    try:
        dom.destroy()
    except libvirt.libvirtError as exc:
        if not connection.is_gone(exc):
            raise


def _undefine_quietly(dom: libvirt.virDomain) -> None:
    try:
        dom.undefine()
    except libvirt.libvirtError as exc:
        if not connection.is_gone(exc):  # gone, or transient (not defined): nothing to undefine
            raise


def _versions(conn: libvirt.virConnect) -> str:
    return f"libvirt {_dotted(conn.getLibVersion())}, {conn.getType()} {_dotted(conn.getVersion())}"


def _version_parts(conn: libvirt.virConnect) -> dict[str, str]:
    return {"libvirt": _dotted(conn.getLibVersion()), "qemu": _dotted(conn.getVersion())}


def _has_machine(conn: libvirt.virConnect, machine: str, virt_type: str) -> bool:
    """Whether libvirt's QEMU here has ``machine`` (a versioned type such as ``pc-q35-7.2``) under ``virt_type``."""
    try:
        conn.getDomainCapabilities(None, "x86_64", machine, virt_type)
    except libvirt.libvirtError as exc:
        if exc.get_error_code() in (libvirt.VIR_ERR_INVALID_ARG, libvirt.VIR_ERR_CONFIG_UNSUPPORTED):
            return False
        raise
    return True


def _dotted(number: int) -> str:
    return f"{number // 1_000_000}.{number // 1000 % 1000}.{number % 1000}"


def _network_active(conn: libvirt.virConnect) -> bool:
    try:
        return bool(conn.networkLookupByName(NETWORK).isActive())
    except libvirt.libvirtError:
        return False
