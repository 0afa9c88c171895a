#!/usr/bin/env python3
"""Issue 11, goal 5: how many trivial jobs a minute does this host get through when jobs run side by side,
against plain QEMU boots at the same concurrency? Run by hand (it boots many VMs); results go into
docs/benchmarks.md.

    .venv/bin/python benchmarks/throughput.py [--jobs 20] [--concurrency 1,2,3,4] [--runs 1] [--site FILE]
                                              [--floor-timeout-s 12] [--floor-tsc-khz KHZ]

For each concurrency C (and --runs times over, the concurrencies interleaved, each vjobs batch followed by
its floor batch):
  vjobs  --jobs separate `vjobs run examples/hello/job.json --outdir DIR` processes (the CLI, as a batch
         system would start them), at most C at once, each started as soon as one ends; jobs a minute is the
         jobs that succeeded over the wall time of the whole batch. Every result.json must say succeeded: a
         job that did not counts in the wall time, not in the jobs, is named in the note and kept (under
         $TMPDIR/vjobs-benchmark-failures). The jobs share one work_dir, hence one host budget
         (vjobs/host/admission.py: by default as many vCPUs as this process may use, all the memory), a private
         one unless the site file sets work_dir, so that other vjobs on the host neither queue these nor are
         queued by them. Each result.json's `admission` timing says how long that job waited for its share:
         the note says how many waited, and for how long. The note also gives each job's CPU seconds (the
         CLI's own, and everything under it: QEMU, mkfs, ...), read from /proc/PID/stat before it is reaped,
         and the jobs a minute that this CPU cost alone allows on this host's CPUs.
  floor  --jobs boots of plain QEMU with plain-qemu-floor.sh's command line (microvm, TCG,
         -m 256, the same kernel, an initramfs that mounts a squashfs, prints a marker and powers off), with
         `tsc_early_khz=` (the host's TSC kHz; --floor-tsc-khz 0 leaves it out) on the kernel's command line:
         without it microvm under TCG hangs in most boots on a busy host (benchmarks/memory.py FloorHung).
         At most C at once: plain QEMU boots a minute. A boot past --floor-timeout-s is killed and started
         again, its time counted in the batch's wall time, and the note says how many hung.

qemu_user is pinned unless the site file pins a driver of its own.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # run as a script: benchmarks/ is on the path, the repository is not
    sys.path.insert(0, str(REPO))

from benchmarks.memory import (FLOOR_MARKER, STARTS, benchmark_site, floor_argv, floor_description,  # noqa: E402
                               floor_material, floor_tsc_khz, keep_failure, run_process, start_mode, start_names)
from benchmarks.report import Comparison, Section, print_section  # noqa: E402
from vjobs.testing.sites import example_job, merged, site_document, vjobs_command, write_site  # noqa: E402

GOAL = "5. throughput"
GOAL_JOBS_PER_MIN = 40.0
DEFAULT_JOBS = 20
DEFAULT_CONCURRENCY = (1, 2, 3, 4)
DEFAULT_RUNS = 1
DEFAULT_FLOOR_TIMEOUT_S = 12.0
FLOOR_ATTEMPTS = 5
JOB_TIMEOUT_S = 600.0


@dataclass
class JobOutcome:
    seconds: float  # the CLI process, start to end
    status: str
    admission_s: float = 0.0
    error: str = ""
    cpu_self_s: float = 0.0  # the `vjobs run` process's own user + system CPU
    cpu_children_s: float = 0.0  # what it started: QEMU (under unshare and sh when root), mkfs, ...
    start: str = ""  # how its VM started (result.json provenance.start): template, cold, cold (fallback)
    fallback: str = ""  # why it booted cold when it was meant to start from a template


@dataclass
class Batch:
    wall_s: float
    outcomes: list[JobOutcome] = field(default_factory=list)
    hangs: int = 0  # floor only: boots killed and retried

    @property
    def succeeded(self) -> int:
        return sum(outcome.status == "succeeded" for outcome in self.outcomes)

    @property
    def per_minute(self) -> float:
        return round(60.0 * self.succeeded / self.wall_s, 2)


def _concurrencies(value: Any) -> list[int]:
    if value is None:
        return list(DEFAULT_CONCURRENCY)
    if isinstance(value, int):
        return [value]
    if isinstance(value, str):
        return [int(part) for part in value.split(",") if part.strip()]
    return [int(part) for part in value]


def _one_job(job_file: Path, site: Path, outdir: Path) -> JobOutcome:
    command = [*vjobs_command(), "run", str(job_file), "--outdir", str(outdir), "--site", str(site)]
    started = time.monotonic()
    ran = run_process(command, Path(f"{outdir}.log"), JOB_TIMEOUT_S)
    seconds = time.monotonic() - started
    if not ran.in_time:
        return JobOutcome(seconds, "benchmark_timeout", error=f"kept in {keep_failure(outdir)}")
    try:
        result = json.loads((outdir / "result.json").read_text())
    except (OSError, ValueError) as exc:
        return JobOutcome(seconds, "no_result", error=f"{exc}; kept in {keep_failure(outdir)}")
    start, fallback = start_mode(result)
    outcome = JobOutcome(seconds, str(result.get("status")), float(result.get("timings", {}).get("admission", 0.0)),
                         cpu_self_s=ran.cpu_self_s, cpu_children_s=ran.cpu_children_s, start=start,
                         fallback=fallback)
    if outcome.status != "succeeded":
        outcome.error = f"{json.dumps(result.get('error'))[:300]}; kept in {keep_failure(outdir)}"
    return outcome


def vjobs_batch(job_file: Path, site: Path, scratch: Path, jobs: int, concurrency: int) -> Batch:
    scratch.mkdir(parents=True)
    started = time.monotonic()
    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        outcomes = list(pool.map(lambda number: _one_job(job_file, site, scratch / f"job{number}"), range(jobs)))
    return Batch(time.monotonic() - started, outcomes)


def _one_boot(argv: list[str], timeout_s: float, hangs: list[int], lock: threading.Lock) -> JobOutcome:
    started = time.monotonic()
    cpu = 0.0
    with tempfile.TemporaryDirectory(prefix="vjobs-floor-boot-") as folder:
        log = Path(folder) / "out"
        for _ in range(FLOOR_ATTEMPTS):
            ran = run_process(argv, log, timeout_s)
            cpu += ran.cpu_self_s + ran.cpu_children_s
            if not ran.in_time:
                with lock:
                    hangs[0] += 1
                continue
            out = log.read_bytes()
            return JobOutcome(time.monotonic() - started, "succeeded" if FLOOR_MARKER in out else "no_marker",
                              error="" if FLOOR_MARKER in out else out[-300:].decode(errors="replace"),
                              cpu_self_s=cpu)
    return JobOutcome(time.monotonic() - started, "hung", error=f"hung {FLOOR_ATTEMPTS} times", cpu_self_s=cpu)


def floor_batch(argv: list[str], boots: int, concurrency: int, timeout_s: float) -> Batch:
    hangs, lock = [0], threading.Lock()
    started = time.monotonic()
    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        outcomes = list(pool.map(lambda _: _one_boot(argv, timeout_s, hangs, lock), range(boots)))
    return Batch(time.monotonic() - started, outcomes, hangs[0])


def _failures(batches: list[Batch]) -> list[str]:
    return [f"{outcome.status}: {outcome.error}" for batch in batches for outcome in batch.outcomes
            if outcome.status != "succeeded"]


def _cpu_bound(cpu_s: float) -> str:
    cpus = len(os.sched_getaffinity(0))
    return f": at most {60 * cpus / cpu_s:.0f} a minute on {cpus} CPUs" if cpu_s > 0 else ""


def _admission_note(batches: list[Batch], jobs: int) -> str:
    waits = [outcome.admission_s for batch in batches for outcome in batch.outcomes]
    queued = [wait for wait in waits if wait >= 0.1]
    outcomes = [outcome for batch in batches for outcome in batch.outcomes]
    per_job = statistics.median(outcome.seconds for outcome in outcomes)
    cpu_self = statistics.median(outcome.cpu_self_s for outcome in outcomes)
    cpu_children = statistics.median(outcome.cpu_children_s for outcome in outcomes)
    text = (f"each `vjobs run` took {per_job:.2f} s (median) and {cpu_self + cpu_children:.2f} CPU s (vjobs' "
            f"own {cpu_self:.2f}, QEMU and the other processes it started {cpu_children:.2f})"
            f"{_cpu_bound(cpu_self + cpu_children)}; ")
    if not queued:
        return text + "admission queued no job"
    return (text + f"admission queued {len(queued)} of {len(waits)} jobs ({jobs} per batch), "
            f"{sum(queued):.1f} s of waiting in all, {max(queued):.2f} s at most")


def _starts_note(batches: list[Batch]) -> str:
    counts: dict[str, int] = {}
    for outcome in (outcome for batch in batches for outcome in batch.outcomes):
        counts[outcome.start or "?"] = counts.get(outcome.start or "?", 0) + 1
    why = next((outcome.fallback for batch in batches for outcome in batch.outcomes if outcome.fallback), "")
    return ("; the VMs started: " + ", ".join(f"{count} {mode}" for mode, count in sorted(counts.items()))
            + (f" (why: {why[:200]})" if why else ""))


def measure(args: argparse.Namespace) -> Section:
    jobs = getattr(args, "jobs", None) or DEFAULT_JOBS
    runs = getattr(args, "runs", None) or DEFAULT_RUNS
    concurrencies = _concurrencies(getattr(args, "concurrency", None))
    starts = start_names(getattr(args, "starts", None))
    floor_timeout_s = getattr(args, "floor_timeout_s", None) or DEFAULT_FLOOR_TIMEOUT_S
    base, site_path = site_document(getattr(args, "site", None))
    vjobs_batches: dict[tuple[str, int], list[Batch]] = {(s, c): [] for s in starts for c in concurrencies}
    floor_batches: dict[int, list[Batch]] = {c: [] for c in concurrencies}
    with tempfile.TemporaryDirectory(prefix="vjobs-throughput-") as folder:
        scratch = Path(folder)
        overrides = benchmark_site(base, scratch, pin=False)
        sites = {start: write_site(scratch / f"site-{start}.toml", merged(base, merged(overrides, {
            "drivers": {"qemu_user": {"template": STARTS[start][0]}}}))) for start in starts}
        from vjobs.config.site import load_site

        budget = load_site(sites[starts[0]]).host
        job_file = scratch / "hello.json"
        job = example_job()
        job_file.write_text(json.dumps(job))
        for start, site in sites.items():  # warm-up, not counted: templates, probe verdicts, caches
            (scratch / "warm-up").mkdir(exist_ok=True)
            _one_job(job_file, site, scratch / "warm-up" / start)
        tsc_khz = floor_tsc_khz(args)
        floor = floor_argv(floor_material(), tsc_khz=tsc_khz)
        for number in range(runs):
            for concurrency in concurrencies:
                for start, site in sites.items():
                    batch = vjobs_batch(job_file, site, scratch / f"run{number}-{start}-c{concurrency}", jobs,
                                        concurrency)
                    vjobs_batches[start, concurrency].append(batch)
                    print(f"  run {number + 1}/{runs}, concurrency {concurrency}, {start}: {batch.succeeded}/{jobs} "
                          f"succeeded in {batch.wall_s:.1f} s = {batch.per_minute:.1f} jobs/min"
                          + _starts_note([batch]), file=sys.stderr)
                    for failure in _failures([batch]):
                        print(f"    a vjobs job did not succeed: {failure}", file=sys.stderr)
                plain = floor_batch(floor, jobs, concurrency, floor_timeout_s)
                floor_batches[concurrency].append(plain)
                print(f"  run {number + 1}/{runs}, concurrency {concurrency}, plain QEMU: {plain.succeeded}/{jobs} "
                      f"in {plain.wall_s:.1f} s = {plain.per_minute:.1f} boots/min ({plain.hangs} hung)",
                      file=sys.stderr)
    comparisons = []
    vcpus, memory = job.get("resources", {}).get("vcpus", 1), job.get("resources", {}).get("memory_mib", 512)
    for start in starts:
        for concurrency in concurrencies:
            mine, plain = vjobs_batches[start, concurrency], floor_batches[concurrency]
            failures = _failures(mine)
            note = _admission_note(mine, jobs) + _starts_note(mine)
            if failures:
                note += f"; **{len(failures)} job(s) did not succeed** (not counted): " + " | ".join(failures[:3])
            hangs = sum(batch.hangs for batch in plain)
            boots = [outcome for batch in plain for outcome in batch.outcomes]
            boot_cpu = statistics.median(outcome.cpu_self_s for outcome in boots)
            note += (f"; a plain QEMU boot took {statistics.median(outcome.seconds for outcome in boots):.2f} s "
                     f"and {boot_cpu:.2f} CPU s{_cpu_bound(boot_cpu)}, {hangs} hung and were retried (counted in "
                     "its wall time)")
            if _failures(plain):
                note += f", {len(_failures(plain))} never booted"
            comparisons.append(Comparison(
                GOAL, f"`vjobs run` hello job ×{jobs}, {concurrency} at once (separate CLI processes), qemu_user "
                f"{STARTS[start][1]}", [batch.per_minute for batch in mine],
                f"plain QEMU boots ({floor_description(tsc_khz)}) ×{jobs}, {concurrency} at once",
                [batch.per_minute for batch in plain], unit="jobs/min", lower_is_better=False,
                absolute_goal=GOAL_JOBS_PER_MIN, note=note))
    at_once = min(budget.vcpus // vcpus, budget.memory_mib // memory)
    text = (f"`benchmarks/throughput.py --jobs {jobs} --runs {runs}` on {len(os.sched_getaffinity(0))} CPUs: jobs "
            f"a minute from the wall time of each whole batch (a warm-up job per way to start, not counted, made "
            f"its template); each job asks {vcpus} vCPU and {memory} MiB; the host budget (vjobs/host/admission.py) was "
            f"{budget.vcpus} vCPUs and {budget.memory_mib} MiB, so at most {at_once} VMs could run at once: "
            f"beyond {at_once} jobs at once, the others wait for admission (the notes say how long). "
            f"Site: {site_path or 'built-in defaults'}.")
    return Section("Throughput: trivial jobs a minute (issue 11, goal 5)", comparisons, text)


def arguments(description: str | None = None, argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=description or __doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=DEFAULT_JOBS, help="jobs (and plain boots) per batch")
    parser.add_argument("--concurrency", default=",".join(map(str, DEFAULT_CONCURRENCY)),
                        help="jobs at once, comma-separated: one batch each")
    parser.add_argument("--runs", type=int, default=DEFAULT_RUNS, help="batches per concurrency")
    parser.add_argument("--site", default=None)
    parser.add_argument("--starts", default="template,cold",
                        help="how the jobs' VMs start, comma-separated: template (the default), cold")
    parser.add_argument("--floor-tsc-khz", type=int, default=None,
                        help="tsc_early_khz= for the plain QEMU's kernel (default: the host's; 0: none)")
    parser.add_argument("--floor-timeout-s", type=float, default=DEFAULT_FLOOR_TIMEOUT_S,
                        help="a plain QEMU boot that takes longer has hung: killed and retried")
    return parser.parse_args(argv)


def main() -> None:
    print_section(measure(arguments()))


if __name__ == "__main__":
    main()
