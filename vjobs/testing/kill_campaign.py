#!/usr/bin/env python3
"""Kill -9 campaign (issue 9 point 7): kill a `vjobs run` with SIGKILL at random moments across every phase,
run `vjobs gc`, and count what is left. Method and figures: docs/reliability.md.

    .venv/bin/python benchmarks/kill_campaign.py --kills 300 --drivers qemu_user,kvm,xen --seed 1 \\
        --json /tmp/kill-campaign.json            (the long run; or: python -m vjobs.testing.kill_campaign ...)

Its short run is a test: tests/reliability/test_kill_campaign.py.

For each driver the campaign makes a site of its own (its own ``work_dir``; a ``cache_dir`` seeded with hard
links to the built images of ``--source-cache``, by default $VJOBS_TEST_CACHE), and for ``xen`` starts one
XAPI stand-in (``python -m vjobs.testing.xapi_standin`` on loopback) for the whole campaign. It measures the
job's phases with two complete runs (the first builds a new release image and, for kvm, does the deep probe),
then, for each kill:

1. starts a process that does what ``vjobs run --site S --outdir O job.json`` does, through the public API
   (``python -m vjobs.testing.event_pipe``: ``vjobs.run`` with ``event_hooks``), in a session of its own; it
   reports each public phase, step and progress message (vjobs/events.py) on a pipe, so that the campaign
   knows where vjobs was when it died (``--plain`` runs the ``vjobs`` command itself instead and guesses the
   phase from the elapsed time);
2. SIGKILLs that process alone (not its group: the point is what vjobs leaves when it alone dies), either at
   a time drawn uniformly over 0..1.2x the job's measured duration, or (``--targeted-share`` of the kills)
   a random moment inside one phase or step picked at random among those the calibration saw, so that short
   phases are hit too; ``--new-release-share`` of the runs get new release content (a new release image is
   built), and for kvm ``--reprobe-share`` lose the cached probe verdict (the deep probe boots a guest);
3. waits ``--settle-s``, runs ``vjobs gc --site S``, and counts what is left (``count_leftovers``).

A kill's label is where vjobs was: a phase of ``vjobs.events.PHASES``, then the steps (``STEPS``) it was in,
e.g. ``boot/vm_start`` or ``prepare/release_image/tool:mksquashfs``; ``startup`` before the first event and
``exit`` after ``vjobs.run`` returned. To aim every kill at one step (to reproduce a finding), e.g. the xen
driver's upload of a shared VDI:

    .venv/bin/python benchmarks/kill_campaign.py --drivers xen --kills 4 --targeted-share 1 \
        --max-release-mib 48 --only-targets attach/vm_create/shared_vdi/vdi_upload

A target names phases and steps that vjobs declares, or the campaign stops at once (``check_labels``).

The campaign process is a child subreaper, so every process vjobs started is re-parented to it when vjobs
dies: what still runs after gc is counted as an orphan process.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import ctypes
import json
import os
import random
import re
import secrets
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from vjobs.drivers.kvm.domain import NAMESPACE_URI as OWNER_NS
from vjobs.events import check_targets
from vjobs.host import locks
from vjobs.host.gc import TEMP_FOLDER
from vjobs.testing.event_pipe import EXIT, STARTUP, Timeline
from vjobs.testing.host_state import held_tokens
from vjobs.testing.processes import descendants, process_table
from vjobs.testing.sites import (LIBVIRT_URI, StandinProcess, XapiPool, libvirt_settings, seed_cache, site_document,
                                 vjobs_command, write_site)

PYTHON = sys.executable
VJOBS = vjobs_command()
DRIVERS = ("qemu_user", "kvm", "xen")
PR_SET_CHILD_SUBREAPER = 36
GC_TIMEOUT_S = 180
FRESH_ONLY = re.compile(r"deep_probe|tool:mksquashfs|shared_vdi/")  # what only new content or no verdict causes
QUERY_TIMEOUT_S = 30

#: What is counted after gc; each must be zero.
LEFTOVER_KINDS = (
    "qemu_processes",      # a qemu-system process of one of this campaign's VMs (its name, or a child of ours)
    "orphan_processes",    # any other process vjobs started that still runs (re-parented to the campaign)
    "libvirt_domains",     # a domain named for this campaign's jobs, or labelled with a killed vjobs' pid
    "xapi_vms",            # a VM in the stand-in (only this campaign's jobs use it)
    "xapi_vbds",
    "xapi_job_vdis",       # a VDI labelled with a vjobs run (vjobs.run_id)
    "xapi_partial_shared_vdis",  # a shared (release/base) VDI without vjobs.complete: a half-done upload
    "xen_domains",         # a domain the real Xen of a Xen node still runs (--xen-site; none on the stand-in)
    "job_folders",         # anything in work_dir but admission/
    "admission_shares",    # a token of the campaign's host budget folder that a process still holds
    "cache_partials",      # partial builds, .build-* folders, PID-named temporary files, incomplete entries
    "cache_locks",         # an unheld lock file whose entry is gone (but xen/shared-*.lock: see INFO_KINDS)
    "cache_unknown",       # a file in cache_dir that is none of the above nor a complete entry
    "sockets",             # a Unix socket file anywhere under work_dir or cache_dir
    "temp_folders",        # /tmp/vjobs-inspect-PID-*, /tmp/vjobs-console-PID-* of a killed vjobs
)
#: Counted, reported, not a target: what vjobs keeps on purpose, or what XAPI itself expires.
INFO_KINDS = (
    "xapi_sessions",       # sessions of killed runs never logged out (XAPI expires idle sessions itself)
    "xapi_shared_vdis",    # complete shared VDIs: a cache in the pool, kept on purpose
    "xen_upload_locks",    # cache_dir/xen/shared-KEY.lock: one per content ever uploaded; gc keeps them
    "xapi_templates",      # complete template VDIs (vjobs.template): a cache in the pool, kept on purpose
    "xen_template_records",  # cache_dir/xen/template-NAME.lock, xen/FAMILY.failed: small, kept on purpose
    "cache_entries",       # complete cache entries (release images, built images, raw copies)
)

class CampaignError(RuntimeError):
    pass


def check_labels(labels: Iterable[str]) -> None:
    """Raise ValueError for a label (``phase/step/step:detail``) that names a phase or step vjobs does not
    emit: a campaign aimed at it would wait for an event that never comes."""
    phases, steps = [], []
    for label in labels:
        phase, *inside = label.split("/")
        if phase not in (STARTUP, EXIT):
            phases.append(phase)
        steps += [step.split(":", 1)[0] for step in inside]
    check_targets(phases, steps)


# --- processes -----------------------------------------------------------------------------------------

def become_subreaper() -> bool:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0
    except OSError:
        return False


def reap_orphans(keep: Iterable[int] = ()) -> None:
    """Reap the zombies re-parented to us (not our own Popen children, which their owners wait for)."""
    keep = set(keep)
    me = os.getpid()
    for proc in process_table().values():
        if proc.ppid == me and proc.state == "Z" and proc.pid not in keep:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(proc.pid, os.WNOHANG)


def _xapi_of(site_file: Path) -> tuple[str, Path]:
    """The XAPI URL and password file of a site file's ``[drivers.xen]``."""
    settings = site_document(str(site_file))[0].get("drivers", {}).get("xen", {})
    if not settings.get("url") or not settings.get("password_file"):
        raise CampaignError(f"{site_file}: [drivers.xen] has no url and password_file")
    return settings["url"], Path(settings["password_file"])


