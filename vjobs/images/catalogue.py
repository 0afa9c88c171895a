"""Guest images: the site's catalogue, checked against its sha256 sums, or the built-in ones.

An image is a boot image (kernel and initramfs; the built-in one unless the catalogue names its own) and,
optionally, a root file system the admins provide (``rootfs``): then the guest agent boots, mounts that
read-only, and runs the payload in it (vjobs/images/rootfs/). Built-in: ``default`` (busybox only) and
``debian12`` (a Debian 12 minbase with Python, built on first use).

The image modules import downwards only: this catalogue uses boot.py (the built-in boot image) and rootfs/
(base images), and those build their cache entries with store.py, which imports none of them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from vjobs.config.site import SiteConfig
from vjobs.drivers.contract import BootImage
from vjobs.errors import ImageError
from vjobs.host.cache import CacheHold
from vjobs.images.boot import build_default_image, load_default_image
from vjobs.images.rootfs import RootfsImage, debian, load_rootfs
from vjobs.images.store import ChecksumCache

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


def resolve_image(name: str, site: SiteConfig, progress: Callable[[str], None], *,
                  hold: CacheHold) -> ResolvedImage:
    """The catalogue's entry ``name`` (a site may override a built-in name), else a built-in image. The
    built-in images it builds or finds in the cache stay while ``hold`` (the job's) holds them."""
    entry = site.images.get(name)
    if entry is None and name in BUILT_IN:
        return built_in_image(site.cache_dir, progress, hold=hold) if name == "default" else \
            built_in_base(name, site.cache_dir, progress, hold=hold)
    if entry is None:
        known = ", ".join(sorted({*site.images, *BUILT_IN}))
        raise ImageError(f"/image: {name!r} is not in this site's catalogue ({site.source}) nor built in; "
                         f"known: {known}", code="image_not_found")
    if entry.kernel is not None:
        _check_boot(name, entry, site.cache_dir)
        boot = ResolvedImage(name, BootImage(entry.kernel, entry.initramfs, entry.cmdline, entry.kernel_sha256,
                                             entry.initramfs_sha256),
                             entry.kernel_sha256, entry.initramfs_sha256)
    else:
        boot = built_in_image(site.cache_dir, progress, hold=hold)
    rootfs = None
    if entry.rootfs is not None:
        rootfs = load_rootfs(entry.rootfs, entry.rootfs_sha256, site.cache_dir, f"images.{name}.rootfs")
    return ResolvedImage(name, boot.boot, boot.kernel_sha256, boot.initramfs_sha256, rootfs)


def catalogue_states(site: SiteConfig) -> list[dict[str, str]]:
    """Each catalogue entry and built-in image with its state ("ok", "not built", "broken") and why, as
    ``vjobs image list`` shows them. Checks what a job would check, without building anything."""
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


def built_in_base(name: str, cache_dir: Path, progress: Callable[[str], None], *,
                  hold: CacheHold) -> ResolvedImage:
    """A built-in root file system (built on first use) booted by the built-in boot image."""
    manifest = debian.build(cache_dir, progress, hold=hold)
    boot = built_in_image(cache_dir, progress, hold=hold)
    rootfs = load_rootfs(Path(manifest.rootfs), manifest.rootfs_sha256, cache_dir, f"built-in image {name}")
    return ResolvedImage(name, boot.boot, boot.kernel_sha256, boot.initramfs_sha256, rootfs)


def built_in_image(cache_dir: Path, progress: Callable[[str], None], *, hold: CacheHold) -> ResolvedImage:
    manifest = build_default_image(cache_dir, progress, hold=hold)
    return ResolvedImage("default", BootImage(manifest.kernel, manifest.initramfs, manifest.cmdline,
                                              manifest.kernel_sha256, manifest.initramfs_sha256, builtin=True),
                         manifest.kernel_sha256, manifest.initramfs_sha256)
