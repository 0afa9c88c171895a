#!/usr/bin/env python3
"""What does a Slurm job array of vjobs jobs gain over running them one after another? Run by hand, as root
(real Slurm, real VMs); results go into docs/benchmarks.md.

    .venv/bin/python benchmarks/slurm_array.py [--jobs 6] [--cache DIR]

The same N quick jobs (the built-in busybox image, qemu_user, one vCPU; the payload sleeps 2 s and writes a
file), timed from the first submission to the last result:
  (a) as a Slurm job array through examples/slurm/submit-array.sh, on a real one-node Slurm with 2 CPUs
      (vjobs.testing.servers.slurm, in a loopback-only network namespace): two VMs at a time;
  (b) one after another with plain `vjobs run`.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import vjobs
from vjobs.host.cache import CacheHold
from vjobs.images.boot import build_default_image
from vjobs.testing.figures import ratio
from vjobs.testing.servers.netns import LoopbackNetns
from vjobs.testing.servers.slurm import SlurmCluster, why_not_available
from vjobs.testing.sites import write_site

REPO = Path(__file__).resolve().parent.parent
VJOBS = REPO / ".venv/bin/vjobs"
SUBMIT = REPO / "examples/slurm/submit-array.sh"
CPUS = 2


def write_jobs(folder: Path, count: int) -> list[Path]:
    folder.mkdir()
    paths = []
    for number in range(1, count + 1):
        job = {"id": f"task{number}", "command": ["sh", "-c", "sleep 2 && mkdir -p out && echo $TASK > out/task.txt"],
               "env": {"TASK": f"task{number}"}, "outputs": ["out"], "walltime_s": 300,
               "resources": {"vcpus": 1, "memory_mib": 256, "scratch_mib": 16, "output_mib": 4}}
        paths.append(folder / f"task{number}.json")
        paths[-1].write_text(json.dumps(job))
    return paths


def job_seconds(outdirs: list[Path], how: str) -> float:
    """The median of the jobs' own wall times (result.json's timings.total); exits if one did not succeed."""
    totals = []
    for outdir in outdirs:
        result = json.loads((outdir / "result.json").read_text())
        if result["status"] != "succeeded":
            sys.exit(f"{how}: job {result['job_id']} {result['status']}: {result.get('error')}")
        totals.append(result["timings"]["total"])
    return statistics.median(totals)


def as_array(slurm: SlurmCluster, jobs: list[Path], outdir: Path, env: dict[str, str]) -> tuple[float, float]:
    begun = time.monotonic()
    submitted = slurm.run(["sh", str(SUBMIT), str(outdir), *map(str, jobs)], env=env)
    slurm.wait(slurm.submitted_job(submitted.stdout), timeout=60 * len(jobs))
    elapsed = time.monotonic() - begun
    return elapsed, job_seconds([outdir / str(number) for number in range(1, len(jobs) + 1)], "Slurm array")


def one_after_another(jobs: list[Path], outdir: Path, env: dict[str, str]) -> tuple[float, float]:
    begun = time.monotonic()
    for job in jobs:
        subprocess.run([str(VJOBS), "run", str(job), "--outdir", str(outdir / job.stem), "--json"],
                       env={**os.environ, **env}, stdout=subprocess.DEVNULL, check=False)
    elapsed = time.monotonic() - begun
    return elapsed, job_seconds([outdir / job.stem for job in jobs], "one after another")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=6)
    parser.add_argument("--cache", default=str(vjobs.load_site().cache_dir))
    args = parser.parse_args()
    why_not = why_not_available()
    if why_not:
        sys.exit(f"cannot start Slurm here: {why_not}")
    held = CacheHold()  # never released: the image stays until the benchmark's process exits
    build_default_image(Path(args.cache), hold=held)  # built before the clock runs
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        site = write_site(scratch / "site.toml", {"driver": "qemu_user", "cache_dir": args.cache,
                                                  "work_dir": str(scratch / "work")})
        env = {"VJOBS": str(VJOBS), "VJOBS_SITE": str(site)}
        jobs = write_jobs(scratch / "jobs", args.jobs)
        one_after_another(jobs[:1], scratch / "warm-up", env)  # the probe's verdict, cached for both
        with LoopbackNetns("vjobs-bench") as netns, SlurmCluster(netns, scratch / "slurm", cpus=CPUS) as slurm:
            array, array_job = as_array(slurm, jobs, scratch / "array", env)
        sequential, sequential_job = one_after_another(jobs, scratch / "sequential", env)
    print(f"{args.jobs} jobs (busybox image, qemu_user, 1 vCPU, payload sleeps 2 s), wall time; in brackets the "
          "median job's own (vjobs' timings.total):")
    print(f"  Slurm array on a {CPUS}-CPU node: {array:6.1f} s  ({array_job:.1f} s)")
    print(f"  one after another:          {sequential:6.1f} s  ({sequential_job:.1f} s)")
    print(f"  one after another / array:  {sequential / array:6.2f}")
    print("\n| jobs | Slurm array, 2 CPUs | one after another | ratio |\n| --- | --- | --- | --- |")
    print(f"| {args.jobs} VM jobs (sleep 2 s) | {array:.1f} s ({array_job:.1f} s a job) | {sequential:.1f} s "
          f"({sequential_job:.1f} s a job) | {ratio(sequential / array)} |")


if __name__ == "__main__":
    main()
