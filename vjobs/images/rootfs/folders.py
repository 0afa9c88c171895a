"""Base images made from a host folder, named by its path where an image's name goes (``vjobs exec ./tree
CMD``, ``"image": "/cvmfs/unpacked.cern.ch/registry.hub.docker.com/library/debian:stable"``):

- an unpacked container image: a root file system tree (``etc/`` with ``bin/`` or ``usr/``), as
  /cvmfs/unpacked.cern.ch holds them. Imaged like a release (vjobs/guest/disks.py): in the site's release
  format, everything owned by root, links kept as links (the guest resolves them inside the image), cached by
  the tree's fingerprint (names, types, modes, sizes, mtimes);
- an OCI image layout (``oci-layout`` and ``index.json``; ``PATH:TAG`` picks a tag): unpacked on the host
  without privilege (oci.py), never trusting it, into a squashfs with the layers' owners and modes, cached by
  the manifest's digest, so the next job unpacks nothing.

Either way the image is an entry of this process's own cache (an ordinary account's own), its folder or layers
bounded as a bind is (``[limits] bind_mib``), and it is then checked and booted as a catalogue's rootfs
(``load_rootfs``): a raw squashfs or erofs file whose format the hypervisor is told.
"""

from __future__ import annotations

import hashlib
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from vjobs.config.site import SiteConfig
from vjobs.errors import ImageError, LimitExceeded
from vjobs.guest.binds import MAX_BIND_ENTRIES
from vjobs.guest.disks import RELEASES, build_disk, cached_image, release_image
from vjobs.host.cache import CacheHold
from vjobs.images.checked import CheckedFiles
from vjobs.images.rootfs import RootfsImage, load_rootfs, oci

UNPACK_VERSION = 1  # bump when oci.py unpacks a layout into other bytes than before
SQUASHFS = ["-comp", "lz4", "-noappend", "-no-xattrs", "-no-progress", "-quiet",
            "-root-uid", "0", "-root-gid", "0", "-root-mode", "755"]
WHAT_A_PATH_NAMES = ("a folder holding an unpacked root file system (etc/ with bin/ or usr/) or an OCI image "
                     "layout (oci-layout and index.json; PATH:TAG picks a tag)")


@dataclass(frozen=True)
class ImageFolder:
    path: Path  # resolved: /cvmfs/unpacked.cern.ch's images are links
    layout: bool  # an OCI image layout, else a root file system tree
    tag: str | None = None


def names_a_folder(image: str) -> bool:
    """Whether a job's ``image`` is a path (it has a ``/``: ``./tree``) rather than a catalogue or built-in name."""
    return "/" in image


def folder_rootfs(image: str, site: SiteConfig, cache_dir: Path, progress: Callable[[str], None], *,
                  hold: CacheHold, files: CheckedFiles) -> tuple[RootfsImage, dict[str, str]]:
    """The base image made from the folder ``image`` names, built into ``cache_dir`` (this process's own) or
    found there, held by ``hold`` and opened among ``files`` (the job's); and what the result's provenance
    should add (an OCI manifest's digest)."""
    folder = find_image_folder(image)
    label = f"image {image}"
    releases = cache_dir / RELEASES
    if folder.layout:
        layout = oci.read_layout(folder.path, folder.tag, label)
        path, sha256 = _layout_image(layout, releases, site, progress, hold)
        origin = {"oci_manifest_digest": layout.manifest_digest}
    else:
        _check_tree(folder.path, site, label)
        path, sha256 = release_image(folder.path, releases, site.release_format, progress, hold=hold)
        origin = {}
    return load_rootfs(path, sha256, label, files), origin


