"""What is checked is what boots, seen from the guest (issue 18). A catalogue's base image passes every check;
then, once the checks are done and before the driver creates the VM, the site either replaces the folder that
holds it by another whose file is another image (a path-based hypervisor would boot that one), or rewrites the
file in place with its mtime put back (the trick that once got a qcow2 a backing file). The first job's guest
reads the file that was checked; the second job is refused before its guest runs. Through qemu_user and kvm
(a real libvirtd: VJOBS_REQUIRE_LIBVIRT=1 makes sure it does not skip). The same without a VM, and for the
raw copy xen gets: tests/images/test_checked_files.py."""

from __future__ import annotations

import dataclasses
import hashlib
import os
import shutil
import subprocess
from pathlib import Path

import pytest

import vjobs
from vjobs.config.site import CatalogueImage

pytestmark = pytest.mark.vm

DRIVERS = ["qemu_user", "kvm"]  # a parameter named driver_site: the kvm one gets the libvirt mark


@pytest.fixture
def base(debian_image, tmp_path) -> Path:
    """A copy of the Debian base in a folder of the site's own, ``images/current``; beside it ``images/new``,
    whose image of the same name is a squashfs with nothing but an /etc/debian_version that says so."""
    current, new = tmp_path / "images" / "current", tmp_path / "images" / "new"
    current.mkdir(parents=True)
    shutil.copyfile(debian_image.rootfs, current / "base.squashfs")
    (new / "tree" / "etc").mkdir(parents=True)
    (new / "tree" / "etc" / "debian_version").write_text("not the image that was checked\n")
    subprocess.run(["mksquashfs", str(new / "tree"), str(new / "base.squashfs"), "-quiet"], check=True)
    return current / "base.squashfs"


def site_with(request, driver_site: str, image: Path):
    site = request.getfixturevalue(f"{driver_site}_site")
    digest = hashlib.sha256(image.read_bytes()).hexdigest()
    return dataclasses.replace(site, images={"base": CatalogueImage(rootfs=image, rootfs_sha256=digest)})


def once_checked(action) -> dict:
    """Event hooks that run ``action`` when the driver is about to create the VM: every check is done."""
    def hook(event) -> None:
        if event.subject == "vm_create":
            action()
    return {"step_started": [hook]}


@pytest.mark.parametrize("driver_site", DRIVERS)
def test_a_base_whose_folder_is_replaced_after_its_check_boots_as_checked(driver_site, request, base, make_job,
                                                                          tmp_path, assert_clean_host):
    def new_images() -> None:
        os.rename(base.parent, base.parent.with_name("old"))
        os.rename(base.parent.with_name("new"), base.parent)

    result = vjobs.run(make_job(["cat", "/etc/debian_version"], image="base"), outdir=tmp_path / "out",
                       site=site_with(request, driver_site, base), event_hooks=once_checked(new_images))
    assert b"not the image" in base.read_bytes()  # the path names the other image now
    assert result.status == "succeeded", result.error
    assert (tmp_path / "out" / "stdout").read_text().startswith("12.")  # Debian 12's: the file that was checked


@pytest.mark.parametrize("driver_site", DRIVERS)
def test_a_base_rewritten_in_place_after_its_check_is_refused_before_the_guest_runs(driver_site, request, base,
                                                                                    make_job, tmp_path,
                                                                                    assert_clean_host):
    def rewrite() -> None:
        before = base.stat()
        with open(base, "r+b") as image:  # the last byte: padding, so the image still mounts
            image.seek(before.st_size - 1)
            image.write(b"\x01")
        os.utime(base, ns=(before.st_atime_ns, before.st_mtime_ns))

    result = vjobs.run(make_job(["echo", "ran"], image="base"), outdir=tmp_path / "out",
                       site=site_with(request, driver_site, base), event_hooks=once_checked(rewrite))
    assert result.status == "setup_error" and result.error["code"] == "image_error", result.error
    assert "was changed after vjobs checked it and before the VM started" in result.error["message"]
    assert str(base) in result.error["message"]
    assert not (tmp_path / "out" / "stdout").exists()  # the payload never ran
