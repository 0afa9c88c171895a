"""Root file system images: the operating system a site's admins provide, booted by every job, never written.

- ``inspect``: recognise an image from its own bytes and refuse what is unsafe or unmountable;
- ``qemu_img``: qemu-img on such an image, one confined way (to inspect a qcow2, or to convert it);
- ``debian``: the built-in Debian 12 base (``"image": "debian12"``), made with mmdebstrap.

On the way to a job (``load_rootfs``): the file is opened once (vjobs/images/checked.py) and everything below
reads it through that descriptor, which the driver then gets. Its inspection is read from a cache keyed by
the sha256 the catalogue names, and its sum is checked (hashed once per stamp), so a job pays for neither
after the first; a refusal is remembered too, for the file as it is (its stamp). A driver that cannot attach
the image's container format (xen takes raw only) gets a raw copy made once per image (``disk_for``), a cache
entry (vjobs/host/cache.py) like a release image.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from vjobs.drivers.contract import Disk
from vjobs.errors import ImageError
from vjobs.host import locks
from vjobs.host.cache import CacheHold
from vjobs.images.checked import CheckedFile, CheckedFiles
from vjobs.images.rootfs import qemu_img
from vjobs.images.rootfs.inspect import RootfsInfo, inspect_rootfs

INSPECTION_VERSION = 1  # bump when inspect.py learns something that changes its verdicts


@dataclass(frozen=True)
class RootfsImage:
    file: CheckedFile  # opened once; its path names it in messages
    sha256: str
    info: RootfsInfo

    @property
    def path(self) -> Path:
        return self.file.path

    def provenance(self) -> dict:
        return {"rootfs_sha256": self.sha256, "rootfs_filesystem": self.info.filesystem,
                "rootfs_container": self.info.container}


def load_rootfs(path: Path, sha256: str, label: str, files: CheckedFiles) -> RootfsImage:
    """A catalogue's rootfs, checked: present, readable, the sha256 the catalogue says, a safe format, all of
    it through one descriptor (``files``: the job's). A file is inspected before it is hashed, so a wrong one
    is refused without reading all of it."""
    file = files.open(path, label)
    record = files.cache_dir / "rootfs" / f"{sha256}.v{INSPECTION_VERSION}.json"
    info = _read_inspection(record)
    if info is None or file.size > files.limits.max_file_bytes:  # a file too large is refused before it is hashed
        info = _inspected(file, files)
    file.verify(sha256, files.cache_dir / "checksums.json")
    if not record.exists():
        _write_inspection(record, info)
    return RootfsImage(file, sha256, info)


def _inspected(file: CheckedFile, files: CheckedFiles) -> RootfsInfo:
    """``inspect_rootfs``, its refusal remembered for the file as it is (its stamp): a file that took minutes
    to refuse (a qcow2 of 65,536 bogus snapshots) is refused at once for the next job, until it changes."""
    refusals = files.cache_dir / "rootfs" / "refused.json"
    known = _read_json(refusals)
    if known.get(str(file.path), {}).get("stamp") == file.stamp:
        raise ImageError(f"{known[str(file.path)]['message']} (refused before, and the file has not changed since)")
    try:
        return inspect_rootfs(file, files.limits)
    except ImageError as refusal:
        _write_json(refusals, {**known, str(file.path): {"stamp": file.stamp, "message": str(refusal)}})
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


def disk_for(rootfs: RootfsImage, formats: tuple[str, ...], progress: Callable[[str], None], *, hold: CacheHold,
             files: CheckedFiles) -> Disk:
    """The read-only disk that carries ``rootfs`` to a driver that attaches ``formats``. Its ``cache_key``
    (the image's sha256) lets a driver that copies disks (xen) upload it once per pool. A raw copy is a
    cache entry that ``hold`` (the job's) keeps, opened as one of the job's ``files``."""
    container = rootfs.info.container
    if container in formats:
        return Disk("rootfs", rootfs.path, container, readonly=True, cache_key=rootfs.sha256, file=rootfs.file)
    if "raw" not in formats:
        raise ImageError(f"the driver attaches only {', '.join(formats)} disks, and vjobs can only make raw "
                         f"copies of the base image {rootfs.path} ({container}); use another driver")
    copy = _raw_copy(rootfs, files, progress, hold)
    return Disk("rootfs", copy, "raw", readonly=True, cache_key=rootfs.sha256,
                file=files.open(copy, f"the raw copy of {rootfs.file.label}"))


def _raw_copy(rootfs: RootfsImage, files: CheckedFiles, progress: Callable[[str], None], hold: CacheHold) -> Path:
    """``rootfs`` as raw, made once from its checked descriptor (``qemu_img.convert_to_raw``: backing disabled,
    under the site's limits, unprivileged) in a folder of its own that nobody else can enter."""
    folder = files.cache_dir / "rootfs"
    target = folder / f"{rootfs.sha256}.raw"
    with locks.exclusive(folder / f"{rootfs.sha256}.lock"):
        if target.exists() and hold.use(target):
            return target
        progress(f"converting the {rootfs.info.container} base image {rootfs.path} to raw, once")
        partial = folder / f"{rootfs.sha256}.{os.getpid()}.partial"  # `vjobs gc` removes one a dead build left
        partial.mkdir(mode=0o700)
        try:
            qemu_img.convert_to_raw(rootfs.file, partial / "raw", rootfs.info.virtual_size, files.limits)
            os.replace(partial / "raw", target)
        finally:
            shutil.rmtree(partial, ignore_errors=True)
        hold.use(target)
    hold.added(target, progress)
    return target
