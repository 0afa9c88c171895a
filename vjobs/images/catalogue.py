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

from vjobs.config.site import CatalogueImage, SiteConfig
from vjobs.drivers.contract import BootImage
from vjobs.errors import ImageError
from vjobs.host.cache import CacheHold
from vjobs.images.boot import build_default_image, load_default_image, open_default_image
from vjobs.images.checked import CheckedFiles
from vjobs.images.rootfs import RootfsImage, debian, load_rootfs

BUILT_IN = ("default", "debian12")


@dataclass(frozen=True)
class ResolvedImage:
    name: str
    boot: BootImage
    rootfs: RootfsImage | None = None

    def provenance(self) -> dict:
        fields = {"image": self.name, "kernel_sha256": self.boot.kernel.sha256(),
                  "initramfs_sha256": self.boot.initramfs.sha256()}
        return {**fields, **(self.rootfs.provenance() if self.rootfs else {})}


def resolve_image(name: str, site: SiteConfig, progress: Callable[[str], None], *, hold: CacheHold,
                  files: CheckedFiles) -> ResolvedImage:
    """The catalogue's entry ``name`` (a site may override a built-in name), else a built-in image, its files
    opened and checked among ``files`` (the job's; vjobs/images/checked.py). The built-in images it builds or
    finds in the cache stay while ``hold`` (the job's) holds them."""
    entry = site.images.get(name)
    if entry is None and name in BUILT_IN:
        return built_in_image(progress, hold=hold, files=files) if name == "default" else \
            built_in_base(name, progress, hold=hold, files=files)
    if entry is None:
        known = ", ".join(sorted({*site.images, *BUILT_IN}))
        raise ImageError(f"/image: {name!r} is not in this site's catalogue ({site.source}) nor built in; "
                         f"known: {known}", code="image_not_found")
    boot = _own_boot(name, entry, files) if entry.kernel is not None else \
        built_in_image(progress, hold=hold, files=files).boot
    rootfs = None
    if entry.rootfs is not None:
        rootfs = load_rootfs(entry.rootfs, entry.rootfs_sha256, f"images.{name}.rootfs", files)
    return ResolvedImage(name, boot, rootfs)


def catalogue_states(site: SiteConfig) -> list[dict[str, str]]:
    """Each catalogue entry and built-in image with its state ("ok", "not built", "broken") and why, as
    ``vjobs image list`` shows them. Checks what a job would check, without building anything."""
    rows = []
    for name, entry in sorted(site.images.items()):
        kind = "rootfs" if entry.rootfs else "boot image"
        try:
            details = []
            with CheckedFiles(site.cache_dir, site.inspection) as files:
                if entry.kernel is not None:
                    _own_boot(name, entry, files)
                    details.append(f"own kernel {entry.kernel}")
                if entry.rootfs is not None:
                    details.append(load_rootfs(entry.rootfs, entry.rootfs_sha256, f"images.{name}.rootfs",
                                               files).info.describe())
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


def _own_boot(name: str, entry: CatalogueImage, files: CheckedFiles) -> BootImage:
    return BootImage(files.verified(entry.kernel, f"images.{name}.kernel", entry.kernel_sha256),
                     files.verified(entry.initramfs, f"images.{name}.initramfs", entry.initramfs_sha256),
                     entry.cmdline)


def built_in_base(name: str, progress: Callable[[str], None], *, hold: CacheHold,
                  files: CheckedFiles) -> ResolvedImage:
    """A built-in root file system (built on first use) booted by the built-in boot image."""
    manifest = debian.build(files.cache_dir, progress, hold=hold)
    boot = built_in_image(progress, hold=hold, files=files)
    rootfs = load_rootfs(Path(manifest.rootfs), manifest.rootfs_sha256, f"built-in image {name}", files)
    return ResolvedImage(name, boot.boot, rootfs)


def built_in_image(progress: Callable[[str], None], *, hold: CacheHold, files: CheckedFiles) -> ResolvedImage:
    manifest = build_default_image(files.cache_dir, progress, hold=hold)
    return ResolvedImage("default", open_default_image(manifest, files))
