#!/usr/bin/env python3
"""Is a start from a pre-booted template as reliable as a cold boot? Runs the example job (examples/hello)
``--runs`` times each way on qemu_user, interleaved (template, cold, template, ...), and counts outcomes:
succeeded, failed, and for the template side how many fell back to a cold boot and why. The template is
made before the count starts (its making is measured once, apart).

    .venv/bin/python benchmarks/template_reliability.py [--runs 200] [--site FILE] [--json OUT]

Issue 11 turns templates on by default only after at least 200 template runs with no failure and no
fallback, alongside as many cold boots."""

from __future__ import annotations

import argparse
import collections
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import vjobs  # noqa: E402
from vjobs.config.site import site_from_dict  # noqa: E402
from vjobs.testing.sites import example_job  # noqa: E402


def sites(args, scratch: Path):
    cache = str(vjobs.load_site(args.site).cache_dir)
    common = {"cache_dir": cache, "work_dir": str(scratch / "work"), "driver": "qemu_user"}
    return {mode: site_from_dict({**common, "drivers": {"qemu_user": {"template": mode == "template"}}})
            for mode in ("template", "cold")}


def campaign(runs: int, site_by_mode, scratch: Path) -> dict:
    outcomes = {mode: collections.Counter() for mode in site_by_mode}
    fallbacks = collections.Counter()
    totals = {mode: [] for mode in site_by_mode}
    started = time.monotonic()
    made = vjobs.run(example_job(), site=site_by_mode["template"], outdir=scratch / "making")
    making_s = made.timings.get("boot")
    for number in range(runs):
        for mode, site in site_by_mode.items():
            outdir = scratch / f"{mode}{number}"
            result = vjobs.run(example_job(), site=site, outdir=outdir)
            shutil.rmtree(outdir, ignore_errors=True)
            start = result.provenance.get("start", {})
            label = result.status
            if mode == "template" and start.get("mode") != "template":
                label = f"{result.status}, cold fallback"
                fallbacks[start.get("fallback") or start.get("why") or "?"] += 1
            outcomes[mode][label] += 1
            totals[mode].append(result.timings.get("total", 0.0))
        if (number + 1) % 20 == 0:
            print(f"  {number + 1}/{runs}: " + "; ".join(f"{mode} {dict(counts)}" for mode, counts in
                                                           outcomes.items()), flush=True)
    return {"runs": runs, "outcomes": {mode: dict(counts) for mode, counts in outcomes.items()},
            "fallbacks": dict(fallbacks), "template_making_boot_s": making_s,
            "median_total_s": {mode: statistics.median(values) for mode, values in totals.items()},
            "campaign_s": round(time.monotonic() - started, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=200)
    parser.add_argument("--site", default=None)
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        report = campaign(args.runs, sites(args, Path(folder)), Path(folder))
    print(json.dumps(report, indent=2))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
