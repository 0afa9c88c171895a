"""The checkpoint benchmark's short run (issue 20; the long one: benchmarks/checkpoint.py, docs/benchmarks.md
"Checkpoints"): one 256 MiB guest, a payload that touched little of its memory and one that filled it, each
checkpointed on SIGTERM, resumed and started over through the CLI. The benchmark itself stops on a wrong exit
status or a resumed payload that does not go on counting; this checks what its figures must show whatever
the machine: a filled guest's checkpoint holds what the payload wrote, an idle guest's does not."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from vjobs.testing.sites import write_site


@pytest.mark.vm
def test_a_checkpoint_grows_with_the_memory_touched_and_resumes(repo, cache_dir, built_image, tmp_path):
    site = write_site(tmp_path / "site.toml", {"cache_dir": str(cache_dir), "work_dir": str(tmp_path / "work")})
    figures = tmp_path / "figures.json"
    done = subprocess.run([sys.executable, str(repo / "benchmarks/checkpoint.py"), "--memory", "256", "--runs", "1",
                           "--site", str(site), "--json", str(figures)],
                          capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    little, filled = (next(case for case in json.loads(figures.read_text()) if case["touch"] == touch)
                      for touch in ("little", "all"))
    assert little["touched_mib"] == 0 and filled["touched_mib"] > 128
    assert filled["state_bytes"] - little["state_bytes"] > (filled["touched_mib"] << 20) * 0.8
    assert filled["stored_bytes"] >= filled["state_bytes"] > (256 << 20) // 2
    for case in (little, filled):
        assert 0 < case["save_guest_s"] <= case["checkpoint_total_s"] < case["sigterm_to_exit_s"]
        assert 0 < case["resume_running_s"] < case["resume_first_line_s"] < case["resume_wall_s"]
