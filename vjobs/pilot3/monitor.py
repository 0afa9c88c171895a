"""What the pilot's monitors read about a payload in a VM: the guest's figures, written by the payload runner
into the job's work directory in the shape of prmon's output (the memory monitor ATLAS pilots run).

Pilot 3 measures a payload on the host: the CPU time of its process tree, the CPUs its process group ran on,
and, through a memory monitor, its memory. For a VM none of these is the payload's (QEMU, or nothing under kvm
and xen). The runner subscribes to vjobs' ``usage`` event (the payload's cgroup in the guest, about every
``sync_interval_s``) and writes two files, which vjobs' user plugin reads for the pilot
(vjobs/pilot3/user_plugin/guest.py):

    vjobs_prmon.txt    one row per sample, tab-separated under a header (prmon's columns and units: memory in
                       KiB, times in seconds, I/O in bytes), appended
    vjobs_prmon.json   prmon's ``--json-summary`` shape: "Max" (the largest memory and process count, the
                       latest cumulative CPU and I/O figures, wall time), "Avg" (memory and processes averaged
                       over the samples, I/O as bytes per second), "HW" (the VM: its vCPUs and memory);
                       replaced whole at each sample, and once more with the run's final figures

Names with "prmon" in them are skipped by the pilot's looping-job check (its ``remove_unwanted_files``), so
these files never make a hung payload look alive; the runner never touches the payload's own files. The
payload's cgroup memory (``memory.current``, ``memory.peak``) stands for both RSS and PSS: the guest has no
other process of the job to share pages with. Columns the guest does not measure (vmem, swap, threads,
network) are left out rather than guessed.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from pathlib import Path
from typing import Any, Mapping

SERIES_NAME = "vjobs_prmon.txt"
SUMMARY_NAME = "vjobs_prmon.json"
KIB_PER_MIB = 1024
# prmon's columns (in its order) that the guest's figures fill: column -> (usage figure, factor)
COLUMNS = {
    "nprocs": ("processes", 1),
    "pss": ("memory_current_mib", KIB_PER_MIB),
    "read_bytes": ("io_read_bytes", 1),
    "rss": ("memory_current_mib", KIB_PER_MIB),
    "stime": ("cpu_system_s", 1),
    "utime": ("cpu_user_s", 1),
    "write_bytes": ("io_write_bytes", 1),
}


class MonitorFiles:
    """The two files of one payload, in ``workdir``; ``record`` is the ``usage`` event hook. A file that cannot
    be written is skipped (the job goes on; the pilot then sees the figures of the last sample it could
    read): nothing is printed, since the payload's stderr is the pilot's to scan."""

    def __init__(self, workdir: Path, vcpus: int, memory_mib: int, clock=time.time):
        self.workdir = Path(workdir)
        self.vcpus, self.memory_mib, self.clock = vcpus, memory_mib, clock
        self.started = clock()
        self.latest: dict[str, float] = {}  # the newest value of every figure seen
        self.peaks: dict[str, float] = {}  # "rss", "nprocs": the largest seen
        self.sums: dict[str, float] = {}  # "rss", "nprocs": summed over the samples, for the averages
        self.samples = 0

    def record(self, event: Any) -> None:
        """A ``usage`` event: one more row, and the summary so far."""
        self.add_sample(event.usage or {})

    def add_sample(self, usage: Mapping[str, float]) -> None:
        usage = _figures(usage)
        self.latest.update(usage)
        self.samples += 1
        for column, figure in (("rss", "memory_current_mib"), ("nprocs", "processes")):
            if figure in usage:
                value = usage[figure] * COLUMNS[column][1]
                self.sums[column] = self.sums.get(column, 0) + value
                self.peaks[column] = max(self.peaks.get(column, 0), value)
        now = self.clock()
        row = [int(now), *(self._column(name) for name in COLUMNS), int(now - self.started)]
        self._write(SERIES_NAME, "\t".join(map(str, row)) + "\n", append=True)
        self._write(SUMMARY_NAME, json.dumps(self.summary(now)))

    def conclude(self, usage: Mapping[str, float]) -> None:
        """The run's final figures (``result.usage``): the summary a last time, if there are any."""
        usage = _figures(usage)
        if usage:
            self.latest.update(usage)
            self._write(SUMMARY_NAME, json.dumps(self.summary(self.clock())))

    def summary(self, now: float) -> dict:
        wall_s = max(1, int(now - self.started))
        peak_rss = max(self.peaks.get("rss", 0), self.latest.get("memory_peak_mib", 0) * KIB_PER_MIB)
        peak_procs = max(self.peaks.get("nprocs", 0), self.latest.get("processes_peak", 0))
        largest = {"rss": int(peak_rss), "pss": int(peak_rss), "nprocs": int(peak_procs)}
        cumulative = {name: self._column(name) for name in ("utime", "stime", "read_bytes", "write_bytes")}
        average = {"rss": int(self.sums.get("rss", 0) / max(self.samples, 1))}
        average["pss"] = average["rss"]
        average["nprocs"] = round(self.sums.get("nprocs", 0) / max(self.samples, 1), 2)
        average.update({name: int(cumulative[name] / wall_s) for name in ("read_bytes", "write_bytes")})
        return {"Max": {**largest, **cumulative, "wtime": wall_s}, "Avg": average,
                "HW": {"cpu": {"CPUs": self.vcpus}, "mem": {"MemTotal": self.memory_mib * KIB_PER_MIB}}}

    def _column(self, name: str) -> float:
        """A column's value now: the latest figure, in prmon's unit; CPU seconds as measured, the rest whole."""
        figure, factor = COLUMNS[name]
        value = self.latest.get(figure, 0) * factor
        return value if figure.startswith("cpu_") else int(value)

    def _write(self, name: str, text: str, append: bool = False) -> None:
        """Appends to, or replaces, one of the runner's files; never through a link (the work directory also
        holds what the payload wrote)."""
        path = self.workdir / name
        try:
            if append:
                fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
                with os.fdopen(fd, "a") as sink:
                    header = "\t".join(["Time", *COLUMNS, "wtime"]) + "\n"
                    sink.write((header if sink.tell() == 0 else "") + text)
            else:  # replaced whole, so the pilot never reads half a summary (the temporary name has "prmon" too)
                temporary = path.with_name(f".{name}.{os.getpid()}.tmp")
                with contextlib.suppress(FileNotFoundError):
                    temporary.unlink()
                fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
                with os.fdopen(fd, "w") as sink:
                    sink.write(text)
                os.replace(temporary, path)
        except OSError:
            pass


def _figures(usage: Mapping[str, Any]) -> dict[str, float]:
    """The numbers of a usage sample or of ``result.usage`` (which may also hold a ``note``)."""
    return {name: value for name, value in usage.items()
            if isinstance(value, (int, float)) and not isinstance(value, bool)}
