"""The content store under ``cache_dir``: what vjobs builds once and reuses (cache entries, held and evicted
by vjobs/host/cache.py), and how a file's content is hashed.

The image modules (checked, catalogue, boot, rootfs/) build on it; it imports none of them.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
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


def publish(output: Path, folder: Path, manifest: dict) -> None:
    """A build's last step, inside ``build_once``: the manifest written into the finished ``output``, which then
    takes ``folder``'s place whole (a forced rebuild replaces it), so readers see a complete entry or none."""
    (output / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    if folder.exists():
        shutil.rmtree(folder)
    os.rename(output, folder)


def sha256_of(fd: int) -> str:
    """The sha256 of what the open file ``fd`` holds, read with ``pread``: the file's offset, which a
    hypervisor may share, is left alone."""
    digest, offset = hashlib.sha256(), 0
    while block := os.pread(fd, 1 << 20, offset):
        digest.update(block)
        offset += len(block)
    return digest.hexdigest()


def sha256_file(path: Path) -> str:
    """The sha256 of a file vjobs has just built (a file a VM gets is hashed through its ``CheckedFile``)."""
    with open(path, "rb") as handle:
        return sha256_of(handle.fileno())
