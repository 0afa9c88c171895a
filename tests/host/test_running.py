"""``vjobs ps`` (vjobs/host/running.py): the jobs running on the node, each from the record it keeps in its job
folder; root sees every account's, an account its own; a record of a dead vjobs, or one that lies, is not
believed."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from vjobs.config.site import site_from_dict
from vjobs.host.identity import create_owned_folder, new_owner
from vjobs.host.running import RECORD_NAME, running_jobs, write_record


def record_for(owner, **fields) -> dict:
    return {"job_id": owner.job_id, "uid": os.geteuid(), "pid": owner.pid, "driver": "qemu_user", "vcpus": 2,
            "memory_mib": 512, "phase": "run", "started_at": "2026-12-04T10:00:00+00:00",
            "started_s": time.time() - 75, "outdir": "/out", "usage": {"cpu_user_s": 1.0}, "sync": {}, **fields}


@pytest.fixture
def site(tmp_path):
    return site_from_dict({"work_dir": str(tmp_path / "work")}, source="test site")


def job_folder(site, job_id, pid=None):
    owner = new_owner(job_id)
    if pid is not None:
        owner = type(owner)(**{**vars(owner), "pid": pid})
    return owner, create_owned_folder(site.work_dir / f"{job_id}-{owner.run_id}", owner)


def test_a_running_job_is_listed_with_its_account_and_elapsed_time(site):
    owner, folder = job_folder(site, "alive")
    write_record(folder, record_for(owner))
    [job] = running_jobs(site)
    assert (job["job_id"], job["phase"], job["vcpus"], job["usage"]) == ("alive", "run", 2, {"cpu_user_s": 1.0})
    assert job["account"] == "root" if os.geteuid() == 0 else job["account"]
    assert 74 <= job["elapsed_s"] < 200


def test_a_dead_vjobs_and_records_that_lie_are_not_listed(site, tmp_path):
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    owner, folder = job_folder(site, "dead", pid=int(gone.stdout))
    write_record(folder, record_for(owner))
    owner, folder = job_folder(site, "other-uid")
    write_record(folder, record_for(owner, uid=os.geteuid() + 1))
    owner, folder = job_folder(site, "garbage")
    (folder / RECORD_NAME).write_text("{not json")
    owner, folder = job_folder(site, "wrong-shape")
    write_record(folder, record_for(owner, vcpus="many"))
    owner, folder = job_folder(site, "linked")
    elsewhere = tmp_path / "elsewhere.json"
    elsewhere.write_text(json.dumps(record_for(owner)))
    (folder / RECORD_NAME).symlink_to(elsewhere)
    assert running_jobs(site) == []


@pytest.mark.vm
@pytest.mark.skipif(os.geteuid() != 0, reason="making accounts needs root")
def test_root_sees_every_accounts_jobs_and_an_account_only_its_own(pool_accounts, account_cache, tmp_path):
    owner_account, other = pool_accounts[0], pool_accounts[1]
    site_file = owner_account.home / "ps-site.toml"
    site_file.write_text(f'driver = "qemu_user"\ncache_dir = "{account_cache(owner_account)}"\n')
    job = owner_account.home / "ps-job.json"
    job.write_text(json.dumps({"id": "long-one", "command": ["sleep", "600"], "walltime_s": 900}))
    owner_account.own(site_file), owner_account.own(job)
    process = owner_account.popen([owner_account.vjobs, "run", "--site", str(site_file), "--outdir",
                                   str(owner_account.home / "ps-out"), str(job)],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        root_view = _wait_for_phase(site_from_dict({}, source="defaults"), "long-one", "run")
        assert root_view["account"] == owner_account.name and root_view["uid"] == owner_account.uid
        own = json.loads(owner_account.run([owner_account.vjobs, "ps", "--json", "--site", str(site_file)],
                                           check=True).stdout)
        assert [job["job_id"] for job in own] == ["long-one"]
        theirs = other.run([other.vjobs, "ps", "--json"], check=True).stdout
        assert json.loads(theirs) == []
        table = owner_account.run([owner_account.vjobs, "ps", "--site", str(site_file)], check=True).stdout
        assert table.splitlines()[0].split()[:3] == ["JOB", "ACCOUNT", "DRIVER"]
        assert f"long-one  {owner_account.name}  qemu_user" in table
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(60)
    assert all(job["job_id"] != "long-one" for job in running_jobs(site_from_dict({}, source="defaults")))


def _wait_for_phase(site, job_id: str, phase: str, timeout_s: float = 180) -> dict:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for job in running_jobs(site):
            if job["job_id"] == job_id and job["phase"] == phase:
                return job
        time.sleep(0.5)
    raise AssertionError(f"{job_id} was not seen in phase {phase} within {timeout_s} s: {running_jobs(site)}")
