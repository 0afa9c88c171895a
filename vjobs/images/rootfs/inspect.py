"""Recognise a root file system image from its own bytes, on the host, before any hypervisor sees it.

An admin's image is a file vjobs did not write, so it is read as hostile input:
- only fixed, bounded ranges are read (superblocks, partition tables): no parser loops over the image;
- the file is read only through its checked descriptor (vjobs/images/checked.py), and refused at once when
  it is larger than the site's ``[inspection] max_file_gib``;
- a qcow2 file is read only by ``qemu-img``, with its format named and its backing disabled, under the
  site's limits and as an unprivileged user (qemu_img.py), and refused when it would make QEMU open any
  other file (a backing file, an external data file) or needs a key (encryption): docs/base-images.md says
  why;
- the result names the file system the guest will mount and where it starts, so the guest never guesses.

Accepted: squashfs, erofs and ext4 (clean) as a whole disk, or in a partition of a GPT or MBR disk, either
as a raw file or inside a qcow2.
"""

from __future__ import annotations

import struct
from dataclasses import asdict, dataclass

from vjobs.config.site import InspectionLimits
from vjobs.errors import ImageError
from vjobs.images.checked import CheckedFile
from vjobs.images.rootfs import qemu_img

HEAD_BYTES = 65536  # the guest agent recognises its disks by the sha256 of this many leading bytes
SECTOR = 512
MAX_GPT_ENTRIES = 128
GIB = 1 << 30

# What the guest kernel (Debian's 6.1 cloud kernel) can read: its squashfs has no LZMA (the old format 2,
# not xz), its erofs only LZ4.
SQUASHFS_COMPRESSION = {1: "gzip", 2: "lzma", 3: "lzo", 4: "xz", 5: "lz4", 6: "zstd"}
SQUASHFS_GUEST_CAN_READ = {"gzip", "lzo", "xz", "lz4", "zstd"}
EROFS_COMPRESSION_BITS = {0: "lz4", 1: "lzma", 2: "deflate", 3: "zstd"}
EROFS_GUEST_CAN_READ = {"lz4"}
EXT4_INCOMPAT_RECOVER, EXT4_INCOMPAT_JOURNAL_DEV = 0x4, 0x8
GPT_LINUX_ROOT_X86_64 = bytes.fromhex("e3bc684fcde8b14d96e7fbcaf984b709")  # 4F68BCE3-E8CD-4DB1-96E7-FBCAF984B709
MBR_EXTENDED_TYPES = {0x05, 0x0F, 0x85}


@dataclass(frozen=True)
class RootfsInfo:
    """What vjobs knows about a root file system image after inspecting it."""

    container: str  # how the hypervisor must open the file: "raw" or "qcow2"
    filesystem: str  # what the guest mounts: "squashfs", "erofs" or "ext4"
    partition: int | None  # the partition number holding it, None for a whole-disk file system
    compression: str | None
    virtual_size: int  # bytes the guest sees
    guest_head_sha256: str  # sha256 of the first HEAD_BYTES the guest sees on the device

    def describe(self) -> str:
        where = f"partition {self.partition} of a disk" if self.partition else "a whole disk"
        packed = f", {self.compression}" if self.compression else ""
        return f"{self.filesystem}{packed} on {where}, in a {self.container} file"

    def to_json(self) -> dict:
        return asdict(self)


def inspect_rootfs(file: CheckedFile, limits: InspectionLimits) -> RootfsInfo:
    """Check ``file`` and say what it holds; raise ImageError naming its label and what to do otherwise.
    ``limits``: the site's ``[inspection]`` (the file's size; the time and memory of a qcow2's qemu-img calls)."""
    label, path = file.label, file.path
    if file.size > limits.max_file_bytes:
        raise ImageError(f"{label}: {path} is {file.size / GIB:.1f} GiB, more than the {limits.max_file_gib:g} GiB "
                         "the site allows an image file ([inspection] max_file_gib); give a smaller image (a "
                         "squashfs of the root file system) or raise the setting")
    if file.size < 2 * SECTOR:
        raise ImageError(f"{label}: {path} is {file.size} bytes, too small to hold a file system")
    try:
        if file.read(0, 4) == b"QFI\xfb":
            budget = qemu_img.Budget(limits)
            return _inspect_disk(_Qcow2Source(file, _qcow2_info(file, budget), budget), label)
        return _inspect_disk(_RawSource(file), label)
    except struct.error as exc:  # a header whose magic is there and whose fields are not: the file ends first
        raise ImageError(f"{label}: {path} ends ({file.size} bytes) inside the header its first bytes "
                         "announce: it is truncated, or not an image; rebuild it") from exc


