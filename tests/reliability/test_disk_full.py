"""A full work_dir or cache_dir while a job is prepared or runs: disk_full, a result, nothing left."""

from __future__ import annotations

import dataclasses
import os
import subprocess

import pytest

import vjobs
from vjobs.errors import SetupError
from vjobs.guest.disks import release_image

pytestmark = [pytest.mark.vm, pytest.mark.skipif(os.geteuid() != 0, reason="mounts a small tmpfs")]


@pytest.fixture
def small_disk(tmp_path):
    """A 48 MiB file system, unmounted after the test."""
    mount = tmp_path / "small"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=48m", "vjobs-test-small", str(mount)], check=True)
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=True)


def _job_folders(folder):
    return [p for p in folder.iterdir() if p.name != "admission"] if folder.exists() else []


def test_inputs_larger_than_the_free_space_give_disk_full_at_prepare(make_site, make_job, small_disk, tmp_path):
    site = make_site(driver="qemu_user", work_dir=str(small_disk / "work"))
    job = make_job(["true"], inputs={"big.bin": os.urandom(1 << 20) * 60})
    result = vjobs.run(job, site=site, outdir=tmp_path / "out")
    assert result.status == "setup_error" and result.error["code"] == "disk_full", result.error
    assert "work_dir" in result.error["message"] or str(small_disk) in result.error["message"]
    assert (tmp_path / "out" / "result.json").exists()
    assert _job_folders(small_disk / "work") == []


@pytest.mark.parametrize("driver", ["qemu_user", pytest.param("kvm", marks=pytest.mark.libvirt)])
def test_a_guest_that_fills_the_host_disk_while_it_runs_gives_disk_full(driver, make_site, make_job, small_disk,
                                                                        tmp_path, request):
    site = make_site(driver="qemu_user") if driver == "qemu_user" else request.getfixturevalue("kvm_site")
    site = dataclasses.replace(site, work_dir=small_disk / "work")
    job = make_job(["sh", "-c", "dd if=/dev/urandom of=big bs=1M count=100 && sync"],
                   resources={"scratch_mib": 160}, walltime_s=120)
    result = vjobs.run(job, site=site, outdir=tmp_path / "out")
    assert result.error and result.error["code"] == "disk_full", result.error
    assert result.timings["run"] < 60  # seen when QEMU paused the guest, not at the wall time
    assert _job_folders(small_disk / "work") == []


def test_a_release_image_that_does_not_fit_the_cache_gives_disk_full(small_disk, tmp_path, cache_hold):
    """The release image alone goes to the small file system: the job's other cached images stay usable."""
    release = tmp_path / "release"
    release.mkdir()
    (release / "data.bin").write_bytes(os.urandom(1 << 20) * 70)  # incompressible: 70 MiB of image
    with pytest.raises(SetupError) as refused:
        release_image(release, small_disk / "releases", "squashfs", lambda message: None, hold=cache_hold)
    assert refused.value.code == "disk_full" and "free space" in str(refused.value)
    assert [p.name for p in (small_disk / "releases").iterdir() if not p.name.endswith(".lock")] == []
