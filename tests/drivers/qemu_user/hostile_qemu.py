#!/usr/bin/python3 -I
"""A QEMU that a guest has taken over, as far as the host can tell: started exactly as vjobs starts a template
restore (same user, namespaces, limits and descriptors), it tries to change everything it holds, by every way
a process has, says what worked on its last line of stderr as JSON, and exits. Any other start (the template's
own boot, a cold boot) is the real QEMU. Used by tests/drivers/qemu_user/test_shared_ram.py."""

import ctypes
import errno
import json
import mmap
import os
import sys

REAL = "/usr/bin/qemu-system-x86_64"
FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE = 1, 2
libc = ctypes.CDLL(None, use_errno=True)


def write(fd):
    os.write(fd, b"X" * 4096)


def pwrite(fd):
    os.pwrite(fd, b"X" * 4096, 0)


def truncate(fd):
    os.ftruncate(fd, 0)


def punch(fd):
    if libc.fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, ctypes.c_long(0), ctypes.c_long(4096)):
        raise OSError(ctypes.get_errno(), "fallocate")


def shared_map(fd):
    with mmap.mmap(fd, 4096, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE) as mapped:
        mapped[:4] = b"XXXX"


def reopen(fd):
    again = os.open(f"/proc/self/fd/{fd}", os.O_RDWR)
    try:
        os.pwrite(again, b"X" * 4096, 0)
    finally:
        os.close(again)


def chmod_then_reopen(fd):
    os.fchmod(fd, 0o666)
    reopen(fd)


def main():
    if "-incoming" not in sys.argv:
        os.execv(REAL, [REAL, *sys.argv[1:]])
    held = {}
    for name in os.listdir("/proc/self/fd"):
        try:
            held[int(name)] = os.readlink(f"/proc/self/fd/{name}")
        except OSError:
            pass  # the listing's own descriptor, closed already
    changed, tried = set(), 0
    for fd, target in held.items():
        for attempt in (write, pwrite, truncate, punch, shared_map, reopen, chmod_then_reopen):
            tried += 1
            try:
                attempt(fd)
            except (OSError, ValueError):
                continue
            changed.add(f"{attempt.__name__}:{target}")
    files = [target for target in held.values() if target.startswith("/")]  # not its sockets and pipes
    changed = sorted({os.path.basename(change) for change in changed if ":/" in change})
    sys.stderr.write("\n" + json.dumps({"files": len(files), "ram": any("vjobs-template-ram" in f for f in files),
                                        "tried": tried, "changed": changed}) + "\n")
    sys.exit(errno.EPERM)


main()
