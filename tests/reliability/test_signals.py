"""The batch system ends vjobs: SIGTERM gives a 'cancelled' result and a clean host; SIGKILL leaves no VM
running (QEMU dies with its parent) and `vjobs gc` removes the files."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

import vjobs
from vjobs.testing.host_state import work_leftovers
from vjobs.testing.processes import qemu_processes

pytestmark = pytest.mark.vm


@pytest.fixture
def site_file(tmp_path, cache_dir, built_image):
    path = tmp_path / "site.toml"
    path.write_text(f'driver = "qemu_user"\ncache_dir = "{cache_dir}"\nwork_dir = "{tmp_path / "work"}"\n')
    return path


def test_sigterm_cancels_and_cleans_up(make_job, site_file, tmp_path, start_vjobs, wait_for_payload,
                                      assert_clean_host):
    process = start_vjobs(make_job(["sleep", "600"]), site_file, tmp_path / "out")
    wait_for_payload(tmp_path / "work", process)
    process.send_signal(signal.SIGTERM)
    stdout, _ = process.communicate(timeout=60)
    assert process.returncode == 204
    result = json.loads(stdout)
    assert result["status"] == "cancelled" and result["error"]["code"] == "cancelled"
    assert json.loads((tmp_path / "out" / "result.json").read_text())["status"] == "cancelled"


def test_sigkill_takes_qemu_down_and_gc_removes_the_files(make_job, site_file, tmp_path, start_vjobs,
                                                         wait_for_payload):
    process = start_vjobs(make_job(["sleep", "600"]), site_file, tmp_path / "out")
    wait_for_payload(tmp_path / "work", process)
    assert qemu_processes(str(tmp_path))
    process.kill()
    process.wait()
    deadline = time.monotonic() + 10
    while qemu_processes(str(tmp_path)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert qemu_processes(str(tmp_path)) == []
    unrelated = tmp_path / "work" / "not-ours"
    unrelated.mkdir()
    gc = subprocess.run([sys.executable, "-m", "vjobs", "gc", "--site", str(site_file)], capture_output=True,
                        text=True, check=True)
    assert "removed job folder" in gc.stdout
    assert work_leftovers(tmp_path / "work") == ["not-ours"]


EARLY_SIGTERM = """
import os, signal, sys
from vjobs.cli.commands import main
from vjobs.container.signals import early_signals_held
with early_signals_held():                 # what `vjobs run` does before it imports the rest of vjobs
    os.kill(os.getpid(), signal.SIGTERM)   # comes while vjobs would still be importing, loading or probing
    sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.parametrize("command", ["run", "exec"])
def test_a_sigterm_before_the_job_started_still_gives_a_cancelled_result(command, make_job, tmp_path):
    """A pilot's SIGTERM at vjobs' very start: no VM is started, and result.json says cancelled."""
    out = tmp_path / "out"
    out.mkdir()
    arguments = ["run", "--outdir", str(out), str(make_job(["true"]))] if command == "run" else \
        ["exec", "--result", str(out / "result.json"), "default", "true"]
    done = subprocess.run([sys.executable, "-c", EARLY_SIGTERM, *arguments], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 204, done.stderr
    result = json.loads((out / "result.json").read_text())
    assert (result["status"], result["error"]["code"]) == ("cancelled", "cancelled")
    assert "SIGTERM" in result["error"]["message"] and "boot" not in result["timings"]


class _SignalsItselfWhenCollected:
    """Python runs a signal handler between two bytecodes, also inside a ``__del__``, and drops what it
    raises there: the cancel's exception is lost, as it was once in the accounts campaign."""

    def __del__(self):
        os.kill(os.getpid(), signal.SIGTERM)
        sum(range(1000))  # bytecodes inside __del__: the handler runs here


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # the dropped exception
def test_a_sigterm_whose_exception_python_dropped_still_cancels_the_job(make_job, qemu_user_site, tmp_path,
                                                                       assert_clean_host):
    def in_a_finalizer(event):
        if event.subject == "run":
            _SignalsItselfWhenCollected()  # collected at once, in this thread (the job's main thread)

    started = time.monotonic()
    result = vjobs.run(make_job(["sleep", "600"]), site=qemu_user_site, outdir=tmp_path / "out",
                       event_hooks={"phase_started": [in_a_finalizer]})
    assert (result.status, result.error["code"]) == ("cancelled", "cancelled"), result.error
    assert time.monotonic() - started < 120  # not the wall time: cancelled within a second of the signal
