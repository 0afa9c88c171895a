"""The xen driver: each job's disks become VDIs in a storage repository, the VM is a PV guest booted
straight from the image's kernel and initramfs, and everything it creates is tagged for ``vjobs gc``.

XAPI calls used (the closing note of issue 4 lists them too):
  session.login_with_password / logout, session.get_this_host, host.get_record, host.compute_free_memory,
  SR.get_by_name_label, SR.get_record, VDI.create / destroy / get_all_records / set_read_only /
  add_to_other_config, VBD.create, VM.create / start / hard_shutdown / destroy / get_record /
  get_power_state / get_all_records / get_VBDs, VBD.get_record, console.get_record, event.from,
  HTTP PUT /import_raw_vdi (format=vhd: sparse; or raw), HTTP GET /export_raw_vdi, HTTP CONNECT /console.

XAPI gives a PV guest one text console and no channel of its own making (no virtio-serial, no vsock), so the
guest's live channel (the payload's stdout and stderr, sync rounds, usage samples) travels on that console:
the kernel command line says so to the agent (``vjobs.streams=console``), which writes its records in escape
sequences that the driver takes out of the console before its log (vjobs/guest/streams.py
``StreamsOnConsole``), and reads the host's requests as typed on the console.
"""

from __future__ import annotations

import contextlib
import ssl
import time
from pathlib import Path
from typing import Callable, Iterator, Mapping

from vjobs.drivers.contract import (VM, Capabilities, Channel, Check, CheckedFile, Disk, Driver, Stop, VMSpec,
                                    check_disk_formats, check_unchanged, destroyed_on_failure, first_failure)
from vjobs.drivers.xen.xapi import Xapi, xapi_errors
from vjobs.errors import VMError
from vjobs.events import Events
from vjobs.guest.streams import STREAMS_ON_CONSOLE, StreamsOnConsole
from vjobs.host import locks

MIB = 1 << 20
TAG = "vjobs"
SHARED_KEY = "vjobs.content_key"  # on VDIs shared by jobs: the release and base images
COMPLETE = "vjobs.complete"
UPLOADER = "vjobs.uploader."  # on a shared VDI being uploaded: the uploader's owner labels, for gc
NULL_REF = "OpaqueRef:NULL"
XEN_CAPABILITIES = Path("/proc/xen/capabilities")
FORMATS = ("raw",)  # a VDI takes the disk's bytes as they are


