"""The XAPI calls the stand-in implements. Each method ``cls__name`` answers the XML-RPC method ``cls.name``;
the session reference, XAPI's first argument, is checked by the dispatcher and not passed on.

Implemented: session.login_with_password / logout / get_this_host; host.get_record / compute_free_memory;
SR.get_by_name_label; VDI.create / clone / destroy / set_read_only / add_to_other_config /
remove_from_other_config; VBD.create / plug / destroy; VM.create (Halted, or Suspended with its suspend_VDI) / start /
suspend / resume / hard_shutdown / destroy / get_power_state / get_VBDs; console (records only); event.from;
and for every class get_record, get_all, get_all_records, get_by_uuid, get_by_name_label. See model.py for
what is simplified."""

from __future__ import annotations

import json
import os
import shutil
import socket
import tarfile
from pathlib import Path
from typing import Callable

from vjobs.drivers.contract import Disk
from vjobs.drivers.xen.suspended import features_within  # XAPI's check, as the driver asks it first
from vjobs.testing.xapi_standin.model import (API_VERSION, MIB, NULL_REF, CannotResume, Faults, Stats, Store,
                                              XapiFailure, record_for_wire)

SESSION_FREE_CALLS = {"session.login_with_password"}
# host.cpu_info: the CPU the guests see is QEMU's default TCG model (qemu64, an "AuthenticAMD"), the same on
# every stand-in; the features are a fixed stand-in, in XAPI's form (32-bit words in hex, joined by "-").
# A test that plays another host changes them; a real resume across hosts depends on QEMU (runner.py).
CPU_INFO = {"vendor": "AuthenticAMD", "features_pv": "078bfbff-80d82203-00000000-00000000",
            "features_hvm": "078bfbff-80d82203-00000000-00000000", "cpu_count": "1", "socket_count": "1"}


TEST_PLUGIN = "vjobs-testing"  # host.call_plugin's plugin of the stand-in's own
RUNNERS = ("qemu", "xl")  # how started VMs run: QEMU TCG guests here, or Xen PV domains in the dom0 it runs in


def runner_class(kind: str):
    """The runner of started VMs: runner.py's QEMU guests (vjobs' qemu_user driver), or xl_runner.py's Xen
    domains (stdlib only: imported alone where vjobs' dependencies are absent, in a Xen node's dom0)."""
    if kind == "xl":
        from vjobs.testing.xapi_standin.xl_runner import XlRunner
        return XlRunner
    from vjobs.testing.xapi_standin.runner import GuestRunner
    return GuestRunner


def _unpack(suspend_image: Path, folder: Path) -> None:
    """The files of a suspend image (a flat tar of regular files, as ``VM.suspend`` packs it) into ``folder``.
    Anything else is refused: the image may have been uploaded by a client. By hand, not with extractall's
    ``filter``: a Xen node's dom0 has Python 3.11.2, older than the filter."""
    with tarfile.open(suspend_image) as image:
        for member in image:
            if not member.isfile() or "/" in member.name or member.name in ("", ".", ".."):
                raise XapiFailure("VM_INCOMPATIBLE_WITH_THIS_HOST", "", "",
                                  f"the suspend image holds {member.name!r}, not a file the stand-in wrote")
            with image.extractfile(member) as source, open(folder / member.name, "xb") as target:
                shutil.copyfileobj(source, target, 1 << 20)


