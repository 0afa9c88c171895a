#!/usr/bin/env python3
"""Is a start from a pre-booted template as reliable as a cold boot? Runs jobs ``--runs`` times each way on
qemu_user, interleaved (template, cold, template, ...), through the CLI as a pilot would, and counts
outcomes: succeeded, failed, and for the template side how many fell back to a cold boot and why. The
template is made before the count starts.

    .venv/bin/python benchmarks/template_reliability.py [--runs 200] [--concurrency 4] [--site FILE] [--json OUT]

The rounds cycle through three kinds (a concurrent round counts each of its jobs as a run, so with
``--concurrency 4`` a sixth of the runs are hello, a sixth all-memory, two thirds concurrent):
- ``hello``: examples/hello, one job at a time;
- ``all-memory``: a guest that writes all its free memory (a tmpfs filled from /dev/urandom, as
  benchmarks/checkpoint.py), then checks what it wrote: every page of the template's RAM is copied on write;
- ``concurrent``: ``--concurrency`` hello jobs started at once.

Issue 11 turned templates on by default after 200 template runs with no failure and no fallback; issue 21
asks the same of templates whose RAM is mapped from one shared memfd (docs/templates.md)."""

from __future__ import annotations

import argparse
import collections
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import vjobs  # noqa: E402
from vjobs.testing.sites import vjobs_command, write_site  # noqa: E402

HELLO = REPO / "examples" / "hello" / "job.json"
# Fills what the guest can spare (16 MiB and 3 % kept), then reads it back against its sum.
ALL_MEMORY = r"""
mkdir -p /tmp/fill && mount -t tmpfs -o size=100% fill /tmp/fill || exit 3
fill=$(awk '/^MemTotal:/ { t = $2 / 1024 } /^MemAvailable:/ { a = $2 / 1024 }
            END { m = int(a - 16 - t * 0.03); print (m > 0 ? m : 0) }' /proc/meminfo)
dd if=/dev/urandom of=/tmp/fill/data bs=1M count="$fill" 2>/dev/null || exit 4
first=$(sha256sum < /tmp/fill/data)
second=$(sha256sum < /tmp/fill/data)
[ "$first" = "$second" ] || exit 5
echo "wrote and read back $fill MiB"
"""
KINDS = ("hello", "all-memory", "concurrent")


def sites(args, scratch: Path) -> dict[str, Path]:
    cache = str(vjobs.load_site(args.site).cache_dir)
    common = {"cache_dir": cache, "work_dir": str(scratch / "work"), "driver": "qemu_user"}
    return {mode: write_site(scratch / f"{mode}.toml", {**common, "drivers": {"qemu_user": {
        "template": mode == "template"}}}) for mode in ("template", "cold")}


def jobs(scratch: Path) -> dict[str, Path]:
    all_memory = scratch / "all-memory.json"
    all_memory.write_text(json.dumps({"id": "all-memory", "command": ["sh", "-c", ALL_MEMORY],
                                      "resources": {"memory_mib": 256}}))
    return {"hello": HELLO, "all-memory": all_memory, "concurrent": HELLO}


def run_jobs(site: Path, job: Path, outdirs: list[Path]) -> list[dict]:
    """Start one job per outdir at once through the CLI; their results."""
    started = [subprocess.Popen([*vjobs_command(), "run", "--site", str(site), str(job), "--outdir", str(outdir)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for outdir in outdirs]
    results = []
    for process, outdir in zip(started, outdirs):
        process.wait(900)
        try:
            results.append(json.loads((outdir / "result.json").read_text()))
        except (OSError, ValueError) as error:
            results.append({"status": f"no result.json ({error})", "provenance": {}, "timings": {}})
        shutil.rmtree(outdir, ignore_errors=True)
    return results


def campaign(runs: int, concurrency: int, site_by_mode: dict[str, Path], job_by_kind: dict[str, Path],
             scratch: Path) -> dict:
    outcomes = {mode: collections.Counter() for mode in site_by_mode}
    fallbacks = collections.Counter()
    totals = {mode: collections.defaultdict(list) for mode in site_by_mode}
    counted = {mode: 0 for mode in site_by_mode}
    started = time.monotonic()
    making = run_jobs(site_by_mode["template"], HELLO, [scratch / "making"])[0]
    number = 0
    while min(counted.values()) < runs:
        kind = KINDS[number % len(KINDS)]
        for mode, site in site_by_mode.items():
            at_once = min(concurrency if kind == "concurrent" else 1, runs - counted[mode])
            for result in run_jobs(site, job_by_kind[kind], [scratch / f"{mode}{number}-{i}" for i in range(at_once)]):
                start = result.get("provenance", {}).get("start", {})
                label = f"{kind}: {result['status']}"
                if mode == "template" and start.get("mode") != "template":
                    label += ", cold fallback"
                    fallbacks[start.get("fallback") or start.get("why") or "?"] += 1
                outcomes[mode][label] += 1
                totals[mode][kind].append(result.get("timings", {}).get("total", 0.0))
                counted[mode] += 1
        number += 1
        if number % 15 == 0:
            print(f"  {counted}: " + "; ".join(f"{mode} {dict(counts)}" for mode, counts in outcomes.items()),
                  flush=True)
    return {"runs": runs, "concurrency": concurrency, "outcomes": {m: dict(c) for m, c in outcomes.items()},
            "fallbacks": dict(fallbacks), "template_making_total_s": making.get("timings", {}).get("total"),
            "median_total_s": {mode: {kind: statistics.median(values) for kind, values in by_kind.items()}
                               for mode, by_kind in totals.items()},
            "campaign_s": round(time.monotonic() - started, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=200)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--site", default=None)
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        scratch = Path(folder)
        report = campaign(args.runs, args.concurrency, sites(args, scratch), jobs(scratch), scratch)
    print(json.dumps(report, indent=2))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
