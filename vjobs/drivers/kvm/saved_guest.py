"""A kvm job's guest saved into a checkpoint, and continued from one (vjobs/checkpoint/).

Saving is libvirt's external memory snapshot without disks and without metadata (``snapshotCreateXML`` with
``<memory snapshot="external">``, every disk ``snapshot="no"``, ``NO_METADATA``): libvirt writes the guest's
memory and device state, with the domain's description in its header, in the format ``virDomainSave`` writes,
and QEMU stays up. ``virDomainSave`` would end QEMU, and a periodic checkpoint could then only go on through
a restore. The guest is paused first, so that it stays paused afterwards (libvirt resumes only a guest it
paused itself); its writable disks' files are then as the saved state expects (QEMU drained them on the pause).

Who may read the file: the system libvirtd writes it as root (or as its QEMU user), 0600, and an ordinary
account in group ``libvirt`` could then neither read nor copy it. So vjobs makes the file first, as its own
user, 0600, in the folder it was given (``claim``): libvirtd opens an existing file for writing with
O_TRUNC and leaves its owner and mode as they were, so what it writes is vjobs' user's (seen with libvirt
9.0; a root-squashing NFS folder would refuse libvirtd's open as root, as it refuses the VM's disks there).

A restore hands libvirt the same machine, device for device (``domain.restored_xml``: the description in the
state file, with this run's name, owner labels and paths put in) and a private copy of the state
(``CheckedFile.private_copy``: libvirt takes paths only), and stand-ins for the kernel and initramfs, as
qemu_user's restores have (vjobs/drivers/standins.py): the guest booted long
ago, so a checkpoint carries no boot image, but libvirt's QEMU needs a kernel for the machine to be the same.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any, Callable, Mapping

import libvirt

from vjobs.drivers.contract import CheckedFile
from vjobs.drivers.standins import STAND_INS, write_stand_ins
from vjobs.errors import CheckpointError

STATE = "state"
KERNEL, INITRAMFS = STAND_INS
ABORT_S = 30.0  # how long an aborted save may take to end


def save(dom: libvirt.virDomain, folder: Path, deadline: float, kernel: CheckedFile, versions: Mapping[str, str],
         roles: list[str]) -> dict[str, Any]:
    """Pause ``dom``, write its memory and device state into ``folder`` by ``deadline`` (else libvirt's job is
    aborted and ``CheckpointError`` raised, the guest still paused), with stand-ins made from ``kernel``;
    return its identity. ``versions``: this host's ``{"libvirt": ..., "qemu": ...}``; ``roles``: its disks'."""
    if dom.state()[0] != libvirt.VIR_DOMAIN_PAUSED:
        dom.suspend()
    description = ET.fromstring(dom.XMLDesc())
    state = claim(folder / STATE)
    _by(deadline, dom, lambda: dom.snapshotCreateXML(_snapshot_xml(description, state),
                                                     libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_NO_METADATA))
    write_stand_ins(kernel, folder)
    return identity(description, versions, roles)


def _by(deadline: float, dom: libvirt.virDomain, write: Callable[[], Any]) -> None:
    """``write()`` (a libvirt call that blocks until the state is written), done by ``deadline``: else the
    domain's job is aborted (QEMU cancels the save; the guest stays paused) and the save fails."""
    failures: list[BaseException] = []

    def run() -> None:
        try:
            write()
        except BaseException as error:  # raised in the caller's thread, below
            failures.append(error)

    writer = threading.Thread(target=run, name="kvm-save", daemon=True)
    writer.start()
    writer.join(max(0.0, deadline - time.monotonic()))
    if writer.is_alive():
        with contextlib.suppress(libvirt.libvirtError):
            dom.abortJob()
        writer.join(ABORT_S)
        raise CheckpointError("libvirt did not save the guest within the time left for the checkpoint: aborted "
                              "(a guest that touched much memory writes that much; give the checkpoint more time)",
                              code="checkpoint_too_slow")
    if failures:
        raise failures[0]


def claim(path: Path) -> Path:
    """A new empty file of vjobs' user, 0600, which libvirtd fills without changing its owner (see above)."""
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600))
    return path


def _snapshot_xml(description: ET.Element, state: Path) -> str:
    """The memory into ``state``, no disk touched: a disk left unnamed would get an external overlay."""
    snapshot = ET.Element("domainsnapshot")
    ET.SubElement(snapshot, "memory", snapshot="external", file=str(state))
    disks = ET.SubElement(snapshot, "disks")
    for target in description.iterfind("./devices/disk/target"):
        ET.SubElement(disks, "disk", name=target.get("dev"), snapshot="no")
    return ET.tostring(snapshot, encoding="unicode")


def identity(description: ET.Element, versions: Mapping[str, str], roles: list[str]) -> dict[str, Any]:
    """What a restore must match, from the running domain's description: the versioned machine type libvirt
    resolved (``q35`` runs as ``pc-q35-7.2`` under QEMU 7.2), its virt type, vCPUs and memory, and the disks'
    roles in order (their count and order are the saved machine's)."""
    memory = description.find("memory")
    return {"hypervisor": "QEMU through libvirt", "libvirt": versions["libvirt"], "qemu": versions["qemu"],
            "virt_type": description.get("type"), "machine_type": description.find("./os/type").get("machine"),
            "vcpus": int(description.findtext("vcpu")),
            "memory_mib": _kib(int(memory.text), memory.get("unit", "KiB")) // 1024,
            "disks": roles}


def _kib(amount: int, unit: str) -> int:
    return amount * {"b": 1, "bytes": 1, "KiB": 1024, "MiB": 1 << 20, "GiB": 1 << 30}[unit] // 1024


def problem(identity: Mapping[str, Any], virt_type: str, versions: Mapping[str, str],
            machines: Mapping[str, bool]) -> str | None:
    """Why this host (its ``virt_type``, ``versions``, and ``machines``: whether libvirt here has a machine
    type, by name) cannot continue a guest saved with ``identity``, naming what differs; None when it can."""
    saved_by = f"QEMU {identity.get('qemu')} through libvirt {identity.get('libvirt')}"
    if identity.get("virt_type") != virt_type:
        return (f"the guest was saved under virt_type {identity.get('virt_type')!r} and this site's kvm driver runs "
                f"{virt_type!r}: set [drivers.kvm] virt_type to match, or resume it on a host that runs it")
    if _version(str(identity.get("qemu"))) > _version(versions["qemu"]):
        return (f"the guest was saved by {saved_by}, newer than QEMU {versions['qemu']} here, which cannot load "
                "a newer QEMU's state: resume it where that QEMU or a later one is installed")
    machine = identity.get("machine_type")
    if not machine or not machines.get(machine):
        return (f"the guest was saved by {saved_by} with machine type {machine}, which QEMU {versions['qemu']} "
                "here does not have: resume it where that QEMU (or one that keeps that machine type) is installed")
    return None


def _version(dotted: str) -> tuple[int, ...]:
    return tuple(int(part) for part in dotted.split(".") if part.isdigit())
