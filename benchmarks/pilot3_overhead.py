#!/usr/bin/env python3
"""What does running a PanDA Pilot 3 job's payload in a vjobs VM cost? Run by hand (real pilots, real
VMs); results go into docs/benchmarks.md.

    .venv/bin/python benchmarks/pilot3_overhead.py [--runs 3] [--cache DIR]

Interleaved, per run, the same payload (read a staged-in input, write the declared output) three ways:
  - the pilot with its generic user: the payload on the host (the floor);
  - the pilot with the vjobs user: the payload in a VM on the built-in Debian base (qemu_user, TCG);
  - `vjobs run` of the same payload script and input, no pilot.
For the two pilot runs: the pilot's whole run (start to exit), and its payload phase (from the payload
command's start to its return, read from the pilot's own log). The pilot always runs with PILOT_NOKILL=1 in
a PID namespace of its own (vjobs.pilot3.harness).
"""

from __future__ import annotations

import argparse
import re
import shutil
import statistics
import tempfile
from datetime import datetime
from pathlib import Path

import vjobs
from vjobs.pilot3.harness import PilotSite, fetch_sdist, make_job, run_pilot
from vjobs.pilot3.plugin import install_plugin
from vjobs.testing.figures import median_range
from vjobs.testing.panda_standin import PandaStandin
from vjobs.testing.sites import write_site

PAYLOAD = "#!/bin/bash\nset -e\n{ cat events.txt; uname -r; } > summary.txt\n"
STAMP = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) ")


def payload_phase(pilot_log: Path) -> float:
    """Seconds from the payload command's start to its return, from the pilot's log."""
    lines = pilot_log.read_text(errors="replace").splitlines()
    start = next(i for i, line in enumerate(lines) if "payload execution command" in line)
    begun = next(_time(line) for line in lines[start:] if "executing command" in line and STAMP.match(line))
    ended = next(_time(line) for line in lines[start:] if "run() returned exit_code" in line)
    return (ended - begun).total_seconds()


def _time(line: str) -> datetime:
    return datetime.strptime(STAMP.match(line).group(1), "%Y-%m-%d %H:%M:%S,%f")


def pilot_job(folder: Path, pilot: Path, user: str, site_file: Path, panda_id: int) -> tuple[float, float]:
    site = PilotSite(folder)
    job = make_job(site, panda_id, PAYLOAD, inputs={"events.txt": b"muon jet\n"}, outputs=("summary.txt",),
                   container_name="debian12")
    with PandaStandin(job) as standin:
        run = run_pilot(site, pilot, standin.url, user=user, env={"VJOBS_SITE": str(site_file)}, timeout_s=600)
        final = standin.final(str(panda_id))
    if not final or final["state"] != "finished":
        raise SystemExit(f"pilot job {panda_id} ({user}) did not finish: {final}; see {run.output}")
    return run.elapsed_s, payload_phase(run.output)


def vjobs_run(folder: Path, site_file: Path) -> float:
    (folder / "inputs").mkdir(parents=True)
    (folder / "inputs" / "events.txt").write_text("muon jet\n")
    (folder / "inputs" / "payload.sh").write_text(PAYLOAD)
    job = {"id": "direct", "image": "debian12", "command": ["bash", "payload.sh"], "inputs": str(folder / "inputs"),
           "outputs": ["summary.txt"], "resources": {"memory_mib": 2048}}
    result = vjobs.run(job, site=str(site_file), outdir=folder / "out")
    if result.status != "succeeded":
        raise SystemExit(f"vjobs run failed: {result.error}")
    return result.timings["total"]


def spread(values: list[float]) -> str:
    return median_range(values, 1, dash="-", range_of_one=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--cache", default=str(vjobs.load_site().cache_dir))
    args = parser.parse_args()
    samples: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        pilot = scratch / "pilot"
        shutil.copytree(fetch_sdist(Path(args.cache) / "pilot3"), pilot)
        install_plugin(pilot)
        site_file = write_site(scratch / "site.toml", {"driver": "qemu_user", "cache_dir": args.cache,
                                                       "work_dir": str(scratch / "work")})
        from vjobs.host.cache import CacheHold
        from vjobs.images.catalogue import resolve_image
        from vjobs.images.checked import CheckedFiles

        held = CacheHold()  # never released: the images stay until the benchmark's process exits
        site = vjobs.load_site(site_file)
        with CheckedFiles(site.cache_dir) as files:
            resolve_image("debian12", site, print, hold=held, files=files)  # built before the clock runs
        for number in range(args.runs):
            for user in ("generic", "vjobs"):
                total, phase = pilot_job(scratch / f"{user}-{number}", pilot, user, site_file, 5000 + number)
                samples.setdefault(f"{user} pilot total", []).append(total)
                samples.setdefault(f"{user} payload phase", []).append(phase)
            samples.setdefault("vjobs run", []).append(vjobs_run(scratch / f"run-{number}", site_file))
            print(f"run {number + 1}: " + ", ".join(f"{key} {values[-1]:.1f}" for key, values in samples.items()),
                  flush=True)
    print(f"\nmedians of {args.runs} (min-max), seconds:")
    for key, values in samples.items():
        print(f"  {key:24s} {spread(values)}")
    cost = statistics.median(samples["vjobs payload phase"]) - statistics.median(samples["generic payload phase"])
    print(f"  the VM adds {cost:.1f} s to the payload phase; `vjobs run` of the same payload takes "
          f"{statistics.median(samples['vjobs run']):.1f} s")


if __name__ == "__main__":
    main()