# --- the campaign of one driver ------------------------------------------------------------------------

@dataclass
class Options:
    kills: int = 10
    seed: int = 1
    targeted_share: float = 0.5
    new_release_share: float = 0.25
    reprobe_share: float = 0.1
    debian_share: float = 0.0
    max_release_mib: float = 2.0
    settle_s: float = 0.3
    stretch: float = 1.2
    plain: bool = False
    calibration_runs: int = 2
    only_targets: tuple[str, ...] = ()  # aim targeted kills at these labels only (to reproduce a finding)
    xen_site: Path | None = None  # xen against this site's XAPI (a Xen node's) instead of a stand-in of its own
    verbose: bool = True

    def __post_init__(self) -> None:
        check_labels(self.only_targets)


class DriverCampaign:
    def __init__(self, driver: str, root: Path, source_cache: Path | None, options: Options, tag: str):
        self.driver, self.options, self.tag = driver, options, tag
        self.rng = random.Random(f"{options.seed}-{driver}")
        self.root = root / driver
        self.work, self.cache, self.outs = self.root / "work", self.root / "cache", self.root / "out"
        self.jobs, self.release = self.root / "jobs", self.root / "release"
        self.site = self.root / "site.toml"
        self.budget = self.root / "host-budget"
        self.source_cache = source_cache
        self.standin: StandinProcess | XapiPool | None = None
        self.killed_pids: set[int] = set()
        self.probe_domains: set[str] = set()  # names of kvm deep-probe domains that a killed vjobs owned
        self.known: dict[str, set[str]] = {kind: set() for kind in LEFTOVER_KINDS}
        self.typical_s = 0.0
        self.spans: dict[str, float] = {}  # label -> typical seconds in it
        self.fresh_only: set[str] = set()  # labels seen only when the release and probe verdict were new
        self.plain_offsets: list[tuple[float, str]] = []
        self.runs = 0

    # set-up and tear-down

    def setup(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)
        for folder in (self.work, self.outs, self.jobs, self.release):
            folder.mkdir(parents=True)
        debian = self.options.debian_share > 0
        seed_cache(self.source_cache, self.cache, ("default", "debian12") if debian else ("default",), rootfs=debian)
        (self.jobs / "inputs").mkdir()
        (self.jobs / "inputs" / "events.csv").write_text("".join(f"{i},{i * i}\n" for i in range(100)))
        (self.release / "bin").mkdir()
        (self.release / "bin" / "analyse.sh").write_text("#!/bin/sh\nwc -l \"$@\"\n")
        (self.release / "bin" / "analyse.sh").chmod(0o755)
        self._new_release()
        site = {"driver": self.driver, "cache_dir": str(self.cache), "work_dir": str(self.work), "boot_timeout_s": 60,
                "host": {"budget_dir": str(self.budget)}}  # its own, not the node's
        if self.driver == "kvm":
            site["drivers"] = {"kvm": libvirt_settings()}
        elif self.driver == "xen" and self.options.xen_site:
            self.standin = XapiPool(*_xapi_of(self.options.xen_site))  # a real Xen's, shared: kept running
            site["drivers"] = {"xen": self.standin.settings()}
        elif self.driver == "xen":
            self.standin = StandinProcess(self.root / "xapi", password="kill-campaign", sr_size_mib=1 << 20).start()
            site["drivers"] = {"xen": self.standin.settings()}
        write_site(self.site, site)
        if not (self.cache / "images").is_dir() or not any((self.cache / "images").glob("default-*")):
            self._say("no built image to reuse: building the default image into the campaign's cache")
            subprocess.run([*VJOBS, "image", "build", "default", "--site", str(self.site)], check=True)

    def close(self) -> None:
        if isinstance(self.standin, StandinProcess):
            self.standin.stop()
            self.standin = None

    def _say(self, message: str) -> None:
        if self.options.verbose:
            print(f"[{self.driver}] {message}", file=sys.stderr, flush=True)

    # the job

    def _new_release(self) -> None:
        """New release content: a new image to build (and, for xen, a new shared VDI to upload)."""
        size = int(self.rng.uniform(0, self.options.max_release_mib) * (1 << 20))
        (self.release / "data.bin").write_bytes(self.rng.randbytes(size))
        (self.release / "version.txt").write_text(f"{secrets.token_hex(8)}\n")

    def _job(self, number: int, image: str) -> Path:
        job = {"id": f"kc{self.tag}-{self.driver[:3]}-{number}", "image": image,
               "command": ["sh", "-c", "mkdir -p out && /opt/release/bin/analyse.sh events.csv > out/count.txt "
                                       "&& sleep 0.5"],
               "inputs": "inputs", "release": {"path": str(self.release), "mount": "/opt/release"},
               "outputs": ["out"], "resources": {"vcpus": 1, "memory_mib": 256, "scratch_mib": 16, "output_mib": 8},
               "walltime_s": 120}
        path = self.jobs / f"job-{number}.json"
        path.write_text(json.dumps(job))
        return path

    def _forget_probe_verdicts(self) -> None:
        for verdict in (self.cache / "probes").glob("*.json"):
            verdict.unlink(missing_ok=True)

    # one run

    def _start(self, number: int, image: str) -> tuple[subprocess.Popen, Timeline, Path]:
        outdir = self.outs / str(number)
        read, write = os.pipe()
        env = {key: value for key, value in os.environ.items() if key != "VJOBS_SITE"}
        job = str(self._job(number, image))
        if self.options.plain:
            argv = [*VJOBS, "run", "--site", str(self.site), "--outdir", str(outdir), job]
        else:  # the same run through the public API, its events on the pipe
            argv = [PYTHON, "-m", "vjobs.testing.event_pipe", str(write), str(self.site), str(outdir), job]
        log = open(self.root / f"run-{number}.log", "wb")
        timeline = Timeline(started=time.monotonic())
        try:
            proc = subprocess.Popen(argv, pass_fds=(write,), start_new_session=True, stdin=subprocess.DEVNULL,
                                    stdout=log, stderr=subprocess.STDOUT, env=env, cwd=self.jobs)
        finally:
            os.close(write)
            log.close()
        timeline.read_from(read)
        self.runs += 1
        return proc, timeline, outdir

    def calibrate(self) -> dict:
        """Complete runs: a fresh one (new release image, no probe verdict) and, unless ``calibration_runs``
        is 1, a steady one (the typical duration)."""
        seen = []
        for number, fresh in ((-1, True), (0, False))[:max(1, self.options.calibration_runs)]:
            if fresh:
                self._new_release()
                self._forget_probe_verdicts()
            proc, timeline, outdir = self._start(number, "default")
            proc.wait(600)
            end = time.monotonic()
            timeline.wait_done()
            try:
                result = json.loads((outdir / "result.json").read_text())
            except (OSError, ValueError):
                result = {}
            if proc.returncode != 0 or result.get("status") != "succeeded":
                log = (self.root / f"run-{number}.log").read_text(errors="replace")[-2000:]
                raise CampaignError(f"{self.driver}: the calibration job did not succeed (exit {proc.returncode}, "
                                    f"{result.get('status')}: {result.get('error')}); its output: {log}")
            seen.append((end - timeline.started, timeline.durations(end), result.get("timings", {})))
            shutil.rmtree(outdir, ignore_errors=True)
            (self.root / f"run-{number}.log").unlink(missing_ok=True)
        (fresh_s, fresh_spans, _), (self.typical_s, steady_spans, steady_timings) = seen[0], seen[-1]
        self.spans = {**fresh_spans, **steady_spans}
        # what only a new release or a missing probe verdict makes happen
        self.fresh_only = {label for label in self.spans if FRESH_ONLY.search(label)}
        if len(seen) > 1:
            self.fresh_only |= set(fresh_spans) - set(steady_spans)
        startup = self.typical_s - steady_timings.get("total", self.typical_s)
        offset, self.plain_offsets = startup, [(0.0, STARTUP)]
        for name, seconds in steady_timings.items():
            if name != "total" and not name.startswith("guest_"):
                self.plain_offsets.append((offset, name))
                offset += seconds
        unseen = [label for label in self.options.only_targets if label not in self.spans]
        if unseen:  # declared but not emitted (yet), or not on this driver's path: those kills come uniformly
            self._say(f"--only-targets: the calibration never saw {', '.join(unseen)}")
        baseline = self.gc_and_count()
        self._say(f"calibrated: {self.typical_s:.2f} s per job ({fresh_s:.2f} s with a new release image); "
                  f"phases: {', '.join(f'{k} {v:.3f}' for k, v in sorted(self.spans.items(), key=lambda kv: kv[0]))}")
        return {"typical_s": round(self.typical_s, 3), "fresh_s": round(fresh_s, 3),
                "spans_s": {k: round(v, 4) for k, v in self.spans.items()}, "fresh_only": sorted(self.fresh_only),
                "baseline": baseline}

    def one_kill(self, number: int) -> dict:
        opts, rng = self.options, self.rng
        targeted = not opts.plain and rng.random() < opts.targeted_share
        targets = [label for label in sorted(self.spans) if not opts.only_targets or label in opts.only_targets]
        target = rng.choice(targets) if targeted and targets else None
        targeted = target is not None
        fresh = target in self.fresh_only if targeted else False
        new_release = fresh or rng.random() < opts.new_release_share
        reprobe = self.driver == "kvm" and (fresh or rng.random() < opts.reprobe_share)
        image = "debian12" if rng.random() < opts.debian_share else "default"
        if new_release:
            self._new_release()
        if reprobe:
            self._forget_probe_verdicts()
        delay = rng.uniform(0, opts.stretch * self.typical_s)
        if targeted:
            delay = rng.uniform(0, self.spans.get(target, 0.0))
        proc, timeline, outdir = self._start(number, image)
        deadline = timeline.started + max(60.0, 4 * self.typical_s)
        if targeted and target != STARTUP:
            with timeline.changed:
                timeline.changed.wait_for(lambda: timeline.done or target in {label for _t, label in timeline.labels()}
                                          or time.monotonic() > deadline,
                                          timeout=max(0.0, deadline - time.monotonic()))
            kill_at = time.monotonic() + delay
        else:
            kill_at = timeline.started + delay
        while proc.poll() is None and time.monotonic() < kill_at:
            time.sleep(min(0.005, max(0.0, kill_at - time.monotonic())))
        if proc.poll() is None:  # not reaped, so the pid is still vjobs' (a zombie at worst)
            os.kill(proc.pid, signal.SIGKILL)  # vjobs alone, not its process group
        killed_at = time.monotonic()
        proc.wait()
        timeline.wait_done()
        killed = proc.returncode == -signal.SIGKILL
        record = {"n": number, "mode": "targeted" if targeted else "uniform", "target": target,
                  "delay_s": round(delay, 4), "new_release": new_release, "reprobe": reprobe, "image": image,
                  "pid": proc.pid, "killed": killed, "rc": proc.returncode,
                  "elapsed_s": round(killed_at - timeline.started, 4)}
        if not killed:
            record["phase"] = "completed"
            shutil.rmtree(outdir, ignore_errors=True)
            (self.root / f"run-{number}.log").unlink(missing_ok=True)
            return record
        self.killed_pids.add(proc.pid)
        if opts.plain:
            record["phase"] = self._phase_by_time(killed_at - timeline.started)
        else:
            changes = timeline.labels()
            record["phase"] = changes[-1][1] if changes else STARTUP
            record["last_progress"] = (timeline.progress() or [None])[-1]
        if self.driver == "kvm":  # a deep probe's domain is named vjobs-probe-RUNID: note the ones it owned
            self.probe_domains |= {d["name"] for d in self._libvirt_domains()
                                   if d["labels"].get("vjobs.pid") == str(proc.pid)}
        time.sleep(opts.settle_s)
        record.update(self.gc_and_count())
        shutil.rmtree(outdir, ignore_errors=True)
        if not record["new_leftovers"]:
            (self.root / f"run-{number}.log").unlink(missing_ok=True)
        return record

    def _phase_by_time(self, elapsed: float) -> str:
        label = STARTUP
        for offset, name in self.plain_offsets:
            if elapsed >= offset:
                label = name
        return label + "?"  # a guess from the calibration's timings

    # gc and the count

    def gc_and_count(self) -> dict:
        started = time.monotonic()
        try:
            done = subprocess.run([*VJOBS, "gc", "--site", str(self.site), "--json"], capture_output=True,
                                  text=True, timeout=GC_TIMEOUT_S, stdin=subprocess.DEVNULL)
            removed = json.loads(done.stdout) if done.returncode == 0 else []
            gc = {"rc": done.returncode, "s": round(time.monotonic() - started, 3), "removed": removed}
            if done.returncode != 0:
                gc["stderr"] = done.stderr[-1000:]
        except subprocess.TimeoutExpired:
            gc = {"rc": None, "s": GC_TIMEOUT_S, "removed": [], "stderr": "timed out"}
        except ValueError:
            gc = {"rc": done.returncode, "s": round(time.monotonic() - started, 3), "removed": [],
                  "stderr": f"unreadable output: {done.stdout[-500:]}"}
        reap_orphans(keep=[self.standin.pid] if isinstance(self.standin, StandinProcess) else [])
        leftovers, info = self.count_leftovers()
        new = {kind: sorted(set(items) - self.known[kind]) for kind, items in leftovers.items()}
        for kind, items in leftovers.items():
            self.known[kind] |= set(items)
        return {"gc": gc, "leftovers": {k: v for k, v in leftovers.items() if v},
                "new_leftovers": {k: v for k, v in new.items() if v}, "info": info}

    def count_leftovers(self) -> tuple[dict[str, list[str]], dict[str, int]]:
        found: dict[str, list[str]] = {kind: [] for kind in LEFTOVER_KINDS}
        info: dict[str, int] = {kind: 0 for kind in INFO_KINDS}
        self._count_processes(found)
        if self.driver == "kvm":
            for domain in self._libvirt_domains():
                labels = domain["labels"]
                ours = domain["name"].startswith(f"vjobs-kc{self.tag}-") or domain["name"] in self.probe_domains \
                    or (labels.get("vjobs.hostname") == socket.gethostname()
                        and labels.get("vjobs.pid", "").isdigit() and int(labels["vjobs.pid"]) in self.killed_pids)
                if ours:
                    found["libvirt_domains"].append(f"{domain['name']} ({'running' if domain['active'] else 'defined'})")
        if self.standin is not None:
            self._count_xapi(found, info)
        self._count_work(found)
        self._count_cache(found, info)
        for path in Path(tempfile.gettempdir()).glob("vjobs-*"):
            match = TEMP_FOLDER.fullmatch(path.name)
            if match and int(match[2]) in self.killed_pids:
                found["temp_folders"].append(str(path))
        return found, info

    def _count_processes(self, found: dict[str, list[str]]) -> None:
        table = process_table()
        me = os.getpid()
        standin = self.standin.pid if isinstance(self.standin, StandinProcess) else None
        mine = descendants(me, table)
        standin_tree = descendants(standin, table) if standin else set()
        names = (f"vjobs-kc{self.tag}-", *self.probe_domains)
        for proc in table.values():
            if proc.state == "Z" or proc.pid == me:
                continue
            if proc.pid in standin_tree:  # the stand-in's guests: none may run once gc is done
                if proc.is_qemu:
                    found["qemu_processes"].append(proc.describe())
                continue
            if proc.pid == standin:
                continue
            named = any(name in arg for arg in proc.argv for name in names)
            if proc.is_qemu and (named or proc.pid in mine):
                found["qemu_processes"].append(proc.describe())
            elif proc.pid in mine:
                found["orphan_processes"].append(proc.describe())

    def _libvirt_domains(self) -> list[dict]:
        script = ("import json, sys, libvirt, xml.etree.ElementTree as ET\n"
                  "libvirt.registerErrorHandler(lambda c, e: None, None)\n"
                  "conn = libvirt.open(sys.argv[1]); out = []\n"
                  "for dom in conn.listAllDomains():\n"
                  "    try: xml = dom.metadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT, sys.argv[2])\n"
                  "    except libvirt.libvirtError: xml = None\n"
                  "    labels = {e.get('name'): e.text or '' for e in ET.fromstring(xml) "
                  "if e.tag.endswith('label')} if xml else {}\n"
                  "    try: active = bool(dom.isActive())\n"
                  "    except libvirt.libvirtError: continue  # gone since the listing (another's, or gc's)\n"
                  "    out.append({'name': dom.name(), 'active': active, 'labels': labels})\n"
                  "print(json.dumps(out))\n")
        done = subprocess.run([PYTHON, "-c", script, LIBVIRT_URI, OWNER_NS], capture_output=True, text=True,
                              timeout=QUERY_TIMEOUT_S)
        if done.returncode != 0:
            raise CampaignError(f"cannot list libvirt domains at {LIBVIRT_URI}: {done.stderr.strip()[-500:]}")
        return json.loads(done.stdout)

    def _count_xapi(self, found: dict[str, list[str]], info: dict[str, int]) -> None:
        records = self.standin.query()
        for record in records["VM"].values():
            found["xapi_vms"].append(f"VM {record['name_label']} ({record['power_state']})")
        for ref, record in records["VBD"].items():
            found["xapi_vbds"].append(f"VBD {ref} of {record.get('VM')}")
        for record in records["VDI"].values():
            config = record.get("other_config", {})
            if "vjobs.run_id" in config:
                found["xapi_job_vdis"].append(f"VDI {record['name_label']}")
            elif "vjobs.content_key" in config and not config.get("vjobs.complete"):
                found["xapi_partial_shared_vdis"].append(f"VDI {record['name_label']} "
                                                         f"(content {config['vjobs.content_key'][:12]})")
            elif "vjobs.content_key" in config:
                info["xapi_shared_vdis"] += 1
            elif "vjobs.template" in config and config.get("vjobs.complete"):
                info["xapi_templates"] += 1
            elif "vjobs.template" in config:
                found["xapi_partial_shared_vdis"].append(f"VDI {record['name_label']} (a template being made)")
            else:
                found["xapi_job_vdis"].append(f"VDI {record['name_label']} (unlabelled)")
        info["xapi_sessions"] = len(records["session"])
        if isinstance(self.standin, XapiPool):
            found["xen_domains"] += self.standin.domains()

    def _count_work(self, found: dict[str, list[str]]) -> None:
        if not self.work.is_dir():
            return
        for path in sorted(self.work.iterdir()):
            if path.name != "admission":
                found["job_folders"].append(str(path))
        found["admission_shares"] += [str(self.budget / name) for name in held_tokens(self.budget)]
        found["sockets"] += [str(p) for p in _sockets(self.work)]

    def _count_cache(self, found: dict[str, list[str]], info: dict[str, int]) -> None:
        cache = self.cache
        found["sockets"] += [str(p) for p in _sockets(cache)]
        for path in sorted(cache.iterdir()) if cache.is_dir() else []:
            if path.is_dir():
                continue
            if path.name in ("checksums.json", "evict.lock"):
                continue
            kind = "cache_partials" if re.fullmatch(r".+\.\d+\.(tmp|partial)", path.name) else "cache_unknown"
            found[kind].append(str(path))
        for name, entry, sidecars in (("releases", r"(?P<key>[0-9a-f]{32})\.(squashfs|erofs)", (".json",)),
                                      ("rootfs", r"(?P<key>[0-9a-f]{64})\.raw", ())):
            folder = cache / name
            if not folder.is_dir():
                continue
            names = sorted(p.name for p in folder.iterdir())
            keys = {m["key"] for n in names if (m := re.fullmatch(entry, n))}
            for item in names:
                path = folder / item
                if re.fullmatch(entry, item):
                    key = re.fullmatch(entry, item)["key"]
                    if all((folder / f"{key}{s}").exists() for s in sidecars):
                        info["cache_entries"] += 1
                    else:
                        found["cache_partials"].append(f"{path} (no {', '.join(sidecars)} beside it)")
                elif re.fullmatch(r".+\.\d+\.(partial|tmp)", item):
                    found["cache_partials"].append(str(path))
                elif item.endswith(".lock"):
                    if item[:-5] not in keys and not _held(path):
                        found["cache_locks"].append(str(path))
                elif name == "releases" and item.endswith(".json"):
                    if item[:-5] not in keys:
                        found["cache_partials"].append(f"{path} (its image is gone)")
                elif name == "rootfs" and re.fullmatch(r"[0-9a-f]{64}\.v\d+\.json", item):
                    pass  # an inspection record: small, kept on purpose
                else:
                    found["cache_unknown"].append(str(path))
        for built in (cache / "images", cache / "templates"):  # folders built by build_once, FAMILY-KEY
            for path in sorted(built.iterdir()) if built.is_dir() else []:
                if path.name.startswith(".build-") or re.fullmatch(r".+\.\d+\.tmp", path.name):
                    found["cache_partials"].append(str(path))
                elif path.is_dir() and re.fullmatch(r"[a-z0-9_]+-[0-9a-f]{16}", path.name):
                    info["cache_entries"] += 1
                elif re.fullmatch(r"[a-z0-9_]+\.failed", path.name):
                    pass  # a template's last failure, remembered on purpose: small
                elif path.name == "ram-keepers" and path.is_dir():  # qemu_user's keepers' sockets and locks
                    found["cache_unknown"] += [str(item) for item in sorted(path.iterdir())
                                               if not re.fullmatch(r"[0-9a-f]{24}\.(lock|sock)", item.name)]
                elif not re.fullmatch(r"[a-z0-9_]+\.(lock|inuse)", path.name):  # .inuse: a kvm template slot's
                    found["cache_unknown"].append(str(path))
        probes = cache / "probes"
        if probes.is_dir():
            for path in sorted(probes.iterdir()):
                if not path.name.endswith(".json"):
                    found["cache_partials" if re.search(r"\.\d+\.tmp$", path.name) else "cache_unknown"].append(str(path))
        xen = cache / "xen"
        if xen.is_dir():
            for path in sorted(xen.iterdir()):
                if re.fullmatch(r"shared-[0-9a-f]+\.lock", path.name):
                    info["xen_upload_locks"] += 1
                elif re.fullmatch(r"template-[a-z0-9_]+-[0-9a-f]{16}\.lock|[a-z0-9_]+\.failed", path.name):
                    info["xen_template_records"] += 1
                else:
                    found["cache_unknown"].append(str(path))
        for path in sorted(cache.iterdir()) if cache.is_dir() else []:
            if path.is_dir() and path.name not in ("releases", "rootfs", "images", "templates", "probes", "xen"):
                found["cache_unknown"].append(str(path))

    # the campaign

    def run(self, kills: int) -> dict:
        calibration = self.calibrate()
        records, attempts, number = [], 0, 0
        while sum(1 for r in records if r["killed"]) < kills and attempts < 3 * kills + 10:
            number += 1
            attempts += 1
            record = self.one_kill(number)
            records.append(record)
            if record["killed"]:
                new = record.get("new_leftovers") or {}
                done = sum(1 for r in records if r["killed"])
                note = f"  NEW LEFTOVERS: {json.dumps(new)}" if new else ""
                self._say(f"kill {done}/{kills}: {record['phase']} after {record['elapsed_s']:.3f} s{note}")
        final = self.final_sweep(records)
        return {"calibration": calibration, "kills": records, "final": final,
                "summary": summarise(records, final)}

    def final_sweep(self, records: list[dict]) -> dict:
        """One more gc at the end: once more than TEMP_GRACE_S (60 s, vjobs/host/cache.py) has passed, if a
        PID-named temporary file was still there, since gc spares younger ones."""
        last = records[-1] if records else {}
        if any(re.search(r"\.\d+\.tmp\b", item) for item in last.get("leftovers", {}).get("cache_partials", [])):
            self._say("waiting 65 s for the temporary files' grace to pass before the final gc")
            time.sleep(65)
        outcome = self.gc_and_count()
        return {"leftovers": outcome["leftovers"], "info": outcome["info"], "gc": outcome["gc"]}


