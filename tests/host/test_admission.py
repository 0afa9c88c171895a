"""Host admission (vjobs/host/admission.py) with real processes holding real shares: the VMs of concurrent vjobs
never get more than the host's budget, a job waits for its share or is refused with its own code, and the
share of a process killed with SIGKILL comes back by itself. No VM boots here. Each test has a budget folder
of its own (``[host] budget_dir``), made by root on demand as the node's is; the same between ordinary
accounts: tests/host/test_admission_accounts.py."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest

from vjobs.config.site import HOST_BUDGET_DIR, HostBudget, load_site, site_from_dict
from vjobs.errors import AdmissionRefused, InvalidSite
from vjobs.host.admission import admitted, gc_stale_shares, prepare_host_folder
from vjobs.testing.admission_holders import AdmissionHolders, said
from vjobs.testing.host_state import held_tokens


@pytest.fixture
def document(tmp_path):
    """A site whose host has 2 vCPUs and 4096 MiB for VMs (64 memory tokens of 64 MiB)."""
    return {"work_dir": str(tmp_path / "work"), "cache_dir": str(tmp_path / "cache"),
            "host": {"vcpus": 2, "memory_mib": 4096, "admission_wait_s": 5, "budget_dir": str(tmp_path / "budget")}}


def site_of(document, **host):
    return site_from_dict({**document, "host": {**document["host"], **host}}, source="test site")


@pytest.fixture
def holders(document):
    """``start(job_id, vcpus, memory_mib, hold="stdin", site=None)``: a holder (vjobs.testing.admission_holders)
    under the test's site, or ``site``; each still running after the test is killed by its pid."""
    with AdmissionHolders() as started:
        yield lambda job_id, vcpus, memory_mib, hold="stdin", site=None: started.start(
            site or document, job_id, vcpus, memory_mib, hold=hold)


def first_line(process, timeout=10.0) -> str:
    line = said(process, timeout)
    assert line is not None, f"holder {process.pid} said nothing within {timeout} s"
    return line


def held(document) -> tuple[int, int]:
    """How many vCPU and memory tokens of the test's budget folder some process holds."""
    names = held_tokens(Path(document["host"]["budget_dir"]))
    return sum(name.startswith("vcpu.") for name in names), sum(name.startswith("mem.") for name in names)


def test_a_job_that_fits_is_admitted_at_once(document, holders):
    holder = holders("a", 1, 1024)
    said, folder = first_line(holder).split()
    assert said == "admitted" and folder == document["host"]["budget_dir"]
    assert held(document) == (1, 16)
    started = time.monotonic()
    with admitted("b", 1, 3072, site_of(document)) as share:
        assert time.monotonic() - started < 0.5
        assert (share.job_id, share.pid, share.vcpus, share.memory_mib) == ("b", os.getpid(), 1, 3072)
        assert held(document) == (2, 64)
    assert held(document) == (1, 16)  # b's share went with it
    holder.stdin.close()
    assert holder.wait(10) == 0 and held(document) == (0, 0)


def test_the_budget_folder_is_made_by_root_for_every_account(document):
    """Made on demand (as scripts/install.sh makes the node's): root's, 0755, its tokens 0644, which any
    account may open and lock and only root create, write or remove."""
    folder = Path(document["host"]["budget_dir"])
    with admitted("a", 1, 100, site_of(document)):
        pass
    assert HOST_BUDGET_DIR == Path("/var/lib/vjobs/admission")
    names = sorted(os.listdir(folder))
    assert names == sorted(["budget.json", "vcpu.0", "vcpu.1", *(f"mem.{index}" for index in range(64))])
    assert json.loads((folder / "budget.json").read_text()) == {"memory_unit_mib": 64}
    for path in [folder, *folder.iterdir()]:
        info = path.stat()
        assert (info.st_uid, info.st_mode & 0o7777) == (0, 0o755 if path == folder else 0o644), path
    bigger = site_of(document, vcpus=3, memory_mib=8192)
    assert prepare_host_folder(bigger) == (f"{folder}: 3 vCPU tokens and 128 memory tokens of 64 MiB, made by "
                                           "root, for every account on this node")
    assert prepare_host_folder(site_of(document)).endswith("3 vCPU tokens and 128 memory tokens of 64 MiB, made "
                                                           "by root, for every account on this node")  # none removed
    with admitted("b", 2, 4096, site_of(document, admission_wait_s=0)):  # a smaller [host]: its first tokens only
        with pytest.raises(AdmissionRefused, match="no room"):
            with admitted("c", 1, 64, site_of(document, admission_wait_s=0)):
                pass
        with admitted("d", 1, 64, bigger):
            pass


def test_a_big_budget_gets_a_bigger_memory_unit(document):
    site = site_of(document, memory_mib=100_000)
    assert "391 memory tokens of 256 MiB" in prepare_host_folder(site)  # at most 512 of them
    with admitted("a", 1, 513, site):
        assert held(document) == (1, 3)


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
    assert holder.wait(10) == 0 and held(document) == (0, 0)


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
        f"1 job holds 2 of 2 vCPUs and 1024 of 4096 MiB (pid {holder.pid} of root: 2 vCPUs and 1024 MiB); "
        "run it later or on another host")
    started = time.monotonic()
    with pytest.raises(AdmissionRefused, match="within 0 s"):  # no wait at all
        with admitted("c", 1, 512, site_of(document, admission_wait_s=0)):
            pass
    assert time.monotonic() - started < 0.5
    assert held(document) == (2, 16)  # the holder's: a refused job holds nothing


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
    assert not os.path.exists(document["host"]["budget_dir"])


