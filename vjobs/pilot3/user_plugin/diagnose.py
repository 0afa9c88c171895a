"""vjobs' Pilot 3 user plugin, diagnose part: a vjobs failure becomes the pilot error code it stands for, and
the payload's final CPU time is the guest's.

vjobs' payload runner writes ``payload_error_report.json`` (``{"error_code": N, "error_diag": "..."}``)
into the work directory when the VM, not the payload, failed; this pilot version does not read that file
itself, so ``interpret`` does, and the pilot then reports the job failed with that code.

The pilot calls ``interpret`` right after it has set the job's CPU time from ``os.times()`` of its children
(the runner's and QEMU's time on the host): ``interpret`` puts the guest's final figures in its place.
"""

import json
import os

from pilot.common.errorcodes import ErrorCodes
from pilot.user.generic.diagnose import *  # noqa: F401,F403 (the rest as the generic user has it)
from pilot.user.generic.diagnose import interpret as generic_interpret

from .cpu import forget
from .guest import cpu_seconds, read_summary, vcpus

REPORT_NAME = "payload_error_report.json"


def interpret(job):
    """0 when vjobs reported nothing; else the report's code is added to the job's pilot errors."""
    exit_code = generic_interpret(job)
    use_guest_figures(job)
    try:
        with open(os.path.join(job.workdir, REPORT_NAME)) as handle:
            report = json.load(handle)
        code, diagnostics = int(report["error_code"]), str(report.get("error_diag", ""))
        cause = bool(report.get("cause", True))
    except (OSError, ValueError, KeyError, TypeError):
        return exit_code
    # A VM failure goes before the generic 1305 the pilot has added for the non-zero exit; a cancellation
    # (cause false) stays behind the pilot's own reason for it.
    job.piloterrorcodes, job.piloterrordiags = ErrorCodes().add_error_code(code, priority=cause, msg=diagnostics)
    return 1


def use_guest_figures(job):
    """The payload's CPU time and cores as the guest measured them, where the runner reported them."""
    summary = read_summary(job.workdir)
    seconds, count = cpu_seconds(summary), vcpus(summary)
    if seconds is not None:
        job.cpuconsumptiontime = int(round(seconds))
        job.cpuconsumptionunit, job.cpuconversionfactor = "s", 1.0
    if count is not None:
        job.corecount = job.actualcorecount = count
    forget(job)
