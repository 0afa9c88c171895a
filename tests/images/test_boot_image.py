"""The built-in guest image: a real kernel and initramfs from the package registry, built once, reused."""

from __future__ import annotations

import io
import os
import subprocess

import pytest

from vjobs.errors import DiskFull
from vjobs.images import boot as image
from vjobs.images.cpio import CpioWriter


def _cpio_listing(data: bytes) -> list[str]:
    """What GNU cpio (an independent reader) sees in the archive: `ls -l`-style lines."""
    done = subprocess.run(["cpio", "-itv", "--quiet"], input=data, capture_output=True, check=True)
    return done.stdout.decode().splitlines()


def test_cpio_is_read_back_by_gnu_cpio_and_reproducible():
    def archive() -> bytes:
        buffer = io.BytesIO()
        writer = CpioWriter(buffer)
        writer.add_dir("dev")
        writer.add_char_device("dev/console", 5, 1)
        writer.add_file("init", b"#!/bin/sh\n", mode=0o755)
        writer.add_symlink("sh", "init")
        writer.close()
        return buffer.getvalue()

    first = archive()
    assert first == archive()
    listing = _cpio_listing(first)
    assert [line.split()[-1] for line in listing[:3]] == ["dev", "dev/console", "init"]
    assert listing[1].startswith("crw-------") and "5,   1" in listing[1]
    assert listing[2].startswith("-rwxr-xr-x")
    assert listing[3].endswith("sh -> init")


def test_built_image_has_the_agent_busybox_and_modules_in_dependency_order(built_image):
    data = built_image.initramfs.read_bytes()
    names = [line.split()[-1] for line in _cpio_listing(data)]
    assert {"init", "bin/busybox", "dev/console", "etc/vjobs/modules"} <= set(names)
    assert built_image.kernel.stat().st_size > 1_000_000
    modules = list(built_image.modules)
    assert modules.index("virtio_ring") < modules.index("virtio_blk")
    assert modules.index("virtio") < modules.index("virtio_pci")
    assert {"squashfs", "erofs", "xen-blkfront", "virtio_mmio"} <= set(modules)
    # every module's own dependencies come before it: the agent insmods them in this order
    for position, name in enumerate(modules):
        ko = next(name_ for name_ in names if name_ == f"lib/modules/{name}.ko")
        extracted = subprocess.run(["cpio", "-i", "--quiet", "--to-stdout", ko], input=data,
                                   capture_output=True, check=True).stdout
        for dependency in image._depends_from_bytes(extracted):
            assert dependency in [m.replace("-", "_") for m in modules[:position]], (name, dependency)


def test_each_module_is_listed_with_every_device_group_that_needs_it(built_image):
    """The agent loads a module when it wants one of its groups (agent/lib.sh's load_modules): a module
    shared by two groups must carry both, or a VM wanting only one would miss it."""
    listed = subprocess.run(["cpio", "-i", "--quiet", "--to-stdout", "etc/vjobs/modules"],
                            input=built_image.initramfs.read_bytes(), capture_output=True, check=True).stdout
    groups = {line.split()[0].removesuffix(".ko"): set(line.split()[1:]) for line in listed.decode().splitlines()}
    assert list(groups) == list(built_image.modules)
    assert groups["xen-blkfront"] == {"xen"} and groups["virtio_net"] == {"net"}
    assert {"pci", "mmio", "disk", "scsi", "net"} <= groups["virtio_ring"]  # every virtio driver needs it
    assert groups["squashfs"] == {"disk"} and {"scsi"} == groups["sd_mod"]
    assert set().union(*groups.values()) == set(image.MODULE_ROOTS.values())


def test_second_build_with_same_inputs_does_nothing(built_image, cache_dir, cache_hold):
    before = built_image.initramfs.stat().st_mtime_ns
    again = image.build_default_image(cache_dir, hold=cache_hold)
    assert again == built_image
    assert again.initramfs.stat().st_mtime_ns == before


def test_damaged_image_is_rebuilt(built_image, cache_dir, tmp_path, cache_hold):
    own_cache = tmp_path / "cache"
    first = image.build_default_image(own_cache, hold=cache_hold)
    first.initramfs.write_bytes(b"damaged")
    assert image.load_default_image(own_cache) is None
    rebuilt = image.build_default_image(own_cache, hold=cache_hold)
    assert rebuilt.initramfs_sha256 == first.initramfs_sha256
    assert not list((own_cache / "images").glob(".build-*"))


@pytest.mark.skipif(os.getuid() != 0, reason="mounting a small tmpfs needs root")
def test_disk_full_while_building_the_image_is_a_clear_error_and_leaves_nothing(tmp_path, cache_hold):
    full = tmp_path / "full"
    full.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(full)], check=True)
    try:
        with pytest.raises(DiskFull) as failure:
            image.build_default_image(full, hold=cache_hold)
        assert failure.value.code == "disk_full" and str(full) in str(failure.value)
        assert [p.name for p in (full / "images").iterdir()] == ["default.lock"]
    finally:
        subprocess.run(["umount", str(full)], check=True)