class XenDriver(Driver):
    def probe(self) -> Capabilities:
        # Outside dom0 the kernel paths may still be valid on the XAPI host: the site says so with require_dom0.
        advisory = () if self.settings.get("require_dom0", True) else ("dom0",)
        checks = [self._dom0_check()]
        facts = self._xapi_checks(checks) if checks[0].ok or advisory else {}
        usable = first_failure(checks, advisory) is None
        return Capabilities.from_checks(
            self.name, checks, facts.get("hypervisor", ""), advisory=advisory,
            acceleration="xen-pv" if usable else None,
            acceleration_reason="Xen paravirtualised guest (PV direct kernel boot)" if usable else "",
            read_only_disks=True, disk_formats=FORMATS, **facts)

    def _xapi_checks(self, checks: list[Check]) -> dict:
        """Log in and look at the host and the SR, adding a check for each; the facts learnt on the way."""
        try:
            with Xapi(self.settings) as xapi, xapi_errors("probe", xapi.url):
                checks.append(Check("login", True, f"logged in to {xapi.url} as {xapi.username}"))
                host = xapi.api.session.get_this_host(xapi.handle)
                record = xapi.api.host.get_record(host)
                free = int(xapi.api.host.compute_free_memory(host)) // MIB
                version = record.get("software_version", {})
                hypervisor = f"Xen {version.get('xen', '?')}, {version.get('product_brand', 'XAPI')} " \
                             f"{version.get('product_version', '?')}"
                capabilities = record.get("capabilities", [])
                pv = any(c.startswith("xen-") for c in capabilities)
                checks.append(Check("host", pv, f"{record.get('name_label')}: {hypervisor}; capabilities "
                                                f"{' '.join(capabilities)}; {free} MiB free"))
                checks.append(self._sr_check(xapi))
        except Exception as exc:  # any failure is the verdict
            checks.append(Check("xapi", False, str(exc)))
            return {}
        return {"hypervisor": hypervisor, "max_memory_mib": free}

    def _dom0_check(self) -> Check:
        try:
            in_dom0 = "control_d" in XEN_CAPABILITIES.read_text()
        except OSError:
            in_dom0 = False
        if in_dom0:
            return Check("dom0", True, "running in dom0: the image's kernel paths are valid for XAPI")
        return Check("dom0", False, f"not running in a Xen dom0 ({XEN_CAPABILITIES} says no or is absent): "
                                    "XAPI reads PV kernels from dom0's files (set [drivers.xen] "
                                    "require_dom0 = false if the same paths exist on the XAPI host)")

    def _sr_check(self, xapi: Xapi) -> Check:
        name = self.settings.get("sr")
        found = xapi.api.SR.get_by_name_label(name) if name else []
        if not found:
            return Check("sr", False, f"storage repository {name!r} not found: set [drivers.xen] sr to the name "
                                      "label of an SR of the pool")
        record = xapi.api.SR.get_record(found[0])
        free = (int(record["physical_size"]) - int(record["physical_utilisation"])) // MIB
        return Check("sr", free > 0, f"SR {name!r}: {free} MiB free")

    def create(self, spec: VMSpec) -> VM:
        check_disk_formats(spec, FORMATS, self.name)
        vm = XenVM(spec, self.settings, self.host.cache_dir, self.host.events)
        with destroyed_on_failure(vm):
            vm.attach()
        return vm

    def collect_garbage(self, is_orphan: Callable[[Mapping[str, str]], bool]) -> list[str]:
        if not self.settings.get("password_file"):
            return []  # no pool configured: nothing of vjobs' can be there
        removed = []
        with Xapi(self.settings) as xapi, xapi_errors("gc", xapi.url):
            for ref, record in xapi.api.VM.get_all_records().items():
                if TAG in record.get("tags", []) and is_orphan(record.get("other_config", {})):
                    _destroy_vm(xapi, ref)
                    removed.append(f"destroyed VM {record['name_label']}")
            for ref, record in xapi.api.VDI.get_all_records().items():
                labels = record.get("other_config", {})
                if SHARED_KEY in labels and not labels.get(COMPLETE):
                    labels = {key[len(UPLOADER):]: value for key, value in labels.items() if key.startswith(UPLOADER)}
                if "vjobs.run_id" in labels and is_orphan(labels):
                    with contextlib.suppress(Exception):
                        xapi.api.VDI.destroy(ref)
                        removed.append(f"destroyed VDI {record['name_label']}")
        return removed


