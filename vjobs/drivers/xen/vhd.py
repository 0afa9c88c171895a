"""A raw disk image as a dynamic VHD stream, for XAPI's ``/import_raw_vdi?format=vhd``: the 2 MiB blocks
that hold only zeros are left out, so a mostly empty scratch or results disk costs a few KiB on the wire
instead of its full size. Layout and checksums as in Microsoft's "Virtual Hard Disk Image Format
Specification" (footer copy, dynamic header, block allocation table, blocks with their sector bitmaps,
footer). The disk is read through its open file (vjobs/images/checked.py), never by path."""

from __future__ import annotations

import struct
import time
import uuid
from dataclasses import dataclass
from typing import Iterator

from vjobs.drivers.contract import CheckedFile

SECTOR = 512
BLOCK = 2 << 20  # the usual VHD block size; the BAT has one entry per block
BITMAP = SECTOR  # a 2 MiB block has 4096 sectors: one bit each, 512 bytes
UNUSED = 0xFFFFFFFF
VHD_EPOCH = 946684800  # 2000-01-01T00:00:00Z, where VHD timestamps count from


@dataclass(frozen=True)
class VhdPlan:
    """What the stream will hold: its total length (the HTTP Content-Length) and the blocks it carries."""

    source: CheckedFile
    size: int
    present: tuple[int, ...]  # indexes of the blocks that hold data

    @property
    def blocks(self) -> int:
        return -(-self.size // BLOCK)

    @property
    def bat_bytes(self) -> int:
        return -(-self.blocks * 4 // SECTOR) * SECTOR

    @property
    def data_start(self) -> int:
        return SECTOR + 1024 + self.bat_bytes

    @property
    def length(self) -> int:
        return self.data_start + len(self.present) * (BITMAP + BLOCK) + SECTOR


def plan(source: CheckedFile) -> VhdPlan:
    size = source.size
    if size % SECTOR:
        raise ValueError(f"{source.path} is {size} bytes, not a whole number of {SECTOR}-byte sectors")
    present = []
    zero = bytes(BLOCK)
    for index in range(-(-size // BLOCK)):
        block = source.read(index * BLOCK, BLOCK)
        if block != zero[:len(block)]:
            present.append(index)
    return VhdPlan(source, size, tuple(present))


def stream(vhd: VhdPlan) -> Iterator[bytes]:
    footer = _footer(vhd.size)
    yield footer
    yield _dynamic_header(vhd.blocks)
    yield _bat(vhd)
    for index in vhd.present:
        data = vhd.source.read(index * BLOCK, BLOCK)
        yield b"\xff" * BITMAP  # every sector of a present block is in this file
        yield data + bytes(BLOCK - len(data))  # a last, partial block is padded to the block size
    yield footer


def _bat(vhd: VhdPlan) -> bytes:
    entries = [UNUSED] * vhd.blocks
    for position, index in enumerate(vhd.present):
        entries[index] = (vhd.data_start + position * (BITMAP + BLOCK)) // SECTOR
    table = struct.pack(f">{vhd.blocks}I", *entries)
    return table + b"\xff" * (vhd.bat_bytes - len(table))


def _footer(size: int) -> bytes:
    cylinders, heads, sectors = _geometry(size)
    fields = struct.pack(">8sIIQI4sI4sQQHBBII16sB", b"conectix", 2, 0x00010000, SECTOR,
                         int(time.time()) - VHD_EPOCH, b"vjob", 0x00010000, b"Wi2k", size, size,
                         cylinders, heads, sectors, 3, 0, uuid.uuid4().bytes, 0)
    return _with_checksum(fields + bytes(SECTOR - len(fields)), offset=64)


def _dynamic_header(blocks: int) -> bytes:
    fields = struct.pack(">8sQQIIII", b"cxsparse", 0xFFFFFFFFFFFFFFFF, SECTOR + 1024, 0x00010000, blocks, BLOCK, 0)
    return _with_checksum(fields + bytes(1024 - len(fields)), offset=36)


def _with_checksum(data: bytes, offset: int) -> bytes:
    checksum = ~sum(data) & 0xFFFFFFFF  # the checksum field itself is still zero here
    return data[:offset] + struct.pack(">I", checksum) + data[offset + 4:]


def _geometry(size: int) -> tuple[int, int, int]:
    """Cylinders, heads, sectors per track, by the specification's algorithm."""
    total = min(size // SECTOR, 65535 * 16 * 255)
    if total >= 65535 * 16 * 63:
        per_track, heads = 255, 16
        cylinder_heads = total // per_track
    else:
        per_track = 17
        cylinder_heads = total // per_track
        heads = max((cylinder_heads + 1023) // 1024, 4)
        if cylinder_heads >= heads * 1024 or heads > 16:
            per_track, heads = 31, 16
            cylinder_heads = total // per_track
        if cylinder_heads >= heads * 1024:
            per_track, heads = 63, 16
            cylinder_heads = total // per_track
    return cylinder_heads // heads, heads, per_track
