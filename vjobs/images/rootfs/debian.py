"""The built-in Debian 12 base image: a minbase with Python 3, made by mmdebstrap from the host's package
sources into an LZ4 squashfs, so that a job runs on a real distribution with no site config at all
(``"image": "debian12"``).

- Reproducible: ``SOURCE_DATE_EPOCH`` is fixed, so mmdebstrap and mksquashfs write the same bytes for the
  same package versions (a newer package in the archive is a new image, by design).
- LZ4 rather than zstd or xz: under TCG every byte a job reads is decompressed by an emulated CPU, and LZ4
  costs the least (the image is 100 MiB against 74 MiB for zstd level 3).
- Cached make-style under ``CACHE/images/debian12-KEY`` (KEY hashes the recipe); documentation, man pages
  and locales are left out by dpkg filters (~50 MiB nobody reads in a batch job).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

from vjobs.errors import ImageError
from vjobs.host.cache import CacheHold
from vjobs.host.tools import run_tool
from vjobs.images.checked import CheckedFiles
from vjobs.images.store import build_once, publish, sha256_file

NAME = "debian12"
BUILDER_VERSION = 1
SUITE = "bookworm"
PACKAGES = ("python3",)
SOURCE_DATE_EPOCH = "1700000000"
DPKG_FILTERS = ("path-exclude=/usr/share/man/*", "path-exclude=/usr/share/doc/*",
                "path-include=/usr/share/doc/*/copyright", "path-exclude=/usr/share/locale/*",
                "path-exclude=/usr/share/info/*")
SQUASHFS = ["-comp", "lz4", "-noappend", "-no-progress", "-quiet"]


@dataclass(frozen=True)
class BaseManifest:
    name: str
    rootfs: str
    rootfs_sha256: str
    size: int
    suite: str
    packages: list[str]  # "name=version" of every package in the image
    build_seconds: float
    recipe_key: str

    def python_version(self) -> str | None:
        return next((p.split("=", 1)[1] for p in self.packages if p.startswith("python3=")), None)


def recipe_key() -> str:
    recipe = json.dumps([BUILDER_VERSION, SUITE, PACKAGES, SOURCE_DATE_EPOCH, DPKG_FILTERS, SQUASHFS])
    return hashlib.sha256(recipe.encode()).hexdigest()[:16]


def image_dir(cache_dir: Path) -> Path:
    return Path(cache_dir) / "images" / f"{NAME}-{recipe_key()}"


def load(cache_dir: Path) -> BaseManifest | None:
    """The built image if it is there and has the sha256 it was built with, else None."""
    try:
        manifest = BaseManifest(**json.loads((image_dir(cache_dir) / "manifest.json").read_text()))
        with CheckedFiles(cache_dir) as files:
            files.verified(Path(manifest.rootfs), f"built-in image {NAME}", manifest.rootfs_sha256)
    except (OSError, ValueError, TypeError, ImageError):
        return None
    return manifest


def build(cache_dir: Path, progress: Callable[[str], None] = lambda message: None, *, hold: CacheHold,
          force: bool = False) -> BaseManifest:
    folder = image_dir(cache_dir)
    return build_once(folder, f"{NAME} image", lambda: load(cache_dir),
                      lambda scratch: _build(scratch, folder, progress), hold=hold, force=force)


def _build(scratch: Path, folder: Path, progress: Callable[[str], None]) -> BaseManifest:
    started = time.monotonic()
    tree = scratch / "tree"
    progress(f"{NAME}: mmdebstrap {SUITE} minbase with {', '.join(PACKAGES)} (about 20 s)")
    _mmdebstrap(tree, progress)
    packages = _packages(tree)
    output = scratch / "image"
    output.mkdir()
    progress(f"{NAME}: {len(packages)} packages; making the LZ4 squashfs")
    run_tool(["mksquashfs", tree, output / "rootfs.squashfs", *SQUASHFS], f"making the {NAME} squashfs",
             error=ImageError, where=output, env=_reproducible(), install="apt-get install squashfs-tools")
    manifest = BaseManifest(
        name=NAME, rootfs=str(folder / "rootfs.squashfs"), rootfs_sha256=sha256_file(output / "rootfs.squashfs"),
        size=(output / "rootfs.squashfs").stat().st_size, suite=SUITE, packages=packages,
        build_seconds=round(time.monotonic() - started, 1), recipe_key=recipe_key())
    publish(output, folder, asdict(manifest))
    progress(f"{NAME}: ready in {manifest.build_seconds} s, {manifest.size >> 20} MiB: {folder}")
    return manifest


def _mmdebstrap(tree: Path, progress: Callable[[str], None]) -> None:
    argv = ["mmdebstrap", "--variant=minbase", f"--include={','.join(PACKAGES)}",
            *(f"--dpkgopt={rule}" for rule in DPKG_FILTERS), SUITE, str(tree)]
    if os.geteuid() != 0:
        argv.insert(1, "--mode=unshare")  # no root: user namespaces instead of chroot as root

    def each_line(line: str) -> None:
        if line.startswith("I: "):
            progress(f"{NAME}: {line[3:].strip()}")

    run_tool(argv, f"installing {SUITE} into the {NAME} image", error=ImageError, where=tree.parent,
             env=_reproducible(), each_line=each_line, install="apt-get install mmdebstrap (scripts/install.sh does)",
             hint="check the host's apt sources (apt-get update as root); without root, mmdebstrap needs "
                  "newuidmap (the uidmap package) and subordinate ids in /etc/subuid, or the administrator "
                  f"builds the image once for every account: vjobs image build {NAME}")


def _packages(tree: Path) -> list[str]:
    """name=version of every installed package, read from the tree's dpkg status file."""
    packages, name = [], None
    for line in (tree / "var/lib/dpkg/status").read_text().splitlines():
        if line.startswith("Package: "):
            name = line.split(": ", 1)[1]
        elif line.startswith("Version: ") and name:
            packages.append(f"{name}={line.split(': ', 1)[1]}")
    return sorted(packages)


def _reproducible() -> dict[str, str]:
    """The environment of the tools that write the image: the same bytes for the same packages."""
    return {**os.environ, "SOURCE_DATE_EPOCH": SOURCE_DATE_EPOCH}
