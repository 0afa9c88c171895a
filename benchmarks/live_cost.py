#!/usr/bin/env python3
"""What seeing a job live costs (docs/sync.md), on qemu_user, whose QEMU is this process's child so that its CPU
time is measured with vjobs' own. Run by hand; results go into docs/benchmarks.md.

    .venv/bin/python benchmarks/live_cost.py [--runs 2] [--seconds 20] [--bind-gib 1] [--site FILE]

1. A job that writes steadily (a line to stdout and to a file in a read-write bind every 0.2 s for --seconds),
   interleaved in four set-ups: the live channel off (``live_channel = false``: everything at the end), live
   streams only (``sync_interval_s = 0``), and streams with a sync round every 10 s and every 1 s. For each:
   the job's wall time, the payload's own time (guest clock) and the host CPU seconds (vjobs and QEMU,
   user + system), and the rounds applied.
2. A read-write bind of --bind-gib GiB (4 MiB files of random bytes) in which the payload changes one file:
   from the change (the payload prints a line right after it, which the live stdout brings within ~1 s) to
   the host folder showing it, with a round every second; and the host's time to apply that round. The
   same with a bind of one small file, for the floor.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import resource
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import vjobs
from vjobs.testing.figures import median_range

STEADY = ('i=0; end=$(($(date +%s) + {seconds})); while [ $(date +%s) -lt $end ]; do i=$((i + 1)); '
          'echo "line $i" >> /data/log.txt; echo "line $i"; sleep 0.2; done')
SETUPS = {"off": {"live_channel": False}, "streams only": {"sync_interval_s": 0},
          "streams + sync 10 s": {"sync_interval_s": 10}, "streams + sync 1 s": {"sync_interval_s": 1}}
CHANGE_ONE = "sleep 4; echo changed >> /data/f0000; echo changed; sleep 12"


def cpu_seconds() -> float:
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def steady_writer(site, args, scratch: Path) -> dict[str, dict[str, list[float]]]:
    warm_up = vjobs.run({"id": "warm-up", "command": ["true"]}, site=site, outdir=scratch / "warm-up")  # a template
    if warm_up.status != "succeeded":
        sys.exit(f"warm-up: {warm_up.status} {warm_up.error}")
    samples = {name: {"total": [], "guest_payload": [], "host_cpu": [], "rounds": []} for name in SETUPS}
    for number in range(args.runs):  # interleaved: a noisy minute hurts every set-up alike
        for name, settings in SETUPS.items():
            bind = scratch / f"steady-{number}-{name.replace(' ', '_')}"
            bind.mkdir()
            job = {"id": "steady", "command": ["sh", "-c", STEADY.format(seconds=args.seconds)],
                   "walltime_s": args.seconds + 120, "binds": [{"source": str(bind), "target": "/data"}]}
            before = cpu_seconds()
            result = vjobs.run(job, site=dataclasses.replace(site, **settings), outdir=bind.with_suffix(".out"))
            if result.status != "succeeded":
                sys.exit(f"{name}: {result.status} {result.error}")
            samples[name]["host_cpu"].append(cpu_seconds() - before)
            samples[name]["total"].append(result.timings["total"])
            samples[name]["guest_payload"].append(result.timings.get("guest_payload", 0.0))
            samples[name]["rounds"].append(result.sync.get("rounds", 0))
    return samples


def one_file_changed(site, args, scratch: Path, gib: float) -> dict[str, list[float]]:
    """Seconds from the payload's change (as its live stdout tells) to the host's copy showing it."""
    bind = scratch / f"bind-{gib}"
    bind.mkdir()
    count = max(1, int(gib * 1024 / 4))
    for index in range(count):
        (bind / f"f{index:04d}").write_bytes(os.urandom(4 << 20) if gib >= 0.01 else b"small\n")
    site = dataclasses.replace(site, sync_interval_s=1, limits={**site.limits, "bind_mib": int(gib * 1024) + 64})
    samples = {"latency": [], "apply": [], "to_payload": []}
    for number in range(args.runs):
        out = scratch / f"bind-{gib}-{number}.out"
        applied = []
        seen = {}

        def note(event) -> None:
            if event.subject == "sync_round":
                applied.append(event.elapsed_s)

        def watch() -> None:
            target = bind / "f0000"
            size = target.stat().st_size
            while "host" not in seen:
                with contextlib.suppress(FileNotFoundError):
                    if "stdout" not in seen and (out / "stdout").read_bytes() == b"changed\n":
                        seen["stdout"] = time.monotonic()
                    if target.stat().st_size != size:
                        seen["host"] = time.monotonic()
                time.sleep(0.02)

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        job = {"id": "one-changed", "command": ["sh", "-c", CHANGE_ONE], "walltime_s": 600,
               "resources": {"output_mib": int(gib * 1024) + 64, "scratch_mib": 64},
               "binds": [{"source": str(bind), "target": "/data"}]}
        result = vjobs.run(job, site=site, outdir=out, event_hooks={"step_ended": [note]})
        watcher.join(5)
        if result.status != "succeeded" or "host" not in seen or "stdout" not in seen:
            sys.exit(f"{gib} GiB bind: {result.status} {result.error}, seen {seen}")
        samples["latency"].append(max(seen["host"] - seen["stdout"], 0.0))
        samples["apply"].append(max(applied))
        samples["to_payload"].append(result.timings["to_payload"])
        (bind / "f0000").write_bytes(os.urandom(4 << 20) if gib >= 0.01 else b"small\n")
    return samples


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--seconds", type=int, default=20)
    parser.add_argument("--bind-gib", type=float, default=1.0)
    parser.add_argument("--site")
    args = parser.parse_args()
    site = dataclasses.replace(vjobs.load_site(args.site), pinned_driver="qemu_user")
    spread = lambda values: median_range(values, 2, dash="-", range_of_one=True)  # noqa: E731
    with tempfile.TemporaryDirectory(dir="/var/tmp") as folder:
        steady = steady_writer(site, args, Path(folder))
        print(f"\nA job writing a line to stdout and to a bound file every 0.2 s for {args.seconds} s "
              f"(medians of {args.runs}, min-max):\n")
        print("| set-up | wall time, s | payload (guest clock), s | host CPU (vjobs + QEMU), s | rounds |")
        print("| --- | --- | --- | --- | --- |")
        for name, values in steady.items():
            print(f"| {name} | {spread(values['total'])} | {spread(values['guest_payload'])} | "
                  f"{spread(values['host_cpu'])} | {statistics.median(values['rounds']):.0f} |")
        print("\nOne file changed in a read-write bind, a round every second:\n")
        print("| bind | change to host copy, s | host applies the round, s | to_payload, s |")
        print("| --- | --- | --- | --- |")
        for gib in (0.0, args.bind_gib):
            values = one_file_changed(site, args, Path(folder), gib)
            label = f"{gib:g} GiB in {max(1, int(gib * 256))} files" if gib else "one small file"
            print(f"| {label} | {spread(values['latency'])} | {spread(values['apply'])} | "
                  f"{spread(values['to_payload'])} |", flush=True)


if __name__ == "__main__":
    main()
