#!/usr/bin/env python3
"""What does running a job in a VM cost here? Run by hand (it boots many VMs); results go into
docs/benchmarks.md.

    .venv/bin/python benchmarks/run_overhead.py [--runs 5] [--driver qemu_user] [--site FILE]

Prints, for the example job: wall time per phase (median of --runs); and for a CPU-bound payload
(sha256 of 64 MiB, same busybox binary on host and in guest): host time, guest time, and their ratio.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import vjobs

REPO = Path(__file__).resolve().parent.parent
CPU_PAYLOAD = "dd if=/dev/zero bs=1M count=64 2>/dev/null | busybox sha256sum"


def run_job(document: dict, args, outdir: Path) -> vjobs.Result:
    result = vjobs.run(document, site=args.site, driver=args.driver, outdir=outdir)
    if result.status != "succeeded":
        sys.exit(f"benchmark job failed: {result.status} {result.error}")
    return result


def phases(args) -> None:
    job = json.loads((REPO / "examples/hello/job.json").read_text())
    base = REPO / "examples/hello"
    job["inputs"], job["release"]["path"] = str(base / job["inputs"]), str(base / job["release"]["path"])
    samples: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory() as scratch:
        for number in range(args.runs):
            timings = run_job(job, args, Path(scratch) / str(number)).timings
            for phase, seconds in timings.items():
                samples.setdefault(phase, []).append(seconds)
    print(f"example job, {args.runs} runs, median seconds per phase:")
    for phase in ("probe", "prepare", "attach", "boot", "run", "guest_payload", "collect", "teardown", "total"):
        if phase in samples:
            print(f"  {phase:14s} {statistics.median(samples[phase]):7.3f}   "
                  f"(min {min(samples[phase]):.3f}, max {max(samples[phase]):.3f})")


def cpu_overhead(args) -> None:
    host_times = []
    for _ in range(args.runs):
        started = time.monotonic()
        subprocess.run(["sh", "-c", CPU_PAYLOAD], check=True, capture_output=True)
        host_times.append(time.monotonic() - started)
    guest_times = []
    with tempfile.TemporaryDirectory() as scratch:
        for number in range(args.runs):
            job = {"id": "cpu", "command": ["sh", "-c", CPU_PAYLOAD], "walltime_s": 600}
            guest_times.append(run_job(job, args, Path(scratch) / str(number)).timings["guest_payload"])
    host, guest = statistics.median(host_times), statistics.median(guest_times)
    print(f"CPU-bound payload ({CPU_PAYLOAD!r}), median of {args.runs}:")
    print(f"  host {host:.3f} s, guest {guest:.3f} s, guest/host ratio {guest / host:.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--driver", default=None)
    parser.add_argument("--site", default=None)
    args = parser.parse_args()
    phases(args)
    cpu_overhead(args)


if __name__ == "__main__":
    main()
