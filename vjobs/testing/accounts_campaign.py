#!/usr/bin/env python3
"""Accounts campaign (issue 18, "Under load"): ordinary accounts run many vjobs jobs at once on one node against
one host budget, with faults mixed in, and the campaign counts what is lost or left and the most VMs that ran at
once. Method and figures: docs/reliability.md, "Accounts sharing a node".

    .venv/bin/python benchmarks/accounts_campaign.py --jobs 1000 --accounts 4 --seed 1 --json /tmp/accounts.json
                                    (needs root: it makes the accounts; or python -m vjobs.testing.accounts_campaign)

Its short run is a test: tests/reliability/test_accounts_campaign.py.

Each account (vjobs.testing.accounts: an ordinary account with the login PATH and vjobs from pip in a virtualenv
of the system python3) gets a folder of its own with its site file (qemu_user; a cache it owns, seeded with the
built boot image of ``--source-cache``; the campaign's host budget, ``[host]`` and ``budget_dir``, the same for
every account) and runs ``--workers`` jobs at a time with its own ``vjobs run``. Each job is one of ``KINDS``,
drawn with their weights: a payload that succeeds (its output is checked), fails, overruns its wall time, is
hostile (floods its stdout, fills its output disk, forks without end, prints the agent's words, kills every
process in the guest), or whose ``vjobs`` gets SIGTERM (it must say ``cancelled``) or SIGKILL (then the account
runs ``vjobs gc``, as a pilot does before its next job) at a random moment.

A job is **lost** when it has no ``result.json`` (SIGKILL aside), a status its kind does not allow, or a
succeeded job misses its output. What is **left** is counted after every account and root have run
``vjobs gc``: QEMU processes of the accounts, folders in their work folders, budget tokens still locked, and
processes of the accounts (those that ran before the campaign began are reported apart, as
``running_before``: an earlier test's are that test's to stop). A sampler looks at the process table every
``SAMPLE_S`` and records the most QEMUs and vCPUs of the accounts at once; **over budget** counts the samples
above ``[host]``.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import queue
import random
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from vjobs.config.site import load_site
from vjobs.host import locks
from vjobs.host.admission import prepare_host_folder
from vjobs.testing import accounts as pool
from vjobs.testing.host_state import work_leftovers
from vjobs.testing.processes import Proc, process_table
from vjobs.testing.sites import example_job, vjobs_command, write_site

SAMPLE_S = 0.05
JOB_TIMEOUT_S = 300  # a vjobs run that takes longer is a finding (counted as lost), not a hang of the campaign
GC_TIMEOUT_S = 180
SLEEPER = "sleep 120"


@dataclass(frozen=True)
class Kind:
    weight: int
    command: str  # the payload's shell command
    statuses: frozenset[str]  # what result.json may say
    walltime_s: int = 60
    signal_to_vjobs: int | None = None  # sent to vjobs at a random moment in SIGNAL_WINDOW_S


SIGNAL_WINDOW_S = (0.3, 4.0)
HOSTILE = frozenset({"succeeded", "failed", "timeout", "vm_error"})
KINDS = {
    "succeeds": Kind(40, 'mkdir -p out && echo "$JOB" > out/r.txt', frozenset({"succeeded"})),
    "fails": Kind(10, "echo about to fail >&2; exit 3", frozenset({"failed"})),
    "walltime": Kind(8, SLEEPER, frozenset({"timeout"}), walltime_s=3),
    "sigterm": Kind(10, SLEEPER, frozenset({"cancelled"}), signal_to_vjobs=signal.SIGTERM),
    "sigkill": Kind(10, SLEEPER, frozenset(), signal_to_vjobs=signal.SIGKILL),
    "floods_stdout": Kind(4, "head -c 20000000 /dev/urandom", HOSTILE, walltime_s=20),
    "fills_output": Kind(4, "mkdir -p out; dd if=/dev/zero of=out/big bs=1M 2>/dev/null; exit 0",
                         HOSTILE | {"setup_error"}, walltime_s=20),
    "fork_bomb": Kind(3, "b() { b | b & }; b", HOSTILE, walltime_s=5),
    "lies": Kind(4, "echo 'vjobs-agent: up'; echo 'vjobs-agent: running the payload'; printf 'VJOBS-IO-DISK\\0'; "
                    "exit 0", HOSTILE),
    "kills_guest": Kind(3, "kill -9 -1; sleep 5", HOSTILE, walltime_s=10),
}


@dataclass(frozen=True)
class Plan:
    number: int
    account: int
    kind: str
    signal_after_s: float


def plan_jobs(count: int, accounts: int, seed: int) -> list[Plan]:
    draw = random.Random(seed)
    names = list(KINDS)
    weights = [KINDS[name].weight for name in names]
    return [Plan(number=number, account=number % accounts, kind=draw.choices(names, weights)[0],
                 signal_after_s=round(draw.uniform(*SIGNAL_WINDOW_S), 2)) for number in range(count)]


class BudgetWatch(threading.Thread):
    """Samples the QEMU processes of ``uids``: the most at once, their vCPUs (``-smp``), the samples above the
    budget."""

    def __init__(self, uids: set[int], vcpus: int):
        super().__init__(daemon=True)
        self.uids, self.vcpus = uids, vcpus
        self.most_vms = self.most_vcpus = self.samples = self.over_budget = 0
        self.seen_over: list[list[str]] = []  # the first few samples above the budget, for the report
        self.stopping = threading.Event()

    def run(self) -> None:
        while not self.stopping.is_set():
            vms = [proc for proc in process_table().values() if proc.uid in self.uids and _runs_a_guest(proc)]
            vcpus = sum(_smp(proc.argv) for proc in vms)
            self.samples += 1
            self.most_vms, self.most_vcpus = max(self.most_vms, len(vms)), max(self.most_vcpus, vcpus)
            if vcpus > self.vcpus:
                self.over_budget += 1
                if len(self.seen_over) < 5:
                    self.seen_over.append([proc.describe() for proc in vms])
            time.sleep(SAMPLE_S)


def _runs_a_guest(proc) -> bool:
    """A QEMU that runs a guest, not one asked a question (``-version``, ``-netdev help``) by a probe."""
    return proc.is_qemu and "-smp" in proc.argv


def _smp(argv: list[str]) -> int:
    for flag, value in zip(argv, argv[1:]):
        if flag == "-smp":
            return int(re.match(r"\d+", value)[0])
    return 1


class Campaign:
    def __init__(self, accounts: list[pool.Account], root: Path, source_cache: Path | None, budget_vcpus: int,
                 budget_memory_mib: int, workers: int):
        self.accounts, self.root, self.workers = accounts, root, workers
        self.budget_vcpus, self.budget_memory_mib = budget_vcpus, budget_memory_mib
        self.budget_dir = root / "budget"
        self.sites = [self._prepare(account, source_cache) for account in accounts]
        prepare_host_folder(load_site(self.sites[0]))  # as root, as scripts/install.sh makes the node's
        self.records: list[dict] = []
        self.lock = threading.Lock()
        self.running_before: dict[int, Proc] = {}  # the accounts' processes before the first job: not its leftovers

    def _folder(self, account: pool.Account) -> Path:
        return self.root / account.name

    def _prepare(self, account: pool.Account, source_cache: Path | None) -> Path:
        folder = self._folder(account)
        shutil.rmtree(folder, ignore_errors=True)
        for name in ("jobs", "out"):
            (folder / name).mkdir(parents=True, exist_ok=True)
        if source_cache is not None:  # copies: a hard link given to the account would give it root's file
            pool.give_built_images(account, source_cache, folder / "cache", families=("default",))
        site = write_site(folder / "site.toml", {
            "driver": "qemu_user", "cache_dir": str(folder / "cache"),
            "host": {"vcpus": self.budget_vcpus, "memory_mib": self.budget_memory_mib, "admission_wait_s": 900,
                     "budget_dir": str(self.budget_dir)}})
        account.own(folder)
        folder.chmod(0o700)
        return site

    def run(self, plans: list[Plan]) -> dict:
        self.root.chmod(0o755)
        per_account: dict[int, queue.Queue] = collections.defaultdict(queue.Queue)
        for plan in plans:
            per_account[plan.account].put(plan)
        self.running_before = self._accounts_processes()
        watch = BudgetWatch({account.uid for account in self.accounts}, self.budget_vcpus)
        watch.start()
        started = time.monotonic()
        threads = [threading.Thread(target=self._worker, args=(per_account[index],))
                   for index in range(len(self.accounts)) for _ in range(self.workers)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        elapsed = time.monotonic() - started
        gc = self._gc_everyone()
        watch.stopping.set()
        watch.join()
        return {"jobs": len(plans), "elapsed_s": round(elapsed, 1), "budget_vcpus": self.budget_vcpus,
                "most_vms_at_once": watch.most_vms, "most_vcpus_at_once": watch.most_vcpus,
                "samples": watch.samples, "samples_over_budget": watch.over_budget, "seen_over": watch.seen_over,
                "by_kind": _by_kind(self.records),
                "signalled_before_vjobs_started": sum(bool(r.get("before_vjobs_started")) for r in self.records),
                "lost": [r for r in self.records if r["lost"]], "records": sorted(self.records, key=lambda r: r["job"]),
                "gc_failures": gc, "left": self.leftovers(),
                "running_before": [_described(proc) for proc in self.running_before.values()]}

    def _worker(self, plans: queue.Queue) -> None:
        while True:
            try:
                plan = plans.get_nowait()
            except queue.Empty:
                return
            record = self._run_job(plan)
            with self.lock:
                self.records.append(record)

    def _run_job(self, plan: Plan) -> dict:
        account, site, kind = self.accounts[plan.account], self.sites[plan.account], KINDS[plan.kind]
        folder = self._folder(account)
        name = f"j{plan.number:05d}-{plan.kind}"
        job = example_job()
        job.update({"id": name, "command": ["sh", "-c", kind.command], "env": {"JOB": name},
                    "walltime_s": kind.walltime_s, "outputs": ["out"]})
        job["resources"].update({"vcpus": 1, "memory_mib": 256, "output_mib": 8})
        job_file, outdir = folder / "jobs" / f"{name}.json", folder / "out" / name
        job_file.write_text(json.dumps(job))
        os.chown(job_file, account.uid, account.gid)
        begun = time.monotonic()
        process = account.popen([account.vjobs, "run", "--site", str(site), "--outdir", str(outdir), str(job_file)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        signalled = kind.signal_to_vjobs is not None and self._signal_later(process, plan, kind)
        try:
            _, stderr = process.communicate(timeout=JOB_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            process.kill()
            _, stderr = process.communicate()
        record = {"job": name, "account": account.name, "kind": plan.kind, "exit": process.returncode,
                  "seconds": round(time.monotonic() - begun, 2), "signalled": signalled}
        if kind.signal_to_vjobs == signal.SIGKILL:
            record["gc_rc"] = account.run([account.vjobs, "gc", "--site", str(site)], timeout=GC_TIMEOUT_S).returncode
        record.update(self._judge(plan, kind, outdir, stderr.decode(errors="replace"), process.returncode))
        return record

    @staticmethod
    def _signal_later(process: subprocess.Popen, plan: Plan, kind: Kind) -> bool:
        try:
            process.wait(timeout=plan.signal_after_s)
            return False  # over before the signal: judged as it ended
        except subprocess.TimeoutExpired:
            process.send_signal(kind.signal_to_vjobs)  # vjobs itself: setpriv and env exec it
            return True

    def _judge(self, plan: Plan, kind: Kind, outdir: Path, stderr: str, exit_code: int) -> dict:
        try:
            result = json.loads((outdir / "result.json").read_text())
        except (OSError, ValueError):
            if kind.signal_to_vjobs == signal.SIGKILL:
                return {"status": None, "lost": False}
            if kind.signal_to_vjobs and exit_code == -kind.signal_to_vjobs and not stderr and not outdir.exists():
                # Before Python ran vjobs' first line (vjobs/container/signals.py): no VM, no file yet. Counted
                # apart, as what could not be made to hold, not as lost.
                return {"status": None, "lost": False, "before_vjobs_started": True}
            return {"status": None, "lost": "no result.json", "stderr": stderr[-1500:]}
        status = result.get("status")
        allowed = kind.statuses or {status}  # SIGKILL: whatever it wrote before it died
        if kind.signal_to_vjobs and status == "succeeded":
            allowed = allowed | {"succeeded"}  # the payload may end before the signal comes: sleep 120 cannot
        lost: str | bool = False
        if status not in allowed:
            lost = f"status {status} ({(result.get('error') or {}).get('code')}), expected {sorted(allowed)}"
        elif plan.kind == "succeeds" and _read(outdir / "outputs/out/r.txt") != f"{result['job_id']}\n":
            lost = "the output is missing or wrong"
        record = {"status": status, "code": (result.get("error") or {}).get("code"), "lost": lost}
        if lost:
            record["error"] = (result.get("error") or {}).get("message", "")[:800]
        return record

    def _gc_everyone(self) -> list[str]:
        """Every account's ``vjobs gc`` with its site, then root's with the node's own (root's gc looks in every
        account's work folder; an account's site, whose cache root does not own, is not root's to use)."""
        failures = []
        for account, site in zip(self.accounts, self.sites):
            done = account.run([account.vjobs, "gc", "--site", str(site)], timeout=GC_TIMEOUT_S)
            if done.returncode:
                failures.append(f"{account.name}: exit {done.returncode}: {done.stderr[-500:]}")
        done = subprocess.run([*vjobs_command(), "gc"], capture_output=True, text=True, timeout=GC_TIMEOUT_S)
        if done.returncode:
            failures.append(f"root: exit {done.returncode}: {done.stderr[-500:]}")
        return failures

    def _accounts_processes(self) -> dict[int, Proc]:
        """The accounts' processes now, by PID. An ended process the campaign (a subreaper) has not reaped yet
        is gone: a template RAM keeper that an account's gc stopped (vjobs/drivers/qemu_user/shared_ram.py),
        say."""
        uids = {account.uid for account in self.accounts}
        return {p.pid: p for p in process_table().values() if p.uid in uids and p.state != "Z"}

    def leftovers(self) -> dict[str, list[str]]:
        """What the campaign's jobs left: the accounts' processes that were not running before it began (one
        of an earlier test's is that test's to stop), job folders and budget tokens still held."""
        left_running = [p for pid, p in self._accounts_processes().items() if pid not in self.running_before]
        left = {"qemu": [_described(p) for p in left_running if p.is_qemu],
                "processes": [_described(p) for p in left_running if not p.is_qemu],
                "job_folders": [], "tokens_held": self.tokens_held()}
        for account in self.accounts:
            left["job_folders"] += work_leftovers(account.work_dir)
        return left

    def tokens_held(self) -> list[str]:
        """The budget's token files someone still holds a lock on (after every job ended: none may be)."""
        held = []
        for token in sorted(self.budget_dir.glob("*")) if self.budget_dir.is_dir() else ():
            with locks.try_exclusive(token, create=False) as free:
                if token.is_file() and not free:
                    held.append(str(token))
        return held


