"""QEMU command lines and child processes, shared by every piece of vjobs that starts qemu-system-x86_64.

Two rules hold for every QEMU vjobs starts:
- each drive names its format (QEMU never guesses one: a guessed format lets a guest that writes a qcow2
  header into a raw disk make QEMU open host files on the next boot), a qcow2's backing is disabled, and
  read-only drives are read-only at the device level;
- QEMU opens no host file by name and dies with the process that started it, even when that process is
  killed with SIGKILL; when vjobs is root it runs confined as a user of its own (vjobs/drivers/qemu_user/confine.py).
  What it reads is what vjobs checked: the read-only disks' checked descriptors themselves, sealed copies
  of the kernel and initramfs made from theirs (vjobs/images/checked.py).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from vjobs.drivers.contract import CheckedFile, Disk
from vjobs.drivers.qemu_user.confine import Confinement, preexec, wrap
from vjobs.drivers.qemu_user.ram_keeper import seal
from vjobs.guest.streams import STREAMS_PORT

DEFAULT_BINARY = "qemu-system-x86_64"

# q35 is the default: under TCG on a loaded host, microvm (even with the legacy PIT, PIC and RTC) hung
# silently in 1 to 5 boots of 6 here, the kernel failing to calibrate its TSC with no HPET or PM timer to
# fall back on; q35 has both and booted every time, about 0.5 s slower (docs/benchmarks.md).
MACHINES = {
    "microvm": ("microvm,pit=on,pic=on,rtc=on", "virtio-blk-device"),
    "q35": ("q35", "virtio-blk-pci"),
    "pc": ("pc", "virtio-blk-pci"),
}


# qboot (shipped with Debian's QEMU) only loads the kernel QEMU hands it. Measured against SeaBIOS on a
# quiet machine, 6 interleaved cold boots each: 2.13 s against 2.16 s a job, within the noise, so SeaBIOS
# stays the default and qboot is a site's choice (firmware = "qboot").
QBOOT = Path("/usr/share/qemu/qboot.rom")
DEFAULT_TB_SIZE_MIB = 32
RAM_BACKEND = "vjobs-ram"  # the guest RAM's block, by this name in a saved state: a restore must name it so too


@dataclass(frozen=True)
class GuestRam:
    """Where the guest's RAM lives, when not in QEMU's anonymous memory (``-m`` alone). ``fd``: a memfd whose
    pages are the RAM (vjobs/drivers/qemu_user/shared_ram.py), or None: anonymous memory under the backend's
    name (a template-started guest restored from a checkpoint). ``shared``: QEMU writes the guest's RAM into
    the memfd (a template guest, saved without its RAM); else it maps it copy-on-write (a job's guest)."""

    fd: int | None = None
    shared: bool = False


@dataclass(frozen=True)
class QemuMachine:
    name: str = "q35"
    accel: str = "tcg"  # "tcg" or "kvm"
    # Bounds TCG's translation cache, which otherwise dominates QEMU's memory: 32 MiB cost no CPU time against
    # 64 for a trivial job or a Python one, and 26 MiB less memory on a cold boot; 16 cost 25-33 % more CPU
    # (benchmarks/memory.py, docs/benchmarks.md).
    tb_size_mib: int | None = DEFAULT_TB_SIZE_MIB
    firmware: str | None = None  # a -bios file (QBOOT); None: QEMU's default (SeaBIOS)
    machine_type: str | None = None  # a versioned type (``pc-q35-7.2``) instead of ``name``'s: a saved guest's


class PassedFiles:
    """The descriptors QEMU gets instead of paths: it opens no host file by name (vjobs/drivers/qemu_user/confine.py). Each
    ``add_*`` returns what to write in QEMU's command line; ``fds`` go to the child; ``close()`` after spawn."""

    def __init__(self):
        self.fds: list[int] = []
        self.args: list[str] = []  # -add-fd options
        self._sets = 0

    def _keep(self, fd: int) -> int:
        os.set_inheritable(fd, True)
        self.fds.append(fd)
        return fd

    def add_disk(self, disk: Disk) -> str:
        """A ``/dev/fdset/N`` for a drive. A read-only disk's is its checked descriptor, duplicated; a writable
        disk (vjobs' own, made in the job's folder) is opened here, read-write and read-only too, because QEMU
        opens an image read-only first and reopens it for writing."""
        self._sets += 1
        if disk.readonly:
            fds = [os.dup(disk.file.fd)]
        else:
            fds = [os.open(disk.path, mode | os.O_CLOEXEC | os.O_NOFOLLOW) for mode in (os.O_RDWR, os.O_RDONLY)]
        for fd in fds:
            self.args += ["-add-fd", f"fd={self._keep(fd)},set={self._sets}"]
        return f"/dev/fdset/{self._sets}"

    def add_file(self, file: CheckedFile) -> int:
        """A descriptor number for a file QEMU only reads (a saved template's state: ``-incoming fd:N``)."""
        return self._keep(os.dup(file.fd))

    def add_sealed_copy(self, file: CheckedFile, name: str) -> str:
        """A ``/proc/self/fd/N`` for a file QEMU reads by path (the kernel, the initramfs): a sealed
        in-memory copy made from the checked descriptor, which any user may reopen and none may change."""
        fd = self._keep(os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING))
        file.copy_to(fd)
        seal(fd)
        return f"/proc/self/fd/{fd}"

    def add_ram(self, fd: int) -> str:
        """A ``/proc/self/fd/N`` for the guest RAM's memfd (``GuestRam``): QEMU 7.2 maps a memory backend's file
        by path only, and opens it read-write even to map it private; the memfd's seals are what keep a job's
        QEMU from changing it (vjobs/drivers/qemu_user/shared_ram.py)."""
        return f"/proc/self/fd/{self._keep(os.dup(fd))}"

    def add_socket(self, sock: socket.socket) -> int:
        return self._keep(sock.detach())  # ours to close from now on, once: the socket object lets go

    def close(self) -> None:
        for fd in self.fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        self.fds = []


