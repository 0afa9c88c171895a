"""Host folders bound into the guest (a job's ``binds``), on the host side.

- Before anything is read whole, each folder's size is measured with a bound: a walk that stops as soon
  as the folder is over the site's ``limits.bind_mib`` (or has more entries than a job may carry), so a
  bind of a whole ``/cvmfs`` is refused in a moment, naming the size seen and the limit.
- Read-only binds become read-only disks (vjobs/guest/disks.py images them like releases, cached by content).
- Read-write binds are copied onto the scratch disk; after the payload, the agent returns them whole, the
  never-trusting reader (vjobs/guest/collect.py) extracts them (regular files and folders only, size limits),
  and ``merge_back`` copies what is new or changed into the host folder. It opens every folder on the way
  with ``O_NOFOLLOW`` relative to the one above, so a guest-chosen name can never lead a write through a
  link the host folder holds; files are replaced by a rename, never written through, and keep the guest's
  modification time (never later than the host's clock). While the payload runs, sync rounds do the same
  and carry deletions back (vjobs/guest/sync.py).
"""

from __future__ import annotations

import contextlib
import grp
import hashlib
import os
import pwd
import shutil
import stat
import time
from pathlib import Path
from typing import Iterator

from vjobs.config.job import Job
from vjobs.config.site import SiteConfig
from vjobs.errors import LimitExceeded
from vjobs.host.roles import caches

MAX_BIND_ENTRIES = 1_000_000
CHUNK = 1 << 20


def check_folders(job: Job, site: SiteConfig) -> None:
    """Refuse a bind (or the release) that holds vjobs' own folders (its copy would copy itself) or that is
    larger than the site allows, before reading it whole."""
    folders = [(f"/binds/{index}/source", bind.source) for index, bind in enumerate(job.binds)]
    if job.release:
        folders.append(("/release/path", job.release.path))
    elsewhere = f"elsewhere in {site.source}"
    own_cache = caches(site).own  # an account's own when cache_dir is the administrator's (vjobs/host/roles.py)
    vjobs_folders = [("work_dir", site.work_dir, f"set work_dir {elsewhere}"),
                     ("cache_dir", site.cache_dir, f"set cache_dir {elsewhere}"),
                     ("own cache", own_cache, "set XDG_CACHE_HOME, or cache_dir in a site config, elsewhere")]
    for pointer, folder in folders:
        for name, own, advice in vjobs_folders:
            if own.resolve().is_relative_to(folder):
                raise LimitExceeded(f"job {job.id}: {pointer}: {folder} holds vjobs' {name} ({own}); bind a "
                                    f"folder outside it, or {advice}")
    _check_sizes(job.id, folders, site.bind_limit_bytes, site.source)


def _check_sizes(job_id: str, folders: list[tuple[str, Path]], limit_bytes: int, source: str) -> None:
    for pointer, folder in folders:
        seen, entries = folder_size(folder, limit_bytes)
        if seen > limit_bytes or entries > MAX_BIND_ENTRIES:
            raise LimitExceeded(
                f"job {job_id}: {pointer}: {folder} holds more than {limit_bytes >> 20} MiB or "
                f"{MAX_BIND_ENTRIES} entries (seen so far: {seen >> 20} MiB in {entries} entries; limits.bind_mib "
                f"in {source}); a folder that large is not imaged or copied into a VM: bind a smaller part of it")


def copy_for_guest(source: Path, target: Path) -> None:
    """Copy a read-write bind's folder for the scratch disk (hard links where possible: mke2fs only reads).
    A link to a regular file comes in as that file, as a staged-in input (a pilot's ``mv`` copytool links
    inputs from storage) must, but only when the link's owner may read the file: vjobs may run with more
    rights than the folder's owner, and must not carry into the VM what the owner could not read. Other
    links stay links (dangling in the guest, as in a container without the target bound)."""
    for folder, dirs, files in os.walk(source):
        relative = Path(folder).relative_to(source)
        (target / relative).mkdir(parents=True, exist_ok=True)
        for name in dirs + files:
            path, copy = Path(folder, name), target / relative / name
            if path.is_symlink():
                if _owner_may_read(path):
                    link_or_copy(path.resolve(), copy)
                else:
                    os.symlink(os.readlink(path), copy)
            elif name in files:
                link_or_copy(path, copy)


