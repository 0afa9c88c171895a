"""vjobs jobs as a Slurm job array, submitted with examples/slurm/ to a real one-node Slurm with 2 CPUs.

Six VM jobs of one CPU each: all succeed, Slurm runs two at a time (never more, and more than one), and each
job's output is staged out to a real XRootD server. Slurm, its batch jobs (so vjobs and QEMU) and XRootD all run
in one loopback-only network namespace. And scancel reaches vjobs, which stops the VM and says so. And an
ordinary account submits its jobs as a grid site's pool account does: Slurm runs them as that account, with
its own vjobs. And a task of the preemptible array (examples/slurm/preemptible.sbatch), requeued while its VM
runs, is saved on Slurm's SIGTERM and resumed when Slurm starts it again.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest

from vjobs.testing.processes import qemu_processes

pytestmark = [pytest.mark.slurm, pytest.mark.vm, pytest.mark.timeout(600)]

TASKS = 6

# Stands in for vjobs (the sbatch script runs $VJOBS): records when each task's vjobs starts and ends.
TIMED = """#!/bin/sh
echo "$SLURM_ARRAY_TASK_ID start $(date +%s.%N)" >> {times}
{vjobs} "$@"
status=$?
echo "$SLURM_ARRAY_TASK_ID end $(date +%s.%N)" >> {times}
exit $status
"""


def write_job(folder: Path, task: str, command: str, **fields) -> Path:
    job = {"id": task, "command": ["sh", "-c", command], "env": {"TASK": task}, "walltime_s": 300,
           "resources": {"vcpus": 1, "memory_mib": 256, "scratch_mib": 16, "output_mib": 4}, **fields}
    folder.mkdir(exist_ok=True)
    path = folder / f"{task}.json"
    path.write_text(json.dumps(job))
    return path


@pytest.fixture
def vjobs_program(repo) -> Path:
    """The vjobs command the batch jobs run: the repository's own installation."""
    return repo / ".venv/bin/vjobs"


@pytest.fixture
def submit(slurm_cluster, tmp_path, cache_dir, repo, vjobs_program):
    """``submit(jobs, vjobs=...)``: the job files as one array with examples/slurm/submit-array.sh (results in
    tmp_path/out/TASK), run by ``vjobs`` (the repository's vjobs unless given); returns the array's job id."""
    def submit(jobs: list[Path], vjobs: Path = vjobs_program) -> str:
        site = tmp_path / "site.toml"
        site.write_text(f'driver = "qemu_user"\ncache_dir = "{cache_dir}"\nwork_dir = "{tmp_path / "work"}"\n')
        submitted = slurm_cluster.run(["sh", str(repo / "examples/slurm/submit-array.sh"), str(tmp_path / "out"),
                                       *map(str, jobs)], env={"VJOBS": str(vjobs), "VJOBS_SITE": str(site)})
        return slurm_cluster.submitted_job(submitted.stdout)
    return submit


def task_logs(out: Path) -> str:
    return "\n".join(f"--- {log.name}\n{log.read_text(errors='replace')[-1500:]}"
                     for log in sorted(out.glob("slurm-*.out")))


def max_overlap(lines: list[str]) -> int:
    """The most tasks running at once, from ``TASK start|end SECONDS`` lines (an end before a start at the same
    instant)."""
    events = sorted((float(seconds), 1 if what == "start" else -1)
                    for _task, what, seconds in (line.split() for line in lines))
    running = peak = 0
    for _, step in events:
        running += step
        peak = max(peak, running)
    return peak


def test_a_job_array_runs_two_vms_at_a_time_and_stages_out(slurm_cluster, xrootd, built_image, submit,
                                                           vjobs_program, tmp_path):
    times, timed = tmp_path / "times.txt", tmp_path / "vjobs-timed"
    timed.write_text(TIMED.format(times=times, vjobs=vjobs_program))
    timed.chmod(0o755)
    tasks = [f"task{n}" for n in range(1, TASKS + 1)]
    stage_out = {task: {"stage_out": {"destination": xrootd.server.url_in_netns(f"/slurm/{task}")}} for task in tasks}
    jobs = [write_job(tmp_path / "jobs", task, 'sleep 2 && mkdir -p out && echo "output of $TASK" > out/task.txt',
                      outputs=["out"], **stage_out[task]) for task in tasks]

    array = submit(jobs, vjobs=timed)
    slurm_cluster.wait(array, timeout=480)

    out = tmp_path / "out"
    logs = task_logs(out)
    for number, task in enumerate(tasks, start=1):
        result = json.loads((out / str(number) / "result.json").read_text())
        assert (result["job_id"], result["status"]) == (task, "succeeded"), (result.get("error"), logs)
        assert (out / str(number) / "outputs/out/task.txt").read_text() == f"output of {task}\n"
        assert [(u["path"], u["verified"]) for u in result["uploads"]] == [("out/task.txt", True)], result
        assert (xrootd.data / "slurm" / task / "out/task.txt").read_text() == f"output of {task}\n"
    finished = {row["ArrayTaskId"]: row for row in slurm_cluster.jobcomp() if row.get("ArrayJobId") == array}
    assert sorted(finished, key=int) == [str(n) for n in range(1, TASKS + 1)], logs
    assert {(row["JobState"], row["ExitCode"]) for row in finished.values()} == {("COMPLETED", "0:0")}, logs
    assert all(row["Tres"].startswith("cpu=1,mem=1G") for row in finished.values()), finished

    lines = times.read_text().splitlines()
    assert len(lines) == 2 * TASKS, lines
    assert max_overlap(lines) == 2, f"VMs at once: {max_overlap(lines)} (the node has 2 CPUs): {lines}"


