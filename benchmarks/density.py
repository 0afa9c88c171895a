#!/usr/bin/env python3
"""Density: what N concurrent guests cost the host's memory, from templates and cold, in one run.

    .venv/bin/python benchmarks/density.py [--counts 4,16] [--memory-mib 256]

For each count N and each way to start (qemu_user from a template, whose guests map one sealed copy of the
template's RAM copy-on-write, and cold boots), N jobs start at once, each with a payload that says it is
up and sleeps. Once every payload is up, the host's memory of each job is read: the proportional set size
(PSS) of its QEMU, in which a page N processes share counts 1/N to each. The template's RAM is counted once,
whole, as the memfd its keeper holds (whether or not a guest maps a page of it), plus the keeper's own PSS;
the guests' share of it is taken out of their PSS, so nothing is counted twice and nothing is left out.
The payloads touch almost nothing, so the cost per guest is what vjobs and QEMU add. The jobs are then
cancelled (SIGINT)."""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks.report import Comparison, Section, print_comparisons  # noqa: E402
from vjobs.testing.processes import descendants, process_table  # noqa: E402
from vjobs.testing.sites import vjobs_command, write_site  # noqa: E402

UP = "vjobs-density-up"
WAIT_S = 600.0
TEMPLATE_RAM = "vjobs-template-ram"
MAPPING = re.compile(r"^[0-9a-f]+-[0-9a-f]+ ")  # a mapping's first line in /proc/PID/smaps


def job(memory_mib: int, scratch: Path) -> Path:
    path = scratch / "job.json"
    path.write_text(json.dumps({"id": "density", "command": ["sh", "-c", f"echo {UP}; exec sleep 3600"],
                                "resources": {"memory_mib": memory_mib}, "walltime_s": 3600}))
    return path


def smaps_kib(pid: int) -> tuple[int, int, int]:
    """(PSS of the process, the shared part of its template-RAM mapping's PSS, its TCG translation cache's
    PSS: its anonymous rwx mapping), KiB."""
    pss = shared = tcg = 0
    in_ram = in_tcg = False
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        if MAPPING.match(line):
            fields = line.split()
            in_ram, in_tcg = TEMPLATE_RAM in line, fields[1].startswith("rwx") and len(fields) == 5
        elif line.startswith("Pss:"):
            value = int(line.split()[1])
            pss += value
            shared += value if in_ram else 0
            tcg += value if in_tcg else 0
        elif in_ram and line.startswith("Anonymous:"):
            shared -= int(line.split()[1])  # the guest's own copies of template pages: its, not shared
    return pss, max(shared, 0), tcg


def keepers_kib(cache_dir: Path) -> int:
    """The keepers of this cache's templates: each one's PSS and its memfd's pages, KiB."""
    total = 0
    for proc in process_table().values():
        if any(part.endswith("ram_keeper.py") for part in proc.argv) and str(cache_dir) in " ".join(proc.argv):
            total += smaps_kib(proc.pid)[0]
            for fd in os.listdir(f"/proc/{proc.pid}/fd"):
                if TEMPLATE_RAM in os.readlink(f"/proc/{proc.pid}/fd/{fd}"):
                    total += os.stat(f"/proc/{proc.pid}/fd/{fd}").st_blocks // 2
                    break
    return total


