"""The built-in guest image: Debian's cloud kernel and busybox-static, from the package registry, with the
vjobs agent (agent/: a small /init and its ordered stage scripts) in the initramfs.

Nothing is installed on the host: the packages are fetched with ``apt-get download`` and unpacked with
``dpkg -x`` into a temporary folder. The cloud kernel flavour is used because it is LZ4-compressed (TCG
decompresses it quickly: about 2 s to /init on a 2-core host, where the xz-compressed generic kernel took 6 s) and has CONFIG_XEN_PV and CONFIG_PVH, so
one kernel serves QEMU, libvirt and Xen PV guests. Its block and filesystem drivers are modules; the
initramfs carries the ones the agent needs, in dependency order, in /etc/vjobs/modules.

``make``-style: the image lives in ``CACHE/images/default-KEY`` where KEY hashes what the build depends
on (this builder, the agent, the module list, the command line, the package names). A second build with
the same inputs only checks the files; ``force=True`` fetches the packages again (a newer kernel, say)."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

from vjobs.drivers.contract import BootImage
from vjobs.errors import ImageError
from vjobs.host.cache import CacheHold
from vjobs.host.tools import run_tool
from vjobs.images.checked import CheckedFiles
from vjobs.images.cpio import CpioWriter
from vjobs.images.store import build_once, publish, sha256_file

BUILDER_VERSION = 3
KERNEL_PACKAGE = "linux-image-cloud-amd64"  # a metapackage: it depends on the current versioned kernel
BUSYBOX_PACKAGE = "busybox-static"
# The modules the agent may load, each root with the group of devices it serves; their dependencies are
# added. The agent loads only the groups its VM's devices need (agent/stages/10-boot.sh): under TCG each
# module costs 10-40 ms of boot. virtio_pci for q35/pc, virtio_mmio for microvm, xen_blkfront for Xen PV,
# virtio_net for jobs that ask for a network, overlay for base images, virtio_scsi and sd_mod for templates
# (a restored guest gets its disks hot-plugged onto a virtio-scsi bus, which needs no PCI hot-plug); ext4
# is built into the cloud kernel; virtio_console for the port that carries the payload's live streams
# (vjobs/guest/streams.py).
MODULE_ROOTS = {"virtio_pci": "pci", "virtio_mmio": "mmio", "xen_blkfront": "xen", "virtio_blk": "disk",
                "squashfs": "disk", "erofs": "disk", "overlay": "disk", "virtio_scsi": "scsi", "sd_mod": "scsi",
                "virtio_net": "net", "virtio_console": "serial"}
# No "quiet": a kernel that hangs or panics should say where on the console log the user gets.
# cryptomgr.notests: the kernel's boot-time self-tests of its crypto algorithms take 0.2 s under TCG, and
# nothing in this guest relies on the kernel's crypto (the agent hashes with busybox).
CMDLINE = "panic=-1 loglevel=4 cryptomgr.notests"
AGENT = Path(__file__).resolve().parent.parent / "guest" / "agent"  # the guest half of the protocol
RESEED = "etc/vjobs/vjobs-reseed"  # agent/bin/vjobs-reseed.S says what it is


def agent_files() -> dict[str, bytes]:
    """The agent as initramfs paths -> contents: /init, its helpers, its stages in the order they run."""
    files = {"init": (AGENT / "init").read_bytes(),
             "etc/vjobs/lib.sh": (AGENT / "lib.sh").read_bytes(),
             "etc/vjobs/payload-ns.sh": (AGENT / "payload-ns.sh").read_bytes()}
    for stage in sorted((AGENT / "stages").glob("*.sh")):
        files[f"etc/vjobs/stages/{stage.name}"] = stage.read_bytes()
    files[RESEED] = (AGENT / "bin" / "vjobs-reseed").read_bytes()
    return files


def agent_sha256() -> str:
    return _sha256(json.dumps({name: _sha256(data) for name, data in agent_files().items()}).encode())


@dataclass(frozen=True)
class ImageManifest:
    kernel: Path
    initramfs: Path
    cmdline: str
    kernel_sha256: str
    initramfs_sha256: str
    kernel_package: str
    kernel_version: str
    busybox_version: str
    agent_sha256: str
    modules: tuple[str, ...]
    inputs_key: str

    def to_json(self) -> dict:
        data = asdict(self)
        data.update(kernel=str(self.kernel), initramfs=str(self.initramfs), modules=list(self.modules))
        return data

    @classmethod
    def from_json(cls, data: dict) -> "ImageManifest":
        return cls(**{**data, "kernel": Path(data["kernel"]), "initramfs": Path(data["initramfs"]),
                      "modules": tuple(data["modules"])})


def inputs_key() -> str:
    recipe = json.dumps([BUILDER_VERSION, KERNEL_PACKAGE, BUSYBOX_PACKAGE, MODULE_ROOTS, CMDLINE,
                         agent_sha256()])
    return hashlib.sha256(recipe.encode()).hexdigest()[:16]


def default_image_dir(cache_dir: Path) -> Path:
    return Path(cache_dir) / "images" / f"default-{inputs_key()}"


def load_default_image(cache_dir: Path) -> ImageManifest | None:
    """The built image if it is there and intact, else None. Its files are checked as the site's catalogue
    is (vjobs/images/checked.py): a file is hashed again only when its stamp changed."""
    folder = default_image_dir(cache_dir)
    try:
        manifest = ImageManifest.from_json(json.loads((folder / "manifest.json").read_text()))
    except (OSError, ValueError, TypeError, KeyError):
        return None
    try:
        with CheckedFiles(cache_dir) as files:
            open_default_image(manifest, files)
    except ImageError:
        return None
    return manifest


def open_default_image(manifest: ImageManifest, files: CheckedFiles) -> BootImage:
    """The image as a VM gets it: its kernel and initramfs opened among ``files``, checked against the
    manifest's sums."""
    return BootImage(files.verified(manifest.kernel, "built-in image kernel", manifest.kernel_sha256),
                     files.verified(manifest.initramfs, "built-in image initramfs", manifest.initramfs_sha256),
                     manifest.cmdline, builtin=True)


