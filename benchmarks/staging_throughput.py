#!/usr/bin/env python3
"""How fast does vjobs stage a file, against the protocol's own client moving the same file in the same run?
Run by hand (it needs root for a network namespace); results go into docs/staging.md (its Throughput part).

    .venv/bin/python benchmarks/staging_throughput.py [--mib 512] [--repeat 3] [--protocols xrootd,webdav]
                                                      [--markdown FILE]

XRootD: the real xrootd in a throwaway loopback-only network namespace, serving a --mib MiB file of random bytes.
  floor  `xrdcp -f` (download, and upload of a local file) run inside the namespace against root://127.0.0.1:PORT,
         with and without `--cksum adler32` (end to end: the source's adler32 against the destination's, one
         side asked of the server, the other computed locally, as vjobs verifies; in xrdcp 5.5.3
         `--cksum adler32:source` only fetches the source's and compares nothing, as `-d 3` shows),
         and each again with XRD_CPUSEPGWRTRD=0: xrdcp 5 reads and writes with kXR_pgread/pgwrite by default, a
         CRC32c for every 4 KiB page on both ends, which vjobs' client (fsspec-xrootd, plain reads and writes)
         does not do. `XRD_CPUSEPGWRTRD=0 xrdcp -f --cksum adler32` is the floor doing the same work as vjobs.
  vjobs  stage_in / stage_out of the same file by a child Python process started inside the namespace (this
         script with --child-stage-in / --child-stage-out), so both take the same network path. Timed twice:
         by this process around the child, Python's start and imports included, and by the child around the
         call alone ("in-process"). Extra rows: stage_in / stage_out from this process through the host-side
         Relay the tests use (a Python byte pump in between: not the path a worker node takes), against the
         same-work floor.
WebDAV: wsgidav on 127.0.0.1 in the host namespace, the same file.
  floor  `curl -sS -f -o FILE URL` and `curl -sS -f -T FILE URL`; for the upload also `curl -T` followed by a GET
         of what was stored (vjobs reads an upload back when the server cannot tell its adler32; wsgidav cannot)
  vjobs  as for XRootD, the child in the host namespace.

What vjobs does beyond moving the bytes: stage-in computes adler32 while streaming, then asks the server for its
adler32 (XRootD answers; wsgidav does not, so that download is checked against nothing); stage-out computes the
local file's adler32 first, uploads, then asks the server (XRootD) or reads the file back (WebDAV).

Every measurement is taken --repeat times, interleaved, so that a noisy minute hurts every tool alike; the
medians are reported. Ratios are time ratios, vjobs seconds / floor seconds (above 1: vjobs is slower), as
docs/benchmarks.md gives its others; MiB/s is --mib over the median seconds.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

from vjobs.testing.figures import ratio, value_range

SCRIPT = Path(__file__).resolve()
MIB = 1 << 20
TIMEOUT_S = 600  # per command; a stuck transfer ends the benchmark instead of hanging it
NAME = "source.bin"

Timing = Callable[[], dict[str, float]]  # one run of one tool: {what was timed: seconds}
CHILD_WALL, CHILD_INSIDE = "vjobs, child process, wall incl. Python start", "vjobs, child process, in-process"
RELAY = "vjobs, this process, via the host-side Relay"


@dataclass
class Case:
    """One protocol and direction: floors, vjobs in a child process, and extra vjobs variants (compared with the
    floor that does the same work, ``same_work``), each timed once per repeat."""

    protocol: str
    direction: str
    same_work: str = ""
    floors: list[Timing] = field(default_factory=list)
    vjobs: list[Timing] = field(default_factory=list)
    extras: list[Timing] = field(default_factory=list)
    samples: dict[str, dict[str, list[float]]] = field(
        default_factory=lambda: {"floors": {}, "vjobs": {}, "extras": {}})
    verified_by: set[str] = field(default_factory=set)  # how vjobs checked the file, as its records say

    def measure_once(self) -> None:
        for kind in ("floors", "vjobs", "extras"):
            for timing in getattr(self, kind):
                for label, seconds in timing().items():
                    self.samples[kind].setdefault(label, []).append(seconds)

    def median(self, kind: str, label: str) -> float:
        return statistics.median(self.samples[kind][label])


# --- the vjobs side, run in a child process (inside the namespace) or in this one -------------------------

def settings():
    from vjobs.staging import StagingSettings

    return StagingSettings(retries=0, timeout_s=TIMEOUT_S)  # a failure is reported, not retried into the figure


def preload(url: str) -> None:
    """Import the protocol's client before the clock starts: the in-process figure is the transfer alone."""
    if url.startswith("root"):
        import fsspec_xrootd  # noqa: F401
        import XRootD.client  # noqa: F401
    else:
        import webdav4.fsspec  # noqa: F401