def _sockets(root: Path) -> list[Path]:
    found = []
    for folder, _dirs, files in os.walk(root):
        for name in files:
            path = Path(folder) / name
            with contextlib.suppress(OSError):
                if stat.S_ISSOCK(path.lstat().st_mode):
                    found.append(path)
    return found


def _held(path: Path) -> bool:
    """Whether some process holds a flock on ``path`` (we take and drop it at once if nobody does)."""
    try:
        with locks.try_exclusive(path, create=False) as free:
            return not free
    except FileNotFoundError:
        return False


# --- results -------------------------------------------------------------------------------------------

def summarise(records: list[dict], final: dict | None = None) -> dict:
    killed = [r for r in records if r["killed"]]
    by_phase: dict[str, dict[str, int]] = {}
    for record in killed:
        row = by_phase.setdefault(record["phase"], {"kills": 0, "with_new_leftovers": 0})
        row["kills"] += 1
        row["with_new_leftovers"] += bool(record.get("new_leftovers"))
    leftovers = {kind: sum(len(r.get("new_leftovers", {}).get(kind, [])) for r in killed) for kind in LEFTOVER_KINDS}
    final_left = {kind: len((final or {}).get("leftovers", {}).get(kind, [])) for kind in LEFTOVER_KINDS}
    info = (final or {}).get("info") or (killed[-1].get("info") if killed else {})
    return {"kills": len(killed), "completed_before_kill": len(records) - len(killed),
            "modes": dict(collections.Counter(r["mode"] for r in killed)),
            "new_release_builds_started": sum(1 for r in killed if r["new_release"]),
            "phases": dict(sorted(by_phase.items())), "leftovers_after_gc": leftovers,
            "total_leftovers_after_gc": sum(leftovers.values()), "left_at_the_end": final_left,
            "info_at_the_end": info,
            "gc_failures": sum(1 for r in killed if r.get("gc", {}).get("rc") != 0)}


