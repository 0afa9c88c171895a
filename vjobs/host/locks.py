"""Locks between the vjobs processes of one host: ``flock(2)`` on lock files, and nothing else.

Why flock: the kernel releases a process's locks when it ends, however it ends (SIGKILL included), so no
lock ever goes stale and nothing has to clean up after a crash; a lock is held by an open file descriptor,
and closing that descriptor lets go of it. The descriptors are opened close-on-exec, so a child (QEMU)
never keeps a lock after vjobs is gone. Lock files live on local file systems (work_dir, cache_dir).

By path, for lock files vjobs creates where it needs them:

- ``exclusive(path)``: hold the lock file ``path``, waiting for its holder (a build lock, the eviction lock);
- ``try_exclusive(path)``: hold it if nobody does, without waiting; ``create=False`` for a file or folder
  that must already be there (a cache entry being removed);
- ``hold_shared(path)``: a shared hold on an existing file or folder, kept until ``release``: many readers,
  and no ``try_exclusive`` succeeds meanwhile (a cache entry in use by a job).

The path-level functions check, after locking, that the path still names the file they locked: its holder
may unlink a lock file while it holds it (gc, eviction), and a waiter must then lock the new file there, not
the unlinked one.

By descriptor, for callers that open their lock files themselves (the admission folder's tokens, opened
relative to the folder and never through a link): ``lock``, ``try_lock``, ``unlock``, ``release`` and
``names_at``.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import time
from pathlib import Path
from typing import Iterator

RETRY_S = 0.01  # flock has no timeout: how often ``lock(..., until=...)`` tries again


@contextlib.contextmanager
def exclusive(path: Path) -> Iterator[None]:
    """Hold the lock file ``path`` (created, with its folder, if need be) exclusively; waits for the holder."""
    fd = _acquire(Path(path), fcntl.LOCK_EX, create=True)
    try:
        yield
    finally:
        release(fd)


@contextlib.contextmanager
def try_exclusive(path: Path, *, create: bool = True) -> Iterator[bool]:
    """Hold ``path`` exclusively if nobody else holds it, shared or not; yields whether it does. With
    ``create=False`` the file or folder must exist (FileNotFoundError otherwise), is opened read-only, and
    yields False when the path names another file by the time it is locked."""
    fd = _acquire(Path(path), fcntl.LOCK_EX | fcntl.LOCK_NB, create=create)
    try:
        yield fd is not None
    finally:
        release(fd)


def hold_shared(path: Path) -> int | None:
    """A shared lock on the existing file or folder ``path``, waiting only while someone holds it exclusively;
    the descriptor that holds it, to ``release`` later, or None when ``path`` is gone or was replaced
    meanwhile. Raises OSError when it cannot be opened (PermissionError: not ours to lock)."""
    try:
        return _acquire(Path(path), fcntl.LOCK_SH, create=False)
    except FileNotFoundError:
        return None


def release(fd: int | None) -> None:
    """Let go of the lock held by ``fd`` by closing it (None: nothing held)."""
    if fd is not None:
        os.close(fd)


def names(path: Path, fd: int) -> bool:
    """Whether ``path`` still names the file that ``fd`` holds open."""
    try:
        there, held = os.stat(path), os.fstat(fd)
    except OSError:
        return False
    return (there.st_dev, there.st_ino) == (held.st_dev, held.st_ino)


def names_at(folder: int, name: str, fd: int) -> bool:
    """Whether ``name`` in the open folder ``folder`` (not followed if a link) still names the file ``fd``
    holds open."""
    try:
        there, held = os.stat(name, dir_fd=folder, follow_symlinks=False), os.fstat(fd)
    except OSError:
        return False
    return (there.st_dev, there.st_ino) == (held.st_dev, held.st_ino)


def lock(fd: int, *, shared: bool = False, until: float | None = None) -> bool:
    """Lock the open descriptor ``fd``: wait as long as it takes, or until ``time.monotonic()`` reaches
    ``until``; False when that came first."""
    operation = fcntl.LOCK_SH if shared else fcntl.LOCK_EX
    if until is None:
        fcntl.flock(fd, operation)
        return True
    while not try_lock(fd, shared=shared):
        if time.monotonic() >= until:
            return False
        time.sleep(RETRY_S)
    return True


def try_lock(fd: int, *, shared: bool = False) -> bool:
    """Lock the open descriptor ``fd`` if nobody else holds its file in a conflicting way; never waits."""
    try:
        fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def unlock(fd: int) -> None:
    """Let go of the lock on ``fd`` and keep the descriptor open, to lock it again later."""
    fcntl.flock(fd, fcntl.LOCK_UN)


def _acquire(path: Path, operation: int, *, create: bool) -> int | None:
    if create:
        path.parent.mkdir(parents=True, exist_ok=True)
        flags = os.O_RDWR | os.O_CREAT
    else:
        flags = os.O_RDONLY  # a folder (a cache entry) can be opened, and locked, only so
    while True:
        fd = os.open(path, flags | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, operation)
        except BlockingIOError:
            os.close(fd)
            return None
        except BaseException:  # Ctrl-C while waiting, say
            os.close(fd)
            raise
        if names(path, fd):
            return fd
        os.close(fd)
        if not create:
            return None  # removed or replaced while we waited: the caller looks again
        # else unlinked by its holder (gc, eviction) while we waited: lock the file there now