def stage_in_seconds(url: str, folder: Path) -> tuple[float, str | None]:
    from vjobs.staging import stage_in
    from vjobs.staging.phases import Wanted

    preload(url)
    started = time.monotonic()
    [record] = stage_in([Wanted(url, url.rsplit("/", 1)[1])], folder, settings())
    return time.monotonic() - started, record.verified_by


def stage_out_seconds(file: Path, destination: str) -> tuple[float, str | None]:
    from vjobs.staging import stage_out

    preload(destination)
    started = time.monotonic()
    [record] = stage_out([file.name], file.parent, destination, settings())
    return time.monotonic() - started, record.verified_by


def child_main(args: argparse.Namespace) -> None:
    if args.child_stage_in:
        url, folder = args.child_stage_in
        seconds, verified_by = stage_in_seconds(url, Path(folder))
    else:
        file, destination = args.child_stage_out
        seconds, verified_by = stage_out_seconds(Path(file), destination)
    print(json.dumps({"seconds": seconds, "verified_by": verified_by}))


# --- timing commands ---------------------------------------------------------------------------------------

def timed(argv: list[str]) -> tuple[float, str]:
    """Run ``argv`` under `timeout`; (wall seconds as seen from here, its stdout). Any failure ends the run."""
    started = time.monotonic()
    done = subprocess.run(["timeout", str(TIMEOUT_S), *argv], capture_output=True, text=True)
    seconds = time.monotonic() - started
    if done.returncode != 0:
        sys.exit(f"{shlex.join(argv)} failed (exit {done.returncode}):\n{done.stderr.strip()[-3000:]}")
    return seconds, done.stdout


def floor(label: str, *commands: list[str], after: Callable[[], None]) -> Timing:
    """A floor: the commands run one after the other, their wall times added."""
    def run() -> dict[str, float]:
        seconds = sum(timed(argv)[0] for argv in commands)
        after()
        return {label: seconds}
    return run


def vjobs_child(case: Case, prefix: list[str], option: str, first: str, second: str, *,
                after: Callable[[], None]) -> Timing:
    """vjobs in a child process started with ``prefix`` (the namespace's nsenter, or nothing)."""
    def run() -> dict[str, float]:
        wall, out = timed([*prefix, sys.executable, str(SCRIPT), option, first, second])
        reported = json.loads(out.strip().splitlines()[-1])
        case.verified_by.add(reported["verified_by"] or "nothing (no adler32 from the server)")
        after()
        return {CHILD_WALL: wall, CHILD_INSIDE: reported["seconds"]}
    return run


def vjobs_here(case: Case, label: str, action: Callable[[], tuple[float, str | None]], *,
               after: Callable[[], None]) -> Timing:
    def run() -> dict[str, float]:
        seconds, verified_by = action()
        case.verified_by.add(verified_by or "nothing (no adler32 from the server)")
        after()
        return {label: seconds}
    return run


def removing(*paths: Path) -> Callable[[], None]:
    def remove() -> None:
        for path in paths:
            path.unlink(missing_ok=True)
    return remove


# --- the servers and their cases ----------------------------------------------------------------------------

