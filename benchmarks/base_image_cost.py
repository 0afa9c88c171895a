#!/usr/bin/env python3
"""What does a real base image cost per job? A trivial job (`true`) on the built-in busybox image and on
the built-in Debian 12 base, interleaved in one run, per driver; plus Python's first start in the guest.
Run by hand (it boots many VMs); results go into docs/benchmarks.md.

    .venv/bin/python benchmarks/base_image_cost.py [--runs 5] [--all-drivers] [--site FILE]

For each driver: medians (min-max) of the job's total wall time, its boot phase, the agent's own set-up
(guest clock, from its start to the payload's: disks, and for Debian the base's read-only mount, the
overlay and the binds) and the run phase; the difference of the medians is the base set-up cost.
"""

from __future__ import annotations

import statistics
import sys
import tempfile
from pathlib import Path

from run_overhead import arguments, driver_setups  # the same options and driver set-ups as that benchmark

import vjobs
from vjobs.testing.figures import median_range

JOBS = {
    "busybox": {"id": "trivial-busybox", "command": ["true"], "image": "default"},
    "debian12": {"id": "trivial-debian12", "command": ["true"], "image": "debian12"},
    "debian12 python3": {"id": "python-debian12", "command": ["python3", "-c", "pass"], "image": "debian12"},
}
MEASURED = ("total", "boot", "guest_setup", "run")


def spread(values: list[float]) -> str:
    return median_range(values, 2, dash="-", range_of_one=True)


def measure(site, runs: int, scratch: Path) -> dict[str, dict[str, list[float]]]:
    samples = {name: {key: [] for key in MEASURED + ("guest_payload",)} for name in JOBS}
    for number in range(runs):  # interleaved, so that a noisy minute hurts every image alike
        for name, job in JOBS.items():
            result = vjobs.run({**job, "walltime_s": 300}, site=site, outdir=scratch / f"{name}-{number}")
            if result.status != "succeeded":
                sys.exit(f"{name} failed on {result.driver}: {result.status} {result.error}")
            for key in samples[name]:
                samples[name][key].append(result.timings.get(key, 0.0))
    return samples


def main() -> None:
    args = arguments(__doc__)
    site = vjobs.load_site(args.site)
    from vjobs.host.cache import CacheHold
    from vjobs.images.catalogue import resolve_image
    from vjobs.images.checked import CheckedFiles

    held = CacheHold()  # never released: the images stay until the benchmark's process exits
    with CheckedFiles(site.cache_dir) as files:  # built before the clock runs
        resolve_image("debian12", site, lambda message: print(f"  {message}"), hold=held, files=files)
    rows = []
    with tempfile.TemporaryDirectory() as folder, driver_setups(args, Path(folder)) as setups:
        for label, driver_site in setups:
            print(f"{label}:", flush=True)
            samples = measure(driver_site, args.runs, Path(folder) / label.split()[0])
            for name, values in samples.items():
                print(f"  {name:18s} " + "  ".join(f"{key} {spread(values[key])}" for key in MEASURED))
            cost = statistics.median(samples["debian12"]["total"]) - statistics.median(samples["busybox"]["total"])
            python = statistics.median(samples["debian12 python3"]["guest_payload"])
            rows.append((label, samples, cost, python))
    print("\n| driver | busybox total | debian12 total | base set-up cost | guest set-up busybox / debian12 "
          "| python3 first start in the guest |")
    print("| --- | --- | --- | --- | --- | --- |")
    for label, samples, cost, python in rows:
        print(f"| {label} | {spread(samples['busybox']['total'])} | {spread(samples['debian12']['total'])} | "
              f"{cost:+.2f} | {statistics.median(samples['busybox']['guest_setup']):.2f} / "
              f"{statistics.median(samples['debian12']['guest_setup']):.2f} | {python:.2f} |")
    print(f"\n(medians of {args.runs} interleaved runs, seconds; min-max in brackets)")


if __name__ == "__main__":
    main()