def drive_backends(disks: Sequence[Disk], files: PassedFiles) -> list[str]:
    """The disks' block nodes, named ``disk0``, ``disk1``..., with no guest device yet: each with its format
    named and, for a qcow2, its backing disabled (``"backing": null``: an image rewritten after its check to
    name a backing file still makes QEMU open nothing else)."""
    args: list[str] = []
    for index, disk in enumerate(disks):
        node = {"node-name": f"disk{index}", "driver": disk.format, "read-only": disk.readonly,
                "file": {"driver": "file", "filename": files.add_disk(disk)}}
        if disk.format == "qcow2":
            node["backing"] = None
        if not disk.readonly:
            node["cache"] = {"no-flush": True}  # scratch space the host reads only after QEMU ended
        args += ["-blockdev", json.dumps(node, separators=(",", ":"))]
    return args


def drive_args(disks: Sequence[Disk], device: str, files: PassedFiles) -> list[str]:
    args = drive_backends(disks, files)
    for index in range(len(disks)):
        args += ["-device", f"{device},drive=disk{index}"]
    return args


def qemu_argv(*, binary: str, name: str, vcpus: int, memory_mib: int, kernel: CheckedFile,
              initramfs: CheckedFile, cmdline: str, disks: Sequence[Disk], machine: QemuMachine, files: PassedFiles,
              console: socket.socket, monitor: socket.socket | None = None, streams: socket.socket | None = None,
              network: bool = False, extra: Sequence[str] = (), ram: GuestRam | None = None) -> list[str]:
    """QEMU's command line; every file and socket goes through ``files``. ``console``, ``monitor`` and
    ``streams`` are QEMU's ends of connected socket pairs: nothing listens anywhere in the file system.
    ``streams``: the virtio-serial port ``STREAMS_PORT`` that carries the payload's live output
    (vjobs/guest/streams.py). ``extra``: more options (a template's devices, its disks' backends, ``-incoming``).
    ``ram``: the guest's RAM in a named memory backend (``GuestRam``)."""
    machine_option, block_device = MACHINES[machine.name]
    machine_option = machine.machine_type or machine_option
    if ram is not None:
        machine_option += f",memory-backend={RAM_BACKEND}"
    accel = machine.accel
    if accel == "tcg" and machine.tb_size_mib:
        accel += f",tb-size={machine.tb_size_mib}"
    argv = [binary, "-name", _escape(name), "-machine", machine_option, "-accel", accel,
            *(["-bios", machine.firmware] if machine.firmware and machine.name != "microvm" else []),
            "-m", str(memory_mib), *memory_backend(memory_mib, ram, files), "-smp", str(vcpus),
            "-nodefaults", "-no-user-config", "-nographic", "-no-reboot",
            "-sandbox", "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny",
            "-kernel", files.add_sealed_copy(kernel, "kernel"),
            "-initrd", files.add_sealed_copy(initramfs, "initramfs"), "-append", cmdline,
            "-chardev", f"socket,id=console,fd={files.add_socket(console)}", "-serial", "chardev:console"]
    # The job's network, when it asked and the site allows: QEMU's user-mode stack (slirp), which needs no
    # privileges and gives the guest outbound connections as the vjobs user, nothing inbound.
    argv += ["-nic", f"user,model={block_device.replace('-blk-', '-net-')}" if network else "none"]
    argv += drive_args(disks, block_device, files)
    if streams is not None:
        argv += ["-device", f"{block_device.replace('-blk-', '-serial-')},id=vjobs-serial",
                 "-chardev", f"socket,id=streams,fd={files.add_socket(streams)}",
                 "-device", f"virtserialport,bus=vjobs-serial.0,chardev=streams,name={STREAMS_PORT}"]
    argv += extra
    if monitor is not None:
        # QEMU starts paused (-S): the guest runs only after the monitor is connected and says "cont", so no
        # event is missed, and a QEMU that dies at once is seen at once.
        argv += ["-chardev", f"socket,id=qmp,fd={files.add_socket(monitor)}", "-mon", "chardev=qmp,mode=control",
                 "-S"]
    return [argv[0], *files.args, *argv[1:]]


