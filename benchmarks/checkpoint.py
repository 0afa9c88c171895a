#!/usr/bin/env python3
"""Checkpoints (issue 20): time to checkpoint, checkpoint size and time to resume against the guest's memory,
for a payload that has touched little of it and one that has filled it, beside starting the same job over,
in one run. Run by hand (it boots VMs of up to 4 GiB); results go into docs/benchmarks.md ("Checkpoints").

    .venv/bin/python benchmarks/checkpoint.py [--memory 256,1024,4096] [--runs 2] [--grace 300] [--site FILE]
                                              [--json FILE] [--keep]

Every job goes through the CLI, as a batch system runs it, so that SIGTERM reaches the real `vjobs run`. Per
memory size and payload: `vjobs run --checkpoint DIR`, SIGTERM once the payload's live stdout says it has
touched its memory, then `vjobs resume DIR`; and the same job run again from the start without a checkpoint.
The payload fills a tmpfs with /dev/urandom ("touched all": non-zero data, as QEMU saves a zero page as a flag),
then counts in a shell variable; the resumed run must go on counting where the saved one stopped.

The site (yours, or the built-in defaults) gets ``checkpoint_grace_s = --grace``, so that a save longer than
the default bound (25 s) is measured rather than cut off; the table says which saves fit in 25 s.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # run as a script: benchmarks/ is on the path, the repository is not
    sys.path.insert(0, str(REPO))

from vjobs.checkpoint.folder import CheckpointFolder  # noqa: E402
from vjobs.config.site import SiteConfig  # noqa: E402
from vjobs.testing.figures import median_range  # noqa: E402
from vjobs.testing.sites import merged, site_document, vjobs_command, write_site  # noqa: E402

DEFAULT_GRACE_S = SiteConfig.checkpoint_grace_s
EXIT_CHECKPOINTED = 207
PHASES_BEFORE_RUN = ("probe", "prepare", "admission", "attach", "boot")
TICKS = 30  # 0.2 s each: the payload is still counting when SIGTERM comes, and after the resume
# The fill leaves what the guest needs free: 16 MiB and 3 % of its memory (tmpfs pages cannot be reclaimed).
PAYLOAD = r"""
fill=0
if [ "$TOUCH" = all ]; then
    mkdir -p /tmp/fill && mount -t tmpfs -o size=100% fill /tmp/fill || exit 3
    fill=$(awk '/^MemTotal:/ { t = $2 / 1024 } /^MemAvailable:/ { a = $2 / 1024 }
                END { m = int(a - 16 - t * 0.03); print (m > 0 ? m : 0) }' /proc/meminfo)
    dd if=/dev/urandom of=/tmp/fill/data bs=1M count="$fill" 2>/dev/null || exit 4
fi
echo "touched $fill MiB"
count=0
while [ "$count" -lt TICKS ]; do
    count=$((count + 1))
    echo "tick $count"
    sleep 0.2
done
""".replace("TICKS", str(TICKS))


@dataclass
class Case:
    memory_mib: int
    touch: str
    touched_mib: int = 0
    to_touched_s: float = 0.0  # `vjobs run --checkpoint` started until the payload said it had touched
    sigterm_to_exit_s: float = 0.0
    save_guest_s: float = 0.0
    checkpoint_total_s: float = 0.0  # the manifest's: the guest's save and the disks' copy
    stored_bytes: int = 0
    state_bytes: int = 0
    resume_running_s: float = 0.0  # `vjobs resume` started until the guest runs again (CLI start included)
    resume_first_line_s: float = 0.0  # ... until its next line reached the live stdout
    resume_phases: dict = field(default_factory=dict)
    resume_wall_s: float = 0.0
    over_to_payload_s: float = 0.0  # the same job started over: to the payload's start (CLI start included)
    over_to_touched_s: float = 0.0  # ... to where the checkpoint was taken: the touch done again


def live_line(stdout: Path, pattern: str) -> re.Match | None:
    try:
        return re.search(pattern, stdout.read_text(errors="replace"), re.M)
    except FileNotFoundError:
        return None


def wait_for_line(process: subprocess.Popen, stdout: Path, pattern: str, timeout_s: float) -> re.Match:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if found := live_line(stdout, pattern):
            return found
        if process.poll() is not None:
            sys.exit(f"vjobs exited ({process.returncode}) before {pattern!r} appeared in {stdout}")
        time.sleep(0.02)
    process.send_signal(signal.SIGTERM)
    process.wait()
    sys.exit(f"{pattern!r} did not appear in {stdout} within {timeout_s:.0f} s")


def finished(process: subprocess.Popen, outdir: Path, expected_rc: int, what: str) -> dict:
    rc = process.wait()
    result = json.loads((outdir / "result.json").read_text())
    if rc != expected_rc:
        sys.exit(f"{what}: exit status {rc}, expected {expected_rc}: {result.get('status')} {result.get('error')}")
    return result


def before_run(result: dict, wall_s: float) -> float:
    """From the CLI's start until the guest runs the payload (again): the interpreter's start (wall time less
    result.json's total), then the phases before ``run``."""
    return wall_s - result["timings"]["total"] + sum(result["timings"].get(p, 0.0) for p in PHASES_BEFORE_RUN)


def job_file(folder: Path, memory_mib: int, touch: str) -> Path:
    document = {"id": f"cp-{memory_mib}-{touch}", "command": ["sh", "-c", PAYLOAD], "env": {"TOUCH": touch},
                "walltime_s": 1800, "resources": {"vcpus": 1, "memory_mib": memory_mib}}
    path = folder / f"{document['id']}.json"
    path.write_text(json.dumps(document))
    return path


def vjobs_cli(*args: str | Path, site: Path) -> list[str]:
    return [*vjobs_command(), args[0], *map(str, args[1:]), "--site", str(site), "--json"]


def start_over(job: Path, site: Path, outdir: Path) -> tuple[float, float]:
    """The job run from its start without a checkpoint: seconds to its payload's start (CLI start included:
    wall time less result.json's total plus its ``to_payload``), and to where the checkpoint was taken (the
    memory touched again)."""
    started = time.monotonic()
    process = subprocess.Popen(vjobs_cli("run", job, "--outdir", outdir, site=site), stdout=subprocess.DEVNULL)
    wait_for_line(process, outdir / "stdout", r"^touched \d+ MiB$", 1800)
    to_touched = time.monotonic() - started
    result = finished(process, outdir, 0, f"{job.stem} started over")
    timings = result["timings"]
    return time.monotonic() - started - timings["total"] + timings["to_payload"], to_touched


def checkpointed(case: Case, job: Path, site: Path, scratch: Path) -> Path:
    """``vjobs run --checkpoint``, SIGTERM once the payload has touched its memory; the checkpoint folder."""
    folder, outdir = scratch / f"{job.stem}.checkpoint", scratch / f"{job.stem}.saved"
    started = time.monotonic()
    process = subprocess.Popen(vjobs_cli("run", job, "--outdir", outdir, "--checkpoint", folder, site=site),
                               stdout=subprocess.DEVNULL)
    touched = wait_for_line(process, outdir / "stdout", r"^touched (\d+) MiB$", 1800)
    case.touched_mib, case.to_touched_s = int(touched.group(1)), time.monotonic() - started
    wait_for_line(process, outdir / "stdout", r"^tick 1$", 60)  # counting: what the resume must go on with
    signalled = time.monotonic()
    process.send_signal(signal.SIGTERM)
    finished(process, outdir, EXIT_CHECKPOINTED, f"{job.stem} checkpointed")
    case.sigterm_to_exit_s = time.monotonic() - signalled
    checkpoint = CheckpointFolder(folder).current()
    case.save_guest_s = checkpoint.manifest["timings"]["save_guest"]
    case.checkpoint_total_s = checkpoint.manifest["timings"]["total"]
    case.stored_bytes = checkpoint.manifest["stored_bytes"]
    case.state_bytes = (checkpoint.folder / "guest" / "state").stat().st_size
    return folder


def resumed(case: Case, folder: Path, site: Path, saved_outdir: Path, scratch: Path) -> None:
    """``vjobs resume``: until the guest runs again, until the payload's next line comes, and that it went on
    counting (its stdout, whole at the end, counts once from 1 to TICKS)."""
    outdir = scratch / f"{folder.stem}.resumed"
    last_saved = max(int(n) for n in re.findall(r"^tick (\d+)$", (saved_outdir / "stdout").read_text(), re.M))
    started = time.monotonic()
    process = subprocess.Popen(vjobs_cli("resume", folder, "--outdir", outdir, site=site), stdout=subprocess.DEVNULL)
    wait_for_line(process, outdir / "stdout", rf"^tick {last_saved + 1}$", 600)
    case.resume_first_line_s = time.monotonic() - started
    result = finished(process, outdir, 0, f"{folder.stem} resumed")
    case.resume_wall_s = time.monotonic() - started
    case.resume_running_s = before_run(result, case.resume_wall_s)
    case.resume_phases = {p: result["timings"].get(p, 0.0) for p in PHASES_BEFORE_RUN}
    lines = (outdir / "stdout").read_text().splitlines()
    if lines != [f"touched {case.touched_mib} MiB", *(f"tick {n}" for n in range(1, TICKS + 1))]:
        sys.exit(f"{folder.stem}: the resumed payload did not go on from tick {last_saved}: {lines}")


def measure(memory_mib: int, touch: str, site: Path, scratch: Path) -> Case:
    """One case, in a folder of its own: a second run of the same case must not find the first's live stdout
    (it would be signalled at once, before it even held its signals) nor its checkpoint folder."""
    case = Case(memory_mib, touch)
    scratch = Path(tempfile.mkdtemp(dir=scratch, prefix=f"{memory_mib}-{touch}-"))
    job = job_file(scratch, memory_mib, touch)
    folder = checkpointed(case, job, site, scratch)
    resumed(case, folder, site, scratch / f"{job.stem}.saved", scratch)
    shutil.rmtree(folder)  # before the next case: a 4 GiB guest's checkpoint is 4 GiB
    case.over_to_payload_s, case.over_to_touched_s = start_over(job, site, scratch / f"{job.stem}.over")
    print(f"  {case}", flush=True)
    return case


def warm_up(memory_mib: int, site: Path, scratch: Path) -> None:
    """A job of this memory size, not counted: it makes the template every measured job of that size starts from."""
    job = job_file(scratch, memory_mib, "little")
    outdir = scratch / f"warm-up-{memory_mib}"
    process = subprocess.Popen(vjobs_cli("run", job, "--outdir", outdir, site=site), stdout=subprocess.DEVNULL)
    finished(process, outdir, 0, f"warm-up {memory_mib} MiB")


def table(cases: list[Case]) -> str:
    """One row per memory size and payload: medians (min-max) over the runs."""
    lines = [
        "| memory, MiB | payload | touched, MiB | SIGTERM to exit, s | save_guest, s | checkpoint stored, MiB "
        f"| state alone, MiB | save within {DEFAULT_GRACE_S:g} s | resume: to running, s | resume: next line, s "
        "| started over: to payload, s | started over: to where it was, s |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    groups: dict[tuple[int, str], list[Case]] = {}
    for case in cases:
        groups.setdefault((case.memory_mib, case.touch), []).append(case)
    for (memory_mib, touch), runs in sorted(groups.items(), key=lambda item: (item[0][0], item[0][1] != "little")):
        def seconds(name: str) -> str:
            return median_range([getattr(run, name) for run in runs], 2, dash="-")

        def mib(name: str) -> str:
            return median_range([getattr(run, name) / (1 << 20) for run in runs], 0, dash="-")

        fits = "yes" if all(run.checkpoint_total_s <= DEFAULT_GRACE_S for run in runs) else "**no**"
        lines.append(f"| {memory_mib} | {touch} | {runs[0].touched_mib} "
                     f"| {seconds('sigterm_to_exit_s')} | {seconds('save_guest_s')} | {mib('stored_bytes')} "
                     f"| {mib('state_bytes')} | {fits} | {seconds('resume_running_s')} | {seconds('resume_first_line_s')} "
                     f"| {seconds('over_to_payload_s')} | {seconds('over_to_touched_s')} |")
    return "\n".join(lines)


def machine() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    memory_kib = int(re.search(r"MemTotal:\s+(\d+)", Path("/proc/meminfo").read_text()).group(1))
    return f"{os.cpu_count()} cores ({cpu}), {memory_kib / (1 << 20):.0f} GiB of RAM"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--memory", default="256,1024,4096", help="guest memory sizes, MiB, comma-separated")
    parser.add_argument("--touch", default="little,all", help="payloads: little, all")
    parser.add_argument("--runs", type=int, default=2, help="measurements of each memory size and payload")
    parser.add_argument("--grace", type=float, default=300.0, help="the site's checkpoint_grace_s for this run")
    parser.add_argument("--site")
    parser.add_argument("--json", type=Path, help="also write every measurement into this file (JSON)")
    parser.add_argument("--keep", action="store_true", help="keep the jobs' output folders (in /var/tmp)")
    args = parser.parse_args()
    commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    cases = []
    began = time.monotonic()
    scratch = Path(tempfile.mkdtemp(dir="/var/tmp", prefix="vjobs-checkpoint-bench-"))
    try:
        document, _ = site_document(args.site)
        site = write_site(scratch / "site.toml", merged(document, {
            "checkpoint_grace_s": args.grace, "work_dir": str(scratch / "work"),
            "driver": "qemu_user"}))
        for memory_mib in (int(m) for m in args.memory.split(",")):
            print(f"{memory_mib} MiB:", flush=True)
            warm_up(memory_mib, site, scratch)
            for _ in range(args.runs):
                for touch in args.touch.split(","):
                    cases.append(measure(memory_mib, touch, site, scratch))
    finally:
        if args.keep:
            print(f"the jobs' folders are kept in {scratch}")
        else:
            shutil.rmtree(scratch, ignore_errors=True)
    print(f"\nbenchmarks/checkpoint.py at {commit}, {machine()}, qemu_user (TCG), checkpoint_grace_s = {args.grace:g}, "
          f"{time.monotonic() - began:.0f} s in all:\n")
    print(table(cases))
    if args.json:
        args.json.write_text(json.dumps([dataclasses.asdict(case) for case in cases], indent=2) + "\n")
    print("\nresume phases before the guest runs again (s): " + "; ".join(
        f"{c.memory_mib}/{c.touch}: " + ", ".join(f"{p} {v:.2f}" for p, v in c.resume_phases.items()) for c in cases))


if __name__ == "__main__":
    main()
