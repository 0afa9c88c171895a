"""vjobs' Pilot 3 user plugin, utilities part: the guest's memory figures as a memory monitor's.

The pilot adds ``get_memory_monitor_info(workdir)`` to every job update (``add_memory_info`` in
pilot/control/job.py): here, the figures vjobs' runner measured in the VM (user_plugin/guest.py), under the
names the ATLAS user gives prmon's (maxRSS, maxPSS, avgRSS, avgPSS in KiB; totRBYTES, totWBYTES in bytes;
rateRBYTES, rateWBYTES in bytes per second). No memory monitor process is started: the guest agent measures.
"""

from pilot.user.generic.utilities import *  # noqa: F401,F403 (the rest as the generic user has it)

from .guest import memory_fields, read_summary


def get_memory_monitor_info(workdir, allowtxtfile=False, name=""):
    """The payload's memory and I/O figures so far ({} before the first sample)."""
    return memory_fields(read_summary(workdir))