def build_default_image(cache_dir: Path, progress: Callable[[str], None] = lambda message: None, *,
                        hold: CacheHold, force: bool = False) -> ImageManifest:
    folder = default_image_dir(cache_dir)

    def build(scratch: Path) -> ImageManifest:
        manifest = _build(scratch, folder, progress)
        progress(f"guest image ready: {folder}")
        return manifest

    return build_once(folder, "guest image", lambda: load_default_image(cache_dir), build, hold=hold, force=force)


def _build(scratch: Path, folder: Path, progress: Callable[[str], None]) -> ImageManifest:
    downloads = scratch / "downloads"
    downloads.mkdir()
    progress(f"guest image: fetching {KERNEL_PACKAGE} and {BUSYBOX_PACKAGE} with apt-get download")
    meta = _download(KERNEL_PACKAGE, downloads)
    kernel_package = _versioned_kernel(meta)
    kernel_deb = _download(kernel_package, downloads)
    busybox_deb = _download(BUSYBOX_PACKAGE, downloads)
    unpacked = scratch / "root"
    for deb in (kernel_deb, busybox_deb):
        _dpkg_deb(["-x", deb, unpacked], f"unpacking {deb.name}", scratch)

    vmlinuz = _one(unpacked.glob("boot/vmlinuz-*"), f"no boot/vmlinuz-* in {kernel_deb.name}")
    kernel_version = vmlinuz.name.removeprefix("vmlinuz-")
    modules = _module_closure(unpacked / "lib" / "modules" / kernel_version)
    progress(f"guest image: kernel {kernel_version}, modules {' '.join(m.path.stem for m in modules)}")

    output = scratch / "image"
    output.mkdir()
    shutil.copyfile(vmlinuz, output / "vmlinuz")
    busybox = unpacked / "bin" / "busybox"
    _write_initramfs(output / "initramfs.cpio", busybox.read_bytes(), modules)
    manifest = ImageManifest(
        kernel=folder / "vmlinuz", initramfs=folder / "initramfs.cpio", cmdline=CMDLINE,
        kernel_sha256=sha256_file(output / "vmlinuz"),
        initramfs_sha256=sha256_file(output / "initramfs.cpio"),
        kernel_package=kernel_package, kernel_version=kernel_version,
        busybox_version=_deb_field(busybox_deb, "Version"), agent_sha256=agent_sha256(),
        modules=tuple(m.path.stem for m in modules), inputs_key=inputs_key())
    publish(output, folder, manifest.to_json())
    return manifest


