"""The real PanDA Pilot 3 (3.7.0.36, unmodified) runs one job against the PanDA server stand-in, on this host,
stage-in and stage-out by its own ``mv`` copytool. Select with ``-m pilot3``. (The stand-in's own tests, which
need no pilot: tests/testing/test_panda_standin.py.)

The pilot comes from its sdist: VJOBS_PILOT3_SDIST names an unpacked one, otherwise it is downloaded once
into the session cache (VJOBS_TEST_CACHE keeps it across sessions). It always runs with PILOT_NOKILL=1 in a
PID namespace of its own (see ``vjobs.pilot3.harness``): its orphan killer must never see this machine.
"""

from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.parse
from pathlib import Path

import pytest

from vjobs.pilot3.harness import PilotSite, leftover_processes, make_job, run_pilot
from vjobs.testing.panda_standin import PandaStandin

CANCELLED_BY_SERVER = "1144"  # pilot/common/errorcodes.py PANDAKILL


@pytest.fixture
def site(tmp_path) -> PilotSite:
    return PilotSite(tmp_path / "site")


# --- the real pilot ------------------------------------------------------------------------------------

COPY_UPPER = """#!/bin/sh
# the payload: the pilot runs it as ./<script> <jobPars> in the job's work dir, next to the staged-in input
set -e
tr a-z A-Z < "$1" > "$2"
"""


@pytest.mark.pilot3
def test_generic_pilot_runs_a_job_to_finished(pilot3_sdist, site):
    job = make_job(site, 4242, COPY_UPPER, args="in.txt out.txt", inputs={"in.txt": b"hello from storage\n"},
                   outputs=("out.txt",), core_count=1, min_ram_mb=1000, max_walltime_s=600)
    with PandaStandin(job) as standin:
        run = run_pilot(site, pilot3_sdist, standin.url, user="generic", timeout_s=240)
    print(f"pilot run: {run.elapsed_s:.1f} s, calls: {standin.calls()}")

    assert not run.timed_out and run.exit_code == 0, run.tail()
    states = standin.states(4242)
    assert states[0] == "starting" and "running" in states and states[-1] == "finished", (states, run.tail())
    final = standin.final(4242)
    assert (final["pilotErrorCode"], final["transExitCode"]) == ("0", "0"), final

    # staged out by mv to where the queue data (catchall mv_final_destination, --output-dir) puts it
    assert site.stored("out.txt").read_text() == "HELLO FROM STORAGE\n"
    assert site.stored("4242.log.tgz").is_file()
    assert json.loads(final["xml"])["out.txt"]["surl"] == str(site.stored("out.txt"))
    assert set(standin.calls()) == {"getJob", "updateJob"}

    # the pilot and everything it started are gone: its PID namespace ended with it
    assert not Path(f"/proc/{run.pid}").exists()
    assert leftover_processes(site) == []


SLEEPER = """#!/bin/bash
# the payload: notes when it starts and when it gets SIGTERM, then runs until stopped
trap 'echo "TERM $(date +%s.%N)" >> {marks}; exit 143' TERM
echo "START $(date +%s.%N)" >> {marks}
while true; do sleep 0.2; done
"""


@pytest.mark.pilot3
def test_tobekilled_cancels_the_payload(pilot3_sdist, site):
    """The server's `tobekilled` reaches the pilot in the reply to a heartbeat (every 10 s here, see
    harness.PILOT_CONFIG); the payload gets SIGTERM at once (SIGKILL 3 s later if alive); the job ends failed
    with the pilot's error 1144. The pilot would then idle for 20-145 s more: the harness ends it once the
    final state is in."""
    marks = site.root / "marks.txt"
    job = make_job(site, 4343, SLEEPER.format(marks=marks), inputs={"in.txt": b"x\n"}, outputs=("out.txt",))
    with PandaStandin(job) as standin:
        asked = {}
        threading.Thread(target=_kill_when_running, args=(standin, 4343, marks, asked), daemon=True).start()
        run = run_pilot(site, pilot3_sdist, standin.url, timeout_s=240,
                        stop_when=lambda: standin.final(4343) is not None)
    print(f"pilot run: {run.elapsed_s:.1f} s, states: {standin.states(4343)}")

    assert not run.timed_out, run.tail()
    final = standin.final(4343)
    assert final and final["state"] == "failed" and final["pilotErrorCode"] == CANCELLED_BY_SERVER, run.tail()
    term = [float(line.split()[1]) for line in marks.read_text().splitlines() if line.startswith("TERM")]
    assert term, marks.read_text()
    print(f"SIGTERM {term[0] - asked['at']:.1f} s after the server asked")
    assert term[0] - asked["at"] < 10 + 6
    assert not site.stored("out.txt").exists()
    assert not Path(f"/proc/{run.pid}").exists()
    assert leftover_processes(site) == []


def _kill_when_running(standin: PandaStandin, job_id, marks: Path, asked: dict) -> None:
    """Asks for the kill 3 s into the payload, after the updates that come with its start: the kill then
    reaches the pilot with a heartbeat, as a cancel in the middle of a job does."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not (marks.exists() and "running" in standin.states(job_id)):
        time.sleep(0.2)
    time.sleep(3)
    asked["at"] = time.time()
    standin.kill(job_id)
