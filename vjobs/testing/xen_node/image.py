"""The Xen node's files, built from Debian packages and cached by content (/work/shared/XEN_NESTED.md has the
measured recipe and its pitfalls):

- ``xen.bin``: Debian's Xen 4.17 hypervisor, a multiboot ELF that QEMU's ``-kernel`` loads directly;
- ``vmlinuz``: Debian's *standard* 6.1 kernel as the PV dom0 kernel (the cloud flavour has no dom0 support);
- ``initrd.gz``: a busybox initramfs that loads the few modules it takes to mount the root disk (ext4 and
  virtio_blk are modules in that kernel) and switch_roots to ``/sbin/vjobs-dom0-init`` (dom0-init.sh);
- ``root.img``: a raw ext4 image of a Debian 12 minbase with Xen's tools, Python 3 and the kernel's modules.
  It is never written at run time: the node boots it with ``snapshot=on``.

The entry is ``CACHE/xen-node/node-KEY/`` with ``manifest.json``; KEY hashes this module's recipe, the
package versions apt resolves now and the init scripts' text, so a new kernel or Xen in the archive is a new
node. ``store.build_once`` builds it into a temporary folder beside it and renames it into place under a
lock (complete or absent). It is a test asset, not one of vjobs' own cache kinds: eviction leaves it alone.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

from vjobs.errors import ImageError
from vjobs.host.cache import CacheHold
from vjobs.host.tools import run_tool
from vjobs.images.cpio import CpioWriter
from vjobs.images.rootfs.debian import DPKG_FILTERS, SOURCE_DATE_EPOCH, SUITE
from vjobs.images.store import build_once, publish

BUILDER_VERSION = 1
HYPERVISOR_PACKAGE = "xen-hypervisor-4.17-amd64"
KERNEL_METAPACKAGE = "linux-image-amd64"  # resolved to the linux-image-6.1.0-N-amd64 it depends on
ROOT_PACKAGES = ("xen-utils-4.17", "xen-utils-common", "xenstore-utils", "kmod", "mount", "busybox", "procps",
                 "iproute2", "udev", "python3", "e2fsprogs",
                 "qemu-utils")  # qemu-img: the stand-in turns imported VHDs into raw VDIs
# What it takes to mount an ext4 root on virtio_blk, in dependency order (busybox insmod resolves nothing).
INITRAMFS_MODULES = ("crc16", "mbcache", "jbd2", "crc32c_generic", "ext4", "virtio_ring", "virtio",
                     "virtio_pci_legacy_dev", "virtio_pci_modern_dev", "virtio_pci", "virtio_blk")
ROOT_SPARE_MIB = 256  # free space in root.img beyond its files: logs, xenstored's database
HERE = Path(__file__).parent
INITRAMFS_INIT = HERE / "initramfs-init.sh"
DOM0_INIT = HERE / "dom0-init.sh"
# Settings of Debian's Xen packages that the node changes (file in the root, line appended).
XEN_SETTINGS = (("etc/default/xen", 'XENCONSOLED_ARGS="--log=guest --log-dir=/var/log/xen/console"'),
                ("etc/xen/xl.conf", 'autoballoon="off"'))  # dom0 has its fixed 512 MiB: never balloon it
BUSYBOX = "/bin/busybox"  # the host's, statically linked (the initramfs has no libc)


@dataclass(frozen=True)
class NodeFiles:
    """What ``build`` made, as recorded in the entry's ``manifest.json``: absolute paths and what went in."""
    folder: str
    hypervisor: str
    kernel: str
    initramfs: str
    root: str
    packages: dict[str, str]  # the packages the key names, with their versions
    kernel_release: str
    build_seconds: float
    key: str

    def sizes(self) -> dict[str, int]:
        """Bytes each file takes on disk (root.img is sparse)."""
        return {name: os.stat(path).st_blocks * 512
                for name, path in (("xen.bin", self.hypervisor), ("vmlinuz", self.kernel),
                                   ("initrd.gz", self.initramfs), ("root.img", self.root))}


