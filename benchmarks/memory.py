#!/usr/bin/env python3
"""Issue 11, goal 4: how much memory does vjobs' QEMU hold beyond the guest's own RAM, for a trivial job,
against plain QEMU booting the same kernel? Run by hand (it boots VMs); results go into docs/benchmarks.md.

    .venv/bin/python benchmarks/memory.py [--runs 3] [--site FILE] [--tb-sizes 16,32,64] [--memory-mib 512]
                                          [--starts template,cold] [--sleep-s 2] [--skip-python]
                                          [--floor-tsc-khz KHZ]

What is measured, in each run:
  vjobs  `vjobs run` (the CLI, a child process) of examples/hello with `sleep --sleep-s` appended to its
         command, on qemu_user (pinned), TCG, with --memory-mib of guest RAM (the job schema's default, 512;
         the example itself asks for 256: `--memory-mib 0` keeps the job's own), once per TCG translation
         cache size in --tb-sizes (`[drivers.qemu_user] tb_size_mib`; the site's own value, else vjobs'
         default, is always among them) and way to start in --starts (`[drivers.qemu_user] template`: true,
         the guest restored from a pre-booted template, as the default `auto` does for the built-in image;
         false, a cold boot); a warm-up job per configuration, not counted, makes its template. The QEMU
         process is found among the CLI's descendants (comm qemu-system-*, under unshare and a shell when
         vjobs is root; not one that makes a template) and /proc/PID/smaps is read every
         --interval-s while it lives. The guest's RAM is the one anonymous mapping of exactly the guest's
         size; everything else resident (QEMU's code and libraries, the translation cache, the heap, the
         kernel and initramfs copies) is QEMU's own. Per run: the peaks of (total RSS - the guest mapping's
         RSS), of the anonymous part of it (what QEMUs cannot share with each other), of the guest
         mapping's RSS and of the total RSS; and for the peak, its make-up (translation cache, file-backed,
         other anonymous).
  floor  plain qemu-system-x86_64 with plain-qemu-floor.sh's command line (benchmarks/, a copy of the one
         in ../shared/bench/; microvm, TCG, QEMU's own default tb-size, the same kernel) but -m --memory-mib,
         an init that sleeps --sleep-s before it powers off (a second cpio archive appended to the floor's
         initrd.raw replaces its /init), and `tsc_early_khz=` (the host's TSC kHz; --floor-tsc-khz 0 leaves
         it out) on the kernel's command line: without it microvm under TCG hangs in most boots on a busy
         host (FloorHung); a boot that hangs anyway is killed and retried. Measured the same way. The
         floor's material is built by that script (under $W, else $TMPDIR/vjobs-floor) when it is missing.
  order  one tb-size after the other (vjobs keeps one template per machine, memory and vCPUs, so jobs of
         alternating tb-sizes would remake it each time), within it the starts and the floor interleaved.
  time   for choosing tb_size_mib, per start and tb-size: the unchanged hello job (`vjobs run` total
         seconds), a CPU-bound payload (sha256 of 64 MiB, busybox: a tiny loop, which no translation cache size should
         affect; the guest's own seconds, result.json guest_payload) and a code-heavy one (python3 on the
         debian12 base importing and exercising a dozen stdlib modules; --skip-python leaves it out): wall
         seconds, and the CPU seconds of the whole job (`vjobs run` and every process under it, read from
         /proc/PID/stat before it is reaped), which a busy host disturbs less than wall time.

The jobs run with a private work_dir (so that other vjobs on the host neither queue these jobs nor are
queued by them) unless the site file sets one; the cache is the site's. A job that does not succeed is
kept (under $TMPDIR/vjobs-benchmark-failures), said, and run once more.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # run as a script: benchmarks/ is on the path, the repository is not
    sys.path.insert(0, str(REPO))

from benchmarks.report import Comparison, Section, print_section  # noqa: E402
from vjobs.images.cpio import CpioWriter  # noqa: E402
from vjobs.testing.figures import median_range  # noqa: E402
from vjobs.testing.processes import job_qemu  # noqa: E402
from vjobs.testing.sites import example_job, merged, site_document, vjobs_command, write_site  # noqa: E402

GOAL = "4. QEMU memory beyond the guest"
GOAL_MIB = 64.0
DEFAULT_RUNS = 3
DEFAULT_TB_SIZES = (16, 32, 64)
DEFAULT_MEMORY_MIB = 512
DEFAULT_SLEEP_S = 2.0
DEFAULT_INTERVAL_S = 0.05
DEFAULT_FLOOR_TIMEOUT_S = 12.0  # a plain boot past this (beyond its sleep) has hung: killed and retried
FLOOR_ATTEMPTS = 5
FLOOR_SCRIPTS = (REPO / "benchmarks/plain-qemu-floor.sh", REPO.parent / "shared/bench/plain-qemu-floor.sh")
STARTS = {  # --starts: [drivers.qemu_user] template, and how a row names it
    "template": (True, "from a template (the default, template = auto)"),
    "cold": (False, "cold boot (template = false)"),
}
DEFAULT_STARTS = ("template", "cold")
CPU_PAYLOAD = "dd if=/dev/zero bs=1M count=64 2>/dev/null | busybox sha256sum"
PYTHON_PAYLOAD = "; ".join([
    "import json, decimal, difflib, email.parser, argparse, xml.dom.minidom, textwrap, re, csv, io, fractions",
    "rows = [{'k': i, 'v': str(i) * 3, 'f': i / 7} for i in range(20000)]",
    "assert json.loads(json.dumps(rows)) == rows",
    "decimal.getcontext().prec = 300; decimal.Decimal(2).sqrt()",
    "difflib.SequenceMatcher(None, 'ab' * 400, 'ba' * 400).ratio()",
    "xml.dom.minidom.parseString('<a>' + '<b c=\"1\">x</b>' * 2000 + '</a>').toxml()",
    "buffer = io.StringIO(); csv.writer(buffer).writerows([r.values() for r in rows]); buffer.getvalue()",
    "sum(fractions.Fraction(1, n) for n in range(1, 400))",
    "email.parser.Parser().parsestr('From: a\\nTo: b\\n\\n' + 'hello ' * 1000)",
    "argparse.ArgumentParser().parse_args([])",
    "textwrap.fill('word ' * 5000)",
    "re.findall(r'(\\w+)@(\\w+)', 'a@b ' * 5000)",
])
KIB_PER_MIB = 1024
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


# --- processes, smaps ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Sample:
    """One read of /proc/PID/smaps, in KiB."""

    total: int  # all resident memory
    guest: int  # the guest RAM mapping's
    tcg: int  # anonymous rwx mappings: TCG's translation cache
    files: int  # file-backed mappings: QEMU's code, libraries, the memfd copies of kernel and initramfs
    anonymous: int = 0  # Anonymous of every mapping but the guest's: what a second QEMU cannot share with
    #                     the first (they share the page cache's copy of QEMU's code and libraries)

    @property
    def own(self) -> int:
        return self.total - self.guest

    @property
    def other_anon(self) -> int:  # heap, thread arenas, ROMs, the kernel and initrd copies QEMU keeps
        return self.own - self.tcg - self.files


_MAPPING = re.compile(r"^[0-9a-f]+-[0-9a-f]+ (\S+) \S+ \S+ \d+ ?(.*)$")


def read_smaps(pid: int, guest_mib: int) -> Sample | None:
    """The process's memory, or None when it is gone or holds no mapping of the guest's size (not yet, or
    no more: a QEMU tearing down is not sampled)."""
    try:
        text = Path(f"/proc/{pid}/smaps").read_text()
    except OSError:
        return None
    mappings: list[list[Any]] = []  # perms, path, size KiB, rss KiB, anonymous KiB
    for line in text.splitlines():
        match = _MAPPING.match(line)
        if match:
            mappings.append([match.group(1), match.group(2).strip(), 0, 0, 0])
        elif mappings and line.startswith("Size:"):
            mappings[-1][2] = int(line.split()[1])
        elif mappings and line.startswith("Rss:"):
            mappings[-1][3] = int(line.split()[1])
        elif mappings and line.startswith("Anonymous:"):
            mappings[-1][4] = int(line.split()[1])
    # anonymous, or a template's RAM mapped copy-on-write (vjobs/drivers/qemu_user/shared_ram.py)
    guests = [m for m in mappings if m[0].startswith("rw") and (not m[1] or "vjobs-template-ram" in m[1])
              and m[2] == guest_mib * KIB_PER_MIB]
    if not guests:
        return None
    guest = max(guests, key=lambda m: m[3])
    return Sample(total=sum(m[3] for m in mappings), guest=guest[3],
                  tcg=sum(m[3] for m in mappings if m[0].startswith("rwx") and not m[1]),
                  files=sum(m[3] for m in mappings if m[1].startswith("/") and m is not guest),
                  anonymous=sum(m[4] for m in mappings if m is not guest))


@dataclass
class Peaks:
    """The peaks of one run, KiB; ``at_peak``: the sample where QEMU's own memory peaked."""

    own: int = 0
    guest: int = 0
    total: int = 0
    anonymous: int = 0
    samples: int = 0
    at_peak: Sample | None = None

    def add(self, sample: Sample) -> None:
        self.samples += 1
        if self.at_peak is None or sample.own > self.own:
            self.own, self.at_peak = sample.own, sample
        self.guest, self.total = max(self.guest, sample.guest), max(self.total, sample.total)
        self.anonymous = max(self.anonymous, sample.anonymous)


