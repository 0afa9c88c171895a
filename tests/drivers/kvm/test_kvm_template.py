"""kvm's pre-booted templates (vjobs/drivers/kvm/template.py): a pool of saved domains, one per running job,
restored with the job's disks hot-plugged; any failure is a cold boot that says why."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys

import pytest

import vjobs
from vjobs.testing import sites

pytestmark = [pytest.mark.libvirt, pytest.mark.vm]


@pytest.fixture
def template_site(kvm_site, make_site):
    return make_site(driver="kvm", drivers={"kvm": {**sites.libvirt_settings(), "template": True}})


def slot_of(result) -> str:
    start = result.provenance["start"]
    assert start["mode"] == "template", start
    return start["template"]


def test_jobs_start_from_a_saved_domain_and_the_next_job_reuses_it(template_site, make_job, cache_dir, tmp_path,
                                                                   assert_clean_host):
    own = {"resources": {"memory_mib": 272}}  # a guest shape of its own: other tests' slots stay whole
    first = vjobs.run(make_job(["cat", "/opt/release/data.txt"], release={"data.txt": "x\n"}, **own),
                      site=template_site, outdir=tmp_path / "first")
    assert first.status == "succeeded", (first.error, (tmp_path / "first" / "console.log").read_text())
    assert (tmp_path / "first" / "stdout").read_text() == "x\n"
    second = vjobs.run(make_job(["true"], **own), site=template_site, outdir=tmp_path / "second")
    assert second.status == "succeeded"
    assert slot_of(first) == slot_of(second) and "_272m_1cpu_s0-" in slot_of(first)
    state = cache_dir / "templates" / slot_of(first) / "state"
    assert state.stat().st_uid == os.getuid() and state.stat().st_mode & 0o077 == 0, "not the account's own file"


def test_two_concurrent_jobs_each_get_a_slot(template_site, make_job, tmp_path, assert_clean_host):
    site = sites.write_site(tmp_path / "site.toml", {
        "driver": "kvm", "cache_dir": str(template_site.cache_dir), "work_dir": str(tmp_path / "work"),
        "host": {"budget_dir": str(tmp_path / "host-budget")},
        "drivers": {"kvm": {**sites.libvirt_settings(), "template": True}}})
    job = make_job(["true"], resources={"memory_mib": 304})
    runs = [subprocess.Popen([sys.executable, "-m", "vjobs", "run", "--site", str(site), "--json", "--outdir",
                              str(tmp_path / f"out{number}"), str(job)], stdout=subprocess.PIPE, text=True)
            for number in range(2)]
    results = [json.loads(run.communicate(timeout=300)[0]) for run in runs]
    assert [result["status"] for result in results] == ["succeeded", "succeeded"], results
    slots = sorted(result["provenance"]["start"]["template"] for result in results)
    assert ["_s0-" in slots[0], "_s1-" in slots[1]] == [True, True], slots


def test_a_saved_domain_that_cannot_be_restored_is_a_cold_boot_that_says_why(template_site, make_job, cache_dir,
                                                                             tmp_path, assert_clean_host):
    own = {"resources": {"memory_mib": 336}}
    first = vjobs.run(make_job(["true"], **own), site=template_site, outdir=tmp_path / "first")
    state = cache_dir / "templates" / slot_of(first) / "state"
    state.write_bytes(b"LibvirtQemudSave but not a saved guest")  # its sum updated below: libvirt sees it
    manifest = json.loads((state.parent / "manifest.json").read_text())
    manifest["sha256"]["state"] = hashlib.sha256(state.read_bytes()).hexdigest()
    (state.parent / "manifest.json").write_text(json.dumps(manifest))

    broken = vjobs.run(make_job(["echo", "ran"], **own), site=template_site, outdir=tmp_path / "broken")
    assert broken.status == "succeeded" and (tmp_path / "broken" / "stdout").read_text() == "ran\n"
    assert broken.provenance["start"]["mode"] == "cold"
    assert "restoring" in broken.provenance["start"]["fallback"], broken.provenance

    remembered = vjobs.run(make_job(["true"], **own), site=template_site, outdir=tmp_path / "remembered")
    assert remembered.provenance["start"]["mode"] == "cold"
    assert "boot cold" in remembered.provenance["start"]["fallback"]


def test_a_saved_domain_changed_after_it_was_saved_is_not_restored(template_site, make_job, cache_dir, tmp_path,
                                                                   assert_clean_host):
    own = {"resources": {"memory_mib": 368}}
    first = vjobs.run(make_job(["true"], **own), site=template_site, outdir=tmp_path / "first")
    state = cache_dir / "templates" / slot_of(first) / "state"
    with open(state, "r+b") as saved:  # rewritten in place, its sum not
        saved.seek(1 << 20)
        saved.write(b"not what was saved")
    damaged = vjobs.run(make_job(["true"], **own), site=template_site, outdir=tmp_path / "damaged")
    assert damaged.status == "succeeded" and damaged.provenance["start"]["mode"] == "cold"
    assert "is damaged" in damaged.provenance["start"]["fallback"]


def test_a_job_with_a_network_boots_cold_and_says_why(kvm_site, make_site, make_job, tmp_path, assert_clean_host):
    site = make_site(driver="kvm", allow_network=True, drivers={"kvm": {**sites.libvirt_settings(), "template": True}})
    result = vjobs.run(make_job(["true"], network=True), site=site, outdir=tmp_path / "out")
    if result.status != "succeeded":
        pytest.skip(f"no libvirt network here: {result.error}")
    assert result.provenance["start"] == {"mode": "cold", "why": "the job asks for a network, which a template "
                                                                 "does not have"}
