"""A third-party driver, the smallest honest one: plain QEMU (TCG) on the q35 machine, started and watched by
this file alone. It lives in a package of its own and reaches vjobs only through the driver contract
(vjobs.drivers.contract: ``Driver``, ``VM``) and one entry point in its pyproject.toml.

It gives QEMU the files vjobs checked as the contract asks, by their descriptors (``/dev/fd/N``, which QEMU opens
anew, the same file whatever its path names since). What it leaves out, and vjobs' qemu_user driver does
(vjobs/drivers/qemu_user/): confinement, sealed copies of the kernel and initramfs, QMP events (so this one
cannot tell a crash from a poweroff by more than QEMU's exit status), templates, a deep probe, garbage collection.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

from vjobs.drivers.contract import VM, Capabilities, Disk, Driver, Stop, VMSpec

QEMU = "qemu-system-x86_64"


class DemoDriver(Driver):
    def probe(self) -> Capabilities:
        binary = shutil.which(QEMU)
        if binary is None:
            return Capabilities(self.name, False, f"demo driver (q35): {QEMU} is not installed")
        version = subprocess.run([binary, "-version"], capture_output=True, text=True).stdout.splitlines()[0]
        return Capabilities(self.name, True, f"demo driver (q35): {version}, TCG", acceleration="tcg",
                            hypervisor=version)

    def create(self, spec: VMSpec) -> VM:
        return DemoVM(spec)


class DemoVM(VM):
    process: subprocess.Popen | None = None

    def start(self) -> None:
        spec = self.spec
        argv = [QEMU, "-machine", "q35", "-accel", "tcg", "-m", str(spec.memory_mib), "-smp", str(spec.vcpus),
                "-nodefaults", "-no-user-config", "-nographic", "-no-reboot", "-nic", "none",
                "-kernel", f"/dev/fd/{spec.boot.kernel.fd}", "-initrd", f"/dev/fd/{spec.boot.initramfs.fd}",
                "-append", f"{spec.boot.cmdline} console=ttyS0", "-serial", "stdio"]
        for disk in spec.disks:  # in the order given, each with its format named and read-only where it says
            file = f"/dev/fd/{disk.file.fd}" if disk.readonly else str(disk.path).replace(",", ",,")
            argv += ["-drive", f"file={file},format={disk.format},if=virtio,"
                               f"readonly={'on' if disk.readonly else 'off'}"]
        self.process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                        stderr=subprocess.STDOUT, pass_fds=[file.fd for file in spec.checked_files()])
        stdout = self.process.stdout.fileno()
        spec.console.follow(lambda: os.read(stdout, 65536))  # the guest's serial console, bounded by the core

    def wait_until_stopped(self, deadline: float) -> Stop:
        try:
            status = self.process.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            return Stop.DEADLINE
        return Stop.POWEROFF if status == 0 else Stop.CRASH

    def fetch_disk(self, disk: Disk) -> Path:
        return disk.path  # QEMU wrote the file itself

    def destroy(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()
