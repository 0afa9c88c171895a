"""At the wall time the payload gets SIGTERM and stop_grace_s to write what it can; what it wrote comes back."""

from __future__ import annotations

import json

import pytest

import vjobs

pytestmark = pytest.mark.vm

TERM_AWARE = """
trap 'echo got-term > late.txt; sleep 1; echo wrote-after-term >> late.txt; exit 7' TERM
echo early > early.txt
(trap 'echo child-got-term > child.txt; exit 0' TERM; while :; do sleep 0.2; done) &
while :; do sleep 0.2; done
"""


def test_the_payload_and_its_children_get_sigterm_and_their_late_outputs_come_back(make_site, make_job, tmp_path,
                                                                                   assert_clean_host):
    site = make_site(driver="qemu_user", stop_grace_s=10)
    job = make_job(["sh", "-c", TERM_AWARE], walltime_s=4, outputs=["*.txt"])
    result = vjobs.run(job, site=site, outdir=tmp_path / "out")
    assert result.status == "timeout" and result.error["code"] == "walltime_exceeded"
    assert "SIGTERM" in result.error["message"]
    outputs = tmp_path / "out" / "outputs"
    assert (outputs / "early.txt").read_text() == "early\n"
    assert (outputs / "late.txt").read_text() == "got-term\nwrote-after-term\n"
    assert (outputs / "child.txt").read_text() == "child-got-term\n"
    # the payload ended 1 s into its grace: nobody waited for the other 9
    assert result.timings["run"] < 4 + 5
    assert json.loads((tmp_path / "out" / "result.json").read_text())["status"] == "timeout"


def test_a_payload_that_ignores_sigterm_is_killed_after_the_grace(make_site, make_job, tmp_path,
                                                                   assert_clean_host):
    site = make_site(driver="qemu_user", stop_grace_s=1)
    job = make_job(["sh", "-c", "trap '' TERM; echo before > before.txt; while :; do sleep 1; done"],
                   walltime_s=3, outputs=["*.txt"])
    result = vjobs.run(job, site=site, outdir=tmp_path / "out")
    assert result.status == "timeout"
    assert (tmp_path / "out" / "outputs" / "before.txt").read_text() == "before\n"
    assert 3 <= result.timings["run"] < 3 + 1 + 5