def test_scancel_stops_the_vm_and_vjobs_says_cancelled(slurm_cluster, built_image, submit, tmp_path):
    job = write_job(tmp_path / "jobs", "long", "sleep 300")
    array = submit([job])
    deadline = time.monotonic() + 120
    while not any(line.endswith("RUNNING") for line in slurm_cluster.queued(array)):
        assert time.monotonic() < deadline, slurm_cluster.queued(array)
        time.sleep(0.5)
    time.sleep(5)  # into the boot or the payload: either way vjobs must stop the VM and say so

    slurm_cluster.run(["scancel", array])
    slurm_cluster.wait(array, timeout=60)

    result = json.loads((tmp_path / "out/1/result.json").read_text())
    assert (result["status"], result["error"]["code"]) == ("cancelled", "cancelled"), task_logs(tmp_path / "out")
    assert qemu_processes(str(tmp_path)) == []
    assert [p.name for p in (tmp_path / "work").iterdir() if not p.name.startswith("admission")] == []


def test_a_vm_bigger_than_the_task_was_granted_is_refused_before_it_boots(slurm_cluster, built_image, submit,
                                                                          tmp_path):
    """The sbatch script asks for one CPU; a job that wants two vCPUs is refused, saying what to ask for."""
    job = write_job(tmp_path / "jobs", "wide", "true", resources={"vcpus": 2, "memory_mib": 256})
    array = submit([job])
    slurm_cluster.wait(array, timeout=120)
    result = json.loads((tmp_path / "out/1/result.json").read_text())
    assert (result["status"], result["error"]["code"]) == ("setup_error", "exceeds_allocation"), result["error"]
    assert f"Slurm job {array}_1 (1 CPU" in result["error"]["message"] and "sbatch -c 2" in result["error"]["message"]
    assert "boot" not in result["timings"]


def test_an_ordinary_account_submits_an_array_and_slurm_runs_its_jobs_as_that_account(slurm_cluster, pool_accounts,
                                                                                      account_cache, repo):
    """A pool account submits two jobs with its copy of examples/slurm/submit-array.sh, its own vjobs (VJOBS) and
    a site in its home; slurmd starts each batch job with the submitter's uid (auth/none carries the uid of the
    client that called sbatch). The jobs succeed, and every file they leave is the account's."""
    account = pool_accounts[1]
    cache = account_cache(account)
    folder = account.home / "slurm"
    shutil.copytree(repo / "examples/slurm", folder / "scripts")
    site = folder / "site.toml"
    site.write_text(f'driver = "qemu_user"\ncache_dir = "{cache}"\nwork_dir = "{folder / "work"}"\n')
    tasks = ["acct1", "acct2"]
    jobs = [write_job(folder / "jobs", task, 'mkdir -p out && echo "output of $TASK, uid $(id -u)" > out/task.txt',
                      outputs=["out"]) for task in tasks]
    account.own(folder)

    environment = {"SLURM_CONF": str(slurm_cluster.conf), "VJOBS": account.vjobs, "VJOBS_SITE": str(site)}
    submit = ["sh", str(folder / "scripts/submit-array.sh"), str(folder / "out"), *map(str, jobs)]
    submitted = slurm_cluster.run(account.command(submit, environment), cwd=folder)
    array = slurm_cluster.submitted_job(submitted.stdout)
    slurm_cluster.wait(array, timeout=300)

    out = folder / "out"
    logs = task_logs(out)
    for number, task in enumerate(tasks, start=1):
        result = json.loads((out / str(number) / "result.json").read_text())
        assert (result["job_id"], result["status"]) == (task, "succeeded"), (result.get("error"), logs)
        # uid 0: the payload is root in its guest, whoever ran the VM
        assert (out / str(number) / "outputs/out/task.txt").read_text() == f"output of {task}, uid 0\n"
    finished = [row for row in slurm_cluster.jobcomp() if row.get("ArrayJobId") == array]
    assert {(row["UserId"], row["JobState"]) for row in finished} == {(f"{account.name}({account.uid})",
                                                                       "COMPLETED")}, (finished, logs)
    strangers = sorted(str(path) for path in [out, *out.rglob("*"), folder / "work", *(folder / "work").rglob("*")]
                       if path.stat().st_uid != account.uid)
    assert strangers == [], f"files of the account's jobs that are not the account's: {strangers}"
    assert [p.name for p in (folder / "work").iterdir() if not p.name.startswith("admission")] == []