def resolved_packages() -> dict[str, str]:
    """The package names and versions apt would install now: the key's part that the archive decides."""
    depends = run_tool(["apt-cache", "depends", KERNEL_METAPACKAGE], "resolving the Xen node's kernel",
                       error=ImageError)
    kernel = next((line.split()[-1] for line in depends.splitlines()
                   if line.strip().startswith("Depends: linux-image-")), None)
    if kernel is None:
        raise ImageError(f"the Xen node: {KERNEL_METAPACKAGE} depends on no linux-image package")
    names = [HYPERVISOR_PACKAGE, kernel, *ROOT_PACKAGES]
    policy = run_tool(["apt-cache", "policy", *names], "resolving the Xen node's packages", error=ImageError)
    versions, name = {}, None
    for line in policy.splitlines():
        if not line.startswith(" "):
            name = line.rstrip(":")
        elif line.strip().startswith("Candidate:") and name:
            versions[name] = line.split(":", 1)[1].strip()
    missing = [name for name in names if versions.get(name, "(none)") == "(none)"]
    if missing:
        raise ImageError(f"the Xen node: apt has no candidate for {', '.join(missing)} (apt-get update?)")
    return {name: versions[name] for name in names}


def recipe_key(packages: dict[str, str]) -> str:
    recipe = [BUILDER_VERSION, SUITE, sorted(packages.items()), INITRAMFS_MODULES, ROOT_SPARE_MIB, XEN_SETTINGS,
              DPKG_FILTERS, SOURCE_DATE_EPOCH, INITRAMFS_INIT.read_text(), DOM0_INIT.read_text()]
    return hashlib.sha256(json.dumps(recipe).encode()).hexdigest()[:16]


def load(folder: Path) -> NodeFiles | None:
    """The node built in ``folder``, if it is there whole, else None."""
    try:
        files = NodeFiles(**json.loads((folder / "manifest.json").read_text()))
    except (OSError, ValueError, TypeError):
        return None
    if not all(Path(path).is_file() for path in (files.hypervisor, files.kernel, files.initramfs, files.root)):
        return None
    return files


def build(cache_dir: Path, progress: Callable[[str], None] = lambda message: None, *,
          hold: CacheHold) -> NodeFiles:
    """The node's files, built once for the packages apt resolves now; ``hold`` keeps them in use."""
    packages = resolved_packages()
    folder = Path(cache_dir) / "xen-node" / f"node-{recipe_key(packages)}"
    return build_once(folder, "Xen node", lambda: load(folder),
                      lambda scratch: _build(scratch, folder, packages, progress), hold=hold)


def _build(scratch: Path, folder: Path, packages: dict[str, str], progress: Callable[[str], None]) -> NodeFiles:
    started = time.monotonic()
    output = scratch / "node"
    output.mkdir()
    unpacked = _download(scratch, [name for name in packages if name.startswith(("xen-hypervisor", "linux-image"))],
                         progress)
    release = next(path.name for path in (unpacked / "lib/modules").iterdir())
    with gzip.open(unpacked / "boot/xen-4.17-amd64.gz") as packed, open(output / "xen.bin", "wb") as plain:
        shutil.copyfileobj(packed, plain)
    shutil.copyfile(unpacked / f"boot/vmlinuz-{release}", output / "vmlinuz")
    modules = unpacked / "lib/modules" / release
    _initramfs(output / "initrd.gz", modules)
    progress(f"Xen node: mmdebstrap {SUITE} minbase with {', '.join(ROOT_PACKAGES)} (a minute or two)")
    tree = scratch / "root"
    _root_tree(tree, modules, release)
    _ext4_image(tree, output / "root.img")
    files = NodeFiles(folder=str(folder), hypervisor=str(folder / "xen.bin"), kernel=str(folder / "vmlinuz"),
                      initramfs=str(folder / "initrd.gz"), root=str(folder / "root.img"), packages=packages,
                      kernel_release=release, build_seconds=round(time.monotonic() - started, 1),
                      key=folder.name.rsplit("-", 1)[1])
    publish(output, folder, asdict(files))
    progress(f"Xen node: built in {files.build_seconds} s: {folder}")
    return files


