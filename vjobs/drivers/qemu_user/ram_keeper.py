"""The keeper of a template's RAM: one sealed memfd, handed to every job's QEMU that starts from the template.

Run as a script by vjobs/drivers/qemu_user/shared_ram.py (stdlib only, so that it starts in a few tens of
milliseconds and holds little memory of its own):

    python -I ram_keeper.py RAM_FILE RAM_SUM SOCKET IDLE_S

It copies ``RAM_FILE`` into a memfd page by page (holes stay holes: a hole costs no memory), checks the copy
against ``RAM_SUM`` (``copy_pages``' sum, which the template's manifest keeps), seals it against every change,
and serves it on the unix socket ``SOCKET``: each connection gets the memfd's descriptor, its size and its sum. It says
``ready`` (or ``error: WHY``) on stdout once, then closes stdout. It exits after ``IDLE_S`` seconds without a
request, or as soon as ``SOCKET`` or ``RAM_FILE`` is removed or replaced (a test's cache deleted, a template made
anew); guests that map the memfd keep it whatever the keeper does.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import os
import socket
import sys
import time

PAGE = 4096
CHUNK = 1 << 20  # read at a time; a multiple of PAGE
SEALS = fcntl.F_SEAL_SEAL | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE
CHECK_S = 1.0  # how often an idle keeper looks whether its socket and RAM file are still there
GREETING = b"vjobs-ram"


def copy_pages(source: int, size: int, target: int) -> str:
    """Copy the first ``size`` bytes of the open file ``source`` into ``target`` (already that size), leaving
    every page of zeros a hole, and return their sum: the sha256 of the size, then of each non-zero page's
    number and bytes. A guest's RAM is mostly zero pages (the agent zeroes free memory before a template is
    saved), so both the copy and the sum cost what the guest uses, not its size."""
    digest = hashlib.sha256(b"%d\n" % size)
    zeros = bytes(PAGE)
    for start, end in _data(source, size):
        offset = start - start % PAGE
        while offset < end:
            chunk = os.pread(source, min(CHUNK, end - offset), offset)
            if not chunk:
                break
            view = memoryview(chunk)
            for at in range(0, len(chunk), PAGE):
                page = view[at:at + PAGE]
                if page == zeros[:len(page)]:
                    continue
                digest.update(b"%d\n" % ((offset + at) // PAGE))
                digest.update(page)
                os.pwrite(target, page, offset + at)
            offset += len(chunk)
    return digest.hexdigest()


def _data(fd: int, size: int):
    """(start, end) of each stretch of ``fd`` that may hold data (SEEK_DATA), the whole file where the file
    system cannot say."""
    position = 0
    while position < size:
        try:
            start = os.lseek(fd, position, os.SEEK_DATA)
        except OSError as error:
            if error.errno == errno.ENXIO:
                return
            if error.errno == errno.EINVAL:  # no SEEK_DATA here: read it all
                yield position, size
                return
            raise
        end = min(os.lseek(fd, start, os.SEEK_HOLE), size)
        yield start, end
        position = end


def sealed_copy(ram_file: str, expected_sum: str) -> tuple[int, int]:
    """A sealed memfd holding ``ram_file``, checked against ``expected_sum``; (descriptor, size)."""
    source = os.open(ram_file, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    try:
        size = os.fstat(source).st_size
        memfd = os.memfd_create("vjobs-template-ram", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        os.ftruncate(memfd, size)
        found = copy_pages(source, size, memfd)
    finally:
        os.close(source)
    if found != expected_sum:
        os.close(memfd)
        raise ValueError(f"{ram_file} is not the RAM its template saved (sum {found[:16]}…, expected "
                         f"{expected_sum[:16]}…)")
    seal(memfd)
    return memfd, size


def seal(fd: int, attempts: int = 50) -> None:
    """Seal a memfd against any change. The kernel refuses F_SEAL_WRITE with EBUSY while a page just written
    still has a transient extra reference (seen under load here); that passes within milliseconds."""
    for attempt in range(attempts):
        try:
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, SEALS)
            return
        except OSError as error:
            if error.errno != errno.EBUSY or attempt == attempts - 1:
                raise
            time.sleep(0.02)


def socket_address(folder_fd: int, name: str) -> str:
    """A unix socket's address by its folder's descriptor: a cache folder's path can be longer than the 107
    bytes an address may have."""
    return f"/proc/self/fd/{folder_fd}/{name}"


def serve(ram_file: str, expected_sum: str, socket_path: str, idle_s: float) -> int:
    try:
        memfd, size = sealed_copy(ram_file, expected_sum)
        folder = os.open(os.path.dirname(socket_path), os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        name = os.path.basename(socket_path)
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        partial = f"{name}.{os.getpid()}.partial"
        listener.bind(socket_address(folder, partial))
        listener.listen(64)
        os.rename(partial, name, src_dir_fd=folder, dst_dir_fd=folder)  # complete, or not there at all
        mine = os.stat(name, dir_fd=folder).st_ino
        ram_inode = os.stat(ram_file).st_ino
    except (OSError, ValueError) as error:
        _say(f"error: {error}")
        return 1
    _say("ready")
    listener.settimeout(CHECK_S)
    last_request = time.monotonic()
    while time.monotonic() - last_request < idle_s and _still(folder, name, mine, ram_file, ram_inode):
        try:
            connection, _ = listener.accept()
        except socket.timeout:
            continue
        with connection:
            last_request = time.monotonic()
            try:
                socket.send_fds(connection, [b"%s %d %s\n" % (GREETING, size, expected_sum.encode())], [memfd])
            except OSError:
                pass  # the job gave up waiting: its next try, or the next job, asks again
    if _still(folder, name, mine, ram_file, ram_inode):
        os.unlink(name, dir_fd=folder)
    return 0


def _still(folder: int, name: str, mine: int, ram_file: str, ram_inode: int) -> bool:
    """Whether the socket is still this keeper's and the RAM file still the one it loaded."""
    try:
        return os.stat(name, dir_fd=folder).st_ino == mine and os.stat(ram_file).st_ino == ram_inode
    except OSError:
        return False


def _say(line: str) -> None:
    try:
        os.write(1, line.encode(errors="replace") + b"\n")
    finally:
        os.close(1)
        os.open(os.devnull, os.O_WRONLY)  # descriptor 1 stays taken: nothing else lands on it


if __name__ == "__main__":
    sys.exit(serve(sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4])))
