"""xen specifics, against the XAPI stand-in (vjobs.testing.xapi_standin): login, reachability, the SR, cut
uploads, a VM that will not start, a killed pilot, and a release or base image uploaded once for many jobs.

The end-to-end behaviour shared with every driver (exit status, outputs, read-only release, timeout, crash,
hostile archive) is proven by the conformance suite (vjobs.testing.conformance), where "xen" is one of the
parameters."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading

import pytest
import XenAPI

import vjobs
from vjobs.testing.host_state import work_leftovers

RELEASE = {"bin/tool": "#!/bin/sh\necho tool\n", "data/table.txt": "1 2 3\n" * 1000}


def xen_verdict(make_site, settings):
    site = make_site(driver="xen", drivers={"xen": settings})
    return next(v for v in vjobs.probe(site) if v.driver == "xen"), site


def release_vdis(standin) -> list[dict]:
    return [r for r in standin.store.objects["VDI"].values() if "vjobs.content_key" in r["other_config"]]


def test_probe_reports_the_host_and_the_sr(make_site, xen_settings):
    verdict, _ = xen_verdict(make_site, xen_settings)
    assert verdict.usable and verdict.acceleration == "xen-pv"
    assert {c.name: c.ok for c in verdict.checks} == {"dom0": False, "login": True, "host": True, "sr": True}
    assert "SR 'vjobs-sr': 4096 MiB free" in [c.detail for c in verdict.checks if c.name == "sr"][0]


def test_outside_dom0_the_driver_refuses_unless_told(make_site, xen_settings):
    verdict, _ = xen_verdict(make_site, {**xen_settings, "require_dom0": True})
    assert not verdict.usable and "/proc/xen/capabilities" in verdict.reason


def test_wrong_password(make_site, make_job, xen_settings, tmp_path, assert_clean_host):
    (tmp_path / "xapi-password").write_text("wrong\n")
    verdict, site = xen_verdict(make_site, xen_settings)
    assert not verdict.usable
    assert "SESSION_AUTHENTICATION_FAILED" in verdict.reason and "password_file" in verdict.reason
    assert "wrong" not in verdict.reason and "pool-secret" not in verdict.reason  # the secret is never shown
    result = vjobs.run(make_job(["true"]), site=site, outdir=tmp_path / "out")
    assert result.status == "vm_error" and result.error["code"] == "no_usable_driver"


def test_xapi_unreachable(make_site, xen_settings):
    verdict, _ = xen_verdict(make_site, {**xen_settings, "url": "http://127.0.0.1:9"})
    assert not verdict.usable
    assert "http://127.0.0.1:9 is unreachable" in verdict.reason and "[drivers.xen] url" in verdict.reason


def test_sr_missing(make_site, xen_settings):
    verdict, _ = xen_verdict(make_site, {**xen_settings, "sr": "no-such-sr"})
    assert not verdict.usable and "'no-such-sr' not found" in verdict.reason


@pytest.mark.vm
def test_sr_full_fails_the_job_and_leaves_nothing(xen_site, xapi_standin, make_job, tmp_path, assert_clean_host):
    sr = xapi_standin.calls.sr
    xapi_standin.store.modify("SR", sr, physical_size=40 << 20)  # less than the job's scratch disk
    result = vjobs.run(make_job(["true"]), site=xen_site, outdir=tmp_path / "out")
    assert result.status == "vm_error" and result.error["code"] == "xapi_sr_full"
    assert "storage repository is full" in result.error["message"]


@pytest.mark.vm
def test_release_upload_cut_half_way_leaves_no_half_release(xen_site, xapi_standin, make_job, tmp_path,
                                                             assert_clean_host):
    xapi_standin.faults.cut_upload_of = "-release"
    xapi_standin.faults.cut_upload_after_bytes = 4096
    job = make_job(["sh", "/opt/release/bin/tool"], release=RELEASE)
    result = vjobs.run(job, site=xen_site, outdir=tmp_path / "out")
    assert result.status == "vm_error" and "uploading" in result.error["message"]
    assert release_vdis(xapi_standin) == []  # a cut release is never found again as if it were whole
    again = vjobs.run(job, site=xen_site, outdir=tmp_path / "out2")
    assert again.status == "succeeded", again.error
    assert (tmp_path / "out2" / "stdout").read_text() == "tool\n"


@pytest.mark.vm
def test_vm_that_fails_to_start(make_site, xen_settings, xapi_standin, make_job, tmp_path, assert_clean_host):
    xapi_standin.faults.fail_next_start = "BOOTLOADER_FAILED"  # a template's start would take it: a cold boot
    site = make_site(driver="xen", drivers={"xen": {**xen_settings, "template": False}})
    result = vjobs.run(make_job(["true"]), site=site, outdir=tmp_path / "out")
    assert result.status == "vm_error" and result.error["code"] == "xapi_bootloader_failed"
    assert "could not load the guest kernel" in result.error["message"]


@pytest.mark.vm
def test_second_job_with_the_same_release_uploads_no_release_data(xen_site, xapi_standin, make_job, tmp_path,
                                                                 assert_clean_host):
    job = make_job(["cat", "/opt/release/bin/tool"], release=RELEASE)
    first = vjobs.run(job, site=xen_site, outdir=tmp_path / "out1")
    uploaded = dict(xapi_standin.stats.bytes_imported)
    second = vjobs.run(job, site=xen_site, outdir=tmp_path / "out2")
    assert first.status == second.status == "succeeded"
    new = {label: size for label, size in xapi_standin.stats.bytes_imported.items() if label not in uploaded}
    assert new and not any(label.endswith("-release") for label in new)  # only io and scratch went up
    assert [r["read_only"] for r in release_vdis(xapi_standin)] == [True]


@pytest.mark.vm
def test_a_base_image_is_uploaded_once_per_pool_and_attached_read_only(xen_site, xapi_standin, debian_image,
                                                                       make_job, tmp_path, assert_clean_host):
    """Found again by its content for the next job: one read-only VDI per base image in the pool."""
    for number in (1, 2):
        result = vjobs.run(make_job(["true"], image="debian12", id=f"base{number}"), site=xen_site,
                           outdir=tmp_path / f"out{number}")
        assert result.status == "succeeded", result.error
    vdis = xapi_standin.store.objects["VDI"].values()
    shared = [vdi for vdi in vdis if vdi["other_config"].get("vjobs.content_key") == debian_image.rootfs_sha256]
    assert len(shared) == 1 and shared[0]["read_only"]


@pytest.mark.vm
def test_two_jobs_at_once_share_one_upload_and_attach_it_read_only(xen_site, xapi_standin, make_job, tmp_path,
                                                                  assert_clean_host):
    job = make_job(["cat", "/opt/release/bin/tool"], release=RELEASE)
    results = {}
    runners = [threading.Thread(target=lambda n=n: results.__setitem__(
        n, vjobs.run(job, site=xen_site, outdir=tmp_path / f"out{n}"))) for n in (1, 2)]
    for runner in runners:
        runner.start()
    for runner in runners:
        runner.join(300)
    assert [results[n].status for n in (1, 2)] == ["succeeded", "succeeded"]
    releases = release_vdis(xapi_standin)
    assert len(releases) == 1
    release_uploads = [label for label in xapi_standin.stats.bytes_imported if label.endswith("-release")]
    assert len(release_uploads) == 1
    release_ref = next(ref for ref, r in xapi_standin.store.objects["VDI"].items() if r is releases[0])
    attachments = [e["snapshot"]["mode"] for e in xapi_standin.store.events
                   if e["class"] == "vbd" and e["operation"] == "add" and e["snapshot"]["VDI"] == release_ref]
    assert attachments == ["RO", "RO"]


@pytest.mark.vm
def test_killed_pilot_is_cleaned_from_the_pool_by_gc_and_nothing_else(xen_settings, xapi_standin, make_job,
                                                                      cache_dir, tmp_path, start_vjobs,
                                                                      wait_for_payload):
    site_file = tmp_path / "site.toml"
    settings = "\n".join(f"{key} = {value!r}" if isinstance(value, str) else f"{key} = {str(value).lower()}"
                         for key, value in xen_settings.items())
    site_file.write_text(f'driver = "xen"\ncache_dir = "{cache_dir}"\nwork_dir = "{tmp_path / "work"}"\n'
                         f"[drivers.xen]\n{settings}\n".replace("'", '"'))
    # Someone else's VM and disk in the same pool: gc must leave them alone.
    session = XenAPI.Session(xapi_standin.url)
    session.xenapi.login_with_password("root", "pool-secret", "2.0", "test")
    sr = session.xenapi.SR.get_by_name_label("vjobs-sr")[0]
    other_vdi = session.xenapi.VDI.create({"name_label": "someone-elses-disk", "SR": sr, "virtual_size": "4096",
                                           "type": "user", "sharable": False, "read_only": False,
                                           "other_config": {}, "xenstore_data": {}, "sm_config": {}, "tags": []})
    other_vm = session.xenapi.VM.create({"name_label": "someone-elses-vm", "memory_static_max": "268435456",
                                         "VCPUs_max": "1", "PV_kernel": "/boot/vmlinuz", "tags": ["vjobs"],
                                         "other_config": {}})
    try:
        process = start_vjobs(make_job(["sleep", "600"], release=RELEASE), site_file, tmp_path / "out")
        wait_for_payload(tmp_path / "work", process)
        process.send_signal(signal.SIGKILL)
        process.wait()
        running = [r["name_label"] for r in xapi_standin.store.objects["VM"].values() if r["power_state"] == "Running"]
        assert len(running) == 1 and running[0].startswith("vjobs-t1-")
        gc = subprocess.run([sys.executable, "-m", "vjobs", "gc", "--site", str(site_file)], capture_output=True,
                            text=True, timeout=120)
        assert gc.returncode == 0, gc.stderr
        assert f"destroyed VM {running[0]}" in gc.stdout
        names = sorted(r["name_label"] for r in xapi_standin.store.objects["VDI"].values()
                       if "vjobs.template" not in r["other_config"])
        assert names == ["someone-elses-disk", f"{running[0]}-release"]  # the cached release stays (and template)
        assert [r["name_label"] for r in xapi_standin.store.objects["VM"].values()] == ["someone-elses-vm"]
        assert work_leftovers(tmp_path / "work") == []
    finally:
        session.xenapi.VM.destroy(other_vm)
        session.xenapi.VDI.destroy(other_vdi)
        session.xenapi.session.logout()


def test_job_that_asks_for_a_network_is_refused_clearly(make_site, xen_settings, make_job, tmp_path,
                                                        assert_clean_host):
    """The xen driver attaches no VIFs (yet): a job that needs a network must not run without one."""
    site = make_site(driver="xen", allow_network=True, drivers={"xen": xen_settings})
    result = vjobs.run(make_job(["true"], network=True), site=site, outdir=tmp_path / "out")
    assert result.status == "setup_error" and result.error["code"] == "limit_exceeded"
    assert "/network" in result.error["message"] and "xen driver gives its guests none" in result.error["message"]


@pytest.mark.parametrize("upload_format", ["vhd", "raw"])
def test_disk_upload_round_trip_and_sparse_vhd(xapi_standin, xen_settings, tmp_path, upload_format):
    """A disk with data, long zero runs and a partial last block comes back byte for byte; as VHD, the
    zero blocks are not sent (the stand-in decodes the VHD with qemu-img, an independent reader)."""
    from vjobs.drivers.xen.xapi import Xapi
    from vjobs.images.checked import CheckedFile

    disk = tmp_path / "disk.raw"
    with open(disk, "wb") as handle:
        handle.truncate(40 << 20)
        handle.seek(5 << 20)
        handle.write(os.urandom(3 << 20))
        handle.seek((40 << 20) - 4096)
        handle.write(b"tail" * 1024)
    with Xapi({**xen_settings, "upload_format": upload_format}) as xapi:
        sr = xapi.api.SR.get_by_name_label("vjobs-sr")[0]
        vdi = xapi.api.VDI.create({"name_label": "round-trip", "SR": sr, "virtual_size": str(40 << 20),
                                   "type": "user", "sharable": False, "read_only": False, "other_config": {},
                                   "xenstore_data": {}, "sm_config": {}, "tags": []})
        with CheckedFile.open(disk, "disk") as source:
            sent = xapi.import_vdi(vdi, source, upload_format)
        xapi.export_raw_vdi(vdi, tmp_path / "back.raw", 40 << 20)
        xapi.api.VDI.destroy(vdi)
    assert (tmp_path / "back.raw").read_bytes() == disk.read_bytes()
    assert xapi_standin.stats.bytes_imported["round-trip"] == sent
    if upload_format == "vhd":
        assert sent < 8 << 20  # the three 2 MiB blocks that hold data, and the headers
    else:
        assert sent == 40 << 20