def _described(proc: Proc) -> str:
    return f"{proc.pid} {' '.join(proc.argv[:3])}"


def _read(path: Path) -> str | None:
    try:
        return path.read_text()
    except OSError:
        return None


def _by_kind(records: list[dict]) -> dict[str, dict[str, int]]:
    table: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for record in records:
        code = record.get("code")
        table[record["kind"]][f"{record['status']}/{code}" if code else str(record["status"])] += 1
    return {kind: dict(counts) for kind, counts in sorted(table.items())}


def summary_line(report: dict) -> str:
    left = sum(len(items) for items in report["left"].values())
    return (f"{report['jobs']} jobs in {report['elapsed_s']} s: lost {len(report['lost'])}, left {left}, "
            f"signalled before vjobs started {report['signalled_before_vjobs_started']}, "
            f"gc failures {len(report['gc_failures'])}, most VMs at once {report['most_vms_at_once']} "
            f"({report['most_vcpus_at_once']} vCPUs, budget {report['budget_vcpus']}), "
            f"samples over budget {report['samples_over_budget']} of {report['samples']}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=1000)
    parser.add_argument("--accounts", type=int, default=4)
    parser.add_argument("--workers", type=int, default=3, help="jobs each account runs at once")
    parser.add_argument("--budget-vcpus", type=int, default=2)
    parser.add_argument("--budget-memory-mib", type=int, default=2048)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--root", type=Path, default=Path("/var/tmp/vjobs-accounts-campaign"))
    parser.add_argument("--source-cache", type=Path, default=os.environ.get("VJOBS_TEST_CACHE"))
    parser.add_argument("--use-accounts", help="comma-separated existing accounts (default: make --accounts)")
    parser.add_argument("--json", type=Path)
    options = parser.parse_args(argv)
    if os.geteuid() != 0:
        parser.error("the campaign makes accounts and watches their processes: run it as root")
    venv = pool.account_venv(pool.checkout())
    made = [] if options.use_accounts else pool.create_accounts(options.accounts, prefix="vjtcamp")
    names = options.use_accounts.split(",") if options.use_accounts else [a.name for a in made]
    try:
        accounts = pool.with_venv([pool.existing_account(name) for name in names], venv)
        shutil.rmtree(options.root, ignore_errors=True)
        options.root.mkdir(parents=True, mode=0o755)
        campaign = Campaign(accounts, options.root, options.source_cache, options.budget_vcpus,
                            options.budget_memory_mib, options.workers)
        report = campaign.run(plan_jobs(options.jobs, len(accounts), options.seed))
        report.update({"accounts": names, "seed": options.seed, "workers_per_account": options.workers})
    finally:
        pool.remove_accounts(made)
    print(summary_line(report))
    if options.json:
        options.json.write_text(json.dumps(report, indent=1))
    left = sum(len(items) for items in report["left"].values())
    return 0 if not report["lost"] and not left and not report["samples_over_budget"] and not report["gc_failures"] \
        else 1


if __name__ == "__main__":
    sys.exit(main())