def print_summary(driver: str, summary: dict, out=sys.stdout) -> None:
    print(f"\n== {driver}: {summary['kills']} kills ({summary['completed_before_kill']} runs ended before their "
          f"kill, not counted; {summary['modes']}), {summary['total_leftovers_after_gc']} leftovers after gc",
          file=out)
    width = max([34, *(len(phase) + 2 for phase in summary["phases"])])
    print(f"   {'phase at the kill':<{width}}{'kills':>7}{'  with leftovers':>17}", file=out)
    for phase, row in summary["phases"].items():
        print(f"   {phase:<{width}}{row['kills']:>7}{row['with_new_leftovers']:>17}", file=out)
    print(f"   {'left after gc':<{width}}{'count':>7}{'  at the end':>17}", file=out)
    for kind in LEFTOVER_KINDS:
        print(f"   {kind:<{width}}{summary['leftovers_after_gc'][kind]:>7}{summary['left_at_the_end'][kind]:>17}",
              file=out)
    print(f"   informational (kept on purpose or expired by XAPI): {summary['info_at_the_end']}", file=out)
    if summary["gc_failures"]:
        print(f"   vjobs gc failed {summary['gc_failures']} times", file=out)


MAIN_PHASES = ("probe", "prepare", "attach", "boot", "run", "collect", "teardown")