def test_a_killed_holder_gives_its_share_back_by_itself(document, holders):
    holder = holders("a", 2, 4096)
    assert first_line(holder).startswith("admitted")
    assert held(document) == (2, 64)
    os.kill(holder.pid, signal.SIGKILL)
    assert holder.wait(10) == -signal.SIGKILL
    assert held(document) == (0, 0)  # nothing cleaned up after it: the kernel let go
    with admitted("b", 2, 4096, site_of(document, admission_wait_s=0)):
        assert held(document) == (2, 64)
    assert held(document) == (0, 0) and gc_stale_shares(site_of(document)) == []


def test_gc_removes_only_the_allocation_folders_nobody_uses(document, holders, tmp_path):
    from vjobs.host.allocation import Allocation, admission_scope

    site = site_of(document)
    used, unused = (admission_scope(Allocation("slurm", job, 1, 2048), site) for job in ("1", "2"))
    with admitted("a", 1, 512, site, scope=unused):
        pass
    with admitted("b", 1, 512, site, scope=used):
        assert unused.folder.is_dir() and used.folder.stat().st_mode & 0o777 == 0o700
        removed = gc_stale_shares(site)
        assert removed == [f"removed the admission folder {unused.folder} (no job of its allocation is left)"]
        assert not unused.folder.exists() and used.folder.is_dir()
        with admitted("c", 1, 512, site, scope=unused):  # made again by the next job of its allocation
            pass
    assert gc_stale_shares(site) == [f"removed the admission folder {folder} (no job of its allocation is left)"
                                     for folder in sorted([unused.folder, used.folder])]
    assert sorted(os.listdir(tmp_path / "work")) == []


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
    assert held(document) == (0, 0)


def test_an_admission_folder_that_is_a_link_or_open_to_others_is_refused(document, tmp_path):
    folder = Path(document["host"]["budget_dir"])
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir(mode=0o700)
    os.symlink(elsewhere, folder)
    with pytest.raises(AdmissionRefused, match="is a symbolic link or not a folder") as refused:
        with admitted("a", 1, 512, site_of(document)):
            pass
    assert refused.value.code == "admission_folder_unusable" and list(elsewhere.iterdir()) == []
    os.unlink(folder)
    folder.mkdir()
    os.chmod(folder, 0o777)
    with pytest.raises(AdmissionRefused, match=r"\(mode 777\), and vjobs uses one only when root or uid 0 owns"):
        with admitted("a", 1, 512, site_of(document)):
            pass
    os.chmod(folder, 0o755)
    os.chown(folder, 12345, 12345)
    with pytest.raises(AdmissionRefused, match="belongs to uid 12345"):
        with admitted("a", 1, 512, site_of(document)):
            pass
    os.chown(folder, 0, 0)  # root's and empty: root's job fills it
    with admitted("a", 1, 512, site_of(document)):
        assert held(document) == (1, 8)


def test_a_token_someone_swapped_is_refused(document):
    folder = Path(document["host"]["budget_dir"])
    prepare_host_folder(site_of(document))
    (folder / "vcpu.0").unlink()
    os.mkfifo(folder / "vcpu.0")
    with pytest.raises(AdmissionRefused, match="vcpu.0 is not a file the folder's owner") as refused:
        with admitted("a", 2, 512, site_of(document)):
            pass
    assert refused.value.code == "admission_folder_unusable"


# --- the site's [host] table -------------------------------------------------------------------------------

def test_the_host_budget_defaults_to_what_the_machine_has():
    with open("/proc/meminfo") as meminfo:
        total_kib = next(int(line.split()[1]) for line in meminfo if line.startswith("MemTotal:"))
    for host in (site_from_dict({}).host, site_from_dict({"host": {}}).host, HostBudget()):
        assert host == HostBudget(vcpus=len(os.sched_getaffinity(0)), memory_mib=total_kib // 1024,
                                  admission_wait_s=3600.0, budget_dir=Path("/var/lib/vjobs/admission"))
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
    ({"budget_dir": ""}, "/host/budget_dir: '' should be non-empty"),
])
def test_bad_host_settings_are_refused_naming_the_field(host, message):
    with pytest.raises(InvalidSite, match="^site.toml: " + message.replace("(", r"\(").replace(")", r"\)")):
        site_from_dict({"host": host}, source="site.toml")


def test_the_host_table_in_a_toml_file(tmp_path):
    path = tmp_path / "site.toml"
    path.write_text("[host]\nvcpus = 16\nmemory_mib = 65536\nadmission_wait_s = 600\nbudget_dir = \"budget\"\n")
    assert load_site(path).host == HostBudget(vcpus=16, memory_mib=65536, admission_wait_s=600.0,
                                              budget_dir=tmp_path / "budget")
    path.write_text('[host]\nvcpus = "16"\n')
    with pytest.raises(InvalidSite, match="/host/vcpus: '16' is not of type 'integer'"):
        load_site(path)
