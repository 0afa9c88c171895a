#!/usr/bin/env python3
"""What does running a job in a VM cost here? Run by hand (it boots many VMs); results go into
docs/benchmarks.md.

    .venv/bin/python benchmarks/run_overhead.py [--runs 5] [--site FILE]     the site's own driver choice
    .venv/bin/python benchmarks/run_overhead.py --all-drivers [--runs 5]     qemu_user, kvm (TCG through
                                       libvirtd at qemu:///system) and xen (against the XAPI stand-in)
    .venv/bin/python benchmarks/run_overhead.py --xen-only --xen-site FILE   xen against the stand-in and
                                       against a real Xen: FILE from `python -m vjobs.testing.xen_node --site-out`

Prints, per driver set-up: the example job's wall time per phase (median of --runs), and for a CPU-bound
payload (sha256 of 64 MiB, the same busybox on host and in guest) host time, guest time and their ratio.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterator

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # run as a script: benchmarks/ is on the path, the repository is not
    sys.path.insert(0, str(REPO))

import vjobs  # noqa: E402
from vjobs.config.site import SiteConfig, site_from_dict  # noqa: E402
from vjobs.testing.figures import value_range  # noqa: E402
from vjobs.testing.sites import example_job, libvirt_settings, site_document, write_password, xen_settings  # noqa: E402

CPU_PAYLOAD = "dd if=/dev/zero bs=1M count=64 2>/dev/null | busybox sha256sum"
PHASES = ("probe", "prepare", "attach", "boot", "run", "guest_payload", "collect", "teardown", "total")


def run_job(document: dict, site: SiteConfig, outdir: Path) -> vjobs.Result:
    result = vjobs.run(document, site=site, outdir=outdir)
    if result.status != "succeeded":
        sys.exit(f"benchmark job failed on {result.driver}: {result.status} {result.error}")
    return result


def phases(site: SiteConfig, runs: int, scratch: Path) -> dict[str, float]:
    samples: dict[str, list[float]] = {}
    for number in range(runs):
        for phase, seconds in run_job(example_job(), site, scratch / f"example{number}").timings.items():
            samples.setdefault(phase, []).append(seconds)
    print(f"  example job, {runs} runs, seconds per phase: median (min-max)")
    for phase in PHASES:
        if phase in samples:
            values = samples[phase]
            print(f"    {phase:14s} {statistics.median(values):7.3f}   {value_range(values, 3, dash='-')}")
    return {phase: statistics.median(values) for phase, values in samples.items()}


def cpu_ratio(site: SiteConfig, runs: int, scratch: Path) -> float:
    host_times = []
    for _ in range(runs):
        started = time.monotonic()
        subprocess.run(["sh", "-c", CPU_PAYLOAD], check=True, capture_output=True)
        host_times.append(time.monotonic() - started)
    guest_times = []
    for number in range(runs):
        job = {"id": "cpu", "command": ["sh", "-c", CPU_PAYLOAD], "walltime_s": 600}
        guest_times.append(run_job(job, site, scratch / f"cpu{number}").timings["guest_payload"])
    host, guest = statistics.median(host_times), statistics.median(guest_times)
    print(f"  CPU-bound payload, median of {runs}: host {host:.3f} s, guest {guest:.3f} s, "
          f"guest/host {guest / host:.2f}")
    return guest / host


@contextlib.contextmanager
def driver_setups(args, scratch: Path) -> Iterator[list[tuple[str, SiteConfig]]]:
    if not (args.all_drivers or args.xen_only):
        yield [("site's choice", vjobs.load_site(args.site))]
        return
    from vjobs.testing.xapi_standin import XapiStandin

    # the work folder in /var/tmp: a Xen node's dom0 sees it at the same path (vjobs.testing.xen_node)
    common = {"cache_dir": str(vjobs.load_site(args.site).cache_dir), "work_dir": str(scratch / "work")}
    password = write_password(scratch / "xapi-password", "secret")
    with XapiStandin(scratch / "xapi", password="secret") as standin:
        setups = [
            ("qemu_user", site_from_dict({**common, "driver": "qemu_user"})),
            ("kvm (libvirt, virt_type qemu)", site_from_dict({**common, "driver": "kvm",
                                                              "drivers": {"kvm": libvirt_settings()}})),
            ("xen (XAPI stand-in)", site_from_dict({**common, "driver": "xen",
                                                    "drivers": {"xen": xen_settings(standin.url, password)}})),
        ]
        if args.xen_site:
            real = site_document(args.xen_site)[0]["drivers"]["xen"]
            setups.append(("xen (real Xen 4.17, nested)", site_from_dict({**common, "driver": "xen",
                                                                           "drivers": {"xen": real}})))
        yield [setup for setup in setups if not args.xen_only or setup[0].startswith("xen")]


def arguments(description: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--site", default=None)
    parser.add_argument("--all-drivers", action="store_true")
    parser.add_argument("--xen-only", action="store_true", help="the xen set-ups alone")
    parser.add_argument("--xen-site", help="also xen against this site's XAPI (a Xen node's: real Xen)")
    return parser.parse_args()


def main() -> None:
    args = arguments(__doc__)
    summary = []
    with tempfile.TemporaryDirectory(dir="/var/tmp") as folder, driver_setups(args, Path(folder)) as setups:
        for label, site in setups:
            print(f"{label}:")
            scratch = Path(folder) / label.split()[0]
            medians = phases(site, args.runs, scratch)
            summary.append((label, medians, cpu_ratio(site, args.runs, scratch)))
    print("\nsummary (medians, seconds):")
    print(f"  {'driver':32s} {'total':>7s} {'boot':>7s} {'run':>7s} {'teardown':>9s} {'cpu ratio':>10s}")
    for label, medians, ratio in summary:
        print(f"  {label:32s} {medians['total']:7.2f} {medians['boot']:7.2f} {medians['run']:7.2f} "
              f"{medians['teardown']:9.2f} {ratio:10.2f}")


if __name__ == "__main__":
    main()