@dataclass
class Ran:
    """A process run to its end by run_process."""

    in_time: bool  # false: killed at its timeout
    seconds: float
    cpu_self_s: float  # its own user + system CPU
    cpu_children_s: float  # that of everything it started and waited for (QEMU, mkfs, ...)
    peaks: Peaks | None = None


def _ended(pid: int) -> bool:
    """Whether ``pid`` has ended, leaving it unreaped (a zombie whose /proc/PID/stat still has its times)."""
    return os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None


def _zombie_cpu(pid: int) -> tuple[float, float]:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        utime, stime, cutime, cstime = (int(value) / CLOCK_TICKS for value in fields[11:15])
    except (OSError, ValueError, IndexError):
        return 0.0, 0.0
    return utime + stime, cutime + cstime


def run_process(command: list[str], log: Path, timeout_s: float, *, guest_mib: int | None = None,
                interval_s: float = DEFAULT_INTERVAL_S) -> Ran:
    """Run ``command`` (stdout and stderr into ``log``) to its end or ``timeout_s``, and count its CPU. With
    ``guest_mib``, sample the QEMU among it and its descendants every ``interval_s`` (a QEMU that ends is
    looked for again: a boot retry starts another)."""
    started = time.monotonic()
    with open(log, "wb") as out:
        proc = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)
    in_time, peaks = True, Peaks() if guest_mib else None
    try:
        if peaks is None:
            fired = threading.Event()
            timer = threading.Timer(timeout_s, lambda: (fired.set(), proc.kill()))
            timer.start()
            os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOWAIT)
            timer.cancel()
            in_time = not fired.is_set()
        else:
            qemu: int | None = None
            while not _ended(proc.pid):
                if time.monotonic() - started > timeout_s:
                    proc.kill()
                    os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOWAIT)
                    in_time = False
                    break
                if qemu is None:
                    qemu = job_qemu(proc.pid)
                if qemu is not None:
                    sample = read_smaps(qemu, guest_mib)
                    if sample is not None:
                        peaks.add(sample)
                    elif not Path(f"/proc/{qemu}").exists():
                        qemu = None
                time.sleep(interval_s)
        cpu_self, cpu_children = _zombie_cpu(proc.pid)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
    return Ran(in_time, time.monotonic() - started, cpu_self, cpu_children, peaks)


