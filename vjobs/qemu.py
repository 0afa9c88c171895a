"""QEMU command lines and child processes, shared by every piece of vjobs that starts qemu-system-x86_64.

Two rules hold for every QEMU vjobs starts:
- each drive names its format (QEMU never guesses one: a guessed format lets a guest that writes a qcow2
  header into a raw disk make QEMU open host files on the next boot), and read-only drives are read-only
  at the device level;
- QEMU dies with the process that started it, even when that process is killed with SIGKILL
  (``PR_SET_PDEATHSIG``), so a killed pilot leaves no VM running.
"""

from __future__ import annotations

import ctypes
import os
import re
import signal
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

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

_PR_SET_PDEATHSIG = 1
# A UNIX socket's path must fit in 108 bytes, and a job folder under a pilot's work directory can be deeper
# than that: QEMU runs in the VM's folder and gets this relative path; vjobs connects through
# /proc/self/fd/N/ of that folder (``socket_path_via``).
QMP_SOCKET = "qmp.sock"


@dataclass(frozen=True)
class QemuMachine:
    name: str = "q35"
    accel: str = "tcg"  # "tcg" or "kvm"
    tb_size_mib: int | None = 64  # bounds TCG's translation cache, which otherwise dominates QEMU's memory


def drive_args(disks: Sequence[Disk], device: str) -> list[str]:
    args: list[str] = []
    for index, disk in enumerate(disks):
        options = [f"file={_escape(str(disk.path))}", f"format={disk.format}", "if=none",
                   f"id=disk{index}", "cache=unsafe" if not disk.readonly else "cache=writethrough",
                   f"readonly={'on' if disk.readonly else 'off'}"]
        args += ["-drive", ",".join(options), "-device", f"{device},drive=disk{index}"]
    return args


def qemu_argv(*, binary: str, name: str, vcpus: int, memory_mib: int, kernel: Path, initramfs: Path,
              cmdline: str, disks: Sequence[Disk], console_log: Path, machine: QemuMachine,
              qmp_socket: Path | None = None, network: bool = False) -> list[str]:
    machine_option, block_device = MACHINES[machine.name]
    accel = machine.accel
    if accel == "tcg" and machine.tb_size_mib:
        accel += f",tb-size={machine.tb_size_mib}"
    argv = [binary, "-name", _escape(name), "-machine", machine_option, "-accel", accel,
            "-m", str(memory_mib), "-smp", str(vcpus),
            "-nodefaults", "-no-user-config", "-nographic", "-no-reboot",
            "-sandbox", "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny",
            "-kernel", str(kernel), "-initrd", str(initramfs), "-append", cmdline,
            "-chardev", f"file,id=console,path={_escape(str(console_log))}", "-serial", "chardev:console"]
    # The job's network, when it asked and the site allows: QEMU's user-mode stack (slirp), which needs no
    # privileges and gives the guest outbound connections as the vjobs user, nothing inbound.
    argv += ["-nic", f"user,model={block_device.replace('-blk-', '-net-')}" if network else "none"]
    argv += drive_args(disks, block_device)
    if qmp_socket is not None:
        # QEMU listens and starts paused (-S): the guest runs only after the monitor is connected and says
        # "cont", so no event is missed, and a QEMU that dies at once is seen at once (QemuUserVM._connect_monitor).
        argv += ["-chardev", f"socket,id=qmp,path={_escape(str(qmp_socket))},server=on,wait=off",
                 "-mon", "chardev=qmp,mode=control", "-S"]
    return argv


def socket_path_via(folder_fd: int, name: str = QMP_SOCKET) -> str:
    """A short path to the socket ``name`` in the folder open as ``folder_fd``, whatever the folder's depth."""
    return f"/proc/self/fd/{folder_fd}/{name}"


def _escape(value: str) -> str:
    """QEMU option values separate with commas; a literal comma is written twice."""
    return value.replace(",", ",,")


def _die_with_parent() -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    # The parent may have died between fork and prctl; then nobody would ever kill us.
    if os.getppid() == 1:
        os._exit(1)


def spawn(argv: Sequence[str], log_path: Path, cwd: Path | None = None) -> subprocess.Popen:
    """Start QEMU with its own stderr in ``log_path``, in its own process group, tied to our life; in ``cwd``
    when given (relative socket paths: see ``QMP_SOCKET``)."""
    with open(log_path, "ab") as log:
        return subprocess.Popen(list(argv), stdin=subprocess.DEVNULL, stdout=log, stderr=log, cwd=cwd,
                                preexec_fn=_die_with_parent, start_new_session=True, close_fds=True)


def kill(proc: subprocess.Popen, grace_s: float = 0.0) -> None:
    """Stop QEMU for good; safe to call on a process that already ended."""
    if proc.poll() is not None:
        return
    if grace_s:
        proc.terminate()
        try:
            proc.wait(grace_s)
            return
        except subprocess.TimeoutExpired:
            pass
    proc.kill()
    proc.wait()


def version(binary: str = DEFAULT_BINARY) -> str:
    """``QEMU 7.2.19`` or raises OSError/CalledProcessError when the binary is missing or broken."""
    out = subprocess.run([binary, "-version"], capture_output=True, text=True, check=True, timeout=20).stdout
    match = re.search(r"version (\S+)", out)
    return f"QEMU {match.group(1) if match else out.strip().splitlines()[0]}"
