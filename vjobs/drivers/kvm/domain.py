"""The libvirt domain description of a ``VMSpec``, built with ElementTree, and the vjobs owner labels it
carries in ``<metadata>`` (read back by ``vjobs gc``).

A read-only disk is the file vjobs checked (vjobs/images/checked.py): its source names an fd group, which
the driver fills with that file's descriptor (``virDomainFDAssociate``), so QEMU gets the descriptor and
libvirt opens nothing by path; the path stays in the description for messages. libvirt gives a domain's
kernel and initramfs to QEMU by path only, so the driver passes private copies made from their descriptors."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

from vjobs.drivers.contract import VMSpec
from vjobs.errors import CheckpointError
from vjobs.guest.streams import STREAMS_PORT

#: The namespace of vjobs' element in a domain's <metadata>; libvirt keys metadata by it.
NAMESPACE_URI = "https://vjobs.invalid/owner/1"
NAMESPACE_PREFIX = "vjobs"
ET.register_namespace(NAMESPACE_PREFIX, NAMESPACE_URI)

CONSOLE_SOCKET = "console.sock"
STREAMS_SOCKET = "streams.sock"

_OWNER = f"{{{NAMESPACE_URI}}}owner"
_LABEL = f"{{{NAMESPACE_URI}}}label"


@dataclass(frozen=True)
class DomainSettings:
    """What the site config decides about every domain, as opposed to what the job decides (the spec)."""

    virt_type: str = "kvm"  # "kvm" or "qemu" (TCG)
    machine: str = "q35"  # "q35" or "pc"; libvirt has no microvm
    tb_cache_mib: int | None = 64  # bounds TCG's translation cache, which otherwise dominates QEMU's memory
    network: str | None = None  # a libvirt network to attach when the job may use the network


def domain_xml(spec: VMSpec, settings: DomainSettings, kernel: Path, initramfs: Path,
               sockets: Path | None = None) -> str:
    """The description of ``spec``'s domain, booting ``kernel`` and ``initramfs`` (copies of the spec's);
    ``sockets``: the folder of the sockets its serial port (the console) and its virtio-serial port (the live
    streams) connect to (default: the VM's own, ``spec.workdir``)."""
    domain = ET.Element("domain", type=settings.virt_type)
    _text(domain, "name", spec.name)
    domain.append(owner_metadata(spec.owner.as_labels()))
    _text(domain, "memory", str(spec.memory_mib), unit="MiB")
    _text(domain, "vcpu", str(spec.vcpus))
    domain.append(_os(spec, settings.machine, kernel, initramfs))
    domain.append(_features(settings))
    _text(domain, "clock", None, offset="utc")
    # A reset is how a panicking guest (panic=-1) ends. With on_reboot=destroy libvirt reports it exactly
    # like a clean power-off, so the domain restarts instead: the REBOOT event tells KvmVM that it was a
    # crash, and KvmVM destroys the domain before the rebooted guest gets anywhere.
    _text(domain, "on_poweroff", "destroy")
    _text(domain, "on_reboot", "restart")
    _text(domain, "on_crash", "destroy")
    domain.append(_devices(spec, settings, sockets or spec.workdir))
    return ET.tostring(domain, encoding="unicode")


def restored_xml(saved: str, spec: VMSpec, kernel: Path, initramfs: Path, sockets: Path | None = None) -> str:
    """The description a saved guest continues with (``virDomainRestoreFlags``' replacement for the one in the
    state file, ``saved``): that one, device for device, since libvirt refuses any change the guest would see
    (its name and UUID included, so the domain keeps the name it was saved with), with this run's parts put
    in: ``spec``'s owner labels (which ``vjobs gc`` goes by), its disks' files (copies of the saved ones, in
    the same order), ``kernel`` and ``initramfs`` (copies of the checkpoint's stand-ins), the sockets in
    ``sockets`` (default ``spec.workdir``). This host's libvirt picks its own QEMU binary and security labels."""
    domain = _rebound(saved, spec, kernel, initramfs, sockets)
    disks = domain.find("devices").findall("disk")
    if [element.find("readonly") is not None for element in disks] != [disk.readonly for disk in spec.disks]:
        raise CheckpointError(f"the saved guest has {len(disks)} disks that do not match the job's "
                              f"{', '.join(disk.role for disk in spec.disks)}: the checkpoint is not this job's",
                              code="checkpoint_mismatch")
    for index, (element, disk) in enumerate(zip(disks, spec.disks)):
        source = element.find("source")
        source.attrib = {"file": str(disk.path)}
        if disk.readonly:
            source.set("fdgroup", _fd_group(index))  # disk_fds: the checked descriptor, as in a cold boot
    return ET.tostring(domain, encoding="unicode")


def template_restored_xml(saved: str, spec: VMSpec, kernel: Path, initramfs: Path, sockets: Path) -> str:
    """The description a template's saved guest (no disks) is restored with for ``spec``'s job: as
    ``restored_xml``, the job's disks left out (libvirt refuses a restore with more disks than were saved: they
    are hot-plugged after it, ``scsi_disk_xml``)."""
    return ET.tostring(_rebound(saved, spec, kernel, initramfs, sockets), encoding="unicode")


def _rebound(saved: str, spec: VMSpec, kernel: Path, initramfs: Path, sockets: Path | None) -> ET.Element:
    """The saved description with this run's owner labels, stand-ins and sockets, what libvirt decides left out."""
    domain = ET.fromstring(saved)
    for old in domain.findall("metadata"):
        domain.remove(old)
    domain.insert(2, owner_metadata(spec.owner.as_labels()))
    for label in domain.findall("seclabel"):
        domain.remove(label)
    devices = domain.find("devices")
    for emulator in devices.findall("emulator"):
        devices.remove(emulator)
    domain.find("./os/kernel").text, domain.find("./os/initrd").text = str(kernel), str(initramfs)
    folder = sockets or spec.workdir
    devices.find("./serial/source").set("path", str(folder / CONSOLE_SOCKET))
    for channel in devices.iterfind("channel"):
        if channel.find("target").get("name") == STREAMS_PORT:
            channel.find("source").set("path", str(folder / STREAMS_SOCKET))
    return domain


def disk_fds(spec: VMSpec) -> dict[str, int]:
    """The fd group of each read-only disk, and the checked descriptor that fills it."""
    return {_fd_group(index): disk.file.fd for index, disk in enumerate(spec.disks) if disk.readonly}


def _fd_group(index: int) -> str:
    return f"vjobs-disk{index}"


def _os(spec: VMSpec, machine: str, kernel: Path, initramfs: Path) -> ET.Element:
    os_element = ET.Element("os")
    _text(os_element, "type", "hvm", arch="x86_64", machine=machine)
    _text(os_element, "kernel", str(kernel))
    _text(os_element, "initrd", str(initramfs))
    _text(os_element, "cmdline", f"{spec.boot.cmdline} console=ttyS0")
    return os_element


def _features(settings: DomainSettings) -> ET.Element:
    features = ET.Element("features")
    ET.SubElement(features, "acpi")  # without ACPI, the guest's poweroff halts instead of ending the domain
    if settings.virt_type == "qemu" and settings.tb_cache_mib:
        tcg = ET.SubElement(features, "tcg")
        _text(tcg, "tb-cache", str(settings.tb_cache_mib), unit="MiB")
    return features


def _devices(spec: VMSpec, settings: DomainSettings, sockets: Path) -> ET.Element:
    devices = ET.Element("devices")
    for index, disk in enumerate(spec.disks):
        devices.append(disk_element(index, disk, f"vd{chr(ord('a') + index)}", "virtio"))
    if spec.network and settings.network:
        interface = ET.SubElement(devices, "interface", type="network")
        ET.SubElement(interface, "source", network=settings.network)
        ET.SubElement(interface, "model", type="virtio")
    # A socket that vjobs listens on and QEMU connects to (KvmVM.attach), read by vjobs itself, bounded by the
    # core: a file would be written by QEMU with no limit, and a pty belongs to QEMU's user (root for the
    # system libvirtd), which an account cannot open.
    serial = ET.SubElement(devices, "serial", type="unix")
    ET.SubElement(serial, "source", mode="connect", path=str(sockets / CONSOLE_SOCKET))
    ET.SubElement(serial, "target", port="0")
    # The payload's live stdout and stderr (vjobs/guest/streams.py): a virtio-serial port, made the same way
    # (libvirt adds the virtio-serial controller).
    channel = ET.SubElement(devices, "channel", type="unix")
    ET.SubElement(channel, "source", mode="connect", path=str(sockets / STREAMS_SOCKET))
    ET.SubElement(channel, "target", type="virtio", name=STREAMS_PORT)
    # libvirt would otherwise add a USB controller and a memory balloon nobody uses: less to emulate
    ET.SubElement(devices, "controller", type="usb", model="none")
    ET.SubElement(devices, "memballoon", model="none")
    return devices


def disk_element(index: int, disk, target: str, bus: str) -> ET.Element:
    """The spec's disk ``index`` as the device ``target`` on ``bus`` (virtio; scsi for a template's guest)."""
    element = ET.Element("disk", type="file", device="disk")
    # The format is named so that libvirt and QEMU never probe it: a guest could otherwise write a qcow2
    # header into a raw disk and make QEMU open host files on the next boot. Writable disks are scratch
    # space the host reads only after QEMU ended, so guest flushes need not reach the platter.
    ET.SubElement(element, "driver", name="qemu", type=disk.format, cache="writethrough" if disk.readonly else "unsafe")
    source = ET.SubElement(element, "source", file=str(disk.path))
    if disk.readonly:
        source.set("fdgroup", _fd_group(index))  # disk_fds: the checked descriptor, not the path
    # No backing file, whatever the image's header says: libvirt then neither probes one nor lets QEMU
    # open one ("backing": null).
    ET.SubElement(element, "backingStore")
    ET.SubElement(element, "target", dev=target, bus=bus)
    if disk.readonly:
        ET.SubElement(element, "readonly")
    return element


def scsi_disk_xml(index: int, disk, source: Path) -> str:
    """The spec's disk ``index`` as a template's restored guest gets it, hot-plugged from the file ``source``: one
    SCSI target per disk on the template's controller, in the spec's order (the agent finds them by content
    anyway). By path: libvirt 9.0 hands QEMU no descriptor of ``virDomainFDAssociate`` on a hot-plug ("Could
    not dup FD for /dev/fdset/0"), so a read-only disk's ``source`` is a private link to the checked file
    (``KvmTemplateVM``), which libvirt must not relabel (chown) as it would a file of the VM's own."""
    element = disk_element(index, disk, f"sd{chr(ord('a') + index)}", "scsi")
    source_element = element.find("source")
    source_element.attrib = {"file": str(source)}
    if disk.readonly:
        ET.SubElement(source_element, "seclabel", model="dac", relabel="no")
    ET.SubElement(element, "address", type="drive", controller="0", bus="0", target=str(index), unit="0")
    return ET.tostring(element, encoding="unicode")


def with_scsi_controller(xml: str) -> str:
    """``xml`` (a diskless domain) with the virtio-scsi controller a template's guest gets its disks on."""
    domain = ET.fromstring(xml)
    ET.SubElement(domain.find("devices"), "controller", type="scsi", index="0", model="virtio-scsi")
    return ET.tostring(domain, encoding="unicode")


def owner_metadata(labels: dict[str, str]) -> ET.Element:
    metadata = ET.Element("metadata")
    metadata.append(owner_element(labels))
    return metadata


def owner_element(labels: dict[str, str]) -> ET.Element:
    owner = ET.Element(_OWNER)
    for key, value in sorted(labels.items()):
        _text(owner, _LABEL, value, name=key)
    return owner


def parse_owner(xml: str) -> dict[str, str]:
    """The labels of an owner element, as ``virDomainGetMetadata`` returns it: libvirt hands the element
    back without its namespace (the namespace was the key of the lookup), so local names are compared."""
    owner = ET.fromstring(xml)
    if _local(owner.tag) != "owner":
        return {}
    return {label.get("name", ""): label.text or "" for label in owner if _local(label.tag) == "label"}


def _local(tag: str) -> str:
    return tag.rsplit("}", 1)[-1]


def _text(parent: ET.Element, tag: str, text: str | None, **attributes: str) -> ET.Element:
    element = ET.SubElement(parent, tag, attributes)
    element.text = text
    return element
