"""vjobs' Pilot 3 user plugin: what vjobs measured of the payload inside its VM, for the pilot's monitors.

vjobs' payload runner writes ``vjobs_prmon.json`` into the job's work directory (vjobs/pilot3/monitor.py), in
the shape of prmon's ``--json-summary``: "Max" (peak memory in KiB, cumulative ``utime``/``stime`` in seconds,
I/O bytes), "Avg", and "HW" (the VM's vCPUs). The plugin's ``cpu``, ``utilities`` and ``diagnose`` read it
through these functions. The pilot runs this file, not vjobs: it imports nothing of vjobs.
"""

import json
import os

SUMMARY_NAME = "vjobs_prmon.json"  # vjobs.pilot3.monitor.SUMMARY_NAME (a test keeps the two the same)
# The pilot's names for memory monitor figures (as its ATLAS user reads them from prmon) -> (section, prmon's)
MEMORY_FIELDS = {
    "maxRSS": ("Max", "rss"), "maxPSS": ("Max", "pss"), "avgRSS": ("Avg", "rss"), "avgPSS": ("Avg", "pss"),
    "totRBYTES": ("Max", "read_bytes"), "totWBYTES": ("Max", "write_bytes"),
    "rateRBYTES": ("Avg", "read_bytes"), "rateWBYTES": ("Avg", "write_bytes"),
}


def read_summary(workdir):
    """The runner's latest summary, or {} while there is none (before the first sample, or no vjobs job)."""
    try:
        with open(os.path.join(workdir, SUMMARY_NAME)) as handle:
            summary = json.load(handle)
    except (OSError, ValueError, TypeError):
        return {}
    return summary if isinstance(summary, dict) else {}


def _number(summary, section, name):
    part = summary.get(section)
    value = part.get(name) if isinstance(part, dict) else None
    return value if isinstance(value, (int, float)) and not isinstance(value, bool) and value >= 0 else None


def cpu_seconds(summary):
    """The payload's CPU time in the guest (user + system), or None when not measured yet."""
    user, system = _number(summary, "Max", "utime"), _number(summary, "Max", "stime")
    return None if user is None or system is None else user + system


def vcpus(summary):
    """The VM's vCPUs, or None."""
    hardware = summary.get("HW")
    cpu = hardware.get("cpu") if isinstance(hardware, dict) else None
    count = cpu.get("CPUs") if isinstance(cpu, dict) else None
    return count if isinstance(count, int) and not isinstance(count, bool) and count > 0 else None


def memory_fields(summary):
    """The memory monitor figures the pilot sends with its job updates (only those measured)."""
    fields = {}
    for field, (section, name) in MEMORY_FIELDS.items():
        value = _number(summary, section, name)
        if value is not None:
            fields[field] = int(value)
    return fields
