"""vjobs' Pilot 3 user plugin, CPU part: the pilot counts the guest's CPU time and vCPUs, not the host's.

Pilot 3 measures a payload's CPU time as a sum over its process tree on the host (``job_monitor_tasks`` in
pilot/util/monitoring.py calls ``get_current_cpu_consumption_time`` of pilot/util/processes.py once per
monitoring loop) and its cores as the CPUs its process group ran on (the generic user's ``set_core_counts``).
For a VM the first is QEMU's time or nothing (under kvm and xen QEMU is not in the tree, and a process counts
only once it has waited for a child), and while that sum rounds to 0 pilot 3.7 skips its looping, work
directory and memory checks altogether; the second is 1 whatever the vCPUs.

- The CPU probe has no user hook: ``follow(job)`` (the wrapper calls it as the payload starts) puts
  ``payload_cpu_seconds`` in its place in pilot.util.monitoring. For a payload of this plugin it gives the
  guest's CPU time (user + system of the payload's cgroup) once the runner has reported it, the pilot's own
  measure otherwise: the pilot then runs its checks as for any payload that has used CPU, and sends the
  guest's figure with its heartbeats. A payload that has used no CPU in the guest is skipped by those checks,
  as the pilot skips such a payload on the host.
- ``set_core_counts`` (called once per monitoring loop) and ``get_core_count``: the VM's vCPUs.
- The final CPU time is ``diagnose.interpret``'s, after the pilot's own (os.times() of its children).
"""

import logging

from pilot.user.generic.cpu import *  # noqa: F401,F403 (the rest as the generic user has it)
from pilot.util import monitoring
from pilot.util.processes import get_current_cpu_consumption_time as host_cpu_seconds

from .guest import cpu_seconds, read_summary, vcpus

logger = logging.getLogger(__name__)
_payloads = {}  # PanDA job id -> job, for each payload running in a vjobs VM now


def follow(job):
    """From now on, the pilot's CPU probe reads this job's figures from its VM."""
    _payloads[str(job.jobid)] = job
    if monitoring.__dict__.get("get_current_cpu_consumption_time") is not payload_cpu_seconds:
        if "get_current_cpu_consumption_time" not in monitoring.__dict__:  # another pilot version
            logger.warning("vjobs: this pilot has no get_current_cpu_consumption_time in pilot.util.monitoring; "
                           "its monitoring may not see the guest's CPU time")
        monitoring.get_current_cpu_consumption_time = payload_cpu_seconds


def forget(job):
    _payloads.pop(str(job.jobid), None)


def payload_cpu_seconds(pid):
    """The pilot's CPU probe, for the payload process ``pid``: the guest's figure where there is one."""
    for job in list(_payloads.values()):
        if job.pid == pid:
            seconds = cpu_seconds(read_summary(job.workdir))
            if seconds is not None:
                return seconds
    return host_cpu_seconds(pid)


def get_core_count(job):
    """The VM's vCPUs (0 when not known yet, as the generic user says)."""
    return vcpus(read_summary(job.workdir)) or 0


def set_core_counts(**kwargs):
    """The cores the payload used: its VM's vCPUs (the pilot sends them as ``coreCount``)."""
    job = kwargs.get("job")
    count = vcpus(read_summary(job.workdir)) if job is not None else None
    if count is None:
        logger.debug("vjobs: the payload's vCPUs are not known yet")
        return
    job.actualcorecount = job.corecount = count
    job.corecounts = [count]
