"""The kill -9 campaign's short run (issue 9 point 7): per driver, a few SIGKILLs of a `vjobs run` at random
moments (half of them aimed inside a phase or step picked at random), `vjobs gc` after each, and nothing may be
left: no QEMU, libvirt domain, XAPI VM/VBD/VDI, job folder, admission share, partial build, unheld lock, socket or
orphan process. The campaign (vjobs/testing/kill_campaign.py) runs in a process of its own: it makes itself the
subreaper of what vjobs starts. The long run (300 kills per driver) and its method: benchmarks/kill_campaign.py,
docs/reliability.md."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from vjobs.testing import kill_campaign

KILLS = int(os.environ.get("VJOBS_KILL_CAMPAIGN_KILLS", "4"))
SEED = int(os.environ.get("VJOBS_KILL_CAMPAIGN_SEED", "7"))


def test_a_target_that_vjobs_does_not_emit_stops_the_campaign_at_once(capsys):
    with pytest.raises(SystemExit) as stopped:
        kill_campaign.main(["--drivers", "qemu_user", "--only-targets", "boot/vm_start,boot/xapi-start"])
    assert stopped.value.code == 2
    assert "step 'xapi-start'" in capsys.readouterr().err
    with pytest.raises(ValueError, match="phase 'booting'"):
        kill_campaign.check_labels(["booting/vm_start"])
    kill_campaign.check_labels(["startup", "prepare/release_image/tool:mksquashfs", "exit"])


@pytest.mark.vm
@pytest.mark.parametrize("driver", ["qemu_user", pytest.param("kvm", marks=pytest.mark.libvirt), "xen"])
def test_nothing_is_left_after_sigkill_and_gc(driver, request, cache_dir, built_image, tmp_path):
    if driver == "kvm":
        request.getfixturevalue("kvm_site")  # skips without libvirtd (fails in CI: scripts/test.sh)
    report_path = tmp_path / "campaign.json"
    done = subprocess.run([sys.executable, "-m", "vjobs.testing.kill_campaign", "--kills", str(KILLS),
                           "--drivers", driver, "--seed", str(SEED), "--json", str(report_path),
                           "--root", str(tmp_path / "sites"), "--source-cache", str(cache_dir),
                           "--calibration-runs", "1", "--quiet"],
                          capture_output=True, text=True, timeout=280)
    assert report_path.exists(), f"the campaign wrote no report (exit {done.returncode}): {done.stderr[-3000:]}"
    report = json.loads(report_path.read_text())["drivers"][driver]
    assert "error" not in report, report.get("error")
    summary = report["summary"]
    assert summary["kills"] == KILLS, summary
    assert summary["gc_failures"] == 0, [k["gc"] for k in report["kills"] if k.get("gc", {}).get("rc") != 0]
    left = {kind: count for kind, count in summary["leftovers_after_gc"].items() if count}
    where = [(k["phase"], k["elapsed_s"], k["new_leftovers"]) for k in report["kills"] if k.get("new_leftovers")]
    assert left == {}, f"left after `vjobs gc`: {left}; by kill (phase, seconds in, what): {where}"
    assert report["calibration"]["baseline"]["leftovers"] == {}, "a complete run left something"
