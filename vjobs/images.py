"""Guest images: the site's catalogue, checked against its sha256 sums, or the built-in default image."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .driver import BootImage
from .errors import ImageError
from .site import SiteConfig


@dataclass(frozen=True)
class ResolvedImage:
    name: str
    boot: BootImage
    kernel_sha256: str
    initramfs_sha256: str


def resolve_image(name: str, site: SiteConfig, progress: Callable[[str], None]) -> ResolvedImage:
    entry = site.images.get(name)
    if entry is None and name == "default":
        return built_in_image(site.cache_dir, progress)
    if entry is None:
        known = ", ".join(sorted({*site.images, "default"}))
        raise ImageError(f"/image: {name!r} is not in this site's catalogue ({site.source}); known: {known}")
    checked = ChecksumCache(site.cache_dir / "checksums.json")
    for label, path, expected in (("kernel", entry.kernel, entry.kernel_sha256),
                                  ("initramfs", entry.initramfs, entry.initramfs_sha256)):
        checked.verify(f"images.{name}.{label}", path, expected)
    return ResolvedImage(name, BootImage(entry.kernel, entry.initramfs, entry.cmdline),
                         entry.kernel_sha256, entry.initramfs_sha256)


def built_in_image(cache_dir: Path, progress: Callable[[str], None]) -> ResolvedImage:
    from .guest.image import build_default_image  # deferred: building pulls in apt and the cpio writer

    manifest = build_default_image(cache_dir, progress)
    return ResolvedImage("default", BootImage(manifest.kernel, manifest.initramfs, manifest.cmdline),
                         manifest.kernel_sha256, manifest.initramfs_sha256)


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