# --- jobs, site files, the floor's material ------------------------------------------------------------------

def job_memory_mib(job: Mapping[str, Any]) -> int:
    return int(job.get("resources", {}).get("memory_mib", DEFAULT_MEMORY_MIB))


def benchmark_site(base: Mapping[str, Any], scratch: Path, pin: bool = True) -> dict:
    """What every benchmark job's site adds: qemu_user pinned (unless ``pin`` is false and the site pins a
    driver), a private work_dir unless the site sets one."""
    overrides: dict[str, Any] = {}
    if pin or "driver" not in base:
        overrides["driver"] = "qemu_user"
    if "work_dir" not in base:
        overrides["work_dir"] = str(scratch / "work")
    return overrides


def default_tb_size(base: Mapping[str, Any]) -> int:
    from vjobs.drivers.qemu_user.qemu import QemuMachine

    return int(base.get("drivers", {}).get("qemu_user", {}).get("tb_size_mib", QemuMachine().tb_size_mib))


@dataclass
class JobRun:
    result: dict
    ran: Ran

    @property
    def cpu_s(self) -> float:
        """The job's CPU seconds: `vjobs run` and everything it started."""
        return self.ran.cpu_self_s + self.ran.cpu_children_s


def keep_failure(outdir: Path) -> Path:
    """A copy of a failed job's output folder and CLI log, kept after the benchmark's scratch is gone."""
    kept = Path(tempfile.gettempdir()) / "vjobs-benchmark-failures" / f"{time.strftime('%Y%m%dT%H%M%S')}-{outdir.name}"
    kept.mkdir(parents=True, exist_ok=True)
    if outdir.is_dir():
        shutil.copytree(outdir, kept / "outdir", dirs_exist_ok=True)
    for log in (Path(f"{outdir}.log"), outdir.parent / f"{outdir.name}.job.json"):
        if log.is_file():
            shutil.copy(log, kept / log.name)
    return kept


