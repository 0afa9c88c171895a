"""The xen driver: each job's disks become VDIs in a storage repository, the VM is a PV guest booted
straight from the image's kernel and initramfs, and everything it creates is tagged for ``vjobs gc``.

XAPI calls used (the closing note of issue 4 lists them too):
  session.login_with_password / logout, session.get_this_host, host.get_record, host.compute_free_memory,
  SR.get_by_name_label, SR.get_record, VDI.create / destroy / get_all_records / set_read_only /
  add_to_other_config / get_virtual_size, VBD.create, VM.create / start / hard_shutdown / destroy / get_record /
  get_power_state / get_all_records / get_VBDs, VBD.get_record, console.get_record, event.from,
  HTTP PUT /import_raw_vdi (format=vhd: sparse; or raw), HTTP GET /export_raw_vdi, HTTP CONNECT /console;
  for checkpoints (suspended.py): VM.suspend / resume, VBD.get_device, VM.create of a Suspended VM and
  VBD.create of its attached disks (XAPI 1.257.0 and later).

XAPI gives a PV guest one text console and no channel of its own making (no virtio-serial, no vsock), so the
guest's live channel (the payload's stdout and stderr, sync rounds, usage samples) travels on that console:
the kernel command line says so to the agent (``vjobs.streams=console``), which writes its records in escape
sequences that the driver takes out of the console before its log (vjobs/guest/streams.py
``StreamsOnConsole``), and reads the host's requests as typed on the console. A suspend ends the guest's
domain and its console; a resume makes new ones, which the driver follows on as the same stream
(``_Console``).
"""

from __future__ import annotations

import contextlib
import socket
import ssl
import threading
import time
from pathlib import Path
from typing import Callable, Iterator, Mapping

from vjobs.drivers.contract import (VM, Capabilities, Channel, Check, CheckedFile, Disk, Driver, Stop, VMSpec,
                                    check_disk_formats, check_unchanged, destroyed_on_failure, first_failure)
