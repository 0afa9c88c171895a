"""Guest images: the site's catalogue, checked against its sha256 sums, or the built-in ones.

An image is a boot image (kernel and initramfs; the built-in one unless the catalogue names its own) and,
optionally, a root file system the admins provide (``rootfs``): then the guest agent boots, mounts that
read-only, and runs the payload in it (vjobs/images/rootfs/). Built-in: ``default`` (busybox only) and
``debian12`` (a Debian 12 minbase with Python, built on first use).
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import stat
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, TypeVar

from vjobs.host import locks
from vjobs.host.cache import added, remove_unused, use
from vjobs.drivers.contract import BootImage
from vjobs.errors import ImageError
from vjobs.config.site import SiteConfig

if TYPE_CHECKING:
    from vjobs.images.rootfs import RootfsImage

BUILT_IN = ("default", "debian12")


@dataclass(frozen=True)
class ResolvedImage:
    name: str
    boot: BootImage
    kernel_sha256: str
    initramfs_sha256: str
    rootfs: RootfsImage | None = None

    def provenance(self) -> dict:
        fields = {"image": self.name, "kernel_sha256": self.kernel_sha256,
                  "initramfs_sha256": self.initramfs_sha256}
        return {**fields, **(self.rootfs.provenance() if self.rootfs else {})}


def resolve_image(name: str, site: SiteConfig, progress: Callable[[str], None]) -> ResolvedImage:
    """The catalogue's entry ``name`` (a site may override a built-in name), else a built-in image."""
    entry = site.images.get(name)
    if entry is None and name in BUILT_IN:
        return built_in_image(site.cache_dir, progress) if name == "default" else \
            built_in_base(name, site.cache_dir, progress)
    if entry is None:
        known = ", ".join(sorted({*site.images, *BUILT_IN}))
        raise ImageError(f"/image: {name!r} is not in this site's catalogue ({site.source}) nor built in; "
                         f"known: {known}")
    if entry.kernel is not None:
        _check_boot(name, entry, site.cache_dir)
        boot = ResolvedImage(name, BootImage(entry.kernel, entry.initramfs, entry.cmdline, entry.kernel_sha256,
                                             entry.initramfs_sha256),
                             entry.kernel_sha256, entry.initramfs_sha256)
    else:
        boot = built_in_image(site.cache_dir, progress)
    rootfs = None
    if entry.rootfs is not None:
        from vjobs.images.rootfs import load_rootfs

        rootfs = load_rootfs(entry.rootfs, entry.rootfs_sha256, site.cache_dir, f"images.{name}.rootfs")
    return ResolvedImage(name, boot.boot, boot.kernel_sha256, boot.initramfs_sha256, rootfs)


def catalogue_states(site: SiteConfig) -> list[dict[str, str]]:
    """Each catalogue entry and built-in image with its state ("ok", "not built", "broken") and why, as
    ``vjobs image list`` shows them. Checks what a job would check, without building anything."""
    from vjobs.images.boot import load_default_image
    from vjobs.images.rootfs import debian, load_rootfs

    rows = []
    for name, entry in sorted(site.images.items()):
        kind = "rootfs" if entry.rootfs else "boot image"
        try:
            details = []
            if entry.kernel is not None:
                _check_boot(name, entry, site.cache_dir)
                details.append(f"own kernel {entry.kernel}")
            if entry.rootfs is not None:
                details.append(load_rootfs(entry.rootfs, entry.rootfs_sha256, site.cache_dir,
                                           f"images.{name}.rootfs").info.describe())
            rows.append({"name": name, "kind": kind, "state": "ok", "detail": "; ".join(details)})
        except ImageError as error:
            rows.append({"name": name, "kind": kind, "state": "broken", "detail": str(error)})
    built = {"default": load_default_image(site.cache_dir), "debian12": debian.load(site.cache_dir)}
    for name, manifest in built.items():
        if name not in site.images:  # else the site's entry of that name wins
            detail = f"cached in {site.cache_dir}" if manifest else \
                f"built on first use, or now with: vjobs image build {name}"
            rows.append({"name": name, "kind": "built in", "state": "ok" if manifest else "not built",
                         "detail": detail})
    return rows


def _check_boot(name: str, entry, cache_dir: Path) -> None:
    checked = ChecksumCache(cache_dir / "checksums.json")
    for label, path, expected in (("kernel", entry.kernel, entry.kernel_sha256),
                                  ("initramfs", entry.initramfs, entry.initramfs_sha256)):
        checked.verify(f"images.{name}.{label}", path, expected)


def built_in_base(name: str, cache_dir: Path, progress: Callable[[str], None]) -> ResolvedImage:
    """A built-in root file system (built on first use) booted by the built-in boot image."""
    from vjobs.images.rootfs import debian, load_rootfs

    manifest = debian.build(cache_dir, progress)
    boot = built_in_image(cache_dir, progress)
    rootfs = load_rootfs(Path(manifest.rootfs), manifest.rootfs_sha256, cache_dir, f"built-in image {name}")
    return ResolvedImage(name, boot.boot, boot.kernel_sha256, boot.initramfs_sha256, rootfs)


def built_in_image(cache_dir: Path, progress: Callable[[str], None]) -> ResolvedImage:
    from vjobs.images.boot import build_default_image  # deferred: building pulls in apt and the cpio writer

    manifest = build_default_image(cache_dir, progress)
    return ResolvedImage("default", BootImage(manifest.kernel, manifest.initramfs, manifest.cmdline,
                                              manifest.kernel_sha256, manifest.initramfs_sha256, builtin=True),
                         manifest.kernel_sha256, manifest.initramfs_sha256)


Built = TypeVar("Built")


def build_once(folder: Path, what: str, load: Callable[[], Built | None], build: Callable[[Path], Built],
               force: bool = False) -> Built:
    """Make-style: what ``load`` finds in ``folder`` (a name ending in its recipe's key), else ``build`` it
    into a temporary folder beside it, which ``build`` renames to ``folder``. Under a lock, so two pilots
    starting at once build once; a full disk is ``disk_full``; builds of other recipes (siblings named like
    ``folder`` up to its last ``-``) are removed unless a job still holds them, since nothing uses them
    again. ``folder`` is a cache entry (vjobs/host/cache.py): held for the job, evicted least recently used."""
    if not force and (found := load()) and use(folder):
        return found
    family = folder.name.rsplit("-", 1)[0]
    with locks.exclusive(folder.parent / f"{family}.lock"):
        if not force and (found := load()) and use(folder):
            return found
        try:
            with tempfile.TemporaryDirectory(prefix=f".build-{family}-", dir=folder.parent) as scratch:
                built = build(Path(scratch))
        except OSError as exc:
            if exc.errno == errno.ENOSPC:
                raise ImageError(f"disk full while building the {what} in {folder.parent}: free space or "
                                 "point cache_dir in the site config elsewhere", code="disk_full") from exc
            raise ImageError(f"cannot build the {what} in {folder.parent}: {exc}") from exc
        use(folder)
        for stale in folder.parent.glob(f"{family}-*"):
            if stale != folder and stale.is_dir():
                remove_unused(stale)
    added(folder)
    return built


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class ChecksumCache:
    """Remembers a file's sha256 by (inode, size, mtime) so a large file is hashed once, not per job."""

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
        stamp = f"{info.st_dev}:{info.st_ino}:{info.st_size}:{info.st_mtime_ns}"
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
