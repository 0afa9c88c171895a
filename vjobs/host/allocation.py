"""What a batch system granted the job vjobs runs in, so that no VM is given more.

Inside a Slurm job (``SLURM_JOB_ID`` set), the CPUs are ``SLURM_CPUS_PER_TASK`` (else ``SLURM_CPUS_ON_NODE``)
and the memory ``SLURM_MEM_PER_NODE`` (else ``SLURM_MEM_PER_CPU`` times the CPUs), each lowered to what the
kernel enforces on this process (its CPU affinity, its cgroup's ``memory.max``) when that is less.

Two rules follow (vjobs/container/lifecycle.py): a job whose VM is bigger than the allocation is refused at once with
what to ask the batch system for, and the vjobs of one allocation share it through admission
(vjobs/host/admission.py) with each other and with nobody else: the batch system shares the host. Their budget
folder is the account's own (``<work_dir>/admission.<allocation>``), with tokens as the node's has.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Mapping

if TYPE_CHECKING:
    from vjobs.config.site import SiteConfig
    from vjobs.host.admission import Scope

#: Host memory a VM costs beyond its own RAM (QEMU, its page tables, I/O buffers): a VM of M MiB needs an
#: allocation of at least M + this. Measured under TCG: 60-90 MiB of RSS beyond the guest's RAM.
VM_OVERHEAD_MIB = 128


@dataclass(frozen=True)
class Allocation:
    system: str  # "slurm"
    job_id: str  # the batch job ("123", or "123_4" for an array task)
    cpus: int
    memory_mib: int | None  # None: the batch system set no memory limit

    @property
    def scope(self) -> str:
        """A name for the allocation that is unique on the host (admission folder)."""
        return f"{self.system}-{self.job_id}"

    def describe(self) -> str:
        memory = f", {self.memory_mib} MiB" if self.memory_mib is not None else ""
        return f"{self.system.capitalize()} job {self.job_id} ({self.cpus} CPU{'s' if self.cpus != 1 else ''}{memory})"


def current(environ: Mapping[str, str] = os.environ) -> Allocation | None:
    """The allocation vjobs runs in, or None outside a batch job."""
    job_id = environ.get("SLURM_JOB_ID")
    if not job_id:
        return None
    if environ.get("SLURM_ARRAY_JOB_ID") and environ.get("SLURM_ARRAY_TASK_ID"):
        job_id = f"{environ['SLURM_ARRAY_JOB_ID']}_{environ['SLURM_ARRAY_TASK_ID']}"
    cpus = _first_int(environ.get("SLURM_CPUS_PER_TASK")) or _first_int(environ.get("SLURM_CPUS_ON_NODE")) \
        or _first_int(environ.get("SLURM_JOB_CPUS_PER_NODE")) or 1
    cpus = min(cpus, len(os.sched_getaffinity(0)))
    memory = _first_int(environ.get("SLURM_MEM_PER_NODE"))
    if memory is None and _first_int(environ.get("SLURM_MEM_PER_CPU")):
        memory = _first_int(environ["SLURM_MEM_PER_CPU"]) * cpus
    enforced = cgroup_memory_mib()
    if enforced is not None:
        memory = enforced if memory is None else min(memory, enforced)
    return Allocation("slurm", _safe(job_id), cpus, memory or None)


def admission_scope(allocation: Allocation | None, site: "SiteConfig") -> "Scope | None":
    """The budget the vjobs of one allocation share (their own admission folder); None outside a batch job,
    where the host's budget applies."""
    from vjobs.host.admission import FOLDER, Scope

    if allocation is None:
        return None
    memory = allocation.memory_mib - VM_OVERHEAD_MIB if allocation.memory_mib is not None else site.host.memory_mib
    return Scope(replace(site.host, vcpus=allocation.cpus, memory_mib=max(memory, 1)),
                 site.work_dir / f"{FOLDER}.{allocation.scope}", f"the allocation of {allocation.describe()}",
                 f"what the batch system granted, less {VM_OVERHEAD_MIB} MiB of QEMU's own for memory")


def cgroup_memory_mib(proc_cgroup: Path = Path("/proc/self/cgroup"), root: Path = Path("/sys/fs/cgroup")) -> int | None:
    """``memory.max`` of this process's cgroup (v2) in MiB, or None when there is none or it is "max"."""
    try:
        line = next(line for line in proc_cgroup.read_text().splitlines() if line.startswith("0::"))
        limit = (root / line[3:].lstrip("/") / "memory.max").read_text().strip()
    except (OSError, StopIteration):
        return None
    return int(limit) >> 20 if limit.isdigit() else None


def _first_int(value: str | None) -> int | None:
    """The first number in a Slurm value: "4", "2(x3)", "4,2" all give their first count."""
    match = re.match(r"\s*(\d+)", value or "")
    return int(match.group(1)) if match else None


def _safe(job_id: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", job_id)[:64]