@contextlib.contextmanager
def xrootd_cases(source: Path, scratch: Path) -> Iterator[list[Case]]:
    from vjobs.testing.servers.netns import LoopbackNetns, Relay
    from vjobs.testing.servers.xrootd import XRootDServer

    if os.geteuid() != 0 or not shutil.which("xrootd") or not shutil.which("xrdcp"):
        sys.exit("the XRootD cases need root (a network namespace), xrootd and xrdcp")
    data = Path(tempfile.mkdtemp(prefix="vjobs-bench-xrootd-"))  # under /tmp: the xrootd user must reach it
    try:
        (data / "in").mkdir()
        (data / "up").mkdir()
        shutil.copyfile(source, data / "in" / NAME)  # handed to the xrootd user by the server's start
        with LoopbackNetns("vjobs-bench") as netns, XRootDServer(netns, data, http_port=None) as server, \
                Relay(netns, server.port) as relay:
            in_netns = netns.command
            # A storage element keeps a file's checksum; xrootd computes it on the first query and keeps it.
            timed(in_netns(["xrdfs", f"127.0.0.1:{server.port}", "query", "checksum", f"/in/{NAME}"]))
            yield [xrootd_download(server, relay, in_netns, scratch), xrootd_upload(server, relay, in_netns, source)]
    finally:
        shutil.rmtree(data, ignore_errors=True)


def xrdcp_floors(in_netns, source: str, target: str, after: Callable[[], None]) -> list[Timing]:
    """xrdcp with its defaults (page reads and writes, each 4 KiB page CRC32c-checked) and with plain ones,
    each without and with end-to-end adler32: the last does what vjobs does."""
    floors = []
    for plain in (False, True):
        for verify in (False, True):
            argv = ["xrdcp", "-f", "-s", *["--cksum", "adler32"] * verify, source, target]
            env = ["env", "XRD_CPUSEPGWRTRD=0"] * plain
            label = " ".join(env[1:] + ["xrdcp -f"] + ["--cksum adler32"] * verify)
            floors.append(floor(label, in_netns([*env, *argv]), after=after))
    return floors


SAME_WORK_XRDCP = "XRD_CPUSEPGWRTRD=0 xrdcp -f --cksum adler32"


def xrootd_download(server, relay, in_netns, scratch: Path) -> Case:
    url = server.url_in_netns(f"in/{NAME}")
    case = Case("XRootD", "download", SAME_WORK_XRDCP)
    clean = removing(scratch / "xrdcp.bin", scratch / NAME)
    case.floors = xrdcp_floors(in_netns, url, str(scratch / "xrdcp.bin"), clean)
    case.vjobs = [vjobs_child(case, in_netns([]), "--child-stage-in", url, str(scratch), after=clean)]
    via_relay = f"root://127.0.0.1:{relay.port}//in/{NAME}"
    case.extras = [vjobs_here(case, RELAY, lambda: stage_in_seconds(via_relay, scratch), after=clean)]
    return case


def xrootd_upload(server, relay, in_netns, source: Path) -> Case:
    up = server.data / "up"
    case = Case("XRootD", "upload", SAME_WORK_XRDCP)
    clean = removing(up / "xrdcp.bin", up / "child" / NAME, up / "relay" / NAME)
    case.floors = xrdcp_floors(in_netns, str(source), server.url_in_netns("up/xrdcp.bin"), clean)
    case.vjobs = [vjobs_child(case, in_netns([]), "--child-stage-out", str(source), server.url_in_netns("up/child"),
                              after=clean)]
    via_relay = f"root://127.0.0.1:{relay.port}//up/relay"
    case.extras = [vjobs_here(case, RELAY, lambda: stage_out_seconds(source, via_relay), after=clean)]
    return case