def measure_once(count: int, site: Path, job_file: Path, cache_dir: Path, scratch: Path) -> tuple[float, float]:
    """The host's memory for ``count`` concurrent guests, MiB per guest: in all, and of that TCG's
    translation caches (which a guest under KVM does not have)."""
    jobs = []
    for number in range(count):
        outdir = scratch / f"out{number}"
        shutil.rmtree(outdir, ignore_errors=True)
        jobs.append((subprocess.Popen([*vjobs_command(), "run", "--site", str(site), str(job_file), "--outdir",
                                       str(outdir)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL), outdir))
    try:
        deadline = time.monotonic() + WAIT_S
        while not all(UP in _read(outdir / "stdout") for _, outdir in jobs):
            if time.monotonic() > deadline or any(process.poll() is not None for process, _ in jobs):
                raise SystemExit(f"not every one of {count} jobs came up: {[p.poll() for p, _ in jobs]}")
            time.sleep(0.5)
        time.sleep(2)  # the agents settle
        table = process_table()
        total, translation = keepers_kib(cache_dir), 0
        for process, _ in jobs:
            for pid in descendants(process.pid, table):
                if table[pid].is_qemu:
                    pss, shared, tcg = smaps_kib(pid)
                    total += pss - shared
                    translation += tcg
        return total / 1024 / count, translation / 1024 / count
    finally:
        for process, _ in jobs:
            process.send_signal(signal.SIGINT)
        for process, _ in jobs:
            process.wait(120)


def _read(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except OSError:
        return ""


def measure(args: argparse.Namespace) -> Section:
    counts = [int(c) for c in args.counts.split(",")]
    section = Section("Density: concurrent guests' memory")
    rows = []
    with tempfile.TemporaryDirectory(prefix="vjobs-density-") as folder:
        scratch = Path(folder)
        cache_dir = scratch / "cache"
        # vCPUs overcommitted on purpose: the host's budget (one vCPU per core) would queue all but two jobs
        sites = {way: write_site(scratch / f"{way}.toml", {
            "driver": "qemu_user", "cache_dir": str(cache_dir), "work_dir": str(scratch / "work"),
            "host": {"vcpus": max(counts) * 2}, "drivers": {"qemu_user": {"template": way == "template"}}})
            for way in ("template", "cold")}
        job_file = job(args.memory_mib, scratch)
        for way, site in sites.items():  # the image and the template made once, not counted
            subprocess.run([*vjobs_command(), "run", "--site", str(site), str(REPO / "examples/hello/job.json"),
                            "--outdir", str(scratch / "warm")], capture_output=True, check=True, timeout=600)
            shutil.rmtree(scratch / "warm")
        for count in counts:
            per_guest, tcg = {way: [] for way in sites}, {way: [] for way in sites}
            for _ in range(args.runs):
                for way, site in sites.items():
                    each, translation = measure_once(count, site, job_file, cache_dir, scratch)
                    per_guest[way].append(each)
                    tcg[way].append(translation)
                    print(f"  density: {count} guests, {way}: {each:.1f} MiB each, {translation:.1f} of it TCG's "
                          "translation cache", flush=True)
            section.comparisons.append(Comparison(
                "2. density", f"{count} concurrent {args.memory_mib} MiB guests from a template, MiB each",
                per_guest["template"], "the same, cold boots", per_guest["cold"], unit="MiB",
                absolute_goal=40.0))
            rows.append((count, *(statistics.median(per_guest[way]) for way in sites),
                         *(statistics.median(tcg[way]) for way in sites)))
    section.text = ("Each figure: the sum of PSS of the jobs' QEMUs, plus the template's RAM counted once whole "
                    "and its keeper, divided by the number of guests (benchmarks/density.py). The payloads "
                    "print a line and sleep, touching almost nothing.\n\n" + "\n".join(
                        f"- {count} guests: {template:.1f} MiB each from a template, {cold:.1f} MiB each cold "
                        f"({template * count:.0f} against {cold * count:.0f} MiB in all); of that, TCG's "
                        f"translation cache {tcg_template:.1f} and {tcg_cold:.1f} MiB each, which under KVM "
                        f"does not exist: {template - tcg_template:.1f} against {cold - tcg_cold:.1f} MiB each"
                        for count, template, cold, tcg_template, tcg_cold in rows))
    return section


def arguments(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--counts", default="4,16")
    parser.add_argument("--memory-mib", type=int, default=256)
    parser.add_argument("--runs", type=int, default=1)
    return parser.parse_args(argv)


if __name__ == "__main__":
    section = measure(arguments())
    print_comparisons(section.comparisons)
    print(section.text)
