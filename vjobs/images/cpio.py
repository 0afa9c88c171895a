"""A reproducible writer of the "newc" cpio format, the one the Linux kernel unpacks as an initramfs.

Pure Python, so building the guest image needs neither root nor the cpio tool, and the same inputs always
give the same bytes (owner root, mtime 0, inode numbers in the order entries are added)."""

from __future__ import annotations

import stat
from typing import BinaryIO

_MAGIC = b"070701"
_TRAILER = "TRAILER!!!"


class CpioWriter:
    """Writes entries to ``handle`` in the order they are added; parent folders must be added first (the
    kernel does not create them). ``close()`` writes the trailer; the handle stays open."""

    def __init__(self, handle: BinaryIO):
        self.handle = handle
        self.next_inode = 1
        self.closed = False

    def add_dir(self, name: str, mode: int = 0o755) -> None:
        self._entry(name, stat.S_IFDIR | mode, b"", nlink=2)

    def add_file(self, name: str, data: bytes, mode: int = 0o644) -> None:
        self._entry(name, stat.S_IFREG | mode, data)

    def add_symlink(self, name: str, target: str) -> None:
        self._entry(name, stat.S_IFLNK | 0o777, target.encode())

    def add_char_device(self, name: str, major: int, minor: int, mode: int = 0o600) -> None:
        self._entry(name, stat.S_IFCHR | mode, b"", rdev=(major, minor))

    def close(self) -> None:
        if not self.closed:
            self._entry(_TRAILER, 0, b"", inode=0, nlink=1)
            self.closed = True

    def _entry(self, name: str, mode: int, data: bytes, *, nlink: int = 1, rdev: tuple[int, int] = (0, 0),
               inode: int | None = None) -> None:
        if self.closed:
            raise ValueError("cpio archive already closed")
        name = name.strip("/")
        if not name or ".." in name.split("/"):
            raise ValueError(f"unsafe cpio entry name {name!r}")
        if inode is None:
            inode, self.next_inode = self.next_inode, self.next_inode + 1
        encoded = name.encode() + b"\0"
        fields = (inode, mode, 0, 0, nlink, 0, len(data), 0, 0, rdev[0], rdev[1], len(encoded), 0)
        header = _MAGIC + b"".join(b"%08X" % value for value in fields)
        self._write(header + encoded)
        self._write(data)

    def _write(self, chunk: bytes) -> None:
        self.handle.write(chunk)
        self.handle.write(b"\0" * (-len(chunk) % 4 if chunk else 0))
