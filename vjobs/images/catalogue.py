"""Guest images: the site's catalogue, checked against its sha256 sums, or the built-in ones.

An image is a boot image (kernel and initramfs; the built-in one unless the catalogue names its own) and,
optionally, a root file system the admins provide (``rootfs``): then the guest agent boots, mounts that
read-only, and runs the payload in it (vjobs/images/rootfs/). Built-in: ``default`` (busybox only) and
``debian12`` (a Debian 12 minbase with Python), built on first use by root (or by an account into a cache of
its own); an account's jobs take them read-only from the administrator's cache (vjobs/host/roles.py). A
path (``./tree``, ``/srv/layout:12``) names a folder that becomes the base: an unpacked root file system or an
OCI image layout, imaged into this process's own cache (vjobs/images/rootfs/folders.py).

The image modules import downwards only: this catalogue uses boot.py (the built-in boot image) and rootfs/
(base images), and those build their cache entries with store.py, which imports none of them (a folder's
base image is built like a release's, with vjobs/guest/disks.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, TypeVar

from vjobs.config.site import CatalogueImage, SiteConfig
from vjobs.drivers.contract import BootImage
from vjobs.errors import ImageError
from vjobs.host.cache import CacheHold, trusted
from vjobs.host.roles import ADMINISTRATOR_BUILDS, Caches, caches
from vjobs.images.boot import build_default_image, default_image_dir, load_default_image, open_default_image
from vjobs.images.checked import CheckedFiles
from vjobs.images.rootfs import RootfsImage, debian, load_rootfs
from vjobs.images.rootfs.folders import WHAT_A_PATH_NAMES, folder_rootfs, names_a_folder

# Each built-in image: how its manifest is loaded from a cache, and the cache entry (folder) it lives in.
BUILT_IN = {"default": (load_default_image, default_image_dir), "debian12": (debian.load, debian.image_dir)}
Built = TypeVar("Built")


@dataclass(frozen=True)
class ResolvedImage:
    name: str
    boot: BootImage
    rootfs: RootfsImage | None = None
    origin: dict[str, str] = field(default_factory=dict)  # where a base made from a folder came from

    def provenance(self) -> dict:
        fields = {"image": self.name, "kernel_sha256": self.boot.kernel.sha256(),
                  "initramfs_sha256": self.boot.initramfs.sha256()}
        return {**fields, **(self.rootfs.provenance() if self.rootfs else {}), **self.origin}


def resolve_image(name: str, site: SiteConfig, progress: Callable[[str], None], *, hold: CacheHold,
                  files: CheckedFiles) -> ResolvedImage:
    """The catalogue's entry ``name`` (a site may override a built-in name), else a built-in image, else (a
    path) a base image made from a folder (vjobs/images/rootfs/folders.py), its files opened and checked among
    ``files`` (the job's; vjobs/images/checked.py). The built-in images and the images of folders it builds or
    finds in the cache stay while ``hold`` (the job's) holds them."""
    found_in = caches(site)
    entry = site.images.get(name)
    if entry is None and name in BUILT_IN:
        return built_in_image(found_in, progress, hold=hold, files=files) if name == "default" else \
            built_in_base(name, found_in, progress, hold=hold, files=files)
    if entry is None and names_a_folder(name):
        rootfs, origin = folder_rootfs(name, site, found_in.own, progress, hold=hold, files=files)
        return ResolvedImage(name, built_in_image(found_in, progress, hold=hold, files=files).boot, rootfs, origin)
    if entry is None:
        known = ", ".join(sorted({*site.images, *BUILT_IN}))
        raise ImageError(f"/image: {name!r} is not in this site's catalogue ({site.source}) nor built in; "
                         f"known: {known}; or a path (with a '/', e.g. ./{name}) naming {WHAT_A_PATH_NAMES}",
                         code="image_not_found")
    boot = _own_boot(name, entry, files) if entry.kernel is not None else \
        built_in_image(found_in, progress, hold=hold, files=files).boot
    rootfs = None
    if entry.rootfs is not None:
        rootfs = load_rootfs(entry.rootfs, entry.rootfs_sha256, f"images.{name}.rootfs", files)
    return ResolvedImage(name, boot, rootfs)


def catalogue_states(site: SiteConfig) -> list[dict[str, str]]:
    """Each catalogue entry and built-in image with its state ("ok", "not built", "broken") and why, as
    ``vjobs image list`` shows them. Checks what a job would check, without building anything."""
    found_in = caches(site)
    rows = []
    for name, entry in sorted(site.images.items()):
        kind = "rootfs" if entry.rootfs else "boot image"
        try:
            details = []
            with CheckedFiles(found_in.own, site.inspection) as files:
                if entry.kernel is not None:
                    _own_boot(name, entry, files)
                    details.append(f"own kernel {entry.kernel}")
                if entry.rootfs is not None:
                    details.append(load_rootfs(entry.rootfs, entry.rootfs_sha256, f"images.{name}.rootfs",
                                               files).info.describe())
            rows.append({"name": name, "kind": kind, "state": "ok", "detail": "; ".join(details)})
        except ImageError as error:
            rows.append({"name": name, "kind": kind, "state": "broken", "detail": str(error)})
    for name, (load, folder_of) in BUILT_IN.items():
        if name not in site.images:  # else the site's entry of that name wins
            images = found_in.images
            built = images is not None and load(images) is not None and trusted(folder_of(images))
            if built:
                detail = f"cached in {images}"
            elif found_in.builds_images:
                detail = f"built on first use, or now with: vjobs image build {name}"
            else:
                detail = found_in.not_built(name)
            rows.append({"name": name, "kind": "built in", "state": "ok" if built else "not built",
                         "detail": detail})
    return rows


def _own_boot(name: str, entry: CatalogueImage, files: CheckedFiles) -> BootImage:
    return BootImage(files.verified(entry.kernel, f"images.{name}.kernel", entry.kernel_sha256),
                     files.verified(entry.initramfs, f"images.{name}.initramfs", entry.initramfs_sha256),
                     entry.cmdline)


def built_in_base(name: str, found_in: Caches, progress: Callable[[str], None], *, hold: CacheHold,
                  files: CheckedFiles) -> ResolvedImage:
    """A built-in root file system booted by the built-in boot image (``built_in``), opened among ``files``.
    Its inspection record and checksum go into this process's own cache (``files.cache_dir``): an account
    trusts no record but its own and root's."""
    manifest = built_in(name, found_in, lambda cache: debian.build(cache, progress, hold=hold), hold=hold)
    boot = built_in_image(found_in, progress, hold=hold, files=files)
    rootfs = load_rootfs(Path(manifest.rootfs), manifest.rootfs_sha256, f"built-in image {name}", files)
    return ResolvedImage(name, boot.boot, rootfs)


def built_in_image(found_in: Caches, progress: Callable[[str], None], *, hold: CacheHold,
                   files: CheckedFiles) -> ResolvedImage:
    manifest = built_in("default", found_in, lambda cache: build_default_image(cache, progress, hold=hold),
                        hold=hold)
    return ResolvedImage("default", open_default_image(manifest, files))


def built_in(name: str, found_in: Caches, build: Callable[[Path], Built], *, hold: CacheHold) -> Built:
    """The built-in image ``name``'s manifest: ``build`` makes it (make-style: a no-op when it is there) where
    this process builds the built-in images; else it is the administrator's, found read-only and held by
    ``hold``, or an ``ImageError`` that says who builds it and how (vjobs/host/roles.py)."""
    if found_in.builds_images:
        return build(found_in.own)
    load, folder_of = BUILT_IN[name]
    found = load(found_in.images) if found_in.images else None
    if found is None or not hold.use(folder_of(found_in.images)):
        raise ImageError(found_in.not_built(name), code="image_not_found")
    return found


def refuse_to_build(name: str, found_in: Caches) -> None:
    """``vjobs image build`` by an account whose built-in images are the administrator's: who builds them."""
    if not found_in.builds_images:
        raise ImageError(f"vjobs image build {name}: the built-in images here are the administrator's "
                         f"({found_in.images or 'none trusted'}), read-only to this account: "
                         f"{ADMINISTRATOR_BUILDS.format(name=name)}; to build your own, name a cache_dir of your "
                         "own in a site config", code="image_error")
