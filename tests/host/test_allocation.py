"""Inside a batch job vjobs reads what was granted (vjobs/host/allocation.py): no VM gets more, and the vjobs of
one allocation share it with nobody else. The same against a real Slurm: tests/host/test_slurm.py."""

from __future__ import annotations

import os

import pytest

from vjobs import api
from vjobs.errors import AdmissionRefused
from vjobs.host.admission import admitted
from vjobs.host.allocation import VM_OVERHEAD_MIB, Allocation, admission_scope, cgroup_memory_mib, current

CPUS_HERE = len(os.sched_getaffinity(0))


@pytest.mark.parametrize("environ, expected", [
    ({}, None),
    ({"SLURM_JOB_ID": "7", "SLURM_CPUS_PER_TASK": "1", "SLURM_CPUS_ON_NODE": "2", "SLURM_MEM_PER_NODE": "1024"},
     Allocation("slurm", "7", 1, 1024)),
    ({"SLURM_JOB_ID": "9", "SLURM_ARRAY_JOB_ID": "8", "SLURM_ARRAY_TASK_ID": "3", "SLURM_JOB_CPUS_PER_NODE": "1(x2)",
      "SLURM_MEM_PER_CPU": "300"}, Allocation("slurm", "8_3", 1, 300)),
    ({"SLURM_JOB_ID": "5", "SLURM_CPUS_ON_NODE": "999"}, Allocation("slurm", "5", CPUS_HERE, None)),
])
def test_what_slurm_granted_is_read_from_its_environment(environ, expected, monkeypatch):
    monkeypatch.setattr("vjobs.host.allocation.cgroup_memory_mib", lambda: None)
    assert current(environ) == expected


def test_the_cgroup_memory_limit_lowers_what_slurm_says(tmp_path, monkeypatch):
    (tmp_path / "proc").write_text("0::/slurm/job_4\n")
    (tmp_path / "slurm/job_4").mkdir(parents=True)
    (tmp_path / "slurm/job_4/memory.max").write_text(f"{600 << 20}\n")
    assert cgroup_memory_mib(tmp_path / "proc", tmp_path) == 600
    (tmp_path / "slurm/job_4/memory.max").write_text("max\n")
    assert cgroup_memory_mib(tmp_path / "proc", tmp_path) is None
    monkeypatch.setattr("vjobs.host.allocation.cgroup_memory_mib", lambda: 600)
    assert current({"SLURM_JOB_ID": "4", "SLURM_MEM_PER_NODE": "2048"}).memory_mib == 600


@pytest.mark.parametrize("resources, words", [
    ({"vcpus": 2}, "/resources/vcpus = 2 is more than Slurm job 11 (1 CPU, 1024 MiB) was granted; ask the batch "
                   "system for 2 CPUs (sbatch -c 2)"),
    ({"memory_mib": 1000}, f"needs {1000 + VM_OVERHEAD_MIB} MiB on the host"),
])
def test_a_vm_bigger_than_the_allocation_is_refused_before_anything_is_built(tmp_path, make_site, monkeypatch,
                                                                              resources, words):
    for name, value in {"SLURM_JOB_ID": "11", "SLURM_CPUS_PER_TASK": "1", "SLURM_MEM_PER_NODE": "1024"}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr("vjobs.host.allocation.cgroup_memory_mib", lambda: None)
    result = api.run({"id": "big", "command": ["true"], "resources": resources},
                     site=make_site(driver="qemu_user"), outdir=tmp_path / "out")
    assert result.status == "setup_error" and result.error["code"] == "exceeds_allocation"
    assert words in result.error["message"]
    assert not (tmp_path / "work").exists() or list((tmp_path / "work").iterdir()) == []


def test_allocations_share_their_own_budget_not_the_hosts(make_site):
    site = make_site(host={"vcpus": 1, "memory_mib": 4096, "admission_wait_s": 0})
    first, second = Allocation("slurm", "1", 1, 2048), Allocation("slurm", "2", 1, 2048)
    with admitted("a", 1, 512, site, scope=admission_scope(first, site)):
        with admitted("b", 1, 512, site, scope=admission_scope(second, site)):
            pass  # another batch job's VM: the batch system, not vjobs, shares the host between them
        with pytest.raises(AdmissionRefused, match=r"no room in the allocation of Slurm job 1 \(1 CPU, 2048 MiB\)"):
            with admitted("c", 1, 512, site, scope=admission_scope(first, site)):
                pass  # a second VM in the same allocation of one CPU
        with admitted("d", 1, 512, site):  # outside any batch job: the host's budget, which batch jobs do not use
            with pytest.raises(AdmissionRefused, match="no room in this host's budget"):
                with admitted("e", 1, 512, site):
                    pass
