"""Host admission (vjobs/host/admission.py) with real processes holding real shares: the VMs of concurrent vjobs
never get more than the host's budget, a job waits for its share or is refused with its own code, and the
share of a process killed with SIGKILL comes back by itself. No VM boots here."""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import time

import pytest

from vjobs.host.admission import admitted, gc_stale_shares
from vjobs.errors import AdmissionRefused, InvalidSite
from vjobs.config.site import HostBudget, load_site, site_from_dict

# A vjobs process in miniature: it asks for its share, says so, holds it (for HOLD seconds, or until its
# stdin is closed), and prints when it held it (CLOCK_MONOTONIC is the same for every process).
HOLDER = r"""
import json, sys, time
from vjobs.host.admission import admitted
from vjobs.errors import AdmissionRefused
from vjobs.config.site import site_from_dict

document, job_id, vcpus, memory_mib, hold = sys.argv[1:]
site = site_from_dict(json.loads(document), source="test site")
try:
    with admitted(job_id, int(vcpus), int(memory_mib), site) as share:
        start = time.monotonic()
        print("admitted", share.path, flush=True)
        sys.stdin.readline() if hold == "stdin" else time.sleep(float(hold))
        end = time.monotonic()
except AdmissionRefused as refused:
    print("refused", refused.code, flush=True)
    sys.exit(3)
print("held", json.dumps([start, end]), flush=True)
"""


@pytest.fixture
def document(tmp_path):
    """A site whose host has 2 vCPUs and 4096 MiB for VMs."""
    return {"work_dir": str(tmp_path / "work"), "cache_dir": str(tmp_path / "cache"),
            "host": {"vcpus": 2, "memory_mib": 4096, "admission_wait_s": 5}}


def site_of(document, **host):
    return site_from_dict({**document, "host": {**document["host"], **host}}, source="test site")


