"""xen jobs started from a pre-booted template (vjobs/drivers/xen/template.py), against the XAPI stand-in:
made once and reused, shared by concurrent jobs, a damaged one falls back to a cold boot, and a killed vjobs
leaves nothing of its job behind after gc."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading

import pytest

import vjobs
from vjobs.drivers.xen.template import TEMPLATE_KEY

pytestmark = pytest.mark.vm


def templates(standin) -> dict[str, dict]:
    return {ref: r for ref, r in standin.store.objects["VDI"].items() if TEMPLATE_KEY in r["other_config"]}


def start_of(outdir) -> dict:
    import json
    return json.loads((outdir / "result.json").read_text())["provenance"]["start"]


def test_a_job_starts_from_a_template_and_the_next_reuses_it(xen_site, xapi_standin, make_job, tmp_path,
                                                              assert_clean_host):
    first = vjobs.run(make_job(["echo", "hello"]), site=xen_site, outdir=tmp_path / "out1")
    assert first.status == "succeeded", first.error
    assert (tmp_path / "out1" / "stdout").read_text() == "hello\n"
    start = start_of(tmp_path / "out1")
    assert start["mode"] == "template", start
    made = set(templates(xapi_standin))
    assert len(made) == 1
    starts = xapi_standin.stats.calls.get("VM.start", 0)
    second = vjobs.run(make_job(["echo", "again"]), site=xen_site, outdir=tmp_path / "out2")
    assert second.status == "succeeded", second.error
    assert start_of(tmp_path / "out2") == start  # the same template
    assert set(templates(xapi_standin)) == made
    assert xapi_standin.stats.calls.get("VM.start", 0) == starts  # no boot: a resume
    plugs = [e for e in xapi_standin.store.events if e["class"] == "vbd" and e["operation"] == "add"]
    assert plugs


def test_two_concurrent_jobs_from_one_template(xen_site, xapi_standin, make_job, tmp_path, assert_clean_host):
    jobs, results = {}, {}
    for n in (1, 2):  # make_job writes one file: each job gets its own copy
        jobs[n] = tmp_path / f"job{n}.json"
        jobs[n].write_text(make_job(["echo", str(n)], id=f"c{n}").read_text())
    runners = [threading.Thread(target=lambda n=n: results.__setitem__(
        n, vjobs.run(jobs[n], site=xen_site, outdir=tmp_path / f"out{n}"))) for n in (1, 2)]
    for runner in runners:
        runner.start()
    for runner in runners:
        runner.join(300)
    assert [results[n].status for n in (1, 2)] == ["succeeded", "succeeded"], [results[n].error for n in (1, 2)]
    assert [(tmp_path / f"out{n}" / "stdout").read_text() for n in (1, 2)] == ["1\n", "2\n"]
    assert [start_of(tmp_path / f"out{n}")["mode"] for n in (1, 2)] == ["template", "template"]
    assert len(templates(xapi_standin)) == 1


def test_a_damaged_template_falls_back_to_a_cold_boot_with_the_reason(xen_site, xapi_standin, make_job, tmp_path,
                                                                      assert_clean_host):
    first = vjobs.run(make_job(["true"]), site=xen_site, outdir=tmp_path / "out1")
    assert first.status == "succeeded" and start_of(tmp_path / "out1")["mode"] == "template"
    (ref,) = templates(xapi_standin)
    path = xapi_standin.calls.vdi_path(ref)
    path.write_bytes(b"\0" * path.stat().st_size)  # the suspend image is gone
    second = vjobs.run(make_job(["echo", "cold"]), site=xen_site, outdir=tmp_path / "out2")
    assert second.status == "succeeded", second.error
    assert (tmp_path / "out2" / "stdout").read_text() == "cold\n"
    start = start_of(tmp_path / "out2")
    assert start["mode"] == "cold" and "resuming the template" in start["fallback"], start
    assert templates(xapi_standin) == {}  # destroyed: made anew once the failure is forgotten
    third = vjobs.run(make_job(["true"]), site=xen_site, outdir=tmp_path / "out3")
    assert third.status == "succeeded"
    assert start_of(tmp_path / "out3")["mode"] == "cold" and "failed" in start_of(tmp_path / "out3")["fallback"]


def test_template_false_boots_cold(make_site, xen_settings, xapi_standin, make_job, tmp_path, assert_clean_host):
    site = make_site(driver="xen", drivers={"xen": {**xen_settings, "template": False}})
    result = vjobs.run(make_job(["true"]), site=site, outdir=tmp_path / "out")
    assert result.status == "succeeded"
    assert templates(xapi_standin) == {} and "VBD.plug" not in xapi_standin.stats.calls


def test_killed_vjobs_leaves_no_vm_or_job_vdi_after_gc(xen_settings, xapi_standin, make_job, cache_dir, tmp_path,
                                                       start_vjobs, wait_for_payload):
    site_file = tmp_path / "site.toml"
    settings = "\n".join(f"{key} = {value!r}" if isinstance(value, str) else f"{key} = {str(value).lower()}"
                         for key, value in xen_settings.items())
    site_file.write_text(f'driver = "xen"\ncache_dir = "{cache_dir}"\nwork_dir = "{tmp_path / "work"}"\n'
                         f"[drivers.xen]\n{settings}\n".replace("'", '"'))
    process = start_vjobs(make_job(["sleep", "600"]), site_file, tmp_path / "out")
    wait_for_payload(tmp_path / "work", process)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert len(templates(xapi_standin)) == 1
    gc = subprocess.run([sys.executable, "-m", "vjobs", "gc", "--site", str(site_file)], capture_output=True,
                        text=True, timeout=120)
    assert gc.returncode == 0, gc.stderr
    assert xapi_standin.store.objects["VM"] == {}
    left = [r["name_label"] for r in xapi_standin.store.objects["VDI"].values()
            if TEMPLATE_KEY not in r["other_config"]]
    assert left == []  # the job's disks and its clone of the template are gone; the template stays
