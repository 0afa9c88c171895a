"""vjobs' Pilot 3 user plugin, container part: every payload runs in a vjobs VM.

Installed by ``vjobs pilot3 install PILOT_DIR`` as pilot/user/vjobs/container.py, beside a copy of the
pilot's own generic user. The wrapper returns the one shell line the pilot runs with ``bash -c`` in the
job's work directory: ``exec`` of vjobs' payload runner, so that the pilot's signals reach vjobs directly.

The VM is sized from the PanDA job (coreCount, minRamCount, container_name) and its queue (``maxwdir``: the
room the payload may fill in its work directory, as the pilot's own work-directory check allows), and its
wall time is the job's ``maxWalltime`` or the time the pilot has left, whichever ends first.
"""

import os
import shlex
import sys

from pilot.user.generic.container import *  # noqa: F401,F403 (the rest as the generic user has it)

from .cpu import follow

# Filled in by the installer: the Python that has vjobs installed, and the site's defaults.
VJOBS_PYTHON = "@VJOBS_PYTHON@"
DEFAULT_IMAGE = os.environ.get("VJOBS_PILOT_IMAGE", "debian12")
DEFAULT_MEMORY_MIB = 2048
DEFAULT_WALLTIME_S = 86400
# The pilot's monitor ends everything this long before its maximum running time (pilot/control/monitor.py:
# grace_time); vjobs stops the VM STOP_MARGIN_S before that, so that the pilot still finishes the job as usual
# (the payload's last files synced back, the log staged out, a final state sent).
PILOT_GRACE_S = 180
STOP_MARGIN_S = 60
MIN_WALLTIME_S = 60


def do_use_container(**kwargs):
    """Always: running the payload in a VM is the point of this user."""
    return True


def wrapper(executable, **kwargs):
    """The payload's command line, run in a VM sized by the PanDA job."""
    job = kwargs.get("job")
    if job is None:  # not a payload (the pilot calls the wrapper for nothing else with this user)
        return executable
    raw = getattr(job, "_rawdata", {}) or {}
    memory = int(raw.get("minRamCount") or 0) or DEFAULT_MEMORY_MIB
    argv = [VJOBS_PYTHON, "-m", "vjobs.pilot3.payload", "--workdir", job.workdir,
            "--image", job.imagename or DEFAULT_IMAGE, "--vcpus", str(max(1, int(job.corecount or 1))),
            "--memory-mib", str(memory), "--walltime", str(walltime_s(job))]
    scratch = queue_work_dir_mib(job)
    if scratch:
        argv += ["--scratch-mib", str(scratch)]
    if os.environ.get("VJOBS_SITE"):
        argv += ["--site", os.environ["VJOBS_SITE"]]
    follow(job)  # the pilot's CPU probe reads this payload's figures from the VM from now on (cpu.py)
    return "exec " + " ".join(shlex.quote(word) for word in argv) + " -- " + shlex.quote(executable)


def walltime_s(job):
    """The job's maxWalltime, shortened to the time the pilot has left (less a margin), if that is known."""
    wanted = int(job.maxwalltime or 0) or DEFAULT_WALLTIME_S
    left = pilot_time_left_s(job)
    if left is None:
        return wanted
    return max(MIN_WALLTIME_S, min(wanted, left - STOP_MARGIN_S))


def pilot_time_left_s(job):
    """Seconds until the pilot's monitor ends the pilot for its running time (the queue's ``maxtime``, else its
    --lifetime), or None when not known. pilot.py keeps its options and start time in ``args``, a global of
    the script it runs as (``__main__``); the pilot's own functions turn them into a maximum running time."""
    args = getattr(sys.modules.get("__main__"), "args", None)
    if not getattr(args, "lifetime", None):
        return None
    try:
        from pilot.control.monitor import get_max_running_time
        from pilot.util.timing import get_time_since_start

        queuedata = job.infosys.queuedata
        maximum = get_max_running_time(args.lifetime, queuedata, None, False, getattr(args, "pod", False))
        return int(maximum) - PILOT_GRACE_S - int(get_time_since_start(args))
    except Exception:  # another pilot version: the job's own wall time then stands alone
        return None


def queue_work_dir_mib(job):
    """The queue's ``maxwdir`` (MiB, what the pilot lets a work directory hold), or None when it has none."""
    try:
        value = int(job.infosys.queuedata.maxwdir or 0)
    except (AttributeError, TypeError, ValueError):
        return None
    return value if value > 0 else None


def create_stagein_container_command(workdir, cmd):
    """Stage-in stays on the host: all I/O on the host is the point of vjobs."""
    return cmd