COUNT_TO = 40
COUNT = (f"i=0; while [ $i -lt {COUNT_TO} ]; do i=$((i+1)); echo line $i; echo $i >> count.txt; sleep 0.5; "
         "done")


def stdout_lines(outdir: Path) -> int:
    try:
        return len((outdir / "stdout").read_text().splitlines())
    except FileNotFoundError:
        return 0


def test_a_requeued_task_of_the_preemptible_array_resumes_its_checkpoint(slurm_cluster, built_image, cache_dir, repo,
                                                                        vjobs_program, tmp_path):
    """``scontrol requeue`` of a running task: Slurm sends SIGTERM to every process of the task, QEMU's too,
    which ignores it; vjobs saves the VM on that SIGTERM (no periodic checkpoints here) and ends checkpointed,
    and the task, started again by Slurm, resumes it. The payload's count goes on from there, memory and disks
    alike: its file and its stdout hold every number once, as an uninterrupted run writes them."""
    site = tmp_path / "site.toml"
    site.write_text(f'driver = "qemu_user"\ncache_dir = "{cache_dir}"\nwork_dir = "{tmp_path / "work"}"\n'
                    "checkpoint_interval_s = 0\n")
    job = write_job(tmp_path / "jobs", "counter", COUNT, outputs=["count.txt"])
    jobs_list, out, checkpoints = tmp_path / "jobs.txt", tmp_path / "out", tmp_path / "checkpoints"
    jobs_list.write_text(f"{job}\n")
    out.mkdir()  # for Slurm's log
    submitted = slurm_cluster.run(["sbatch", "--parsable", "--array=1", f"--output={out}/slurm-%A_%a.out",
                                   str(repo / "examples/slurm/preemptible.sbatch"), str(jobs_list), str(out),
                                   str(checkpoints)], env={"VJOBS": str(vjobs_program), "VJOBS_SITE": str(site)})
    array = slurm_cluster.submitted_job(submitted.stdout)
    task = f"{array}_1"

    deadline = time.monotonic() + 240
    while stdout_lines(out / "1") < 6:  # counting
        assert time.monotonic() < deadline and slurm_cluster.queued(array), task_logs(out)
        time.sleep(0.5)
    slurm_cluster.run(["scontrol", "requeue", task])
    # Slurm holds a requeued job back (its BeginTime is set about two minutes ahead, squeue's reason "BeginTime");
    # an administrator lets it start at once as Slurm documents, with a new StartTime.
    while not any(line.endswith("PENDING") for line in slurm_cluster.queued(array)):
        assert time.monotonic() < deadline + 120, (slurm_cluster.queued(array), task_logs(out))
        time.sleep(0.5)
    slurm_cluster.run(["scontrol", "update", f"JobId={task}", "StartTime=now"])
    slurm_cluster.wait(array, timeout=240)

    logs = task_logs(out)
    result = json.loads((out / "1/result.json").read_text())
    assert (result["job_id"], result["status"]) == ("counter", "succeeded"), (result.get("error"), logs)
    assert result["provenance"].get("checkpoints"), f"not resumed: no checkpoint in its provenance\n{logs}"
    slurm_log = (out / f"slurm-{array}_1.out").read_text()
    assert "preemptible.sbatch: resuming" in slurm_log
    assert '"status": "checkpointed"' in slurm_log, logs  # the first run's result.json (--json), saved on SIGTERM
    numbers = [str(n) for n in range(1, COUNT_TO + 1)]
    assert (out / "1/outputs/count.txt").read_text().split() == numbers
    assert (out / "1/stdout").read_text().splitlines() == [f"line {n}" for n in numbers]
    finished = [row for row in slurm_cluster.jobcomp() if row.get("ArrayJobId") == array]
    assert [(row["JobState"], row["ExitCode"]) for row in finished][-1] == ("COMPLETED", "0:0"), (finished, logs)
    assert qemu_processes(str(tmp_path)) == []
