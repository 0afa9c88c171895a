"""An uncompressed erofs image of a host folder, written at the speed of ``cp -a``: the job's inputs' disk.

mksquashfs and mkfs.erofs read each file into their own buffers and write it out again, and take 1.3-2 times
as long as ``cp -a``; here each file's bytes go into the image with ``copy_file_range`` (inside the kernel, as
``cp`` copies them), and the little metadata erofs needs is packed in Python. Nothing is mounted on the host.

The layout (the kernel's fs/erofs/erofs_fs.h, format as in Linux 5.4 and later, no optional feature): 4 KiB
blocks; the superblock at byte 1024; then every inode, 64 bytes each (extended inodes: 32-bit ids,
nanosecond mtimes), from byte INODES_AT; then each inode's data in whole blocks, stored plainly
(``EROFS_INODE_FLAT_PLAIN``): a file's bytes, a symbolic link's target, a folder's entries. A folder's
entries are sorted by name across its blocks (the kernel searches them by halves), each block holding
12-byte entries (nid, name offset, type) and then their names. An inode's nid is its byte offset / 32.
Hard links within the folder stay one inode. tests/guest/test_erofs.py checks images with fsck.erofs.
"""

from __future__ import annotations

import errno
import os
import stat
import struct
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

COPY_CHUNK = 1 << 20  # a copy by hand, where copy_file_range cannot
BLOCK = 4096
SUPER_AT = 1024
MAGIC = 0xE0F5E1E2
INODES_AT = 1152  # after the 128-byte superblock, 64-byte aligned: the root's nid is 36, as mkfs.erofs has it
INODE = struct.Struct("<HHHHQIIIIQII16x")  # erofs_inode_extended
EXTENDED_PLAIN = 1  # i_format: extended inode (bit 0), data layout FLAT_PLAIN (bits 1-3 zero)
DIRENT = struct.Struct("<QHBx")  # erofs_dirent: nid, nameoff, file_type
SUPER = struct.Struct("<IIIBBHQQIIII16s16sIHHH")  # erofs_super_block up to devt_slotoff; the rest is zeros
FILE_TYPES = {stat.S_IFREG: 1, stat.S_IFDIR: 2, stat.S_IFCHR: 3, stat.S_IFBLK: 4, stat.S_IFIFO: 5,
              stat.S_IFSOCK: 6, stat.S_IFLNK: 7}


@dataclass
class _Inode:
    path: bytes
    info: os.stat_result
    nid: int
    parent: "_Inode | None" = None  # a folder's parent folder (the root: None, its own parent)
    entries: list[tuple[bytes, "_Inode"]] = field(default_factory=list)  # a folder's, without . and ..
    links: int = 1
    data: bytes = b""  # a folder's entry blocks or a link's target; a file's bytes are copied from ``path``
    block: int = 0

    @property
    def size(self) -> int:
        return self.info.st_size if stat.S_ISREG(self.info.st_mode) else len(self.data)