@contextlib.contextmanager
def webdav_cases(source: Path, scratch: Path) -> Iterator[list[Case]]:
    from vjobs.testing.servers.webdav import WebDAVServer

    root = scratch / "webdav"
    (root / "in").mkdir(parents=True)
    (root / "up").mkdir()  # curl's PUT needs the folder to exist (wsgidav answers 409 otherwise)
    shutil.copyfile(source, root / "in" / NAME)
    server = WebDAVServer(root)
    try:
        server.start()
        yield [webdav_download(server, scratch), webdav_upload(server, source)]
    finally:
        server.close()


def webdav_download(server, scratch: Path) -> Case:
    url, target = server.url(f"in/{NAME}"), scratch / "curl.bin"
    case = Case("WebDAV", "download", "curl -o")
    clean = removing(target, scratch / NAME)
    case.floors = [floor("curl -o", ["curl", "-sS", "-f", "-o", str(target), url], after=clean)]
    case.vjobs = [vjobs_child(case, [], "--child-stage-in", url, str(scratch), after=clean)]
    return case


def webdav_upload(server, source: Path) -> Case:
    up = server.root / "up"
    url = server.url("up/curl.bin")
    case = Case("WebDAV", "upload", "curl -T, then curl GET of it")
    clean = removing(up / "curl.bin", up / "child" / NAME)
    put = ["curl", "-sS", "-f", "-T", str(source), url]
    case.floors = [floor("curl -T", put, after=clean),
                   floor("curl -T, then curl GET of it", put, ["curl", "-sS", "-f", "-o", "/dev/null", url],
                         after=clean)]
    case.vjobs = [vjobs_child(case, [], "--child-stage-out", str(source), server.url("up/child"), after=clean)]
    return case


CASES = {"xrootd": xrootd_cases, "webdav": webdav_cases}


# --- reporting ---------------------------------------------------------------------------------------------

def machine() -> dict[str, str]:
    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), "?")
    xrdcp = subprocess.run(["xrdcp", "--version"], capture_output=True, text=True)
    curl = subprocess.run(["curl", "--version"], capture_output=True, text=True).stdout.split(" ", 2)[:2]
    return {"date": datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"),
            "cpus": f"{os.cpu_count()} x {model}", "load": "%.2f %.2f %.2f" % os.getloadavg(),
            "kernel": os.uname().release, "tools": f"xrdcp {(xrdcp.stdout or xrdcp.stderr).strip()}, {' '.join(curl)}"}


HEADER = ["protocol", "direction", "floor tool", "floor MiB/s", "vjobs MiB/s, child wall incl. Python start",
          "time ratio", "vjobs MiB/s, in-process", "time ratio"]
EXTRA_HEADER = ["protocol", "direction", "floor tool", "floor MiB/s", "vjobs via the host-side Relay MiB/s",
                "time ratio"]


def rows(case: Case, mib: int) -> list[list[str]]:
    """Each floor against vjobs in the child process, timed from outside and from inside."""
    table = []
    for label in case.samples["floors"]:
        floor_s = case.median("floors", label)
        cells = [case.protocol, case.direction, label, f"{mib / floor_s:.0f}"]
        for timed_as in (CHILD_WALL, CHILD_INSIDE):
            vjobs_s = case.median("vjobs", timed_as)
            cells += [f"{mib / vjobs_s:.0f}", ratio(vjobs_s / floor_s)]
        table.append(cells)
    return table


def extra_rows(case: Case, mib: int) -> list[list[str]]:
    """Each extra vjobs variant against the floor that does the same work."""
    floor_s = case.median("floors", case.same_work)
    table = []
    for label in case.samples["extras"]:
        vjobs_s = case.median("extras", label)
        table.append([case.protocol, case.direction, case.same_work, f"{mib / floor_s:.0f}", f"{mib / vjobs_s:.0f}",
                      ratio(vjobs_s / floor_s)])
    return table


def spreads(cases: list[Case]) -> list[str]:
    lines = []
    for case in cases:
        lines.append(f"{case.protocol} {case.direction} (vjobs verified by: {', '.join(sorted(case.verified_by))})")
        for samples in case.samples.values():
            for label, values in samples.items():
                lines.append(f"  {label:52s} {statistics.median(values):6.2f} s  {value_range(values, dash='-')}")
    return lines


