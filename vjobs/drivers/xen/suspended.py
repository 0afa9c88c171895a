"""A xen guest saved into a checkpoint, and continued from one (vjobs/checkpoint/), with XAPI's own suspend.

Saving is ``VM.suspend``: XAPI stops the guest and writes its memory and device state into a new VDI, the
VM's ``suspend_VDI``, and the VM is Suspended, its VBDs still attached. The driver downloads that VDI
(``SUSPEND_IMAGE``) and notes what XAPI needs to make the VM again (``SUSPENDED_VM``: its
``last_booted_record`` and each disk's guest device); the disks themselves come from ``fetch_disk``.
A periodic checkpoint then lets the guest go on with ``VM.resume``.

Continuing on another host (or pool) uses what XAPI 1.257.0 added for this: ``VM.create`` of a VM that is
Suspended, given its ``suspend_VDI`` (the image uploaded by ``import_raw_vdi`` into a VDI of type
"suspend"), ``last_booted_record`` and ``last_boot_CPU_flags``, and ``VBD.create`` of its disks attached
(``currently_attached``, ``device``) as they were; then ``VM.resume``. An older XAPI has no such
``VM.create``: there a suspended VM moves only as a whole, by ``VM.export`` and ``VM.import`` of an XVA (or
metadata export and import with its VDIs), which vjobs does not do; it answers ``VM_BAD_POWER_STATE`` or
makes the VM Halted, and the restore fails.

XAPI resumes a guest only on a CPU of the vendor it booted on, that has every CPU feature it booted with
(``VM_INCOMPATIBLE_WITH_THIS_HOST``), and under a Xen as new as the one that saved it: ``problem`` asks the
same of the host before anything is uploaded.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Mapping

SUSPEND_IMAGE = "suspend-image"  # the suspend VDI's bytes, as XAPI wrote them
SUSPENDED_VM = "suspended-vm.json"  # last_booted_record and the disks' devices, for VM.create and VBD.create


def identity(vm_record: Mapping[str, Any], host_record: Mapping[str, Any], spec) -> dict[str, Any]:
    """What a restore must match: the Xen and XAPI that saved it, the guest's kind and shape, the CPU it booted
    on (XAPI's ``last_boot_CPU_flags``)."""
    version = host_record.get("software_version", {})
    return {"hypervisor": f"Xen {version.get('xen', '?')}, {version.get('product_brand', 'XAPI')} "
                          f"{version.get('product_version', '?')}",
            "xen": version.get("xen", ""), "domain_type": vm_record.get("domain_type") or "pv",
            "cpu": dict(vm_record.get("last_boot_CPU_flags", {})), "vcpus": spec.vcpus,
            "memory_mib": spec.memory_mib, "disks": [disk.role for disk in spec.disks]}


def write_suspended_vm(folder: Path, vm_record: Mapping[str, Any], devices: Mapping[str, str]) -> None:
    (folder / SUSPENDED_VM).write_text(json.dumps({"last_booted_record": vm_record.get("last_booted_record", ""),
                                                   "devices": dict(devices)}))


def read_suspended_vm(file) -> dict[str, Any]:
    """``SUSPENDED_VM`` from its checked file (vjobs/images/checked.py)."""
    return json.loads(file.read(0, file.size))


def problem(identity: Mapping[str, Any], host_record: Mapping[str, Any]) -> str | None:
    """Why the XAPI host of ``host_record`` would refuse to resume a guest saved with ``identity``."""
    cpu = host_record.get("cpu_info", {})
    saved = identity.get("cpu", {})
    if saved.get("vendor") and saved["vendor"] != cpu.get("vendor"):
        return (f"the guest was saved on a CPU of vendor {saved['vendor']} and this XAPI host's is "
                f"{cpu.get('vendor', 'unknown')}: XAPI resumes a guest only on a CPU of the vendor it booted on")
    key = "features_pv" if identity.get("domain_type", "pv") == "pv" else "features_hvm"
    if saved.get("features") and not features_within(saved["features"], cpu.get(key, "")):
        return (f"the guest booted on a CPU with features ({saved['features']}) that this XAPI host's CPU "
                f"({cpu.get(key, 'unknown')}) lacks: resume it on a host of the pool it was saved in")
    here = host_record.get("software_version", {}).get("xen", "")
    if _older(here, identity.get("xen", "")):
        return (f"the guest was saved under Xen {identity['xen']} and this host runs Xen {here}: a Xen loads only "
                "the save images of its own version or older ones")
    return None


def features_within(wanted: str, offered: str) -> bool:
    """XAPI's CPU feature check: every feature bit the guest booted with is one the host offers (32-bit words in
    hex joined by "-"; a missing word is zero)."""
    def words(features: str) -> list[int]:
        return [int(word, 16) for word in features.split("-") if word]
    offered_words = words(offered)
    return all(word & ~(offered_words[index] if index < len(offered_words) else 0) == 0
               for index, word in enumerate(words(wanted)))


def _older(version: str, than: str) -> bool:
    """``4.13.5`` is older than ``4.17.3``; a version that is not dotted numbers compares as no older."""
    def numbers(text: str) -> tuple[int, ...] | None:
        found = re.match(r"(\d+(?:\.\d+)*)", text)
        return tuple(int(part) for part in found.group(1).split(".")) if found else None
    mine, theirs = numbers(version), numbers(than)
    return mine is not None and theirs is not None and mine < theirs
