"""Xen guests started from a pre-booted template (docs/templates.md, "xen"), with XAPI's own calls only.

Made once per recipe (kernel, initramfs, command line, memory, vCPUs, XAPI host and its Xen): a VM with no
disks boots the image with ``vjobs.template`` (vjobs/drivers/templates.py), its agent says "template ready"
on the console and waits for an io disk; ``VM.suspend`` saves it into its suspend VDI, which ``VDI.clone``
copies into the template, a VDI of the SR that ``other_config`` names (``TEMPLATE_KEY``, the recipe's name)
and that carries what ``VM.create`` of a Suspended VM needs (its ``last_booted_record`` and
``last_boot_CPU_flags``); the template VM is then destroyed, its own suspend VDI with it. The template has no
owner labels: ``vjobs gc`` leaves it, as it leaves a release VDI.

Each job: ``VDI.clone`` of the template, ``VM.create`` of a Suspended VM with that clone as its
``suspend_VDI`` (XAPI 1.257.0, as a checkpoint's restore: suspended.py), ``VM.resume``, then ``VBD.create``
and ``VBD.plug`` of its disks on the running VM (hot-plug); the agent says "up". Any failure on the way boots
the job cold (the driver), remembered per recipe for FAILURE_MEMORY_S; a resume that fails destroys the
template, which is made anew after that.
"""

from __future__ import annotations

import json
import socket
import time
from typing import Any, Mapping

from vjobs.drivers.contract import VMSpec
from vjobs.drivers.templates import recipe_key
from vjobs.errors import VMError
from vjobs.guest.protocol import TEMPLATE_READY_MARKER

FORMAT = 1  # of the template VDI's other_config; a change makes every template anew
TEMPLATE_KEY = "vjobs.template"  # on a template VDI: its name, FAMILY-KEY
BOOTED_KEY = "vjobs.template.last_booted_record"
CPU_FLAGS_KEY = "vjobs.template.last_boot_CPU_flags"  # JSON
BUILD_DEADLINE_S = 60.0  # one cold boot of the template guest, on a loaded host
UP_DEADLINE_S = 20.0  # from VM.resume to the agent's "up"; normally well under a second


def recipe(spec: VMSpec, host_record: Mapping[str, Any]) -> dict[str, Any]:
    """Everything the saved guest depends on; two jobs with the same recipe share a template."""
    boot = spec.boot
    return {"kernel_sha256": boot.kernel.sha256(), "initramfs_sha256": boot.initramfs.sha256(),
            "cmdline": boot.cmdline, "memory_mib": spec.memory_mib, "vcpus": spec.vcpus,
            "host": host_record.get("uuid", ""), "xen": host_record.get("software_version", {}).get("xen", ""),
            "format": FORMAT}


def family(recipe: Mapping[str, Any]) -> str:
    """Templates that replace each other when their image changes: one per guest shape."""
    return f"xen_{recipe['memory_mib']}m_{recipe['vcpus']}cpu"


def name(recipe: Mapping[str, Any]) -> str:
    return f"{family(recipe)}-{recipe_key(recipe)}"


def find(vdi_records: Mapping[str, Mapping[str, Any]], sr: str, template: str, complete_key: str) -> str | None:
    """The complete template VDI named ``template`` in ``sr``; never a job's clone of one (it has owner labels)."""
    for ref, record in vdi_records.items():
        config = record.get("other_config", {})
        if record.get("SR") == sr and config.get(TEMPLATE_KEY) == template and config.get(complete_key) \
                and "vjobs.run_id" not in config:
            return ref
    return None


def wait_until_ready(stream: socket.socket, first: bytes, deadline_s: float = BUILD_DEADLINE_S) -> None:
    """Read the template guest's console until its agent says "template ready"; VMError past ``deadline_s``."""
    seen, deadline = first, time.monotonic() + deadline_s
    while TEMPLATE_READY_MARKER not in seen:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise VMError(f"waited {deadline_s:g} s for the template guest to boot: "
                          f"{seen[-300:].decode(errors='replace')}", code="template_failed")
        stream.settimeout(remaining)
        try:
            data = stream.recv(65536)
        except socket.timeout:
            continue
        if not data:
            raise VMError(f"the template guest's console ended before it was ready: "
                          f"{seen[-300:].decode(errors='replace')}", code="template_failed")
        seen = seen[-4096:] + data


def labels(recipe: Mapping[str, Any], vm_record: Mapping[str, Any]) -> dict[str, str]:
    """The template VDI's other_config, less the complete mark: its name and what VM.create needs."""
    return {TEMPLATE_KEY: name(recipe), BOOTED_KEY: vm_record["last_booted_record"],
            CPU_FLAGS_KEY: json.dumps(dict(vm_record["last_boot_CPU_flags"]))}


def suspended_fields(template_config: Mapping[str, str]) -> dict[str, Any]:
    """What a job's ``VM.create`` takes from the template VDI to make its VM Suspended."""
    return {"power_state": "Suspended", "last_booted_record": template_config[BOOTED_KEY],
            "last_boot_CPU_flags": json.loads(template_config[CPU_FLAGS_KEY])}