def markdown_row(driver: str, summary: dict) -> str:
    """The driver's row of docs/reliability.md's table: kills by the phase vjobs was in, and what was left."""
    counts = collections.Counter()
    for phase, row in summary["phases"].items():
        main = phase.split("/")[0]
        counts[main if main in MAIN_PHASES else "other"] += row["kills"]
    cells = [driver, summary["kills"], *(counts[p] for p in (*MAIN_PHASES, "other")),
             f"**{summary['total_leftovers_after_gc']}**"]
    return "| " + " | ".join(str(cell) for cell in cells) + " |"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kills", type=int, default=10, help="kills per driver (runs that end first do not count)")
    parser.add_argument("--drivers", default=",".join(DRIVERS), help="comma-separated: qemu_user,kvm,xen")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--json", type=Path, help="write every kill's record and the summaries here")
    parser.add_argument("--root", type=Path, help="where the sites go, one folder per driver, removed at the end "
                                                  "unless --keep (default: a new folder in /tmp)")
    parser.add_argument("--keep", action="store_true", help="keep the sites afterwards")
    parser.add_argument("--source-cache", type=Path, default=os.environ.get("VJOBS_TEST_CACHE"),
                        help="a vjobs cache with the built images to reuse (default $VJOBS_TEST_CACHE)")
    parser.add_argument("--targeted-share", type=float, default=0.5,
                        help="share of kills aimed inside a randomly picked phase or step")
    parser.add_argument("--new-release-share", type=float, default=0.25,
                        help="share of runs whose release content is new (a new image is built)")
    parser.add_argument("--reprobe-share", type=float, default=0.1,
                        help="kvm: share of runs without a cached probe verdict (the deep probe boots a guest)")
    parser.add_argument("--debian-share", type=float, default=0.0,
                        help="share of runs on the debian12 base image (it must be in the source cache)")
    parser.add_argument("--max-release-mib", type=float, default=2.0,
                        help="new release content carries up to this much incompressible data")
    parser.add_argument("--settle-s", type=float, default=0.3, help="pause between the kill and gc")
    parser.add_argument("--plain", action="store_true",
                        help="run the `vjobs` command itself; phases are guessed from the elapsed time")
    parser.add_argument("--calibration-runs", type=int, default=2, choices=(1, 2),
                        help="2: a run with a new release, then a steady run for the typical duration; "
                             "1: the first only")
    parser.add_argument("--only-targets", default="",
                        help="comma-separated labels as the summary prints them (e.g. boot/vm_start): aim "
                             "targeted kills at these only")
    parser.add_argument("--fail-on-leftovers", action="store_true", help="exit 1 when anything was left")
    parser.add_argument("--quiet", action="store_true")
    parser.add_argument("--xen-site", type=Path, help="run xen against this site's XAPI (the site file "
                                                      "`python -m vjobs.testing.xen_node --site-out` writes: a "
                                                      "real Xen) instead of a XAPI stand-in of its own")
    args = parser.parse_args(argv)
    drivers = [d.strip() for d in args.drivers.split(",") if d.strip()]
    unknown = set(drivers) - set(DRIVERS)
    if unknown:
        parser.error(f"unknown drivers: {', '.join(sorted(unknown))}")
    try:  # a target that vjobs does not emit stops the campaign here, before anything runs
        options = Options(kills=args.kills, seed=args.seed, targeted_share=args.targeted_share,
                          new_release_share=args.new_release_share, reprobe_share=args.reprobe_share,
                          debian_share=args.debian_share, max_release_mib=args.max_release_mib,
                          settle_s=args.settle_s, plain=args.plain, verbose=not args.quiet,
                          calibration_runs=args.calibration_runs, xen_site=args.xen_site,
                          only_targets=tuple(t.strip() for t in args.only_targets.split(",") if t.strip()))
    except ValueError as exc:
        parser.error(f"--only-targets: {exc}")
    subreaper = become_subreaper()
    root = args.root or Path(tempfile.mkdtemp(prefix="vjobs-kill-campaign-"))
    root.mkdir(parents=True, exist_ok=True)
    tag = secrets.token_hex(3)
    report = {"method": {"command": sys.argv, "seed": args.seed, "tag": tag, "subreaper": subreaper,
                         "options": {k: str(v) if isinstance(v, Path) else v for k, v in vars(options).items()}, "host": socket.gethostname(),
                         "cpus": os.cpu_count(), "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")},
              "drivers": {}}
    failed = False

    def save() -> None:
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            temporary = args.json.with_suffix(".partial")
            temporary.write_text(json.dumps(report, indent=1))
            os.replace(temporary, args.json)

    try:
        for driver in drivers:
            campaign = DriverCampaign(driver, root, args.source_cache, options, tag)
            started = time.monotonic()
            try:
                campaign.setup()
                outcome = campaign.run(args.kills)
            except (RuntimeError, subprocess.SubprocessError, OSError) as exc:  # CampaignError among them
                report["drivers"][driver] = {"error": str(exc)}
                print(f"[{driver}] campaign failed: {exc}", file=sys.stderr)
                failed = True
                save()
                continue
            finally:
                campaign.close()
            outcome["seconds"] = round(time.monotonic() - started, 1)
            report["drivers"][driver] = outcome
            print_summary(driver, outcome["summary"])
            print(f"   docs/reliability.md row: {markdown_row(driver, outcome['summary'])}")
            failed |= bool(outcome["summary"]["total_leftovers_after_gc"] and args.fail_on_leftovers)
            save()
    finally:
        report["method"]["ended_at"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        save()
        if not args.keep:  # the sites this campaign made (a given --root itself stays)
            for driver in drivers:
                shutil.rmtree(root / driver, ignore_errors=True)
            if args.root is None:
                shutil.rmtree(root, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