# --- the bytes the guest will see ------------------------------------------------------------------------

class _RawSource:
    container = "raw"

    def __init__(self, file: CheckedFile):
        self.file, self.path, self.size = file, file.path, file.size

    def read(self, offset: int, length: int) -> bytes:
        return self.file.read(offset, length)


class _Qcow2Source:
    """The guest's view of a qcow2 file, read through ``qemu-img dd`` (qemu_img.py)."""

    container = "qcow2"

    def __init__(self, file: CheckedFile, info: dict, budget: qemu_img.Budget):
        self.file, self.path, self.budget = file, file.path, budget
        self.size = int(info["virtual-size"])

    def read(self, offset: int, length: int) -> bytes:
        first = offset // SECTOR
        data = qemu_img.read_sectors(self.file, first, (offset + length + SECTOR - 1) // SECTOR, self.budget)
        start = offset - first * SECTOR
        return data[start:start + length]


def _qcow2_info(file: CheckedFile, budget: qemu_img.Budget) -> dict:
    label, path = file.label, file.path
    info = qemu_img.info(file, budget)
    convert = (f"convert it once to a self-contained raw file: qemu-img convert -f qcow2 -O raw {path} "
               f"{path.with_suffix('.raw')} (or give a squashfs of its root file system)")
    if info.get("backing-filename") or info.get("full-backing-filename"):
        raise ImageError(f"{label}: {path} is a qcow2 with a backing file ({info.get('backing-filename')}): "
                         f"a guest could make QEMU read other host files through it; {convert}")
    specific = info.get("format-specific", {}).get("data", {})
    if specific.get("data-file"):
        raise ImageError(f"{label}: {path} is a qcow2 with an external data file ({specific['data-file']}): "
                         f"QEMU would open and could write that file; {convert}")
    if info.get("encrypted") or specific.get("encrypt"):
        raise ImageError(f"{label}: {path} is an encrypted qcow2; vjobs has no key to give QEMU; {convert}")
    if specific.get("corrupt"):
        raise ImageError(f"{label}: {path} is a qcow2 marked corrupt; repair it with qemu-img check -r all "
                         "or rebuild it")
    return info


# --- file systems and partition tables --------------------------------------------------------------------

def _inspect_disk(source, label: str) -> RootfsInfo:
    head = source.read(0, HEAD_BYTES)
    guest_head = _sha256(head)
    found = _filesystem_at(source, 0, label)
    partition = None
    if found is None:
        partition, found = _partitioned(source, head, label)
    if found is None:
        raise ImageError(f"{label}: {source.path} holds no file system vjobs recognises (first bytes "
                         f"{head[:8].hex()}); give a squashfs, erofs or ext4 image, a GPT/MBR disk with one "
                         "of them in a partition, or a qcow2 of such a disk")
    filesystem, compression = found
    return RootfsInfo(source.container, filesystem, partition, compression, source.size, guest_head)


def _filesystem_at(source, offset: int, label: str) -> tuple[str, str | None] | None:
    block = source.read(offset, 2048)
    if block[:4] == b"hsqs":
        return "squashfs", _squashfs_compression(block, source, label)
    if len(block) >= 1028 and struct.unpack_from("<I", block, 1024)[0] == 0xE0F5E1E2:
        return "erofs", _erofs_compression(block, source, label)
    if len(block) >= 1024 + 0x64 and struct.unpack_from("<H", block, 1024 + 0x38)[0] == 0xEF53:
        _check_ext4_clean(block, source, label)
        return "ext4", None
    return None


def _squashfs_compression(block: bytes, source, label: str) -> str:
    compression = SQUASHFS_COMPRESSION.get(struct.unpack_from("<H", block, 20)[0], "unknown")
    if compression not in SQUASHFS_GUEST_CAN_READ:
        raise ImageError(f"{label}: {source.path} is a squashfs compressed with {compression}, which the guest "
                         "kernel cannot read; rebuild it with mksquashfs -comp lz4 (or zstd, xz, gzip)")
    return compression


def _erofs_compression(block: bytes, source, label: str) -> str | None:
    incompat = struct.unpack_from("<I", block, 1024 + 0x50)[0]
    if not incompat & 0x2:  # no COMPR_CFGS: uncompressed, or LZ4 only
        return "lz4" if incompat & 0x1 else None
    algorithms = struct.unpack_from("<H", block, 1024 + 0x54)[0]
    names = [name for bit, name in EROFS_COMPRESSION_BITS.items() if algorithms & (1 << bit)]
    unreadable = [name for name in names if name not in EROFS_GUEST_CAN_READ]
    if unreadable or algorithms >> 4:
        raise ImageError(f"{label}: {source.path} is an erofs compressed with {', '.join(unreadable or ['?'])}, "
                         "which the guest kernel cannot read; rebuild it with mkfs.erofs -zlz4")
    return ",".join(names) or None


def _check_ext4_clean(block: bytes, source, label: str) -> None:
    state = struct.unpack_from("<H", block, 1024 + 0x3A)[0]
    incompat = struct.unpack_from("<I", block, 1024 + 0x60)[0]
    if incompat & EXT4_INCOMPAT_JOURNAL_DEV:
        raise ImageError(f"{label}: {source.path} is an ext4 external journal, not a file system")
    if not state & 0x1 or state & 0x2 or incompat & EXT4_INCOMPAT_RECOVER:
        why = "its journal needs recovery" if incompat & EXT4_INCOMPAT_RECOVER else \
            ("it has recorded errors" if state & 0x2 else "it was not cleanly unmounted")
        raise ImageError(f"{label}: {source.path} is a dirty ext4 ({why}): a read-only mount would refuse it "
                         "or see it inconsistent; run e2fsck -f on it (unmounted) and register it again")


def _partitioned(source, head: bytes, label: str) -> tuple[int | None, tuple[str, str | None] | None]:
    if len(head) < SECTOR or head[510:512] != b"\x55\xaa":
        return None, None
    if head[SECTOR:SECTOR + 8] == b"EFI PART":
        partitions = _gpt_partitions(source, head, label)
    else:
        partitions = _mbr_partitions(head)
    fallback = (None, None)
    for number, start, preferred in partitions:
        if start <= 0 or start * SECTOR >= source.size:
            continue
        found = _filesystem_at(source, start * SECTOR, label)
        if found and preferred:
            return number, found
        if found and fallback[1] is None:
            fallback = (number, found)
    return fallback


def _gpt_partitions(source, head: bytes, label: str) -> list[tuple[int, int, bool]]:
    entries_lba, count, size = struct.unpack_from("<QII", head, SECTOR + 72)
    if not (128 <= size <= 1024 and 0 < count and entries_lba > 0):
        raise ImageError(f"{label}: {source.path} has a GPT header vjobs cannot read (entry size {size}, "
                         f"{count} entries)")
    count = min(count, MAX_GPT_ENTRIES)
    table = source.read(entries_lba * SECTOR, count * size)
    partitions = []
    for index in range(len(table) // size):
        entry = table[index * size:(index + 1) * size]
        if entry[:16] == bytes(16):
            continue
        first_lba = struct.unpack_from("<Q", entry, 32)[0]
        partitions.append((index + 1, first_lba, entry[:16] == GPT_LINUX_ROOT_X86_64))
    return partitions


def _mbr_partitions(head: bytes) -> list[tuple[int, int, bool]]:
    partitions = []
    for index in range(4):
        entry = head[446 + 16 * index: 446 + 16 * (index + 1)]
        kind, start = entry[4], struct.unpack_from("<I", entry, 8)[0]
        if kind and kind not in MBR_EXTENDED_TYPES:
            partitions.append((index + 1, start, False))
    return partitions


def _sha256(data: bytes) -> str:
    import hashlib

    return hashlib.sha256(data).hexdigest()
