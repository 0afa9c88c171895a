"""A job's writable disk into a checkpoint and back: copied and summed in one pass, holes kept.

A scratch disk is mostly holes (an 8 GiB disk of which the payload wrote 200 MiB); copying or hashing its
zeros would cost seconds per checkpoint, inside the batch system's grace period. So only the file's data
extents (``SEEK_DATA``) are read, in blocks of ``BLOCK`` bytes; a block of zeros is left a hole in the copy
and out of the sum. The sum (``block_sha256``) is therefore the same for a disk and its copy however the
file system keeps their holes: the sha256 of the file's size, then of each non-zero block's number and
bytes, in order.
"""

from __future__ import annotations

import errno
import hashlib
import os
import time
from pathlib import Path

BLOCK = 1 << 20
_ZEROS = bytes(BLOCK)


def copy_summed(source: int, target: Path, deadline: float | None = None) -> str:
    """Copy the open file ``source`` into the new file ``target`` (this user's, 0600), holes kept; return its
    ``block_sha256``. Raises ``TimeoutError`` when ``time.monotonic()`` passes ``deadline``."""
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)

    def write(offset: int, block: bytes) -> None:
        if deadline is not None and time.monotonic() > deadline:
            raise TimeoutError(f"copying {target.name} took longer than allowed")
        os.pwrite(fd, block, offset)

    try:
        size = os.fstat(source).st_size
        os.ftruncate(fd, size)
        return _blocks(source, size, write)
    finally:
        os.close(fd)


def block_sha256(source: int) -> str:
    """The ``block_sha256`` of the open file ``source``."""
    return _blocks(source, os.fstat(source).st_size, lambda offset, block: None)


def _blocks(source: int, size: int, keep) -> str:
    digest = hashlib.sha256(b"%d\n" % size)
    for start, end in _data_extents(source, size):
        first = start - start % BLOCK  # whole blocks, so that the sum does not depend on where extents begin
        for offset in range(first, end, BLOCK):
            block = os.pread(source, min(BLOCK, size - offset), offset)
            if block.count(0) == len(block):  # faster than comparing with _ZEROS for a partial last block
                continue
            digest.update(b"%d\n" % (offset // BLOCK))
            digest.update(block)
            keep(offset, block)
    return digest.hexdigest()


def _data_extents(fd: int, size: int):
    """(start, end) of each stretch of the file that may hold data, a block's worth apart at least."""
    position, last_end = 0, -1
    while position < size:
        try:
            start = os.lseek(fd, position, os.SEEK_DATA)
        except OSError as error:
            if error.errno == errno.ENXIO:  # only a hole from here on
                return
            raise
        end = os.lseek(fd, start, os.SEEK_HOLE)
        if start - start % BLOCK < last_end:  # the same block as the stretch before: do not read it twice
            start = last_end
        if start < end:
            yield start, end
            last_end = end + (-end) % BLOCK
        position = max(end, last_end)
