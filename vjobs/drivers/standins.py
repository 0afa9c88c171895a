"""Stand-ins for a restored guest's kernel and initramfs, for every QEMU-based driver (qemu_user's templates and
checkpoints, kvm's checkpoints).

A guest restored from a saved state never boots again, yet QEMU (and libvirt for it) still wants ``-kernel``
and ``-initrd``: it reads both whole into its own memory, the kernel into its heap for as long as it runs (14
MiB of the cloud kernel, per VM). The machine must be the saved one, with the same option ROM, and for that
the bzImage's setup part (its header and real-mode code) is all QEMU looks at. The initramfs can be any bytes.
So a saved guest carries these two small files instead of its boot image.
"""

from __future__ import annotations

from pathlib import Path

from vjobs.images.checked import CheckedFile

STAND_INS = ("restore-kernel", "restore-initrd")  # their names, beside the saved state
KERNEL, INITRAMFS = STAND_INS


def write_stand_ins(kernel: CheckedFile, folder: Path) -> None:
    """The stand-ins for ``kernel`` (the guest's, or a stand-in of it) into ``folder``."""
    setup_sectors = kernel.read(0x1f1, 1)[0] or 4  # boot protocol: 0 means 4
    (folder / KERNEL).write_bytes(kernel.read(0, (setup_sectors + 2) * 512))
    (folder / INITRAMFS).write_bytes(bytes(512))