def markdown_table(header: list[str], table: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(row) + " |" for row in [header, ["---"] * len(header), *table]]


def markdown(args: argparse.Namespace, facts: dict[str, str], tables, cases: list[Case]) -> str:
    command = " ".join([".venv/bin/python benchmarks/staging_throughput.py", *sys.argv[1:]])
    about = (f"{facts['date']}: a file of {args.mib} MiB of random bytes, medians of {args.repeat} "
             f"interleaved runs. Machine: {facts['cpus']}, Linux {facts['kernel']}, load average {facts['load']} "
             f"at the start; {facts['tools']}. Ratios are time ratios, vjobs seconds / floor seconds (above 1: "
             "vjobs is slower).")
    lines = ["## Throughput", "", f"    {command}", "",
             textwrap.fill(about, width=110, break_long_words=False, break_on_hyphens=False), ""]
    (header, table), (extra_header, extra) = tables
    lines += markdown_table(header, table)
    if extra:
        lines += ["", "vjobs from the host side through the tests' Relay (a Python byte pump into the namespace),",
                  "against the floor doing the same work:", "", *markdown_table(extra_header, extra)]
    lines += ["", "Seconds, median (min-max):", "", "```", *spreads(cases), "```", ""]
    return "\n".join(lines)


def print_table(header: list[str], table: list[list[str]]) -> None:
    widths = [max(len(row[column]) for row in [header, *table]) for column in range(len(header))]
    for row in [header, *table]:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())


# --- main ----------------------------------------------------------------------------------------------------

def arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mib", type=int, default=512, help="size of the file moved (default 512)")
    parser.add_argument("--repeat", type=int, default=3, help="runs of each measurement (default 3)")
    parser.add_argument("--protocols", default="xrootd,webdav", help="comma-separated: xrootd, webdav")
    parser.add_argument("--markdown", type=Path, help="also write the results as a markdown section here")
    parser.add_argument("--child-stage-in", nargs=2, metavar=("URL", "FOLDER"), help=argparse.SUPPRESS)
    parser.add_argument("--child-stage-out", nargs=2, metavar=("FILE", "DESTINATION"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    unknown = set(args.protocols.split(",")) - set(CASES)
    if unknown:
        parser.error(f"unknown protocols {', '.join(sorted(unknown))}; known: {', '.join(CASES)}")
    return args


def write_random(path: Path, mib: int) -> None:
    with open(path, "wb") as handle:
        for _ in range(mib):
            handle.write(os.urandom(MIB))


def main() -> None:
    args = arguments()
    if args.child_stage_in or args.child_stage_out:
        return child_main(args)
    facts = machine()  # the load average before this benchmark adds its own
    print(f"{facts['date']}, {facts['cpus']}, load average {facts['load']}", flush=True)
    scratch = Path(tempfile.mkdtemp(prefix="vjobs-bench-staging-"))
    try:
        source = scratch / "upload" / NAME
        source.parent.mkdir()
        write_random(source, args.mib)
        with contextlib.ExitStack() as servers:
            cases = [case for protocol in args.protocols.split(",")
                     for case in servers.enter_context(CASES[protocol](source, scratch))]
            for number in range(args.repeat):
                for case in cases:
                    print(f"run {number + 1}/{args.repeat}: {case.protocol} {case.direction}", flush=True)
                    case.measure_once()
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    tables = [(HEADER, [row for case in cases for row in rows(case, args.mib)]),
              (EXTRA_HEADER, [row for case in cases for row in extra_rows(case, args.mib)])]
    print("\n" + "\n".join(spreads(cases)))
    for header, table in tables:
        if table:
            print()
            print_table(header, table)
    if args.markdown:
        args.markdown.write_text(markdown(args, facts, tables, cases))
        print(f"\nwritten to {args.markdown}")


if __name__ == "__main__":
    main()
