"""A real one-node Slurm cluster (Slurm 22.05: ``slurmctld`` and ``slurmd``) for tests and benchmarks.

Slurm listens on every address, so both daemons, every client call and every batch job (a child of slurmd) run
inside a ``LoopbackNetns``; its configuration, state, spool, logs and PID files all lie under one folder.

    with LoopbackNetns() as netns, SlurmCluster(netns, tmp_path / "slurm", cpus=2) as slurm:
        job_id = slurm.sbatch(script, "--array=1-4", "-c", "1", "--mem=500")
        slurm.wait(job_id, timeout=120)
        slurm.jobcomp()            # one dict per finished job (array task), from jobcomp/filetxt

No munge (auth/none, cred/none), no accounting database: a finished job is seen by its leaving ``squeue`` and
in the job-completion file. ``select/cons_tres`` with ``CR_CPU_Memory`` counts ``-c`` and ``--mem`` against the
node's ``cpus`` and ``memory_mib``; neither is enforced on the processes (no cgroup plugins).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

from vjobs.testing.servers.processes import die_with_parent, end_processes

# CR_CPU_Memory: --mem counts too, and DefMemPerCPU keeps a task without --mem from taking the whole node's memory.
# SchedulerParameters: the next array task starts about 1 s after one ends, not 2 s. SlurmdParameters=config_overrides:
# the node's CPUs and memory are these, whatever the machine has (no draining for "low RealMemory").
CONFIG = """\
ClusterName=vjobs
SlurmctldHost=localhost(127.0.0.1)
SlurmctldPort=6817
SlurmdPort=6818
AuthType=auth/none
CredType=cred/none
SlurmUser=root
SlurmdUser=root
MpiDefault=none
MailProg=/bin/true
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU_Memory
SlurmdParameters=config_overrides
ReturnToService=2
SchedulerParameters=sched_min_interval=0,batch_sched_delay=0
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
SlurmctldLogFile={root}/slurmctld.log
SlurmdLogFile={root}/slurmd.log
JobCompType=jobcomp/filetxt
JobCompLoc={root}/jobcomp.txt
NodeName={node} NodeHostname={hostname} NodeAddr=127.0.0.1 CPUs={cpus} RealMemory={memory_mib} State=UNKNOWN
DefMemPerCPU={mem_per_cpu}
PartitionName={partition} Nodes={node} Default=YES MaxTime=INFINITE State=UP
"""


class SlurmError(RuntimeError):
    pass


def why_not_available() -> str | None:
    """None when a Slurm cluster can be started here, else why not."""
    missing = [tool for tool in ("slurmctld", "slurmd", "sbatch", "squeue", "sinfo", "nsenter", "ip")
               if not shutil.which(tool)]
    if missing:
        return f"not installed: {', '.join(missing)} (Debian: apt-get install slurm-wlm)"
    if os.geteuid() != 0:
        return "slurmctld and slurmd in a private network namespace need root"
    return None


class SlurmCluster:
    """One node (``node``, with ``cpus`` CPUs and ``memory_mib`` of memory) in one partition, both daemons run in
    the foreground (``-D``) as children of this process inside ``netns``: ``stop()`` kills them by PID and reaps
    them. Safe to stop twice."""

    node, partition = "vjobs1", "batch"

    def __init__(self, netns, root: Path, *, cpus: int = 2, memory_mib: int = 4096, timeout: float = 30.0):
        self.netns, self.root = netns, Path(root)
        self.cpus, self.memory_mib, self.timeout = cpus, memory_mib, timeout
        self.conf = self.root / "slurm.conf"
        self.processes: dict[str, subprocess.Popen] = {}
        self.submitted: list[str] = []
        self.startup_seconds = 0.0

    def __enter__(self) -> SlurmCluster:
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()

    @property
    def env(self) -> dict[str, str]:
        """The environment for Slurm clients (and, through sbatch, for the batch jobs they submit)."""
        return {**os.environ, "SLURM_CONF": str(self.conf)}

    def command(self, argv: list[str]) -> list[str]:
        """``argv`` run inside the namespace; run it with ``env``."""
        return self.netns.command(argv)

    def run(self, argv: list[str], *, timeout: float = 30, check: bool = True, env: dict[str, str] | None = None,
            cwd: Path | None = None) -> subprocess.CompletedProcess:
        """Runs a Slurm client (or a script that calls them) in the namespace under ``timeout``: a client of a
        daemon that is still starting can hang for minutes. ``env`` adds to ``self.env``; ``cwd`` is where it
        runs, and where sbatch's jobs start."""
        done = subprocess.run(["timeout", str(timeout), *self.command(argv)], env={**self.env, **(env or {})},
                              stdin=subprocess.DEVNULL, capture_output=True, text=True, cwd=cwd)
        if check and done.returncode != 0:
            why = "timed out" if done.returncode == 124 else f"exit {done.returncode}"
            raise SlurmError(f"{' '.join(argv)}: {why}: {done.stderr.strip() or done.stdout.strip()}")
        return done

    def start(self) -> SlurmCluster:
        begun = time.monotonic()
        try:
            for folder in ("state", "spool"):
                (self.root / folder).mkdir(parents=True, exist_ok=True)
            self.conf.write_text(CONFIG.format(root=self.root, node=self.node, partition=self.partition,
                                               hostname=socket.gethostname(), cpus=self.cpus,
                                               memory_mib=self.memory_mib, mem_per_cpu=self.memory_mib // self.cpus))
            self._launch("slurmctld", ["slurmctld", "-D", "-c"])
            self._launch("slurmd", ["slurmd", "-D", "-N", self.node])
            self._wait_idle(begun + self.timeout)
        except BaseException:
            self.stop()
            raise
        self.startup_seconds = time.monotonic() - begun
        return self

    def _launch(self, name: str, argv: list[str]) -> None:
        with open(self.root / f"{name}.out", "ab") as out:
            self.processes[name] = subprocess.Popen(self.command(argv), env=self.env, stdin=subprocess.DEVNULL,
                                                    stdout=out, stderr=out, cwd=self.root,
                                                    preexec_fn=die_with_parent)

    def _wait_idle(self, deadline: float) -> None:
        state = ""
        while True:
            exited = {name: p.returncode for name, p in self.processes.items() if p.poll() is not None}
            if exited:
                raise SlurmError(f"Slurm daemons exited while starting: {exited}\n{self.log_tails()}")
            done = self.run(["sinfo", "-h", "-N", "-n", self.node, "-o", "%T"], timeout=5, check=False)
            state = done.stdout.strip() or done.stderr.strip()
            if state == "idle":
                return
            if time.monotonic() > deadline:
                raise SlurmError(f"node {self.node} not idle in {self.timeout} s ({state})\n{self.log_tails()}")
            time.sleep(0.2)

    def sbatch(self, script: Path | str, *options: str, env: dict[str, str] | None = None) -> str:
        """Submits ``script`` with sbatch ``options``; returns the job id (of the array, for an array)."""
        done = self.run(["sbatch", "--parsable", *options, str(script)], env=env)
        return self.submitted_job(done.stdout)

    def submitted_job(self, parsable: str) -> str:
        """Records the job id in ``sbatch --parsable``'s output (``ID`` or ``ID;CLUSTER``) and returns it; for
        jobs submitted by a script run through ``run``, so that ``stop()`` cancels them if they are still there."""
        job_id = parsable.strip().splitlines()[-1].split(";")[0]
        if not job_id.isdigit():
            raise SlurmError(f"sbatch printed no job id: {parsable!r}")
        self.submitted.append(job_id)
        return job_id

    def queued(self, job_id: str) -> list[str]:
        """``TASK_ID STATE`` lines of the job's tasks still pending, running or completing."""
        done = self.run(["squeue", "-h", "-j", job_id, "-o", "%i %T"], timeout=10, check=False)
        if done.returncode != 0 and "Invalid job id" not in done.stderr:  # purged: long gone
            raise SlurmError(f"squeue -j {job_id}: exit {done.returncode}: {done.stderr.strip()}")
        return done.stdout.splitlines()

    def wait(self, job_id: str, timeout: float = 600) -> None:
        """Until no task of the job is in ``squeue`` any more."""
        deadline = time.monotonic() + timeout
        while left := self.queued(job_id):
            if time.monotonic() > deadline:
                raise TimeoutError(f"Slurm job {job_id} not done in {timeout} s: {left}")
            time.sleep(0.5)

    def jobcomp(self) -> list[dict[str, str]]:
        """The finished jobs (one per array task), as ``jobcomp/filetxt`` wrote them: ``JobId``, ``JobState``,
        ``ArrayJobId``, ``ArrayTaskId``, ``ExitCode``, ``Tres``, ``StartTime``, ... (values without spaces)."""
        path = self.root / "jobcomp.txt"
        lines = path.read_text().splitlines() if path.exists() else []
        return [dict(field.split("=", 1) for field in line.split() if "=" in field) for line in lines]

    def log_tails(self, lines: int = 20) -> str:
        tails = []
        for log in sorted(self.root.glob("*.log")) + sorted(self.root.glob("*.out")):
            tail = log.read_text(errors="replace").splitlines()[-lines:]
            tails.append(f"--- {log.name} (last {len(tail)} lines)\n" + "\n".join(tail))
        return "\n".join(tails)

    def stop(self) -> None:
        """Cancels the jobs this submitted that are still queued (by id), stops both daemons (SIGTERM, SIGKILL
        after 10 s) and reaps them, then kills any ``slurmstepd`` left in the namespace (they are daemonised by
        slurmd, so no child of ours). Safe to repeat."""
        if self.processes.get("slurmctld") and self.processes["slurmctld"].poll() is None:
            live = [job for job in self.submitted if self.queued(job)]
            if live:
                self.run(["scancel", *live], timeout=10, check=False)
                deadline = time.monotonic() + 15
                while any(self.queued(job) for job in live) and time.monotonic() < deadline:
                    time.sleep(0.5)
        end_processes(self.processes[name] for name in ("slurmd", "slurmctld") if name in self.processes)
        self.processes.clear()
        for pid in self._stepds():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def _stepds(self) -> list[int]:
        """PIDs of the ``slurmstepd`` processes in this cluster's network namespace."""
        try:
            ours = os.stat(self.netns.path).st_ino
        except OSError:
            return []
        found = []
        for proc in Path("/proc").iterdir():
            try:
                if (proc.name.isdigit() and (proc / "comm").read_text().strip() == "slurmstepd"
                        and os.stat(proc / "ns" / "net").st_ino == ours):
                    found.append(int(proc.name))
            except OSError:
                continue  # it ended while we looked
        return found