def run_job(job: Mapping[str, Any], site: Path, outdir: Path, *, watch_memory: bool = False,
            interval_s: float = DEFAULT_INTERVAL_S, attempts: int = 2) -> JobRun:
    """One `vjobs run` through the CLI, and its result.json. A job that does not succeed is kept
    (keep_failure), said on stderr and run again, up to ``attempts`` in all; then the benchmark exits."""
    for attempt in range(1, attempts + 1):
        where = outdir if attempt == 1 else outdir.with_name(f"{outdir.name}-again{attempt}")
        run = _run_job_once(job, site, where, watch_memory=watch_memory, interval_s=interval_s)
        if run.result.get("status") == "succeeded":
            return run
        message = (f"benchmark job {job.get('id')} did not succeed: {run.result.get('status')} "
                   f"{json.dumps(run.result.get('error'))[:300]}; kept in {keep_failure(where)}")
        if attempt == attempts:
            sys.exit(message)
        print(f"  {message}; running it again", file=sys.stderr)
    raise AssertionError("unreachable")


def _run_job_once(job: Mapping[str, Any], site: Path, outdir: Path, *, watch_memory: bool,
                  interval_s: float) -> JobRun:
    outdir.parent.mkdir(parents=True, exist_ok=True)
    job_file = outdir.parent / f"{outdir.name}.job.json"
    job_file.write_text(json.dumps(job))
    command = [*vjobs_command(), "run", str(job_file), "--outdir", str(outdir), "--site", str(site)]
    ran = run_process(command, Path(f"{outdir}.log"), float(job.get("walltime_s", 600)) + 120,
                      guest_mib=job_memory_mib(job) if watch_memory else None, interval_s=interval_s)
    try:
        result = json.loads((outdir / "result.json").read_text())
    except (OSError, ValueError) as exc:
        result = {"status": "no_result" if ran.in_time else "benchmark_timeout", "error": f"no result.json: {exc}"}
    return JobRun(result, ran)


def floor_dir() -> Path:
    """Where plain-qemu-floor.sh keeps its material ($W, else $TMPDIR/vjobs-floor, as the script has it)."""
    return Path(os.environ.get("W") or Path(os.environ.get("TMPDIR") or "/tmp") / "vjobs-floor")


def floor_material() -> Path:
    """The floor's folder with vmlinuz, initrd.raw and rel.sqfs, built by the shared script when missing."""
    folder = floor_dir()
    if not all((folder / name).is_file() for name in ("vmlinuz", "initrd.raw", "rel.sqfs")):
        script = next((path for path in FLOOR_SCRIPTS if path.is_file()), None)
        if script is None:
            sys.exit(f"the floor's material is not in {folder} and plain-qemu-floor.sh is missing")
        print(f"building the floor's material with {script} (once)", file=sys.stderr)
        subprocess.run(["bash", str(script), "1"], check=True, stdout=subprocess.DEVNULL,
                       env={**os.environ, "W": str(folder)})
    return folder


def floor_argv(folder: Path, memory_mib: int = 256, initrd: Path | None = None,
               tsc_khz: int | None = None) -> list[str]:
    """plain-qemu-floor.sh's QEMU command line (its -m is 256), and ``tsc_early_khz=`` on the kernel's
    command line when ``tsc_khz`` is set: see FloorHung."""
    cmdline = "console=ttyS0 quiet panic=-1" + (f" tsc_early_khz={tsc_khz}" if tsc_khz else "")
    return ["qemu-system-x86_64", "-machine", "microvm,accel=tcg", "-m", str(memory_mib), "-smp", "1",
            "-nographic", "-no-reboot", "-nodefaults", "-serial", "stdio", "-kernel", str(folder / "vmlinuz"),
            "-initrd", str(initrd or folder / "initrd.raw"), "-append", cmdline,
            "-drive", f"id=d0,file={folder / 'rel.sqfs'},format=raw,if=none,readonly=on",
            "-device", "virtio-blk-device,drive=d0"]