@pytest.fixture
def holders(document):
    """Starts holder processes; any still running after the test is killed (by its pid)."""
    started = []

    def start(job_id, vcpus, memory_mib, hold="stdin", site=None):
        process = subprocess.Popen([sys.executable, "-c", HOLDER, json.dumps(site or document), job_id, str(vcpus),
                                    str(memory_mib), hold], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        started.append(process)
        return process

    yield start
    for process in started:
        if process.poll() is None:
            process.kill()
        process.wait()


def first_line(process, timeout=10.0) -> str:
    ready, _, _ = select.select([process.stdout], [], [], timeout)
    assert ready, f"holder {process.pid} said nothing within {timeout} s"
    return process.stdout.readline().strip()


def share_files(document) -> list[str]:
    folder = os.path.join(document["work_dir"], "admission")
    return sorted(name for name in os.listdir(folder) if name.endswith(".json"))


def test_a_job_that_fits_is_admitted_at_once(document, holders):
    holder = holders("a", 1, 1024)
    said, holders_share = first_line(holder).split()
    assert said == "admitted"
    started = time.monotonic()
    with admitted("b", 1, 3072, site_of(document)) as share:
        assert time.monotonic() - started < 0.5
        assert len(share_files(document)) == 2
        assert json.loads(share.path.read_text()) | {"since": None} == {
            "job_id": "b", "pid": os.getpid(), "vcpus": 1, "memory_mib": 3072, "since": None}
        assert share.path.stat().st_mode & 0o777 == 0o600
    assert share_files(document) == [os.path.basename(holders_share)]  # b's share went with it
    holder.stdin.close()
    assert holder.wait(10) == 0 and share_files(document) == []


def test_a_job_that_does_not_fit_waits_for_a_holder_to_end(document, holders):
    holder = holders("a", 2, 1024, hold="1.0")
    assert first_line(holder).startswith("admitted")
    messages = []
    started = time.monotonic()
    with admitted("b", 1, 512, site_of(document), messages.append):
        waited = time.monotonic() - started
    assert 0.5 < waited < 3
    assert messages[0] == ("job b: waiting for 1 vCPU and 512 MiB: 1 job holds 2 of 2 vCPUs and 1024 of 4096 MiB "
                           "(waited 0 s of at most 5 s)")
    assert holder.wait(10) == 0 and share_files(document) == []


def test_a_job_that_gets_no_room_in_time_is_refused(document, holders):
    holder = holders("a", 2, 1024)
    assert first_line(holder).startswith("admitted")
    started = time.monotonic()
    with pytest.raises(AdmissionRefused) as refused:
        with admitted("b", 1, 512, site_of(document, admission_wait_s=0.5)):
            pytest.fail("admitted with no room")
    assert 0.5 <= time.monotonic() - started < 2
    assert refused.value.code == "admission_timeout" and refused.value.exit_code == 200
    assert str(refused.value) == (
        "job b: no room in this host's budget for 1 vCPU and 512 MiB within 0.5 s ([host] admission_wait_s in "
        "test site; unset, what the machine has): "
        f"1 job holds 2 of 2 vCPUs and 1024 of 4096 MiB (a: 2 vCPUs and 1024 MiB, pid {holder.pid}); "
        "run it later or on another host")
    started = time.monotonic()
    with pytest.raises(AdmissionRefused, match="within 0 s"):  # no wait at all
        with admitted("c", 1, 512, site_of(document, admission_wait_s=0)):
            pass
    assert time.monotonic() - started < 0.5
    assert len(share_files(document)) == 1  # the holder's: a refused job leaves nothing


@pytest.mark.parametrize("vcpus, memory_mib, pointer", [(3, 512, "/resources/vcpus = 3 is more than this host's "
                                                         "budget of 2 vCPUs ([host] vcpus in test site"),
                                                        (1, 8192, "/resources/memory_mib = 8192 is more than this "
                                                         "host's budget of 4096 MiB ([host] memory_mib in test site")])
def test_a_job_bigger_than_the_host_is_refused_at_once(document, vcpus, memory_mib, pointer):
    started = time.monotonic()
    with pytest.raises(AdmissionRefused) as refused:
        with admitted("big", vcpus, memory_mib, site_of(document)):
            pass
    assert time.monotonic() - started < 0.1
    assert refused.value.code == "exceeds_host_budget" and pointer in str(refused.value)
    assert not os.path.exists(document["work_dir"])  # refused before anything was made


def test_a_killed_holder_gives_its_share_back_by_itself(document, holders):
    holder = holders("a", 2, 4096)
    assert first_line(holder).startswith("admitted")
    stale = share_files(document)
    os.kill(holder.pid, signal.SIGKILL)
    assert holder.wait(10) == -signal.SIGKILL
    assert share_files(document) == stale  # nothing cleaned up after it
    with admitted("b", 2, 4096, site_of(document, admission_wait_s=0)) as share:
        assert share_files(document) == [share.path.name]  # the stale file was removed as it counted
    assert share_files(document) == []


def test_gc_removes_the_shares_of_killed_holders_only(document, holders):
    killed, alive = holders("killed", 1, 512), holders("alive", 1, 512)
    assert first_line(killed).startswith("admitted") and first_line(alive).startswith("admitted")
    os.kill(killed.pid, signal.SIGKILL)
    killed.wait(10)
    removed = gc_stale_shares(site_of(document))
    assert len(removed) == 1 and f"(job killed, pid {killed.pid}): its process is gone" in removed[0]
    assert len(share_files(document)) == 1 and gc_stale_shares(site_of(document)) == []
    alive.stdin.close()
    assert alive.wait(10) == 0


def test_concurrent_jobs_never_exceed_the_budget(document, holders):
    site = {**document, "host": {**document["host"], "admission_wait_s": 30}}
    processes = [holders(f"j{number}", 1, 256, hold="0.3", site=site) for number in range(8)]
    intervals = []
    for process in processes:
        out, _ = process.communicate(timeout=30)
        assert process.returncode == 0, out
        intervals.append(json.loads(out.splitlines()[-1].removeprefix("held ")))
    events = sorted([(start, 1) for start, _ in intervals] + [(end, -1) for _, end in intervals])
    running, most = 0, 0
    for _, change in events:
        running += change
        most = max(most, running)
    assert most == 2  # never more than the 2 vCPUs, and both were used
    assert share_files(document) == []


def test_an_admission_folder_that_is_a_link_or_open_to_others_is_refused(document, tmp_path):
    os.makedirs(document["work_dir"])
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir(mode=0o700)
    os.symlink(elsewhere, os.path.join(document["work_dir"], "admission"))
    with pytest.raises(AdmissionRefused, match="is a symbolic link or not a folder") as refused:
        with admitted("a", 1, 512, site_of(document)):
            pass
    assert refused.value.code == "admission_folder_unusable" and list(elsewhere.iterdir()) == []
    os.unlink(os.path.join(document["work_dir"], "admission"))
    os.mkdir(os.path.join(document["work_dir"], "admission"))
    os.chmod(os.path.join(document["work_dir"], "admission"), 0o777)
    with pytest.raises(AdmissionRefused, match=r"\(mode 777\), and only uid"):
        with admitted("a", 1, 512, site_of(document)):
            pass


# --- the site's [host] table -------------------------------------------------------------------------------

def test_the_host_budget_defaults_to_what_the_machine_has():
    with open("/proc/meminfo") as meminfo:
        total_kib = next(int(line.split()[1]) for line in meminfo if line.startswith("MemTotal:"))
    for host in (site_from_dict({}).host, site_from_dict({"host": {}}).host, HostBudget()):
        assert host == HostBudget(vcpus=len(os.sched_getaffinity(0)), memory_mib=total_kib // 1024,
                                  admission_wait_s=3600.0)
    assert site_from_dict({"host": {"vcpus": 3, "admission_wait_s": 0}}).host.vcpus == 3


@pytest.mark.parametrize("host, message", [
    ({"vcpus": 0}, "/host/vcpus: 0 is less than the minimum of 1"),
    ({"vcpus": 2.5}, "/host/vcpus: 2.5 is not of type 'integer'"),
    ({"memory_mib": 64}, "/host/memory_mib: 64 is less than the minimum of 128"),
    ({"admission_wait_s": -1}, "/host/admission_wait_s: -1 is less than the minimum of 0"),
    ({"admission_wait_s": float("nan")}, "/host/admission_wait_s: not a finite number"),
    ({"admission_wait_s": float("inf")}, "/host/admission_wait_s: not a finite number"),
    ({"admission_wait_s": 10 ** 400}, "/host/admission_wait_s: 1000"),
    ({"cpus": 2}, "/host: Additional properties are not allowed ('cpus' was unexpected)"),
])
def test_bad_host_settings_are_refused_naming_the_field(host, message):
    with pytest.raises(InvalidSite, match="^site.toml: " + message.replace("(", r"\(").replace(")", r"\)")):
        site_from_dict({"host": host}, source="site.toml")


def test_the_host_table_in_a_toml_file(tmp_path):
    path = tmp_path / "site.toml"
    path.write_text("[host]\nvcpus = 16\nmemory_mib = 65536\nadmission_wait_s = 600\n")
    assert load_site(path).host == HostBudget(vcpus=16, memory_mib=65536, admission_wait_s=600.0)
    path.write_text('[host]\nvcpus = "16"\n')
    with pytest.raises(InvalidSite, match="/host/vcpus: '16' is not of type 'integer'"):
        load_site(path)