class XenVM(VM):
    def __init__(self, spec: VMSpec, settings: Mapping, cache_dir: Path, events: Events | None = None):
        super().__init__(spec)
        self.events = events or Events()  # the run's: its uploads and downloads are steps of it
        self.xapi = Xapi(settings)
        self.sr_name = settings.get("sr")
        self.upload_format = settings.get("upload_format", "vhd")
        self.cache_dir = cache_dir
        self.vm: str | None = None
        self.vdis: dict[str, str] = {}  # disk role -> VDI ref, for the disks this VM owns
        self.console_stream = None
        self.streams: StreamsOnConsole | None = None  # the guest's live channel, carried on the console
        self.labels = spec.owner.as_labels()

    # --- create and attach -------------------------------------------------------------------------------

    def attach(self) -> None:
        """``create``'s part: log in, create the VM (halted) with copies of the kernel and initramfs (XAPI reads
        them by path), give it its disks as VDIs (uploaded from their open files, or a shared one found)
        plugged in with VBDs; then no checked file may have changed (``check_unchanged``): the VDIs and the
        copies are what XAPI boots."""
        boot = self.spec.boot
        kernel = boot.kernel.private_copy(self.spec.workdir / "kernel")
        initramfs = boot.initramfs.private_copy(self.spec.workdir / "initramfs")
        self.xapi.__enter__()
        with xapi_errors(f"starting {self.spec.name}", self.xapi.url):
            sr = self._sr()
            self.vm = self.xapi.api.VM.create(self._vm_record(kernel, initramfs))
            for position, disk in enumerate(self.spec.disks):
                if disk.cache_key:
                    with self.events.step("shared_vdi", detail=disk.role):
                        vdi = self._shared_vdi(sr, disk)
                else:
                    vdi = self._job_vdi(sr, disk)
                self.xapi.api.VBD.create(self._vbd_record(vdi, position, disk.readonly))
        check_unchanged(self.spec)

    def start(self) -> None:
        with xapi_errors(f"starting {self.spec.name}", self.xapi.url):
            self.xapi.api.VM.start(self.vm, False, False)
        self._follow_console()

    def _sr(self) -> str:
        found = self.xapi.api.SR.get_by_name_label(self.sr_name) if self.sr_name else []
        if not found:
            raise VMError(f"storage repository {self.sr_name!r} not found: set [drivers.xen] sr to the name "
                          "label of an SR of the pool", code="xapi_sr_missing")
        return found[0]

    def _vm_record(self, kernel: Path, initramfs: Path) -> dict:
        spec = self.spec
        memory = str(spec.memory_mib * MIB)
        return {
            "name_label": spec.name, "name_description": f"vjobs job {spec.owner.job_id}", "user_version": "1",
            "is_a_template": False, "affinity": NULL_REF,
            "memory_static_max": memory, "memory_dynamic_max": memory, "memory_dynamic_min": memory,
            "memory_static_min": memory, "VCPUs_params": {}, "VCPUs_max": str(spec.vcpus),
            "VCPUs_at_startup": str(spec.vcpus), "actions_after_shutdown": "destroy",
            "actions_after_reboot": "destroy", "actions_after_crash": "destroy",
            "PV_bootloader": "", "PV_kernel": str(kernel), "PV_ramdisk": str(initramfs),
            "PV_args": f"{spec.boot.cmdline} console=hvc0 {STREAMS_ON_CONSOLE}",
            "PV_bootloader_args": "", "PV_legacy_args": "",
            "HVM_boot_policy": "", "HVM_boot_params": {}, "HVM_shadow_multiplier": 1.0, "platform": {},
            "PCI_bus": "", "other_config": self.labels, "recommendations": "", "xenstore_data": {},
            "ha_always_run": False, "ha_restart_priority": "", "tags": [TAG], "blocked_operations": {},
            "protection_policy": NULL_REF, "is_snapshot_from_vmpp": False, "appliance": NULL_REF,
            "start_delay": "0", "shutdown_delay": "0", "order": "0", "suspend_SR": NULL_REF, "version": "0",
            "generation_id": "", "hardware_platform_version": "0", "has_vendor_device": False,
            "domain_type": "pv",
        }

    def _vbd_record(self, vdi: str, position: int, readonly: bool) -> dict:
        return {"VM": self.vm, "VDI": vdi, "userdevice": str(position), "bootable": False,
                "mode": "RO" if readonly else "RW", "type": "Disk", "empty": False, "other_config": self.labels,
                "qos_algorithm_type": "", "qos_algorithm_params": {}, "unpluggable": False}

    def _new_vdi(self, sr: str, disk: Disk, size: int, other_config: dict) -> str:
        return self.xapi.api.VDI.create({
            "name_label": f"{self.spec.name}-{disk.role}", "name_description": f"vjobs {disk.role} disk",
            "SR": sr, "virtual_size": str(size), "type": "user", "sharable": False, "read_only": False,
            "other_config": other_config, "xenstore_data": {}, "sm_config": {}, "tags": [TAG]})

    def _job_vdi(self, sr: str, disk: Disk) -> str:
        with _opened(disk) as source:
            vdi = self._new_vdi(sr, disk, source.size, self.labels)
            self.vdis[disk.role] = vdi  # recorded before the upload, so destroy() removes a half-uploaded one
            with self.events.step("vdi_upload", detail=disk.role):
                self.xapi.import_vdi(vdi, source, self.upload_format)
        return vdi

    def _shared_vdi(self, sr: str, disk: Disk) -> str:
        """A read-only VDI shared by jobs (a release, a base image), uploaded once per content per pool and
        found again by its ``cache_key``. A local lock keeps two jobs on this host from uploading the same
        content at once."""
        with locks.exclusive(self.cache_dir / "xen" / f"shared-{disk.cache_key}.lock"):
            for ref, record in self.xapi.api.VDI.get_all_records().items():
                config = record.get("other_config", {})
                if record.get("SR") == sr and config.get(SHARED_KEY) == disk.cache_key and config.get(COMPLETE):
                    return ref
            # The uploader's labels, under their own prefix: gc removes an upload whose uploader died before it
            # was complete, and never a complete shared VDI (jobs of other owners use it).
            uploader = {f"{UPLOADER}{key}": value for key, value in self.labels.items()}
            vdi = self._new_vdi(sr, disk, disk.file.size, {SHARED_KEY: disk.cache_key, **uploader})
            try:
                with self.events.step("vdi_upload", detail=disk.role):
                    self.xapi.import_vdi(vdi, disk.file, self.upload_format)
            except Exception:
                with contextlib.suppress(Exception):
                    self.xapi.api.VDI.destroy(vdi)
                raise
            self.xapi.api.VDI.set_read_only(vdi, True)
            self.xapi.api.VDI.add_to_other_config(vdi, COMPLETE, "true")
            return vdi

    # --- run ---------------------------------------------------------------------------------------------

    def _follow_console(self) -> None:
        """Copy the guest's text console into the local console log, so that the boot check and the result
        see it as with any other driver; the live channel the agent puts on it (``STREAMS_ON_CONSOLE``) is
        taken out on the way (``guest_channel``)."""
        consoles = self.xapi.api.VM.get_record(self.vm).get("consoles", [])
        records = [self.xapi.api.console.get_record(ref) for ref in consoles]
        text = [r for r in records if r.get("protocol") == "vt100"]
        if not text:
            return
        stream, first = self.xapi.open_console(text[0]["location"])
        self.console_stream = stream
        self.streams = StreamsOnConsole()
        self.spec.console.write(self.streams.split(first))
        self.spec.console.follow(self.streams.console_text(lambda: stream.recv(65536)))

    def guest_channel(self) -> Channel | None:
        """XAPI gives a guest its console and no other channel: the records come on it (vjobs/guest/streams.py
        ``StreamsOnConsole``) and the host's requests go in as typed; None when the VM has no text console.
        Over TLS (an https URL, not dom0's local socket) nothing goes in: an SSL socket must not be written
        while another thread reads it, so the last sync round before a stop is not asked for there."""
        if self.streams is None:
            return None
        writable = not isinstance(self.console_stream, ssl.SSLSocket)
        return Channel(read=self.streams.read, write=self.console_stream.sendall if writable else None)

    def wait_until_stopped(self, deadline: float) -> Stop:
        """Sleep in ``event.from`` until XAPI reports the VM halted or the deadline passes."""
        token = ""
        with xapi_errors(f"waiting for {self.spec.name}", self.xapi.url):
            while True:
                if self.xapi.api.VM.get_power_state(self.vm) == "Halted":
                    return self._how_it_stopped()
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return Stop.DEADLINE
                answer = getattr(self.xapi.api.event, "from")(["vm"], token, float(min(remaining, 30.0)))
                token = answer["token"]

    def _how_it_stopped(self) -> Stop:
        config = self.xapi.api.VM.get_record(self.vm).get("other_config", {})
        # XAPI notes why the domain last went down; the agent only ever powers off, so anything else is a crash.
        reason = config.get("last_shutdown_reason", "halted")
        return Stop.POWEROFF if reason in ("halted", "clean_shutdown", "poweroff") else Stop.CRASH

    def fetch_disk(self, disk: Disk) -> Path:
        local = self.spec.workdir / f"{disk.role}.downloaded"
        with self.events.step("vdi_download", detail=disk.role):
            self.xapi.export_raw_vdi(self.vdis[disk.role], local, disk.path.stat().st_size)
        return local

    def destroy(self) -> None:
        if self.xapi.session is None and self.vm is None:
            return
        self.xapi.drop_connection()  # the job may have been cancelled in the midst of a call
        with contextlib.suppress(Exception):
            if self.vm is not None:
                _destroy_vm(self.xapi, self.vm)
        for vdi in self.vdis.values():
            with contextlib.suppress(Exception):
                self.xapi.api.VDI.destroy(vdi)
        self.vm, self.vdis = None, {}
        if self.console_stream is not None:
            with contextlib.suppress(OSError):
                self.console_stream.close()
        if self.streams is not None:
            self.streams.end()  # a reader of the channel is not left waiting
        self.xapi.logout()


@contextlib.contextmanager
def _opened(disk: Disk) -> Iterator[CheckedFile]:
    """The file to upload: a read-only disk's checked one; a writable disk (vjobs' own, in the job's folder)
    opened for its upload."""
    if disk.file is not None:
        yield disk.file
        return
    with CheckedFile.open(disk.path, f"the {disk.role} disk") as own:
        yield own


def _destroy_vm(xapi: Xapi, vm: str) -> None:
    """Hard shutdown if needed, then the VM and its VBDs (the VDIs are the caller's to judge)."""
    if xapi.api.VM.get_power_state(vm) != "Halted":
        with contextlib.suppress(Exception):
            xapi.api.VM.hard_shutdown(vm)
    for vbd in xapi.api.VM.get_VBDs(vm):
        with contextlib.suppress(Exception):
            xapi.api.VBD.destroy(vbd)
    xapi.api.VM.destroy(vm)