def _download(scratch: Path, names: list[str], progress: Callable[[str], None]) -> Path:
    """``apt-get download`` the packages and unpack them into one folder (``dpkg -x``: no scripts run)."""
    debs, unpacked = scratch / "debs", scratch / "unpacked"
    debs.mkdir()
    progress(f"Xen node: apt-get download {' '.join(names)}")
    run_tool(["apt-get", "download", *names], "downloading the Xen node's packages", error=ImageError, cwd=debs)
    for deb in sorted(debs.glob("*.deb")):
        run_tool(["dpkg-deb", "-x", deb, unpacked], f"unpacking {deb.name}", error=ImageError, where=scratch)
    return unpacked


def _initramfs(path: Path, modules: Path) -> None:
    """A gzipped newc cpio: the static busybox, INITRAMFS_MODULES and initramfs-init.sh as /init."""
    with gzip.GzipFile(path, "wb", mtime=0) as handle:
        cpio = CpioWriter(handle)
        for name in ("bin", "dev", "proc", "sys", "modules", "newroot"):
            cpio.add_dir(name)
        cpio.add_char_device("dev/console", 5, 1)
        cpio.add_file("bin/busybox", Path(BUSYBOX).read_bytes(), 0o755)
        for module in INITRAMFS_MODULES:
            found = next(modules.rglob(f"{module}.ko"), None)
            if found is None:
                raise ImageError(f"the Xen node's kernel has no module {module}")
            cpio.add_file(f"modules/{module}.ko", found.read_bytes())
        cpio.add_file("modules.order", "\n".join(INITRAMFS_MODULES).encode() + b"\n")
        cpio.add_file("init", INITRAMFS_INIT.read_bytes(), 0o755)
        cpio.close()


def _root_tree(tree: Path, modules: Path, release: str) -> None:
    """dom0's root: the minbase, the kernel's modules (depmod'ed, so modprobe resolves what loads what), the
    node's init and its Xen settings."""
    run_tool(["mmdebstrap", "--variant=minbase", f"--include={','.join(ROOT_PACKAGES)}",
              *(f"--dpkgopt={rule}" for rule in DPKG_FILTERS), SUITE, tree],
             "installing dom0's root for the Xen node", error=ImageError, where=tree.parent,
             env={**os.environ, "SOURCE_DATE_EPOCH": SOURCE_DATE_EPOCH},
             install="apt-get install mmdebstrap", hint="the Xen node is built as root (mmdebstrap's chroot mode)")
    shutil.copytree(modules, tree / "lib/modules" / release, symlinks=True)
    run_tool(["depmod", "-b", tree, release], "indexing dom0's kernel modules", error=ImageError)
    shutil.copyfile(DOM0_INIT, tree / "sbin/vjobs-dom0-init")
    (tree / "sbin/vjobs-dom0-init").chmod(0o755)
    for relative, line in XEN_SETTINGS:
        with open(tree / relative, "a") as settings:
            settings.write(f"\n# vjobs.testing.xen_node\n{line}\n")
    for mount_point in ("srv/xapi", "opt/vjobs-code"):
        (tree / mount_point).mkdir(parents=True, exist_ok=True)


def _ext4_image(tree: Path, image: Path) -> None:
    """A sparse raw ext4 image holding ``tree``, ROOT_SPARE_MIB larger than its files."""
    used = sum(os.lstat(os.path.join(folder, name)).st_blocks * 512
               for folder, dirs, files in os.walk(tree) for name in files + dirs)
    size_mib = used * 5 // 4 // (1 << 20) + ROOT_SPARE_MIB  # a quarter more for ext4's own metadata
    run_tool(["mke2fs", "-q", "-t", "ext4", "-L", "dom0-root", "-E", "root_owner=0:0", "-d", tree, image,
              f"{size_mib}M"], "making dom0's root image", error=ImageError, where=image.parent,
             env={**os.environ, "E2FSPROGS_FAKE_TIME": SOURCE_DATE_EPOCH})