def find_image_folder(image: str) -> ImageFolder:
    """The folder ``image`` names: the whole of it, else ``PATH:TAG`` (the longest ``PATH`` that is a folder);
    ``ImageError`` saying what was looked for when it names neither kind of image folder."""
    whole = Path(image).expanduser()
    if whole.is_dir():
        return _recognised(whole.resolve(), None, image)
    head = image
    while ":" in head:
        head = head.rpartition(":")[0]
        if head and Path(head).expanduser().is_dir():
            return _recognised(Path(head).expanduser().resolve(), image[len(head) + 1:], image)
    if whole.exists():
        raise ImageError(f"/image: {image} is a file, not {WHAT_A_PATH_NAMES}; an image file (squashfs, erofs, "
                         "ext4, qcow2) goes into the site's catalogue (docs/base-images.md)", code="image_not_found")
    raise ImageError(f"/image: {image} does not exist on this host; a path names {WHAT_A_PATH_NAMES}",
                     code="image_not_found")


def _recognised(path: Path, tag: str | None, image: str) -> ImageFolder:
    if os.path.lexists(path / "oci-layout"):
        if tag == "":
            raise ImageError(f"/image: {image} ends with ':' and no tag; name one, or leave out the ':'")
        return ImageFolder(path, layout=True, tag=tag)
    if tag is not None:
        raise ImageError(f"/image: {image}: {path} is not an OCI image layout (it has no oci-layout file), so "
                         f"there is no tag {tag!r} to choose", code="image_not_found")
    if os.path.lexists(path / "etc") and (os.path.lexists(path / "bin") or os.path.lexists(path / "usr")):
        return ImageFolder(path, layout=False)
    raise ImageError(f"/image: {image}: {path} is not {WHAT_A_PATH_NAMES}", code="image_not_found")


def _check_tree(folder: Path, site: SiteConfig, label: str) -> None:
    """Before a tree is read whole: bounded as a bind is (a link counts as itself: the image keeps it), and
    every file and folder in it readable by this user (mksquashfs would put an unreadable file in empty)."""
    limit, seen, entries = site.bind_limit_bytes, 0, 0

    def unreadable(error: OSError) -> None:
        raise ImageError(f"{label}: {error.filename} cannot be read by uid {os.getuid()} ({error.strerror}); "
                         "the image would lack it: make the tree readable")

    for parent, dirs, files in os.walk(folder, onerror=unreadable):
        for name in dirs + files:
            path = os.path.join(parent, name)
            info = os.lstat(path)
            seen += info.st_size if name in files else 0
            entries += 1
            if stat.S_ISREG(info.st_mode) and not os.access(path, os.R_OK):
                raise ImageError(f"{label}: {path} is not readable by uid {os.getuid()}; the image would hold it "
                                 "empty: make the tree readable")
            if seen > limit or entries > MAX_BIND_ENTRIES:
                raise LimitExceeded(
                    f"{label}: {folder} holds more than {limit >> 20} MiB or {MAX_BIND_ENTRIES} entries (seen so "
                    f"far: {seen >> 20} MiB in {entries} entries; limits.bind_mib in {site.source}); a folder "
                    "that large is not imaged: give a smaller image")


def _layout_image(layout: oci.OciImage, releases: Path, site: SiteConfig, progress: Callable[[str], None],
                  hold: CacheHold) -> tuple[Path, str]:
    """The squashfs of ``layout``'s image, keyed by its manifest's digest (which names every layer's)."""
    key = hashlib.sha256(f"oci\0{UNPACK_VERSION}\0{layout.manifest_digest}".encode()).hexdigest()[:32]
    limits = oci.UnpackLimits(site.bind_limit_bytes, MAX_BIND_ENTRIES, f"limits.bind_mib in {site.source}")

    def build(image: Path, scratch: Path) -> None:
        tree, pseudo = scratch / "tree", scratch / "owners.pseudo"
        tree.mkdir(mode=0o700)
        pseudo.write_bytes(oci.unpack(layout, tree, limits).pseudo_definitions())
        build_disk(["mksquashfs", str(tree), str(image), *SQUASHFS, "-pf", str(pseudo)],
                   f"squashfs image of {layout.label}", releases)

    what = f"squashfs image of the OCI layout {layout.layout} ({layout.manifest_digest[:19]}…)"
    return cached_image(releases, key, "squashfs", what, build, progress, hold=hold,
                        source=f"{layout.layout} {layout.manifest_digest}")