class Calls:
    def __init__(self, store: Store, state_dir: Path, username: str, password: str, sr_name: str,
                 sr_size_mib: int, host_memory_mib: int, url: Callable[[], str], runner: str = "qemu"):
        self.store, self.state_dir = store, state_dir
        self.runner_class = runner_class(runner)
        self.username, self.password = username, password
        self.faults, self.stats = Faults(), Stats()
        self.url = url
        self.runners: dict[str, object] = {}  # VM ref -> its runner (runner.py, xl_runner.py)
        self.sr_dir = state_dir / "sr"
        self.sr_dir.mkdir(parents=True, exist_ok=True)
        self.host = store.add("host", {
            "name_label": socket.gethostname(), "hostname": socket.gethostname(), "address": "127.0.0.1",
            "API_version_major": API_VERSION[0], "API_version_minor": API_VERSION[1], "enabled": True,
            "software_version": {"product_brand": "XAPI stand-in (vjobs tests)", "product_version": "0",
                                 "xen": "none (guests run as QEMU TCG)",
                                 **(self.runner_class.host_facts() if runner == "xl" else {})},
            "capabilities": ["xen-3.0-x86_64"], "memory_total": host_memory_mib * MIB, "resident_VMs": [],
            "cpu_info": dict(CPU_INFO)})
        self.sr = store.add("SR", {"name_label": sr_name, "name_description": "stand-in SR (raw files)",
                                   "type": "ext", "content_type": "user", "shared": False,
                                   "physical_size": sr_size_mib * MIB, "physical_utilisation": 0,
                                   "virtual_allocation": 0, "VDIs": [], "other_config": {}})

    # --- session -----------------------------------------------------------------------------------------

    def session__login_with_password(self, username, password, version="", originator=""):
        if (username, password) != (self.username, self.password):
            raise XapiFailure("SESSION_AUTHENTICATION_FAILED", username, "Authentication failure")
        return self.store.add("session", {"this_user": username, "originator": originator,
                                          "this_host": self.host})

    def session__logout(self, session):
        self.store.remove("session", session)
        return ""

    def session__get_this_host(self, session, _session_again):
        return self.host

    def check_session(self, session) -> None:
        if session not in self.store.objects["session"]:
            raise XapiFailure("SESSION_INVALID", session)

    # --- host, SR ----------------------------------------------------------------------------------------

    def host__compute_free_memory(self, host):
        with self.store.lock:
            used = sum(int(vm["memory_static_max"]) for vm in self.store.objects["VM"].values()
                       if vm["power_state"] == "Running")
            return int(self.store.get("host", host)["memory_total"]) - used

    def _sr_free(self) -> int:
        record = self.store.get("SR", self.sr)
        return int(record["physical_size"]) - int(record["physical_utilisation"])

    # --- VDI ---------------------------------------------------------------------------------------------

    def VDI__create(self, record):
        size = int(record.get("virtual_size", 0))
        with self.store.lock:
            self.store.get("SR", record.get("SR", NULL_REF))
            if size > self._sr_free():
                raise XapiFailure("SR_FULL", size, self._sr_free())
            sr = self.store.get("SR", self.sr)
            fields = {"name_label": "", "name_description": "", "type": "user", "sharable": False,
                      "read_only": False, "other_config": {}, "xenstore_data": {}, "sm_config": {}, "tags": []}
            fields.update(record)
            fields.update(virtual_size=size, physical_utilisation=size, VBDs=[], managed=True, missing=False)
            ref = self.store.add("VDI", fields)
            path = self.vdi_path(ref)
            with open(path, "wb") as handle:
                handle.truncate(size)
            self.store.modify("SR", self.sr, VDIs=sr["VDIs"] + [ref],
                              physical_utilisation=int(sr["physical_utilisation"]) + size)
            return ref

    def VDI__clone(self, vdi, driver_params=None):
        """A copy of the VDI, with its name, type, other_config and tags (as XAPI's storage managers copy
        them; a guess), writable; ``driver_params`` are the storage driver's and ignored here."""
        source = self.store.get("VDI", vdi)
        copy = self.VDI__create({key: source[key] for key in ("name_label", "name_description", "type", "SR",
                                                              "virtual_size", "other_config", "sm_config", "tags")})
        shutil.copyfile(self.vdi_path(vdi), self.vdi_path(copy))
        return copy

    def vdi_path(self, ref: str) -> Path:
        return self.sr_dir / f"{self.store.get('VDI', ref)['uuid']}.raw"

    def VDI__destroy(self, vdi):
        with self.store.lock:
            record = self.store.get("VDI", vdi)
            vbds = [self.store.get("VBD", vbd) for vbd in record["VBDs"]]
            if any(vbd["currently_attached"] for vbd in vbds):
                raise XapiFailure("VDI_IN_USE", vdi, "destroy")
            for vbd in list(record["VBDs"]):
                self.VBD__destroy(vbd)
            self.vdi_path(vdi).unlink(missing_ok=True)
            sr = self.store.get("SR", self.sr)
            self.store.modify("SR", self.sr, VDIs=[r for r in sr["VDIs"] if r != vdi],
                              physical_utilisation=int(sr["physical_utilisation"]) - int(record["virtual_size"]))
            self.store.remove("VDI", vdi)
            return ""

    def VDI__set_read_only(self, vdi, value):
        self.store.modify("VDI", vdi, read_only=bool(value))
        return ""

    def VDI__add_to_other_config(self, vdi, key, value):
        with self.store.lock:
            config = dict(self.store.get("VDI", vdi)["other_config"])
            if key in config:
                raise XapiFailure("MAP_DUPLICATE_KEY", "VDI", "other_config", vdi, key)
            self.store.modify("VDI", vdi, other_config={**config, key: value})
            return ""

    def VDI__remove_from_other_config(self, vdi, key):
        with self.store.lock:
            config = dict(self.store.get("VDI", vdi)["other_config"])
            config.pop(key, None)
            self.store.modify("VDI", vdi, other_config=config)
            return ""

    # --- VBD ---------------------------------------------------------------------------------------------

    def VBD__create(self, record):
        with self.store.lock:
            vm, vdi = self.store.get("VM", record["VM"]), self.store.get("VDI", record["VDI"])
            if vm["power_state"] not in ("Halted", "Suspended", "Running"):
                raise XapiFailure("VM_BAD_POWER_STATE", record["VM"], "halted", vm["power_state"].lower())
            if vdi["read_only"] and record.get("mode") != "RO":
                raise XapiFailure("VDI_READONLY", record["VDI"])
            devices = {self.store.get("VBD", vbd)["userdevice"] for vbd in vm["VBDs"]}
            if record["userdevice"] in devices:
                raise XapiFailure("DEVICE_ALREADY_EXISTS", record["userdevice"])
            # As XAPI 1.257.0: a Suspended VM's VBD keeps the currently_attached and device it was created
            # with (its resume plugs it); any other's starts unplugged (a running VM's waits for VBD.plug).
            suspended = vm["power_state"] == "Suspended"
            ref = self.store.add("VBD", {**record,
                                         "currently_attached": bool(record.get("currently_attached")) and suspended,
                                         "device": record.get("device", "") if suspended else ""})
            self.store.modify("VM", record["VM"], VBDs=vm["VBDs"] + [ref])
            self.store.modify("VDI", record["VDI"], VBDs=vdi["VBDs"] + [ref])
            return ref

    def VBD__plug(self, vbd):
        """Hot-plug the VBD into its running VM (the runner's ``plug``); XAPI's errors for a VM not running
        and a VBD already attached."""
        with self.store.lock:
            record = self.store.get("VBD", vbd)
            vm = self.store.get("VM", record["VM"])
            if vm["power_state"] != "Running":
                raise XapiFailure("VM_BAD_POWER_STATE", record["VM"], "running", vm["power_state"].lower())
            if record["currently_attached"]:
                raise XapiFailure("DEVICE_ALREADY_ATTACHED", vbd)
            vdi = self.store.get("VDI", record["VDI"])
            disk = Disk(f"xvd{chr(ord('a') + int(record['userdevice']))}", self.vdi_path(record["VDI"]), "raw",
                        record["mode"] == "RO" or vdi["read_only"])
            runner = self.runners[record["VM"]]
        try:
            runner.plug(disk)
        except Exception as exc:
            raise XapiFailure("INTERNAL_ERROR", f"the stand-in could not plug the disk: {exc}") from exc
        self.store.modify("VBD", vbd, currently_attached=True, device=disk.role)
        return ""

    def VBD__destroy(self, vbd):
        with self.store.lock:
            record = self.store.get("VBD", vbd)
            if record["currently_attached"]:
                raise XapiFailure("DEVICE_ALREADY_ATTACHED", vbd)
            for cls, owner in (("VM", record["VM"]), ("VDI", record["VDI"])):
                if owner in self.store.objects[cls]:
                    refs = self.store.get(cls, owner)["VBDs"]
                    self.store.modify(cls, owner, VBDs=[r for r in refs if r != vbd])
            self.store.remove("VBD", vbd)
            return ""

    # --- VM ----------------------------------------------------------------------------------------------

    def VM__create(self, record):
        for required in ("name_label", "memory_static_max", "VCPUs_max", "PV_kernel"):
            if required not in record:
                raise XapiFailure("FIELD_TYPE_ERROR", required)
        fields = {"other_config": {}, "tags": [], "PV_args": "", "PV_ramdisk": "",
                  "VCPUs_at_startup": record["VCPUs_max"], "last_booted_record": "", "last_boot_CPU_flags": {}}
        fields.update(record)
        # XAPI 1.257.0 and later: a VM may be created Suspended, with its suspend image, last_booted_record and
        # last_boot_CPU_flags; any other power state given makes a Halted VM, without them.
        suspended = record.get("power_state") == "Suspended"
        if suspended and not (fields["last_boot_CPU_flags"] and fields["last_booted_record"]
                              and fields.get("suspend_VDI", NULL_REF) != NULL_REF):
            raise XapiFailure("VM_BAD_POWER_STATE", NULL_REF, "halted", "suspended")
        if suspended:
            self.store.get("VDI", fields["suspend_VDI"])
        else:
            fields.update(suspend_VDI=NULL_REF, last_booted_record="", last_boot_CPU_flags={})
        fields.update(power_state="Suspended" if suspended else "Halted", VBDs=[], consoles=[], domid="-1",
                      resident_on=NULL_REF, is_control_domain=False)
        return self.store.add("VM", fields)

    def VM__get_power_state(self, vm):
        return self.store.get("VM", vm)["power_state"]

    def VM__start(self, vm, start_paused, force):
        with self.store.lock:
            record = self.store.get("VM", vm)
            if record["power_state"] != "Halted":
                raise XapiFailure("VM_BAD_POWER_STATE", vm, "halted", record["power_state"].lower())
            if self.faults.fail_next_start:
                code, self.faults.fail_next_start = self.faults.fail_next_start, None
                raise XapiFailure(code, vm)
            needed, free = int(record["memory_static_max"]), self.host__compute_free_memory(self.host)
            if needed > free:
                raise XapiFailure("HOST_NOT_ENOUGH_FREE_MEMORY", needed, free)
            for key in ("PV_kernel", "PV_ramdisk"):
                if record[key] and not os.access(record[key], os.R_OK):
                    raise XapiFailure("BOOTLOADER_FAILED", vm, f"cannot read {key} {record[key]}")
            runner = self._runner(vm, record)
            booted = {key: record[key] for key in ("memory_static_max", "VCPUs_max", "PV_kernel", "PV_ramdisk",
                                                   "PV_args", "domain_type") if key in record}
            self.store.modify("VM", vm, power_state="Running",  # before QEMU: VM.start is one call
                              last_booted_record=json.dumps(booted), last_boot_CPU_flags=self._cpu_flags())
        try:
            runner.start()
        except BaseException as exc:
            self._halted(vm, "crashed")
            raise XapiFailure("INTERNAL_ERROR", f"the stand-in could not start the guest: {exc}") from exc
        self._running(vm)
        return ""

    def _cpu_flags(self) -> dict:
        """What XAPI records of the host's CPU when a VM starts (``last_boot_CPU_flags``), for a resume's check."""
        cpu = self.store.get("host", self.host)["cpu_info"]
        return {"vendor": cpu["vendor"], "features": cpu["features_pv"]}

    def _running(self, vm: str) -> None:
        """A started or resumed VM's new domain: its console and where it runs."""
        with self.store.lock:
            console = self.store.add("console", {"protocol": "vt100", "VM": vm, "other_config": {}})
            self.store.modify("console", console, location=f"{self.url()}/console?ref={console}")
            self.store.modify("VM", vm, consoles=[console], domid=str(len(self.runners)), resident_on=self.host)

    def _runner(self, vm: str, record: dict, suspend_image: Path | None = None):
        disks = []
        for vbd in sorted(record["VBDs"], key=lambda ref: int(self.store.get("VBD", ref)["userdevice"])):
            vbd_record = self.store.get("VBD", vbd)
            vdi = self.store.get("VDI", vbd_record["VDI"])
            readonly = vbd_record["mode"] == "RO" or vdi["read_only"]
            disks.append(Disk(f"xvd{chr(ord('a') + int(vbd_record['userdevice']))}",
                              self.vdi_path(vbd_record["VDI"]), "raw", readonly))
            self.store.modify("VBD", vbd, currently_attached=True, device=disks[-1].role)
        workdir = self.state_dir / "vms" / record["uuid"][:8]
        shutil.rmtree(workdir, ignore_errors=True)
        restore_from = None
        if suspend_image is not None:
            restore_from = workdir / "resumed"
            restore_from.mkdir(parents=True)
            _unpack(suspend_image, restore_from)
        runner = self.runner_class(record["name_label"], int(record["VCPUs_at_startup"]),
                                   int(record["memory_static_max"]) // MIB, Path(record["PV_kernel"]),
                                   Path(record["PV_ramdisk"]), record["PV_args"], disks, workdir,
                                   on_halted=lambda reason: self._halted(vm, reason), restore_from=restore_from)
        self.runners[vm] = runner
        return runner

    def _halted(self, vm: str, reason: str) -> None:
        with self.store.lock:
            record = self.store.objects["VM"].get(vm)
            if record is None or record["power_state"] == "Halted":
                return
            for vbd in record["VBDs"]:
                self.store.modify("VBD", vbd, currently_attached=False)
            for console in record["consoles"]:
                self.store.remove("console", console)
            self.store.modify("VM", vm, power_state="Halted", consoles=[], domid="-1", resident_on=NULL_REF,
                              other_config={**record["other_config"], "last_shutdown_reason": reason})

    def VM__hard_shutdown(self, vm):
        record = self.store.get("VM", vm)
        if record["power_state"] == "Suspended":  # as XAPI: the suspend image goes, the VM is Halted
            self._forget_suspend_image(vm)
            self._halted(vm, "hard_shutdown")
            return ""
        if record["power_state"] != "Running":
            raise XapiFailure("VM_BAD_POWER_STATE", vm, "running", record["power_state"].lower())
        runner = self.runners.get(vm)
        if runner is not None:
            runner.hard_stop()
        self._halted(vm, "hard_shutdown")
        return ""

    def VM__suspend(self, vm):
        """The guest saved into a new suspend VDI (in the VM's suspend_SR, else the SR), the VM Suspended; its
        VBDs stay attached, as XAPI keeps them for the resume."""
        with self.store.lock:
            record = self.store.get("VM", vm)
            if record["power_state"] != "Running":
                raise XapiFailure("VM_BAD_POWER_STATE", vm, "running", record["power_state"].lower())
            runner = self.runners[vm]
        saving = self.state_dir / "suspending" / record["uuid"]
        shutil.rmtree(saving, ignore_errors=True)
        saving.mkdir(parents=True)
        try:
            try:
                runner.suspend(saving)
            except Exception as exc:
                raise XapiFailure("INTERNAL_ERROR", f"the stand-in could not save the guest: {exc}") from exc
            packed = saving.with_suffix(".tar")
            with tarfile.open(packed, "w") as image:
                for path in sorted(saving.iterdir()):
                    image.add(path, arcname=path.name)
            size = -(-packed.stat().st_size // 512) * 512
            sr = record.get("suspend_SR", NULL_REF)
            vdi = self.VDI__create({"name_label": f"Suspend image for {record['name_label']}", "type": "suspend",
                                    "SR": sr if sr in self.store.objects["SR"] else self.sr,
                                    "virtual_size": size})
            os.truncate(packed, size)
            os.replace(packed, self.vdi_path(vdi))
        finally:
            shutil.rmtree(saving, ignore_errors=True)
            saving.with_suffix(".tar").unlink(missing_ok=True)
        with self.store.lock:
            for console in record["consoles"]:
                self.store.remove("console", console)
            self.store.modify("VM", vm, power_state="Suspended", suspend_VDI=vdi, consoles=[], domid="-1",
                              resident_on=NULL_REF)
        return ""

    def VM__resume(self, vm, start_paused, force):
        """The suspended guest goes on (QEMU restores it); the suspend VDI is destroyed. ``start_paused`` is
        not honoured (the stand-in has no Paused state, as with VM.start); ``force`` skips the CPU check."""
        with self.store.lock:
            record = self.store.get("VM", vm)
            if record["power_state"] != "Suspended":
                raise XapiFailure("VM_BAD_POWER_STATE", vm, "suspended", record["power_state"].lower())
            flags, cpu = record["last_boot_CPU_flags"], self.store.get("host", self.host)["cpu_info"]
            if not force and (flags.get("vendor") != cpu["vendor"]
                              or not features_within(flags.get("features", ""), cpu["features_pv"])):
                raise XapiFailure("VM_INCOMPATIBLE_WITH_THIS_HOST", vm, self.host,
                                  "VM last booted on a CPU with features this host's CPU does not have.")
            runner = self._runner(vm, record, suspend_image=self.vdi_path(record["suspend_VDI"]))
            self.store.modify("VM", vm, power_state="Running")
        try:
            runner.start()
        except BaseException as exc:
            with self.store.lock:  # the suspend image stays: the VM is Suspended still
                self.store.modify("VM", vm, power_state="Suspended")
            if isinstance(exc, CannotResume):
                raise XapiFailure("VM_INCOMPATIBLE_WITH_THIS_HOST", vm, self.host, str(exc)) from exc
            raise XapiFailure("INTERNAL_ERROR", f"the stand-in could not resume the guest: {exc}") from exc
        self._forget_suspend_image(vm)
        self._running(vm)
        return ""

    def _forget_suspend_image(self, vm: str) -> None:
        vdi = self.store.get("VM", vm)["suspend_VDI"]
        if vdi in self.store.objects["VDI"]:
            self.VDI__destroy(vdi)
        self.store.modify("VM", vm, suspend_VDI=NULL_REF)

    def VM__destroy(self, vm):
        with self.store.lock:
            record = self.store.get("VM", vm)
            if record["power_state"] != "Halted":
                raise XapiFailure("VM_BAD_POWER_STATE", vm, "halted", record["power_state"].lower())
            for vbd in list(record["VBDs"]):
                self.VBD__destroy(vbd)
            self.store.remove("VM", vm)
        runner = self.runners.pop(vm, None)
        if runner is not None:
            shutil.rmtree(runner.workdir, ignore_errors=True)
        return ""

    def VM__get_VBDs(self, vm):
        return self.store.get("VM", vm)["VBDs"]

    # --- events ------------------------------------------------------------------------------------------

    def event__from(self, classes, token, timeout):
        answer = self.store.events_from(list(classes), str(token), float(timeout))
        for event in answer["events"]:
            event["snapshot"] = record_for_wire(event["snapshot"])
        return answer

    # --- dom0 plugins ------------------------------------------------------------------------------------

    def host__call_plugin(self, host, plugin, fn, args):
        """XAPI runs a dom0 plugin's function (``/etc/xapi.d/plugins``); the stand-in has one, for tests:
        ``vjobs-testing`` ``domains``, the names of Xen's own domains but dom0's (JSON), so that a test sees
        what runs on the hypervisor and not only what the stand-in's records say. On the QEMU runner there
        is no hypervisor to ask: XAPI's error for a plugin it does not have."""
        self.store.get("host", host)
        if plugin != TEST_PLUGIN or fn != "domains" or not hasattr(self.runner_class, "domains"):
            raise XapiFailure("XENAPI_MISSING_PLUGIN", plugin)
        return json.dumps(self.runner_class.domains())

    # --- the generic accessors every class has ----------------------------------------------------------

    def generic(self, cls: str, name: str, args: list):
        objects = self.store.objects[cls]
        with self.store.lock:
            if name == "get_record":
                return record_for_wire(self.store.get(cls, args[0]))
            if name == "get_all":
                return list(objects)
            if name == "get_all_records":
                return {ref: record_for_wire(record) for ref, record in objects.items()}
            if name == "get_by_uuid":
                for ref, record in objects.items():
                    if record["uuid"] == args[0]:
                        return ref
                raise XapiFailure("UUID_INVALID", cls, args[0])
            if name == "get_by_name_label":
                return [ref for ref, record in objects.items() if record.get("name_label") == args[0]]
            if name.startswith("get_"):
                record = self.store.get(cls, args[0])
                field = name[len("get_"):]
                if field in record:
                    return record[field]  # the dispatcher sends an int as XAPI's int64 string
        raise XapiFailure("MESSAGE_METHOD_UNKNOWN", f"{cls}.{name}")

    # --- shutting the stand-in down ---------------------------------------------------------------------

    def stop_all_guests(self) -> None:
        for runner in list(self.runners.values()):
            runner.hard_stop()


