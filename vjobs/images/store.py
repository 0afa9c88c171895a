"""The content store under ``cache_dir``: what vjobs builds once and reuses (cache entries, held and evicted
by vjobs/host/cache.py), and the sha256 sums of the files it checks, remembered so a file is hashed once.

The image modules (catalogue, boot, rootfs/) build on it; it imports none of them.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
import tempfile
from pathlib import Path
from typing import Callable, TypeVar

from vjobs.errors import ImageError
from vjobs.host import locks
from vjobs.host.cache import CacheHold, remove_unused, seal
from vjobs.host.tools import disk_full_from

Built = TypeVar("Built")


def build_once(folder: Path, what: str, load: Callable[[], Built | None], build: Callable[[Path], Built], *,
               hold: CacheHold, force: bool = False) -> Built:
    """Make-style: what ``load`` finds in ``folder`` (a name ending in its recipe's key), else ``build`` it
    into a temporary folder beside it, which ``build`` renames to ``folder``. Under a lock, so two pilots
    starting at once build once; a full disk is ``DiskFull``; builds of other recipes (siblings named like
    ``folder`` up to its last ``-``) are removed unless a job still holds them, since nothing uses them
    again. ``folder`` is a cache entry (vjobs/host/cache.py): held by ``hold`` (the job's), evicted least
    recently used."""
    if not force and (found := load()) and hold.use(folder):
        return found
    family = folder.name.rsplit("-", 1)[0]
    with locks.exclusive(folder.parent / f"{family}.lock"):
        if not force and (found := load()) and hold.use(folder):
            return found
        try:
            with tempfile.TemporaryDirectory(prefix=f".build-{family}-", dir=folder.parent) as scratch:
                built = build(Path(scratch))
            seal(folder)
        except OSError as exc:
            full = disk_full_from(exc, doing=f"building the {what}", where=folder.parent)
            if full:
                raise full from exc
            raise ImageError(f"cannot build the {what} in {folder.parent}: {exc}") from exc
        hold.use(folder)
        for stale in folder.parent.glob(f"{family}-*"):
            if stale != folder and stale.is_dir():
                remove_unused(stale)
    hold.added(folder)
    return built


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def file_stamp(info: os.stat_result) -> str:
    """What a file is, as the kernel sees it, for remembering what was learnt from its bytes: its device, inode,
    size, mtime and ctime (see ``ChecksumCache``)."""
    return f"{info.st_dev}:{info.st_ino}:{info.st_size}:{info.st_mtime_ns}:{info.st_ctime_ns}"


class ChecksumCache:
    """Remembers a file's sha256 by (device, inode, size, mtime, ctime) so a large file is hashed once, not per
    job. The change time is what makes the stamp trustworthy: anyone who may write the file can put its mtime
    back after rewriting it (``touch -d``), but no one can set its ctime, which every write and every
    ``utime`` moves."""

    def __init__(self, path: Path):
        self.path = path
        try:
            self.known = json.loads(path.read_text())
        except (OSError, ValueError):
            self.known = {}

    def verify(self, label: str, path: Path, expected: str) -> None:
        try:
            info = path.stat()
        except OSError as exc:
            raise ImageError(f"{label}: cannot read {path}: {exc.strerror}") from exc
        if not stat.S_ISREG(info.st_mode):  # a FIFO would block the hash for ever
            raise ImageError(f"{label}: {path} is not a regular file; give the path of an image file")
        stamp = file_stamp(info)
        actual = self.known.get(str(path), {}).get(stamp) or sha256_file(path)
        if actual != expected:
            raise ImageError(f"{label}: {path} has sha256 {actual}, the catalogue says {expected}; "
                             "the file changed or the catalogue is out of date: ask the site admins")
        self.known[str(path)] = {stamp: actual}
        self._save()

    def _save(self) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            temporary = self.path.with_suffix(f".{os.getpid()}.tmp")
            temporary.write_text(json.dumps(self.known))
            os.replace(temporary, self.path)
        except OSError:
            pass  # only a cache: the next job hashes again