from vjobs.drivers.templates import FailureMemo, template_cmdline, why_not_template
from vjobs.drivers.xen import suspended
from vjobs.drivers.xen import template as xen_template
from vjobs.drivers.xen.xapi import Xapi, xapi_errors
from vjobs.errors import CheckpointError, VjobsError, VMError
from vjobs.events import Events
from vjobs.guest.protocol import AGENT_UP_MARKER
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

    def restore_problem(self, identity: Mapping) -> str | None:
        try:
            with Xapi(self.settings) as xapi, xapi_errors("asking whether this host can resume the guest", xapi.url):
                host = xapi.api.host.get_record(xapi.api.session.get_this_host(xapi.handle))
        except VjobsError as error:
            return str(error)
        return suspended.problem(identity, host)

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
                if (SHARED_KEY in labels or xen_template.TEMPLATE_KEY in labels) and not labels.get(COMPLETE):
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
        self.template_setting = settings.get("template", "auto")
        self.cache_dir = cache_dir
        self.vm: str | None = None
        self.vdis: dict[str, str] = {}  # disk role -> VDI ref, for the disks this VM owns
        self.vbds: dict[str, str] = {}  # disk role -> VBD ref
        self.suspend_image: str | None = None  # a restore's uploaded suspend VDI, until VM.resume consumes it
        self.kernel_copies: tuple[Path, Path] | None = None  # what XAPI boots, for a cold boot after a template
        self.disk_vdis: list[tuple[Disk, str]] = []  # each disk's VDI, in the spec's order
        self.template: str | None = None  # the template VDI the Suspended VM was made from; None: cold
        self.template_name = ""
        self.template_memo: FailureMemo | None = None
        self.start_record: dict | None = None  # provenance "start", once a template was considered
        self.started = False
        self.console = _Console()
        self.streams: StreamsOnConsole | None = None  # the guest's live channel, carried on the console
        self.labels = spec.owner.as_labels()

    # --- create and attach -------------------------------------------------------------------------------

    def attach(self) -> None:
        """``create``'s part: log in, create the VM (halted) with copies of the kernel and initramfs (XAPI reads
        them by path), give it its disks as VDIs (uploaded from their open files, or a shared one found)
        plugged in with VBDs; then no checked file may have changed (``check_unchanged``): the VDIs and the
        copies are what XAPI boots. For a restore (``spec.restore``) the VM is created Suspended, with its
        suspend image uploaded and its disks attached as they were (suspended.py)."""
        boot, restore = self.spec.boot, self.spec.restore
        kernel = boot.kernel.private_copy(self.spec.workdir / "kernel")
        initramfs = boot.initramfs.private_copy(self.spec.workdir / "initramfs")
        self.kernel_copies = (kernel, initramfs)
        self.xapi.__enter__()
        with xapi_errors(f"{'restoring' if restore else 'starting'} {self.spec.name}", self.xapi.url):
            sr = self._sr()
            record, devices = self._vm_record(kernel, initramfs), {}
            if restore is not None:
                saved = suspended.read_suspended_vm(restore.files[suspended.SUSPENDED_VM])
                record.update(self._suspended_fields(sr, saved))
                devices = saved["devices"]
            for disk in self.spec.disks:
                if disk.cache_key:
                    with self.events.step("shared_vdi", detail=disk.role):
                        self.disk_vdis.append((disk, self._shared_vdi(sr, disk)))
                else:
                    self.disk_vdis.append((disk, self._job_vdi(sr, disk)))
            if restore is None and (why_not := why_not_template(self.spec, self.template_setting)) is None:
                self._from_template(sr, record)
            elif restore is None and self.template_setting:
                self.start_record = {"mode": "cold", "why": why_not}  # as qemu_user says it
            if self.vm is None:
                self.vm = self.xapi.api.VM.create(record)
                self._create_vbds(devices)
        check_unchanged(self.spec)
        for file in restore.files.values() if restore else ():
            file.check_unchanged()

    def _create_vbds(self, devices: Mapping[str, str] = {}) -> None:
        for position, (disk, vdi) in enumerate(self.disk_vdis):
            self.vbds[disk.role] = self.xapi.api.VBD.create(
                self._vbd_record(vdi, position, disk.readonly, devices.get(disk.role)))

    # --- from a template (template.py) -------------------------------------------------------------------

    def _from_template(self, sr: str, record: dict) -> None:
        """The job's VM made Suspended from a clone of the template for its recipe (found, or made once);
        on any failure nothing of it is left and ``start_record`` says why the job boots cold."""
        try:
            host = self.xapi.api.host.get_record(self.xapi.api.session.get_this_host(self.xapi.handle))
            recipe = xen_template.recipe(self.spec, host)
            self.template_name = xen_template.name(recipe)
            self.template_memo = FailureMemo(self.cache_dir / "xen", xen_template.family(recipe),
                                             self.template_name)
            self.template_memo.raise_if_recent()
            template = self._template_vdi(sr, recipe, record)
            config = self.xapi.api.VDI.get_other_config(template)
            clone = self.suspend_image = self.xapi.api.VDI.clone(template, {})
            for key in (xen_template.TEMPLATE_KEY, COMPLETE):  # a job's clone is no template: gc's with its job
                self.xapi.api.VDI.remove_from_other_config(clone, key)
            self._label_vdi(clone, self.labels)  # gc removes it with its job
            self.vm = self.xapi.api.VM.create({**record, **xen_template.suspended_fields(config),
                                               "suspend_VDI": clone})
            self.template = template
        except Exception as error:  # whatever went wrong, it is not the job's: a cold boot still runs it
            self._undo_template(f"{error}" or type(error).__name__)

    def _template_vdi(self, sr: str, recipe: dict, job_record: dict) -> str:
        """The template VDI for ``recipe``, made here when the SR has none (one maker per host at a time)."""
        name = xen_template.name(recipe)
        with locks.exclusive(self.cache_dir / "xen" / f"template-{name}.lock"):
            found = xen_template.find(self.xapi.api.VDI.get_all_records(), sr, name, COMPLETE)
            if found:
                return found
            try:
                return self._make_template(recipe, job_record)
            except Exception as error:
                self.template_memo.remember(f"making it failed: {error}", stage="make")
                raise

    def _make_template(self, recipe: dict, job_record: dict) -> str:
        """Boot the template guest once, suspend it when its agent waits, keep a clone of its suspend VDI."""
        spec = self.spec
        record = {**job_record, "name_label": f"{spec.name}-template",
                  "name_description": "vjobs: a template guest being made",
                  "PV_args": f"{template_cmdline(spec)} console=hvc0 {STREAMS_ON_CONSOLE}"}
        vm = self.xapi.api.VM.create(record)
        try:
            self.xapi.api.VM.start(vm, False, False)
            consoles = [self.xapi.api.console.get_record(ref) for ref in self.xapi.api.VM.get_consoles(vm)]
            text = [c for c in consoles if c.get("protocol") == "vt100"]
            if not text:
                raise VMError("the template VM has no text console to say it is ready on", code="template_failed")
            stream, first = self.xapi.open_console(text[0]["location"])
            try:
                xen_template.wait_until_ready(stream, first)
            finally:
                stream.close()
            self.xapi.api.VM.suspend(vm)
            suspended_record = self.xapi.api.VM.get_record(vm)
            # The maker's labels, under their own prefix, as on a shared VDI's upload: gc removes a template
            # whose maker died before it was complete (labelled on the suspend VDI first, which a clone copies).
            uploader = {f"{UPLOADER}{key}": value for key, value in self.labels.items()}
            self._label_vdi(suspended_record["suspend_VDI"], {xen_template.TEMPLATE_KEY: xen_template.name(recipe),
                                                              **uploader})
            template = self.xapi.api.VDI.clone(suspended_record["suspend_VDI"], {})
            try:
                self._label_vdi(template, {**xen_template.labels(recipe, suspended_record), **uploader})
                self.xapi.api.VDI.add_to_other_config(template, COMPLETE, "true")
                for key in uploader:  # complete: kept by gc from now on, as a release VDI is
                    self.xapi.api.VDI.remove_from_other_config(template, key)
            except Exception:
                with contextlib.suppress(Exception):
                    self.xapi.api.VDI.destroy(template)
                raise
            self.template_memo.forget()
            return template
        finally:
            with contextlib.suppress(Exception):
                _destroy_vm(self.xapi, vm)  # a Suspended VM's shutdown destroys its own suspend VDI

    def _label_vdi(self, vdi: str, labels: Mapping[str, str]) -> None:
        """``labels`` into the VDI's other_config, replacing what a clone copied (XAPI's add_to_other_config
        refuses a key that is there: MAP_DUPLICATE_KEY)."""
        present = self.xapi.api.VDI.get_other_config(vdi)
        for key, value in labels.items():
            if present.get(key) == value:
                continue
            if key in present:
                self.xapi.api.VDI.remove_from_other_config(vdi, key)
            self.xapi.api.VDI.add_to_other_config(vdi, key, value)

    def _undo_template(self, reason: str) -> None:
        """Nothing left of the template's attempt; the job's VM to be made cold, and why."""
        self.console.hold()  # the resumed guest's console ends: the cold boot's goes on as the same stream
        if self.vm is not None:
            with contextlib.suppress(Exception):
                _destroy_vm(self.xapi, self.vm)
        if self.suspend_image is not None:
            with contextlib.suppress(Exception):
                self.xapi.api.VDI.destroy(self.suspend_image)
        self.vm, self.suspend_image, self.template, self.vbds = None, None, None, {}
        self.spec.console.write(f"\n[vjobs: starting from the template failed ({reason}); booting cold]\n".encode())
        self.start_record = {"mode": "cold", "fallback": reason}

    def _start_from_template(self) -> None:
        """Resume the job's Suspended VM, hot-plug its disks, wait for the agent's "up"."""
        self.xapi.api.VM.resume(self.vm, False, False)
        self.suspend_image = None  # XAPI destroyed it
        self._follow_console()
        for position, (disk, vdi) in enumerate(self.disk_vdis):
            vbd = self.vbds[disk.role] = self.xapi.api.VBD.create(self._vbd_record(vdi, position, disk.readonly))
            self.xapi.api.VBD.plug(vbd)
        if not self.spec.console.wait_for(AGENT_UP_MARKER, xen_template.UP_DEADLINE_S):
            raise VMError(f"the resumed agent did not say it was up within {xen_template.UP_DEADLINE_S:g} s",
                          code="template_failed")

    def _suspended_fields(self, sr: str, saved: dict) -> dict:
        """What makes ``VM.create`` give a Suspended VM: the saved suspend image, uploaded into a VDI of its
        own, and what XAPI recorded when the guest booted."""
        image = self.spec.restore.files[suspended.SUSPEND_IMAGE]
        vdi = self.xapi.api.VDI.create({
            "name_label": f"{self.spec.name}-suspend", "name_description": "vjobs: a checkpoint's suspend image",
            "SR": sr, "virtual_size": str(image.size), "type": "suspend", "sharable": False, "read_only": False,
            "other_config": self.labels, "xenstore_data": {}, "sm_config": {}, "tags": [TAG]})
        self.suspend_image = vdi  # before the upload, so destroy() removes a half-uploaded one
        with self.events.step("vdi_upload", detail="suspend image"):
            self.xapi.import_vdi(vdi, image, self.upload_format)
        return {"power_state": "Suspended", "suspend_VDI": vdi, "last_booted_record": saved["last_booted_record"],
                "last_boot_CPU_flags": dict(self.spec.restore.identity["cpu"])}

    def start(self) -> None:
        if self.template is not None:
            try:
                with xapi_errors(f"resuming {self.spec.name} from its template", self.xapi.url):
                    self._start_from_template()
                self.start_record = {"mode": "template", "template": self.template_name}
                self.started = True
                return
            except Exception as error:
                reason = f"resuming the template {self.template_name} failed: {error or type(error).__name__}"
                self.template_memo.remember(reason)
                with contextlib.suppress(Exception):  # made anew once the memo lets jobs try again
                    self.xapi.api.VDI.destroy(self.template)
                self._undo_template(reason)
            with xapi_errors(f"starting {self.spec.name}", self.xapi.url):
                kernel, initramfs = self.kernel_copies
                self.vm = self.xapi.api.VM.create(self._vm_record(kernel, initramfs))
                self._create_vbds()
        with xapi_errors(f"starting {self.spec.name}", self.xapi.url):
            if self.spec.restore is not None:
                self.xapi.api.VM.resume(self.vm, False, False)
                self.suspend_image = None  # XAPI destroyed it
            else:
                self.xapi.api.VM.start(self.vm, False, False)
        self.started = True
        self._follow_console()

    def provenance(self) -> dict:
        if self.spec.restore is not None:
            return {"start": {"mode": "restored"}}
        return {"start": self.start_record} if self.start_record else {}

    def agent_started(self) -> bool:
        if self.spec.restore is not None or self.template is not None:
            return self.started  # the agent was up when the guest was saved
        return super().agent_started()

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

    def _vbd_record(self, vdi: str, position: int, readonly: bool, device: str | None = None) -> dict:
        """A VBD of the VM; ``device``: for a Suspended VM, the guest device it had, attached as it was."""
        record = {"VM": self.vm, "VDI": vdi, "userdevice": str(position), "bootable": False,
                  "mode": "RO" if readonly else "RW", "type": "Disk", "empty": False, "other_config": self.labels,
                  "qos_algorithm_type": "", "qos_algorithm_params": {}, "unpluggable": False}
        if device is not None:
            record.update(device=device, currently_attached=True)
        return record

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
        taken out on the way (``guest_channel``). After a resume: the new domain's console, read on by the
        same thread."""
        consoles = self.xapi.api.VM.get_record(self.vm).get("consoles", [])
        records = [self.xapi.api.console.get_record(ref) for ref in consoles]
        text = [r for r in records if r.get("protocol") == "vt100"]
        if not text:
            return
        stream, first = self.xapi.open_console(text[0]["location"])
        if self.streams is None:
            self.streams = StreamsOnConsole()
            self.spec.console.write(self.streams.split(first))
            self.console.connect(stream)
            self.spec.console.follow(self.streams.console_text(self.console.read))
        else:
            self.console.connect(stream, first)

    def guest_channel(self) -> Channel | None:
        """XAPI gives a guest its console and no other channel: the records come on it (vjobs/guest/streams.py
        ``StreamsOnConsole``) and the host's requests go in as typed; None when the VM has no text console.
        Over TLS (an https URL, not dom0's local socket) nothing goes in: an SSL socket must not be written
        while another thread reads it, so the last sync round before a stop is not asked for there."""
        if self.streams is None:
            return None
        return Channel(read=self.streams.read, write=None if self.console.tls else self.console.send)

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

    def save_guest(self, folder: Path, deadline: float) -> dict:
        """XAPI's ``VM.suspend``, and its suspend image downloaded into ``folder`` (suspended.py). ``VM.suspend``
        is one call that vjobs cannot cut short (``Async.VM.suspend`` and ``task.cancel`` could): the
        ``deadline`` is checked once it returns, before the download."""
        with xapi_errors(f"suspending {self.spec.name}", self.xapi.url):
            self.console.hold()  # the console ends with the domain: the stream goes on after a resume
            try:
                self.xapi.api.VM.suspend(self.vm)
            except BaseException:
                self.console.release()
                raise
            if time.monotonic() > deadline:
                raise CheckpointError(f"XAPI took past the checkpoint's deadline to suspend {self.spec.name}",
                                      code="checkpoint_timeout")
            record = self.xapi.api.VM.get_record(self.vm)
            image = record["suspend_VDI"]
            with self.events.step("vdi_download", detail="suspend image"):
                self.xapi.export_raw_vdi(image, folder / suspended.SUSPEND_IMAGE,
                                         int(self.xapi.api.VDI.get_virtual_size(image)), what="the suspend image")
            devices = {role: self.xapi.api.VBD.get_device(vbd) for role, vbd in self.vbds.items()}
            suspended.write_suspended_vm(folder, record, devices)
            host = self.xapi.api.host.get_record(self.xapi.api.session.get_this_host(self.xapi.handle))
        return suspended.identity(record, host, self.spec)

    def resume(self) -> None:
        with xapi_errors(f"resuming {self.spec.name}", self.xapi.url):
            self.xapi.api.VM.resume(self.vm, False, False)
        self._follow_console()

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
        for vdi in [*self.vdis.values(), *filter(None, [self.suspend_image])]:
            with contextlib.suppress(Exception):
                self.xapi.api.VDI.destroy(vdi)
        self.vm, self.vdis, self.suspend_image = None, {}, None
        self.console.close()
        if self.streams is not None:
            self.streams.end()  # a reader of the channel is not left waiting
        self.xapi.logout()


class _Console:
    """The VM's text console as one stream across its domains: a suspend (``hold``) ends the domain and its
    console, a resume ``connect``s the new one, and the one reading thread (the console log's, which feeds
    the live channel) reads on from it; the stream ends when a console ends unheld, or at ``close``."""

    def __init__(self):
        self._stream: socket.socket | None = None
        self._first = b""  # what came with the new console's HTTP answer, read before the socket
        self._held = False
        self._closed = False
        self._changed = threading.Condition()

    @property
    def tls(self) -> bool:
        return isinstance(self._stream, ssl.SSLSocket)

    def connect(self, stream: socket.socket, first: bytes = b"") -> None:
        with self._changed:
            old, self._stream, self._first, self._held = self._stream, stream, first, False
            self._changed.notify_all()
        if old is not None:
            with contextlib.suppress(OSError):
                old.close()

    def hold(self) -> None:
        with self._changed:
            self._held = True

    def release(self) -> None:
        with self._changed:
            self._held = False
            self._changed.notify_all()

    def read(self) -> bytes:
        while True:
            with self._changed:
                stream, first, self._first = self._stream, self._first, b""
            if first:
                return first
            try:
                data = stream.recv(65536) if stream is not None else b""
            except OSError:
                data = b""
            if data:
                return data
            with self._changed:
                while self._held and self._stream is stream and not self._closed:
                    self._changed.wait()
                if self._closed or self._stream is stream:
                    return b""

    def send(self, data: bytes) -> None:
        self._stream.sendall(data)

    def close(self) -> None:
        with self._changed:
            self._closed = True
            self._changed.notify_all()
            stream = self._stream
        if stream is not None:
            with contextlib.suppress(OSError):
                stream.close()


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