def _owner_may_read(link: Path) -> bool:
    """Is ``link`` a link to a regular file that the link's owner may read (by its permission bits)?"""
    try:
        owner, info = os.lstat(link).st_uid, link.stat()
    except OSError:
        return False
    if not stat.S_ISREG(info.st_mode):
        return False
    if owner == info.st_uid:
        return bool(info.st_mode & stat.S_IRUSR)
    if owner == 0:
        return True
    groups = {g.gr_gid for g in grp.getgrall() if _user_name(owner) in g.gr_mem} | {_primary_group(owner)}
    return bool(info.st_mode & (stat.S_IRGRP if info.st_gid in groups else stat.S_IROTH))


def _user_name(uid: int) -> str | None:
    with contextlib.suppress(KeyError):
        return pwd.getpwuid(uid).pw_name
    return None


def _primary_group(uid: int) -> int | None:
    with contextlib.suppress(KeyError):
        return pwd.getpwuid(uid).pw_gid
    return None


def link_or_copy(source, target) -> None:
    """A hard link costs nothing and mke2fs only reads it; across file systems (or where the kernel
    refuses a link to another user's file) it is a copy."""
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


def folder_size(root: Path, limit_bytes: int = 1 << 62) -> tuple[int, int]:
    """(bytes, entries) under ``root``, a link to a file counted as the file; the walk stops once over
    ``limit_bytes`` or ``MAX_BIND_ENTRIES``, so a huge folder costs no more than the limit."""
    total = entries = 0
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            with contextlib.suppress(OSError):
                total += os.stat(os.path.join(folder, name)).st_size if name in files else 0
            entries += 1
            if total > limit_bytes or entries > MAX_BIND_ENTRIES:
                return total, entries
    return total, entries


Snapshot = dict[str, tuple[int, int]]  # relative path -> (size, mtime in whole seconds) of a regular file


def snapshot(folder: Path) -> Snapshot:
    """What a read-write bind held when it was copied in: a file that comes back with the same size and
    mtime (a tar keeps whole seconds) was not written by the payload, and is not copied back over whatever
    the host wrote there meanwhile (a pilot writes the payload's stdout into the folder it binds)."""
    seen: Snapshot = {}
    for path, _dirs, files in os.walk(folder):
        for name in files:
            with contextlib.suppress(OSError):
                info = os.lstat(os.path.join(path, name))
                if stat.S_ISREG(info.st_mode):
                    seen[os.path.relpath(os.path.join(path, name), folder)] = (info.st_size, int(info.st_mtime))
        if len(seen) > MAX_BIND_ENTRIES:
            break
    return seen


def merge_back(returned: Path, host_folder: Path, copied_in: Snapshot | None = None) -> list[str]:
    """Copy each file under ``returned`` (the extracted copy of a read-write bind, with the guest's mtimes)
    that the payload created or changed into ``host_folder``; return their relative paths. Unchanged means
    as ``copied_in`` recorded it; a file that is new or differs from the host's is copied, with the guest's
    mtime clamped to the host's clock. A path the host folder holds as something else (a link, a folder
    where a file came back) is left alone, not listed."""
    changed = []
    copied_in = copied_in or {}
    with open_folder(host_folder) as root:
        for relative in _files(returned):
            info = (returned / relative).stat()
            if copied_in.get(relative.as_posix()) == (info.st_size, int(info.st_mtime)):
                continue  # as it went in: the payload did not write it
            if _copy_in(returned / relative, root, relative.parts, min(info.st_mtime, time.time())):
                changed.append(relative.as_posix())
    return sorted(changed)


