"""What the payload used, measured in the guest (its cgroup) and read back at collection."""

from __future__ import annotations

import pytest

import vjobs

# ~2 s of CPU in a loop, then ~100 MiB held in a shell variable.
BURN_AND_ALLOCATE = ("timeout 2 sh -c 'while :; do :; done'; "
                     "x=$(head -c 104857600 /dev/zero | tr '\\0' a); echo ${#x}")


def _run(make_job, make_site, tmp_path, **job):
    site = make_site(driver="qemu_user")
    result = vjobs.run(make_job(["sh", "-c", BURN_AND_ALLOCATE], walltime_s=300, **job),
                       site=site, outdir=tmp_path / "out")
    assert result.ok, (result.error, result.stderr and open(result.stderr).read())
    return result.usage


def _assert_measured(usage):
    assert usage["cpu_user_s"] > 1, usage
    assert usage["memory_peak_mib"] >= 90, usage
    assert usage["processes_peak"] >= 2 and usage["samples"] >= 1 and "note" not in usage, usage


@pytest.mark.vm
def test_the_default_image_reports_cpu_and_memory(make_job, make_site, tmp_path, assert_clean_host):
    _assert_measured(_run(make_job, make_site, tmp_path))


@pytest.mark.vm
def test_the_debian_base_reports_cpu_and_memory(make_job, make_site, debian_image, tmp_path, assert_clean_host):
    _assert_measured(_run(make_job, make_site, tmp_path, image="debian12"))
