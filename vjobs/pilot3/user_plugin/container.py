"""vjobs' Pilot 3 user plugin, container part: every payload runs in a vjobs VM.

Installed by ``vjobs pilot3 install PILOT_DIR`` as pilot/user/vjobs/container.py, beside a copy of the
pilot's own generic user. The wrapper returns the one shell line the pilot runs with ``bash -c`` in the
job's work directory: ``exec`` of vjobs' payload runner, so that the pilot's signals reach vjobs directly.
"""

import os
import shlex

from pilot.user.generic.container import *  # noqa: F401,F403 (the rest as the generic user has it)

# Filled in by the installer: the Python that has vjobs installed, and the site's defaults.
VJOBS_PYTHON = "@VJOBS_PYTHON@"
DEFAULT_IMAGE = os.environ.get("VJOBS_PILOT_IMAGE", "debian12")
DEFAULT_MEMORY_MIB = 2048
DEFAULT_WALLTIME_S = 86400


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
            "--memory-mib", str(memory), "--walltime", str(int(job.maxwalltime or 0) or DEFAULT_WALLTIME_S)]
    if os.environ.get("VJOBS_SITE"):
        argv += ["--site", os.environ["VJOBS_SITE"]]
    return "exec " + " ".join(shlex.quote(word) for word in argv) + " -- " + shlex.quote(executable)


def create_stagein_container_command(workdir, cmd):
    """Stage-in stays on the host: all I/O on the host is the point of vjobs."""
    return cmd
