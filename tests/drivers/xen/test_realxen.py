"""The xen driver against a real Xen 4.17 hypervisor (issue 22): a Xen node (vjobs.testing.xen_node, Xen and a
Debian dom0 nested under QEMU TCG, one per session) whose XAPI stand-in makes real PV domains with xl. Its
guests boot as Xen PV domains: hypercalls, ``hvc0``, xen-blkfront's ``xvd*`` disks, blkback's read-only VBDs.

Here: the driver conformance suite (base images, ``vjobs exec``, the hostile-guest cases: the base and the
release written by root in the guest, a hostile results archive, a console flood; checkpoints with xl save and
restore), what only a real Xen shows, and the SIGKILL campaign's short run. A node that cannot build or boot
fails these tests; none is skipped."""

from __future__ import annotations

import json
import subprocess
import sys
import threading

import pytest

import vjobs
from vjobs.testing.conformance import DriverConformance
from vjobs.testing.sites import write_site

pytestmark = [pytest.mark.vm, pytest.mark.realxen, pytest.mark.timeout(900)]


class TestConformanceOnRealXen(DriverConformance):
    # A PV console carries what xenconsoled reads from the guest's 2 KiB ring, rate-limited per domain; nested
    # under TCG that is a few tens of kB/s (400 kB took the payload 23 s; 3 MB did not pass in 120 s). Still
    # six times the 64 KiB the test keeps.
    console_flood_bytes = 400_000
    console_flood_walltime_s = 300

    @pytest.fixture(params=["xen"])
    def driver_site(self, request, realxen_site):
        request.getfixturevalue("built_image")
        return "xen", realxen_site


def test_the_guest_is_a_xen_pv_domain_with_blkfront_disks_and_a_read_only_release(make_job, realxen_site,
                                                                                   xen_pool, tmp_path,
                                                                                   assert_clean_host):
    script = ("cat /sys/hypervisor/type /sys/hypervisor/guest_type; "
              "for d in /sys/block/xvd*; do echo ${d##*/} ro=$(cat $d/ro); done; "
              "readlink /sys/class/tty/hvc0/device/driver || echo hvc0; sleep 5")
    seen: list[str] = []
    stop = threading.Event()

    def watch() -> None:  # what Xen itself runs while the job does
        while not stop.wait(1):
            seen.extend(name for name in xen_pool.domains() if name not in seen)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        result = vjobs.run(make_job(["sh", "-c", script], release={"data": "x"}), site=realxen_site,
                           outdir=tmp_path / "out")
    finally:
        stop.set()
        watcher.join()
    assert result.status == "succeeded", result.error
    lines = (tmp_path / "out" / "stdout").read_text().splitlines()
    assert lines[:2] == ["xen", "PV"], lines
    disks = dict(line.split(" ro=") for line in lines if line.startswith("xvd"))
    assert len(disks) >= 3 and "1" in disks.values() and "0" in disks.values(), disks  # io, scratch rw; release ro
    assert any(name.startswith("vjobs-") for name in seen), f"no domain of the job in `xl list`: {seen}"
    assert xen_pool.domains() == []
    assert json.loads((tmp_path / "out" / "result.json").read_text())["driver"] == "xen"


KILLS = 2


def test_nothing_is_left_after_sigkill_and_gc_on_real_xen(xen_node, cache_dir, built_image, tmp_path):
    site = write_site(tmp_path / "node-site.toml", {"driver": "xen", "drivers": {"xen": xen_node.site_settings()}})
    report_path = tmp_path / "campaign.json"
    done = subprocess.run([sys.executable, "-m", "vjobs.testing.kill_campaign", "--kills", str(KILLS),
                           "--drivers", "xen", "--xen-site", str(site), "--seed", "5", "--json", str(report_path),
                           "--root", str(tmp_path / "sites"), "--source-cache", str(cache_dir),
                           "--calibration-runs", "1", "--quiet"],
                          capture_output=True, text=True, timeout=840)
    assert report_path.exists(), f"the campaign wrote no report (exit {done.returncode}): {done.stderr[-3000:]}"
    report = json.loads(report_path.read_text())["drivers"]["xen"]
    assert "error" not in report, report.get("error")
    summary = report["summary"]
    assert summary["kills"] == KILLS and summary["gc_failures"] == 0, summary
    left = {kind: count for kind, count in summary["leftovers_after_gc"].items() if count}
    assert left == {}, f"left after `vjobs gc`: {left}"
