"""Root file system images: the operating system a site's admins provide, booted by every job, never written.

- ``inspect``: recognise an image from its own bytes and refuse what is unsafe or unmountable;
- ``debian``: the built-in Debian 12 base (``"image": "debian12"``), made with mmdebstrap.

On the way to a job (``load_rootfs``): the file's sha256 is checked against the catalogue (hashed once per
inode, size and mtime), then its inspection is read from a cache keyed by that sha256, so a job pays for
neither after the first; a refusal is remembered too, for the file as it is (``file_stamp``). A driver that cannot attach the image's container format (xen takes raw only)
gets a raw copy made once per image (``disk_for``), a cache entry (vjobs/host/cache.py) like a release image.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from vjobs.drivers.contract import Disk
from vjobs.errors import ImageError
from vjobs.host import locks
from vjobs.host.cache import CacheHold
from vjobs.host.tools import run_tool
from vjobs.images.rootfs.inspect import RootfsInfo, inspect_rootfs
from vjobs.images.store import ChecksumCache, file_stamp

INSPECTION_VERSION = 1  # bump when inspect.py learns something that changes its verdicts


@dataclass(frozen=True)
class RootfsImage:
    path: Path
    sha256: str
    info: RootfsInfo

    def provenance(self) -> dict:
        return {"rootfs_sha256": self.sha256, "rootfs_filesystem": self.info.filesystem,
                "rootfs_container": self.info.container}


def load_rootfs(path: Path, sha256: str, cache_dir: Path, label: str) -> RootfsImage:
    """A catalogue's rootfs, checked: present, readable, the sha256 the catalogue says, a safe format.
    A file is inspected before it is hashed, so a wrong one is refused without reading all of it."""
    path = Path(path)
    record = Path(cache_dir) / "rootfs" / f"{sha256}.v{INSPECTION_VERSION}.json"
    info = _read_inspection(record)
    if info is None:
        info = _inspected(path, label, Path(cache_dir) / "rootfs" / "refused.json")
    ChecksumCache(Path(cache_dir) / "checksums.json").verify(label, path, sha256)
    if not record.exists():
        _write_inspection(record, info)
    return RootfsImage(path, sha256, info)


def _inspected(path: Path, label: str, refusals: Path) -> RootfsInfo:
    """``inspect_rootfs``, its refusal remembered for the file as it is (``file_stamp``): a file that took
    minutes to refuse (a qcow2 of 65,536 bogus snapshots) is refused at once for the next job, until it changes."""
    try:
        stamp = file_stamp(path.stat())
    except OSError:
        stamp = None  # it is not there: the inspection says so, and there is nothing to remember
    known = _read_json(refusals)
    if stamp and known.get(str(path), {}).get("stamp") == stamp:
        raise ImageError(f"{known[str(path)]['message']} (refused before, and the file has not changed since)")
    try:
        return inspect_rootfs(path, label)
    except ImageError as refusal:
        if stamp:
            _write_json(refusals, {**known, str(path): {"stamp": stamp, "message": str(refusal)}})
        raise


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _write_json(path: Path, document: dict) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(f".{os.getpid()}.tmp")
        partial.write_text(json.dumps(document))
        os.replace(partial, path)
    except OSError:
        pass  # only a cache: the next job inspects again


def _read_inspection(record: Path) -> RootfsInfo | None:
    try:
        return RootfsInfo(**json.loads(record.read_text()))
    except (OSError, ValueError, TypeError):
        return None


def _write_inspection(record: Path, info: RootfsInfo) -> None:
    _write_json(record, info.to_json())


def disk_for(rootfs: RootfsImage, formats: tuple[str, ...], cache_dir: Path,
             progress: Callable[[str], None], *, hold: CacheHold) -> Disk:
    """The read-only disk that carries ``rootfs`` to a driver that attaches ``formats``. Its ``cache_key``
    (the image's sha256) lets a driver that copies disks (xen) upload it once per pool. A raw copy is a
    cache entry that ``hold`` (the job's) keeps."""
    container = rootfs.info.container
    if container in formats:
        return Disk("rootfs", rootfs.path, container, readonly=True, cache_key=rootfs.sha256)
    if "raw" not in formats:
        raise ImageError(f"the driver attaches only {', '.join(formats)} disks, and vjobs can only make raw "
                         f"copies of the base image {rootfs.path} ({container}); use another driver")
    return Disk("rootfs", _raw_copy(rootfs, Path(cache_dir) / "rootfs", progress, hold), "raw", readonly=True,
                cache_key=rootfs.sha256)


def _raw_copy(rootfs: RootfsImage, folder: Path, progress: Callable[[str], None], hold: CacheHold) -> Path:
    target = folder / f"{rootfs.sha256}.raw"
    with locks.exclusive(folder / f"{rootfs.sha256}.lock"):
        if target.exists() and hold.use(target):
            return target
        progress(f"converting the {rootfs.info.container} base image {rootfs.path} to raw, once")
        partial = folder / f"{rootfs.sha256}.{os.getpid()}.partial"
        try:
            run_tool(["qemu-img", "convert", "-f", rootfs.info.container, "-O", "raw", rootfs.path, partial],
                     f"converting the base image {rootfs.path} to raw", error=ImageError, where=folder,
                     install="install qemu-utils")
            os.replace(partial, target)
        finally:
            partial.unlink(missing_ok=True)
        hold.use(target)
    hold.added(target, progress)
    return target