def _write_initramfs(path: Path, busybox: bytes, modules: list[Path]) -> None:
    with open(path, "wb") as handle:
        cpio = CpioWriter(handle)
        for name in ("bin", "dev", "etc", "etc/vjobs", "etc/vjobs/stages", "lib", "lib/modules", "proc", "sys",
                     "run", "tmp", "root", "scratch", "mnt"):
            cpio.add_dir(name)
        cpio.add_char_device("dev/console", 5, 1)  # the kernel opens it for /init before devtmpfs exists
        cpio.add_char_device("dev/null", 1, 3, mode=0o666)
        cpio.add_file("bin/busybox", busybox, mode=0o755)
        for name, data in agent_files().items():
            cpio.add_file(name, data, mode=0o755 if name in ("init", RESEED) else 0o644)
        for module in modules:
            cpio.add_file(f"lib/modules/{module.path.name}", module.path.read_bytes())
        # "FILE GROUP..." lines, each module after its dependencies: the agent loads a module when it
        # wants one of its groups.
        cpio.add_file("etc/vjobs/modules",
                      "".join(f"{m.path.name} {' '.join(m.groups)}\n" for m in modules).encode())
        cpio.close()


@dataclass(frozen=True)
class GuestModule:
    path: Path
    groups: tuple[str, ...]  # the device groups (MODULE_ROOTS' values) that need it


def _module_closure(module_dir: Path) -> list[GuestModule]:
    """The root modules and what they depend on, each after its dependencies and with every group that
    needs it. A root built into the kernel (modules.builtin) is left out; one that is neither a module nor
    built in is an error."""
    available = {_module_name(path): path for path in module_dir.rglob("*.ko")}
    builtin_file = module_dir / "modules.builtin"
    builtin = {_module_name(Path(line)) for line in builtin_file.read_text().split()} if builtin_file.exists() else set()
    groups: dict[str, list[str]] = {}  # in load order: a module is added once its dependencies are

    def visit(name: str, group: str, chain: tuple[str, ...]) -> None:
        name = name.replace("-", "_")
        if name in builtin:
            return
        if name in chain:
            raise ImageError(f"guest image: module dependency cycle {' -> '.join(chain + (name,))}")
        path = available.get(name)
        if path is None:
            raise ImageError(f"guest image: the kernel in {module_dir} has no module {name!r}, built in or not")
        if group in groups.get(name, ()):
            return
        for dependency in _depends(path):
            visit(dependency, group, chain + (name,))
        groups.setdefault(name, []).append(group)

    for root, group in MODULE_ROOTS.items():
        visit(root, group, ())
    return [GuestModule(available[name], tuple(needed_by)) for name, needed_by in groups.items()]


def _module_name(path: Path) -> str:
    return path.name.removesuffix(".ko").replace("-", "_")


def _depends(module: Path) -> list[str]:
    return _depends_from_bytes(module.read_bytes())


def _depends_from_bytes(module: bytes) -> list[str]:
    """Read from the module's own .modinfo strings, so no depmod or modinfo is needed on the host."""
    found = re.search(rb"(?:^|\0)depends=([^\0]*)\0", module)
    names = found.group(1).decode() if found else ""
    return [name.replace("-", "_") for name in names.split(",") if name]


def _download(package: str, folder: Path) -> Path:
    before = set(folder.iterdir())

    def download() -> None:
        run_tool(["apt-get", "download", "-q", package], f"fetching {package} for the built-in guest image",
                 error=ImageError, cwd=folder, hint="check the package sources (run apt-get update as root)",
                 install="the built-in guest image is made from Debian packages: build it on a Debian/Ubuntu "
                         "host, or list your own images in the site config")

    try:
        download()
    except ImageError:
        if os.geteuid() != 0 or shutil.which("apt-get") is None:
            raise
        # A fresh machine may have no package lists yet, or stale ones that name deleted files.
        with contextlib.suppress(ImageError):  # its failure shows in the second download's
            run_tool(["apt-get", "update", "-qq"], "updating the package lists", error=ImageError)
        download()
    return _one(set(folder.iterdir()) - before, f"apt-get download {package} wrote no .deb")


def _versioned_kernel(meta_deb: Path) -> str:
    for dependency in _deb_field(meta_deb, "Depends").split(","):
        name = dependency.strip().split(" ")[0]
        if name.startswith("linux-image-"):
            return name
    raise ImageError(f"{meta_deb.name} depends on no linux-image-* package")


def _deb_field(deb: Path, name: str) -> str:
    return _dpkg_deb(["-f", deb, name], f"reading {name} of {deb.name}", deb.parent).strip()


def _dpkg_deb(arguments: list, what: str, where: Path) -> str:
    return run_tool(["dpkg-deb", *arguments], what, error=ImageError, where=where, install="install dpkg")


def _one(paths, message: str) -> Path:
    paths = sorted(paths)
    if len(paths) != 1:
        raise ImageError(message if not paths else f"{message} (found {len(paths)})")
    return paths[0]


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