def memory_backend(memory_mib: int, ram: GuestRam | None, files: PassedFiles) -> list[str]:
    """The ``-object`` that holds the guest's RAM as ``ram`` says, or nothing: QEMU's anonymous memory."""
    if ram is None:
        return []
    if ram.fd is None:
        return ["-object", f"memory-backend-ram,id={RAM_BACKEND},size={memory_mib}M"]
    share = "on" if ram.shared else "off"
    return ["-object", f"memory-backend-file,id={RAM_BACKEND},size={memory_mib}M,mem-path={files.add_ram(ram.fd)},"
                       f"share={share}"]


def _escape(value: str) -> str:
    """QEMU option values separate with commas; a literal comma is written twice."""
    return value.replace(",", ",,")


def spawn(argv: Sequence[str], files: PassedFiles, confinement: Confinement) -> subprocess.Popen:
    """Start QEMU confined (vjobs/drivers/qemu_user/confine.py), with ``files`` and its stdout and stderr on a pipe (the
    caller bounds what it keeps), in its own process group, tied to our life."""
    return subprocess.Popen(wrap(list(argv), confinement), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, pass_fds=files.fds, preexec_fn=preexec(confinement),
                            start_new_session=True, close_fds=True)


def kill(proc: subprocess.Popen) -> None:
    """Stop QEMU for good, with whatever wraps it (its whole process group); safe once it has ended."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.kill()
    proc.wait()


def version(binary: str = DEFAULT_BINARY) -> str:
    """``QEMU 7.2.19`` or raises OSError/CalledProcessError when the binary is missing or broken."""
    out = subprocess.run([binary, "-version"], capture_output=True, text=True, check=True, timeout=20).stdout
    match = re.search(r"version (\S+)", out)
    return f"QEMU {match.group(1) if match else out.strip().splitlines()[0]}"