def write_erofs(source: Path, image: Path, *, owner: int | None = None) -> None:
    """The folder ``source`` as a new erofs image file ``image``. ``owner``: every inode's uid and gid, else
    each file's own. Raises OSError as reading or writing does (a file unreadable, the disk full)."""
    inodes = _walk(os.fsencode(source))
    for inode in inodes:
        if stat.S_ISDIR(inode.info.st_mode):
            inode.data = _folder_blocks(inode)
        elif stat.S_ISLNK(inode.info.st_mode):
            inode.data = os.readlink(inode.path)
    next_block = -(-(INODES_AT + len(inodes) * INODE.size) // BLOCK)
    for inode in inodes:
        inode.block, next_block = next_block, next_block + -(-inode.size // BLOCK)
    fd = os.open(image, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
    try:
        os.ftruncate(fd, next_block * BLOCK)
        os.pwrite(fd, _superblock(len(inodes), next_block), SUPER_AT)
        os.pwrite(fd, b"".join(_inode(inode, owner) for inode in inodes), INODES_AT)
        for inode in inodes:
            if stat.S_ISREG(inode.info.st_mode):
                _copy_file(inode, fd)
            elif inode.data:
                os.pwrite(fd, inode.data, inode.block * BLOCK)
    finally:
        os.close(fd)


def _walk(root: bytes) -> list[_Inode]:
    """Every inode under ``root`` (``root`` first), each folder's entries with their inodes."""
    inodes = [_Inode(root, os.lstat(root), _nid(0))]
    hard_links: dict[tuple[int, int], _Inode] = {}
    pending = [inodes[0]]
    while pending:
        folder = pending.pop()
        with os.scandir(folder.path) as listing:
            for entry in listing:
                info = entry.stat(follow_symlinks=False)
                key = (info.st_dev, info.st_ino)
                if not stat.S_ISDIR(info.st_mode) and info.st_nlink > 1 and key in hard_links:
                    inode = hard_links[key]
                    inode.links += 1
                else:
                    inode = _Inode(os.fsencode(entry.path), info, _nid(len(inodes)), folder)
                    inodes.append(inode)
                    if stat.S_ISDIR(info.st_mode):
                        pending.append(inode)
                    elif info.st_nlink > 1:
                        hard_links[key] = inode
                folder.entries.append((os.fsencode(entry.name), inode))
    return inodes


def _nid(index: int) -> int:
    return (INODES_AT + index * INODE.size) // 32


def _folder_blocks(folder: _Inode) -> bytes:
    """A folder's entries with . and .., sorted by name and packed into blocks; the last block is cut after
    its last name (the folder's size ends there, as mkfs.erofs writes it)."""
    entries = sorted([(b".", folder), (b"..", folder.parent or folder), *folder.entries], key=lambda e: e[0])
    blocks, block = [], []
    for entry in entries:
        if block and (len(block) + 1) * DIRENT.size + sum(len(name) for name, _ in block) + len(entry[0]) > BLOCK:
            blocks.append(_dirent_block(block).ljust(BLOCK, b"\0"))
            block = []
        block.append(entry)
    blocks.append(_dirent_block(block))
    return b"".join(blocks)


def _dirent_block(entries: list[tuple[bytes, _Inode]]) -> bytes:
    heads, names, offset = [], [], len(entries) * DIRENT.size
    for name, inode in entries:
        heads.append(DIRENT.pack(inode.nid, offset, FILE_TYPES.get(stat.S_IFMT(inode.info.st_mode), 0)))
        names.append(name)
        offset += len(name)
    return b"".join(heads) + b"".join(names)


def _inode(inode: _Inode, owner: int | None) -> bytes:
    info = inode.info
    kind = stat.S_IFMT(info.st_mode)
    links = 2 + sum(stat.S_ISDIR(child.info.st_mode) for _, child in inode.entries) if kind == stat.S_IFDIR \
        else inode.links
    if kind in (stat.S_IFCHR, stat.S_IFBLK):
        major, minor = os.major(info.st_rdev), os.minor(info.st_rdev)
        address = (minor & 0xFF) | (major << 8) | ((minor & ~0xFF) << 12)  # the kernel's new_encode_dev
    elif kind in (stat.S_IFREG, stat.S_IFDIR, stat.S_IFLNK):
        address = inode.block
    else:
        address = 0
    uid, gid = (owner, owner) if owner is not None else (info.st_uid, info.st_gid)
    return INODE.pack(EXTENDED_PLAIN, 0, info.st_mode & 0xFFFF, 0, inode.size, address, inode.nid, uid, gid,
                      info.st_mtime_ns // 10 ** 9, info.st_mtime_ns % 10 ** 9, links)


def _superblock(count: int, blocks: int) -> bytes:
    now = time.time_ns()
    return SUPER.pack(MAGIC, 0, 0, BLOCK.bit_length() - 1, 0, _nid(0), count, now // 10 ** 9, now % 10 ** 9,
                      blocks, 0, 0, uuid.uuid4().bytes, b"vjobs-inputs", 0, 0, 0, 0).ljust(128, b"\0")


def _copy_by_hand(source: int, image: int, offset: int, count: int, at: int) -> int:
    """Up to ``count`` bytes of ``source`` from ``offset`` into ``image`` at ``at``; how many were copied."""
    data = os.pread(source, count, offset)
    written = 0
    while written < len(data):
        written += os.pwrite(image, data[written:], at + written)
    return len(data)


def _copy_file(inode: _Inode, image: int) -> None:
    """The file's bytes into its blocks, inside the kernel. A file that changed size since the walk is an
    error: the image would say otherwise."""
    fd = os.open(inode.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        done, size = 0, inode.size
        while done < size:
            try:
                copied = os.copy_file_range(fd, image, size - done, done, inode.block * BLOCK + done)
            except OSError as error:  # across file systems on an older kernel, or one that cannot: by hand
                if error.errno not in (errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
                    raise
                copied = _copy_by_hand(fd, image, done, min(size - done, COPY_CHUNK), inode.block * BLOCK + done)
            if copied == 0:
                raise OSError(f"{os.fsdecode(inode.path)} shrank while its image was written")
            done += copied
    finally:
        os.close(fd)
