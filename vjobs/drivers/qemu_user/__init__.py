"""qemu_user: qemu-system-x86_64 as an ordinary child process, TCG by default, controlled over QMP."""

from vjobs.drivers.qemu_user.driver import QemuUserDriver

__all__ = ["QemuUserDriver"]