def remove_gone(host_folder: Path, known: Snapshot, present: set[str] | frozenset[str]) -> list[str]:
    """Remove from ``host_folder`` each file of ``known`` (relative path -> size and whole-second mtime, as
    vjobs last saw or wrote it) that is not ``present`` in the guest any more, but only where the host's file
    is still as known: one the host changed meanwhile stays. Returns the relative paths removed; every path
    not present leaves ``known``."""
    removed = []
    with open_folder(host_folder) as root:
        for relative in sorted(set(known) - set(present)):
            parts = tuple(relative.split("/"))
            folder_fd = _open_existing_folders(root, parts[:-1])
            if folder_fd is None:
                known.pop(relative)
                continue
            try:
                info = os.stat(parts[-1], dir_fd=folder_fd, follow_symlinks=False)
                if stat.S_ISREG(info.st_mode) and (info.st_size, int(info.st_mtime)) == known[relative]:
                    os.unlink(parts[-1], dir_fd=folder_fd)
                    removed.append(relative)
            except FileNotFoundError:
                pass
            finally:
                os.close(folder_fd)
                known.pop(relative)
    return removed


@contextlib.contextmanager
def open_folder(folder: Path) -> Iterator[int]:
    root = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    try:
        yield root
    finally:
        os.close(root)


def _files(root: Path) -> Iterator[Path]:
    for folder, _dirs, files in os.walk(root):
        for name in files:
            yield Path(folder, name).relative_to(root)


def _copy_in(source: Path, root_fd: int, parts: tuple[str, ...], mtime: float) -> bool:
    folder_fd = _open_folders(root_fd, parts[:-1])
    if folder_fd is None:
        return False
    try:
        name = parts[-1]
        try:
            existing = os.stat(name, dir_fd=folder_fd, follow_symlinks=False)
        except FileNotFoundError:
            existing = None
        if existing is not None and not stat.S_ISREG(existing.st_mode):
            return False  # a link, a folder, a device: the host's, not for the guest to replace
        if existing is not None and existing.st_size == source.stat().st_size and \
                _digest_at(folder_fd, name) == _digest(source):
            return False
        partial = f".{name}.vjobs-{os.getpid()}"
        descriptor = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644, dir_fd=folder_fd)
        with os.fdopen(descriptor, "wb") as target, open(source, "rb") as data:
            while chunk := data.read(CHUNK):
                target.write(chunk)
            target.flush()
            os.utime(target.fileno(), (max(mtime, 0), max(mtime, 0)))
        os.replace(partial, name, src_dir_fd=folder_fd, dst_dir_fd=folder_fd)
        return True
    finally:
        os.close(folder_fd)


def _open_folders(root_fd: int, parts: tuple[str, ...]) -> int | None:
    """The folder ``parts`` below ``root_fd``, made where missing, never through a link; None when a part
    is something else than a folder."""
    current = os.dup(root_fd)
    for part in parts:
        try:
            os.mkdir(part, 0o755, dir_fd=current)
        except FileExistsError:
            pass
        try:
            following = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=current)
        except OSError:  # a link (ELOOP) or a file (ENOTDIR) where a folder should be
            os.close(current)
            return None
        os.close(current)
        current = following
    return current


def _open_existing_folders(root_fd: int, parts: tuple[str, ...]) -> int | None:
    """The folder ``parts`` below ``root_fd``, never through a link; None when one is missing or not a folder."""
    current = os.dup(root_fd)
    for part in parts:
        try:
            following = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=current)
        except OSError:
            os.close(current)
            return None
        os.close(current)
        current = following
    return current


def _digest_at(folder_fd: int, name: str) -> str:
    descriptor = os.open(name, os.O_RDONLY | os.O_NOFOLLOW, dir_fd=folder_fd)
    with os.fdopen(descriptor, "rb") as handle:
        return _hash(handle)


def _digest(path: Path) -> str:
    with open(path, "rb") as handle:
        return _hash(handle)


def _hash(handle) -> str:
    digest = hashlib.sha256()
    while chunk := handle.read(CHUNK):
        digest.update(chunk)
    return digest.hexdigest()
