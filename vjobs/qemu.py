"""QEMU command lines and child processes, shared by every piece of vjobs that starts qemu-system-x86_64.

Two rules hold for every QEMU vjobs starts:
- each drive names its format (QEMU never guesses one: a guessed format lets a guest that writes a qcow2
  header into a raw disk make QEMU open host files on the next boot), and read-only drives are read-only
  at the device level;
- QEMU opens no host file by name and dies with the process that started it, even when that process is
  killed with SIGKILL; when vjobs is root it runs confined as a user of its own (vjobs/confine.py).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import signal
import socket
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from .confine import Confinement, preexec, wrap
from .driver import Disk

DEFAULT_BINARY = "qemu-system-x86_64"

# q35 is the default: under TCG on a loaded host, microvm (even with the legacy PIT, PIC and RTC) hung
# silently in 1 to 5 boots of 6 here, the kernel failing to calibrate its TSC with no HPET or PM timer to
# fall back on; q35 has both and booted every time, about 0.5 s slower (docs/benchmarks.md).
MACHINES = {
    "microvm": ("microvm,pit=on,pic=on,rtc=on", "virtio-blk-device"),
    "q35": ("q35", "virtio-blk-pci"),
    "pc": ("pc", "virtio-blk-pci"),
}


@dataclass(frozen=True)
class QemuMachine:
    name: str = "q35"
    accel: str = "tcg"  # "tcg" or "kvm"
    tb_size_mib: int | None = 64  # bounds TCG's translation cache, which otherwise dominates QEMU's memory


class PassedFiles:
    """The descriptors QEMU gets instead of paths: it opens no host file by name (vjobs/confine.py). Each
    ``add_*`` returns what to write in QEMU's command line; ``fds`` go to the child; ``close()`` after spawn."""

    def __init__(self):
        self.fds: list[int] = []
        self.args: list[str] = []  # -add-fd options
        self._sets = 0

    def _keep(self, fd: int) -> int:
        os.set_inheritable(fd, True)
        self.fds.append(fd)
        return fd

    def add_disk(self, path: Path, readonly: bool) -> str:
        """A ``/dev/fdset/N`` for a drive. A writable drive gets a read-only descriptor too, because QEMU
        opens an image read-only first and reopens it for writing."""
        self._sets += 1
        modes = (os.O_RDONLY,) if readonly else (os.O_RDWR, os.O_RDONLY)
        for mode in modes:
            fd = self._keep(os.open(path, mode | os.O_CLOEXEC | os.O_NOFOLLOW))
            self.args += ["-add-fd", f"fd={fd},set={self._sets}"]
        return f"/dev/fdset/{self._sets}"

    def add_sealed_copy(self, path: Path, name: str) -> str:
        """A ``/proc/self/fd/N`` for a file QEMU reads by path (the kernel, the initramfs): a sealed
        in-memory copy, which any user may reopen and none may change."""
        fd = os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        with open(path, "rb") as source:
            size = os.fstat(source.fileno()).st_size
            copied = 0
            while copied < size:
                copied += os.sendfile(fd, source.fileno(), copied, size - copied) or size
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SEAL | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW
                    | fcntl.F_SEAL_WRITE)
        return f"/proc/self/fd/{self._keep(fd)}"

    def add_socket(self, sock: socket.socket) -> int:
        return self._keep(sock.detach())  # ours to close from now on, once: the socket object lets go

    def close(self) -> None:
        for fd in self.fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        self.fds = []


def drive_args(disks: Sequence[Disk], device: str, files: PassedFiles) -> list[str]:
    args: list[str] = []
    for index, disk in enumerate(disks):
        options = [f"file={files.add_disk(disk.path, disk.readonly)}", f"format={disk.format}", "if=none",
                   f"id=disk{index}", "cache=unsafe" if not disk.readonly else "cache=writethrough",
                   f"readonly={'on' if disk.readonly else 'off'}"]
        args += ["-drive", ",".join(options), "-device", f"{device},drive=disk{index}"]
    return args


def qemu_argv(*, binary: str, name: str, vcpus: int, memory_mib: int, kernel: Path, initramfs: Path,
              cmdline: str, disks: Sequence[Disk], machine: QemuMachine, files: PassedFiles,
              console: socket.socket, monitor: socket.socket | None = None, network: bool = False) -> list[str]:
    """QEMU's command line; every file and socket goes through ``files``. ``console`` and ``monitor`` are
    QEMU's ends of connected socket pairs: nothing listens anywhere in the file system."""
    machine_option, block_device = MACHINES[machine.name]
    accel = machine.accel
    if accel == "tcg" and machine.tb_size_mib:
        accel += f",tb-size={machine.tb_size_mib}"
    argv = [binary, "-name", _escape(name), "-machine", machine_option, "-accel", accel,
            "-m", str(memory_mib), "-smp", str(vcpus),
            "-nodefaults", "-no-user-config", "-nographic", "-no-reboot",
            "-sandbox", "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny",
            "-kernel", files.add_sealed_copy(kernel, "kernel"),
            "-initrd", files.add_sealed_copy(initramfs, "initramfs"), "-append", cmdline,
            "-chardev", f"socket,id=console,fd={files.add_socket(console)}", "-serial", "chardev:console"]
    # The job's network, when it asked and the site allows: QEMU's user-mode stack (slirp), which needs no
    # privileges and gives the guest outbound connections as the vjobs user, nothing inbound.
    argv += ["-nic", f"user,model={block_device.replace('-blk-', '-net-')}" if network else "none"]
    argv += drive_args(disks, block_device, files)
    if monitor is not None:
        # QEMU starts paused (-S): the guest runs only after the monitor is connected and says "cont", so no
        # event is missed, and a QEMU that dies at once is seen at once.
        argv += ["-chardev", f"socket,id=qmp,fd={files.add_socket(monitor)}", "-mon", "chardev=qmp,mode=control",
                 "-S"]
    return [argv[0], *files.args, *argv[1:]]


def _escape(value: str) -> str:
    """QEMU option values separate with commas; a literal comma is written twice."""
    return value.replace(",", ",,")


def spawn(argv: Sequence[str], files: PassedFiles, confinement: Confinement) -> subprocess.Popen:
    """Start QEMU confined (vjobs/confine.py), with ``files`` and its stdout and stderr on a pipe (the
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