def host_tsc_khz() -> int | None:
    """The host's TSC frequency, which a TCG guest's TSC runs at (QEMU reads the host's): from the kernel's
    log, else /proc/cpuinfo's "cpu MHz"."""
    try:
        log = subprocess.run(["dmesg"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        log = ""
    for pattern in (r"Refined TSC clocksource calibration: ([\d.]+) MHz", r"tsc: Detected ([\d.]+) MHz"):
        found = re.findall(pattern, log)
        if found:
            return round(float(found[-1]) * 1000)
    with contextlib.suppress(OSError):
        found = re.findall(r"cpu MHz\s*:\s*([\d.]+)", Path("/proc/cpuinfo").read_text())
        if found:
            return round(float(found[0]) * 1000)
    return None


def floor_tsc_khz(args: argparse.Namespace) -> int | None:
    """``--floor-tsc-khz``: unset, the host's; 0, none (the script's command line unchanged)."""
    value = getattr(args, "floor_tsc_khz", None)
    return host_tsc_khz() if value is None else (value or None)


def floor_description(tsc_khz: int | None) -> str:
    return ("plain-qemu-floor.sh's command" + (f" + tsc_early_khz={tsc_khz}" if tsc_khz else "")
            + " (microvm, TCG, QEMU's default tb-size)")


FLOOR_MARKER = b"FLOOR-MARKER"
_FLOOR_INIT = """#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc; mount -t sysfs sys /sys; mount -t devtmpfs dev /dev
for m in virtio_ring virtio virtio_mmio virtio_blk squashfs; do [ -f /mods/$m.ko ] && insmod /mods/$m.ko; done
for i in $(seq 1 100); do [ -b /dev/vda ] && break; sleep 0.05; done
mount -t squashfs -o ro /dev/vda /mnt && cat /mnt/marker
sleep {sleep}
poweroff -f
"""


def sleeping_initrd(folder: Path, sleep_s: float, into: Path) -> Path:
    """The floor's initrd.raw with a second archive appended whose /init sleeps before powering off (the
    kernel unpacks both; the later /init replaces the earlier)."""
    init = _FLOOR_INIT.format(sleep=f"{sleep_s:g}").encode()
    with open(into, "wb") as out:
        out.write((folder / "initrd.raw").read_bytes())
        archive = CpioWriter(out)
        archive.add_file("init", init, 0o755)
        archive.close()
    return into


class FloorHung(RuntimeError):
    """Plain QEMU on microvm under TCG often hangs at boot on a loaded host, the kernel failing to calibrate
    its TSC ("tsc: Unable to calibrate against PIT", "No reference (HPET/PMTIMER) available", "Marking TSC
    unstable"), the reason vjobs uses q35 (vjobs/drivers/qemu_user/qemu.py): here 1 boot in 3 alone, 5 in 6 with 6 at once.
    ``tsc_early_khz=`` (the host's TSC kHz) on the kernel's command line skips that calibration: 6 of 6
    booted at once."""


def floor_run(argv: list[str], guest_mib: int, *, watch_memory: bool, interval_s: float = DEFAULT_INTERVAL_S,
              timeout_s: float = 60.0) -> Ran:
    """One plain QEMU boot. Raises FloorHung past ``timeout_s``, RuntimeError when the marker is missing."""
    with tempfile.TemporaryDirectory(prefix="vjobs-floor-boot-") as folder:
        log = Path(folder) / "out"
        ran = run_process(argv, log, timeout_s, guest_mib=guest_mib if watch_memory else None,
                          interval_s=interval_s)
        if not ran.in_time:
            raise FloorHung(f"plain QEMU ran past {timeout_s:g} s")
        if FLOOR_MARKER not in log.read_bytes():
            tail = log.read_bytes()[-300:]
            raise RuntimeError(f"plain QEMU booted without printing the floor's marker: {tail!r}")
        if watch_memory and not ran.peaks.samples:
            raise RuntimeError(f"no {guest_mib} MiB guest RAM mapping was seen in plain QEMU")
    return ran


# --- the benchmark ---------------------------------------------------------------------------------------------

def _mib(kib: Iterable[int]) -> list[float]:
    return [round(value / KIB_PER_MIB, 1) for value in kib]


def _sizes(value: Any) -> list[int]:
    if value is None:
        return list(DEFAULT_TB_SIZES)
    if isinstance(value, str):
        return [int(part) for part in value.split(",") if part.strip()]
    return [int(part) for part in value]


def _breakdown(peaks: list[Peaks]) -> str:
    """QEMU's own memory at its peak, by kind, medians over the runs."""
    samples = [p.at_peak for p in peaks if p.at_peak is not None]
    if not samples:
        return "no sample"
    def median(kind: str) -> float:
        return statistics.median(getattr(s, kind) for s in samples) / KIB_PER_MIB
    return (f"at the peak: TCG translation cache {median('tcg'):.1f} MiB, file-backed (QEMU's code, libraries, "
            f"memfd copies) {median('files'):.1f} MiB, other anonymous (heap, arenas, ROMs, kernel/initrd "
            f"copies) {median('other_anon'):.1f} MiB; {statistics.median(p.samples for p in peaks):.0f} "
            f"samples per run")


KINDS = {  # payload: the wall seconds its table column shows
    "hello": "hello job: `vjobs run` total s",
    "cpu": "sha256 of 64 MiB: payload s",
    "python": "python3 on debian12: payload s",
}


@dataclass
class Results:
    """One configuration's (start, tb-size) runs."""

    peaks: list[Peaks] = field(default_factory=list)
    wall_s: dict[str, list[float]] = field(default_factory=lambda: {kind: [] for kind in KINDS})
    cpu_s: dict[str, list[float]] = field(default_factory=lambda: {kind: [] for kind in KINDS})
    starts: dict[str, int] = field(default_factory=dict)  # how the measured jobs' VMs started (provenance)
    fallbacks: list[str] = field(default_factory=list)  # why a VM meant to start from a template booted cold

    def add(self, kind: str, run: JobRun) -> None:
        timings = run.result["timings"]
        self.wall_s[kind].append(timings["total"] if kind == "hello" else timings["guest_payload"])
        self.cpu_s[kind].append(round(run.cpu_s, 2))
        self.count_start(run)

    def count_start(self, run: JobRun) -> None:
        mode, fallback = start_mode(run.result)
        self.starts[mode] = self.starts.get(mode, 0) + 1
        if fallback and fallback not in self.fallbacks:
            self.fallbacks.append(fallback)


def start_mode(result: Mapping[str, Any]) -> tuple[str, str]:
    """How a job's VM started (result.json provenance.start): "template", "cold" or "cold (fallback)", and
    the fallback's reason."""
    start = (result.get("provenance") or {}).get("start") or {}
    fallback = str(start.get("fallback", ""))
    return start.get("mode", "cold") + (" (fallback)" if fallback else ""), fallback


def _floor_once(argv: list[str], guest_mib: int, interval_s: float, timeout_s: float) -> tuple[Ran, int]:
    """A plain boot, watched, retried when it hangs: the run and how many hung."""
    for hung in range(FLOOR_ATTEMPTS):
        try:
            return floor_run(argv, guest_mib, watch_memory=True, interval_s=interval_s, timeout_s=timeout_s), hung
        except FloorHung:
            if hung == FLOOR_ATTEMPTS - 1:
                raise
    raise AssertionError("unreachable")


def start_names(value: Any, default: Iterable[str] = DEFAULT_STARTS) -> list[str]:
    """``--starts``: names from STARTS."""
    if value is None:
        return list(default)
    names = [part.strip() for part in value.split(",") if part.strip()] if isinstance(value, str) else list(value)
    unknown = [name for name in names if name not in STARTS]
    if unknown:
        raise SystemExit(f"--starts: unknown {unknown}; choose from {', '.join(STARTS)}")
    return names


def tb_table(results: dict[tuple[str, int], Results], kinds: list[str], default_tb: int) -> str:
    """Markdown: per start and tb-size, QEMU's memory beyond the guest and the time of each payload, wall
    and CPU; medians (min–max)."""
    head = ["start", "tb-size, MiB", "beyond the guest, MiB"]
    for kind in kinds:
        head += [KINDS[kind], "its job's CPU s"]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for (start, tb), out in results.items():
        cells = [start, f"{tb}" + (" (default)" if tb == default_tb else ""), median_range(_mib(p.own for p in out.peaks), 1)]
        for kind in kinds:
            cells += [median_range(out.wall_s[kind]), median_range(out.cpu_s[kind])]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def measure(args: argparse.Namespace) -> Section:
    runs = getattr(args, "runs", None) or DEFAULT_RUNS
    memory_mib = getattr(args, "memory_mib", None)
    memory_mib = DEFAULT_MEMORY_MIB if memory_mib is None else memory_mib  # 0: the hello job's own
    sleep_s = getattr(args, "sleep_s", None) or DEFAULT_SLEEP_S
    interval_s = getattr(args, "interval_s", None) or DEFAULT_INTERVAL_S
    floor_timeout_s = getattr(args, "floor_timeout_s", None) or DEFAULT_FLOOR_TIMEOUT_S
    starts = start_names(getattr(args, "starts", None))
    base, site_path = site_document(getattr(args, "site", None))
    default_tb = default_tb_size(base)
    sizes = sorted(set(_sizes(getattr(args, "tb_sizes", None))) | {default_tb})

    sleep_job = example_job(memory_mib, f"&& sleep {sleep_s:g}")
    guest_mib = job_memory_mib(sleep_job)
    jobs = {
        "hello": example_job(memory_mib),
        "cpu": {"id": "cpu", "command": ["sh", "-c", CPU_PAYLOAD], "walltime_s": 600,
                "resources": {"memory_mib": guest_mib}},
        "python": {"id": "python", "image": "debian12", "command": ["python3", "-c", PYTHON_PAYLOAD],
                   "walltime_s": 600, "resources": {"memory_mib": guest_mib}},
    }
    if getattr(args, "skip_python", False):
        del jobs["python"]
    configs = [(start, tb) for start in starts for tb in sizes]
    results = {config: Results() for config in configs}
    floor_runs: list[Ran] = []
    floor_hangs = 0
    with tempfile.TemporaryDirectory(prefix="vjobs-memory-") as folder:
        scratch = Path(folder)
        overrides = benchmark_site(base, scratch)
        sites = {(start, tb): write_site(scratch / f"site-{start}-tb{tb}.toml", merged(base, merged(overrides, {
            "drivers": {"qemu_user": {"tb_size_mib": tb, "template": STARTS[start][0]}}}))) for start, tb in configs}
        material = floor_material()
        tsc_khz = floor_tsc_khz(args)
        floor = floor_argv(material, guest_mib, sleeping_initrd(material, sleep_s, scratch / "initrd-sleep.raw"),
                           tsc_khz)
        # One tb-size after the other, not interleaved: vjobs keeps one template per family (machine, memory,
        # vCPUs), so jobs of alternating tb-sizes would each remake the template the last one removed.
        for tb in sizes:
            for start in starts:  # warm-up, not counted: the template, probe verdicts, caches
                for kind, job in jobs.items():
                    run_job(job, sites[start, tb], scratch / "warm-up" / f"{start}-tb{tb}-{kind}")
            for number in range(runs):
                for start in starts:
                    where, out = scratch / f"{start}-tb{tb}", results[start, tb]
                    watched = run_job(sleep_job, sites[start, tb], where / f"sleep{number}", watch_memory=True,
                                      interval_s=interval_s)
                    if not watched.ran.peaks.samples:
                        sys.exit(f"no QEMU with a {guest_mib} MiB guest RAM mapping was seen under `vjobs run` "
                                 f"({start}, tb-size {tb}): nothing to measure")
                    out.peaks.append(watched.ran.peaks)
                    out.count_start(watched)
                    for kind, job in jobs.items():
                        out.add(kind, run_job(job, sites[start, tb], where / f"{kind}{number}"))
                    print(f"  tb-size {tb}, run {number + 1}/{runs}, {start}: beyond the guest "
                          f"{out.peaks[-1].own / KIB_PER_MIB:.1f} MiB (anonymous "
                          f"{out.peaks[-1].anonymous / KIB_PER_MIB:.1f}), guest "
                          f"{out.peaks[-1].guest / KIB_PER_MIB:.1f} MiB; "
                          + ", ".join(f"{kind} {out.wall_s[kind][-1]:.2f} s ({out.cpu_s[kind][-1]:.2f} CPU s)"
                                      for kind in jobs) + "; started " + ", ".join(out.starts), file=sys.stderr)
                ran, hung = _floor_once(floor, guest_mib, interval_s, sleep_s + floor_timeout_s)
                floor_runs.append(ran)
                floor_hangs += hung
                print(f"  tb-size {tb}, run {number + 1}/{runs}, plain QEMU: beyond the guest "
                      f"{ran.peaks.own / KIB_PER_MIB:.1f} MiB (anonymous {ran.peaks.anonymous / KIB_PER_MIB:.1f}), "
                      f"guest {ran.peaks.guest / KIB_PER_MIB:.1f} MiB, {ran.seconds:.2f} s", file=sys.stderr)

    floor_peaks = [ran.peaks for ran in floor_runs]
    floor_text = f"plain QEMU ({floor_description(tsc_khz)}, -m {guest_mib}, init sleeping {sleep_s:g} s)"
    comparisons = []
    for start in starts:
        job_text = f"`vjobs run` hello + `sleep {sleep_s:g}`, qemu_user {STARTS[start][1]}, q35, TCG, {guest_mib} MiB"
        for tb in [default_tb] + [tb for tb in sizes if tb != default_tb]:
            out = results[start, tb]
            label = f"tb-size {tb}" + (" (the default)" if tb == default_tb else "")
            started = ", ".join(f"{count} {mode}" for mode, count in sorted(out.starts.items()))
            comparisons.append(Comparison(
                GOAL, f"{job_text}, {label}: peak RSS beyond the guest RAM", _mib(p.own for p in out.peaks),
                f"{floor_text}: the same", _mib(p.own for p in floor_peaks), unit="MiB", absolute_goal=GOAL_MIB,
                note=f"{_breakdown(out.peaks)}; the measured jobs' VMs started: {started}"
                + (f" (why: {out.fallbacks[0][:200]})" if out.fallbacks else "")))
        out = results[start, default_tb]
        comparisons += [
            Comparison(GOAL, f"{job_text}, tb-size {default_tb}: peak anonymous memory beyond the guest RAM "
                       "(not QEMU's code and libraries, which QEMUs share)", _mib(p.anonymous for p in out.peaks),
                       f"{floor_text}: the same", _mib(p.anonymous for p in floor_peaks), unit="MiB"),
            Comparison(GOAL, f"{job_text}, tb-size {default_tb}: peak RSS of the guest RAM mapping",
                       _mib(p.guest for p in out.peaks), f"{floor_text}: the same",
                       _mib(p.guest for p in floor_peaks), unit="MiB"),
            Comparison(GOAL, f"{job_text}, tb-size {default_tb}: peak total RSS", _mib(p.total for p in out.peaks),
                       f"{floor_text}: the same", _mib(p.total for p in floor_peaks), unit="MiB"),
        ]
    text = (f"`benchmarks/memory.py --runs {runs}`: QEMU's resident memory beyond the guest's RAM, sampled from "
            f"/proc/PID/smaps every {interval_s:g} s while the job runs; the guest RAM is the anonymous mapping of "
            f"exactly {guest_mib} MiB; peaks per run. The floor's runs took "
            f"{statistics.median(r.seconds for r in floor_runs):.2f} s (median); {floor_hangs} of its boots hung "
            "and were retried. tb-size is `[drivers.qemu_user] tb_size_mib` (QEMU's `-accel tcg,tb-size=N`); "
            "per start and tb-size, medians (min–max) of the memory and of each payload's wall seconds and its "
            "whole job's CPU seconds (`vjobs run` and every process under it: a busy host disturbs it less):\n\n"
            + tb_table(results, list(jobs), default_tb)
            + f"\n\nSite: {site_path or 'built-in defaults'}, qemu_user pinned; a warm-up job per configuration, "
            "not counted, made its template.")
    return Section("QEMU's memory beyond the guest (issue 11, goal 4)", comparisons, text)


def arguments(description: str | None = None, argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=description or __doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=DEFAULT_RUNS)
    parser.add_argument("--site", default=None)
    parser.add_argument("--jobs", type=int, default=None, help="not used here (throughput.py's)")
    parser.add_argument("--concurrency", default=None, help="not used here (throughput.py's)")
    parser.add_argument("--tb-sizes", default=",".join(map(str, DEFAULT_TB_SIZES)),
                        help="TCG translation cache sizes to try, MiB, comma-separated")
    parser.add_argument("--memory-mib", type=int, default=DEFAULT_MEMORY_MIB,
                        help="the guest's RAM (0: the hello job's own, 256)")
    parser.add_argument("--sleep-s", type=float, default=DEFAULT_SLEEP_S)
    parser.add_argument("--interval-s", type=float, default=DEFAULT_INTERVAL_S)
    parser.add_argument("--floor-timeout-s", type=float, default=DEFAULT_FLOOR_TIMEOUT_S,
                        help="a plain QEMU boot that takes longer has hung: killed and retried")
    parser.add_argument("--starts", default=",".join(DEFAULT_STARTS),
                        help="how the jobs' VMs start, comma-separated: template (the default), cold")
    parser.add_argument("--floor-tsc-khz", type=int, default=None,
                        help="tsc_early_khz= for the plain QEMU's kernel (default: the host's; 0: none)")
    parser.add_argument("--skip-python", action="store_true", help="leave out the code-heavy debian12 payload")
    return parser.parse_args(argv)


def main() -> None:
    print_section(measure(arguments()))


if __name__ == "__main__":
    main()
