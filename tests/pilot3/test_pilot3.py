"""PanDA Pilot 3 (3.7.0.36, its own files unmodified) runs its jobs' payloads in vjobs VMs through the user
plugin vjobs ships (``vjobs pilot3 install``), against the PanDA server stand-in on loopback: stage-in and
stage-out by the pilot's own copytool on the host, the payload in the VM on the Debian base, the final state
sent to the stand-in. Failures of the VM reach the server as pilot errors.

And as a grid site runs it: the pilot as a pool account, its payload in a VM of that account's own vjobs.

And long jobs, with the pilot's looping-job check shortened to minutes (harness.SHORT_LOOPING): a payload that
keeps writing in its work directory outlives the limit, one that hangs is killed as looping; the pilot reports
the guest's CPU time, cores and memory.

Always PILOT_NOKILL=1 and a PID namespace of its own (vjobs.pilot3.harness): the pilot's orphan killer must
never see this machine.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest

from vjobs.pilot3.errors import CONTAINERFAILURE
from vjobs.pilot3.harness import PILOT_CONFIG, SHORT_LOOPING, PilotSite, leftover_processes, make_job, run_pilot
from vjobs.pilot3.monitor import SERIES_NAME, SUMMARY_NAME
from vjobs.pilot3.plugin import install_plugin
from vjobs.testing.panda_standin import PandaStandin
from vjobs.testing.processes import qemu_processes

pytestmark = [pytest.mark.pilot3, pytest.mark.vm]

CANCELLED_BY_SERVER = "1144"  # pilot/common/errorcodes.py PANDAKILL
LOOPING_JOB = "1150"  # pilot/common/errorcodes.py LOOPINGJOB

# The payload: reads the staged-in input, writes the declared output, and says where it ran.
PAYLOAD = """#!/bin/bash
set -e
{ echo "input: $(cat events.txt)"; echo "kernel: $(uname -r)"; grep PRETTY_NAME /etc/os-release;
  echo "cores: $(nproc)"; } > summary.txt
echo "payload done"
"""


@pytest.fixture(scope="session")
def vjobs_pilot(pilot3_sdist, tmp_path_factory) -> Path:
    """A copy of the published pilot with the vjobs user added (the published tree stays as it was)."""
    tree = tmp_path_factory.mktemp("pilot") / pilot3_sdist.name
    shutil.copytree(pilot3_sdist, tree)
    install_plugin(tree)
    return tree


@pytest.fixture
def site(tmp_path) -> PilotSite:
    return PilotSite(tmp_path / "site")


@pytest.fixture
def vjobs_site_file(tmp_path, cache_dir, debian_image, corrupt_base) -> Path:
    """The vjobs site config the pilot's payloads use (VJOBS_SITE): qemu_user, the session's cache, and a
    catalogue image the guest cannot mount (for the boot-failure test)."""
    image, digest = corrupt_base
    path = tmp_path / "vjobs-site.toml"
    path.write_text(f'driver = "qemu_user"\ncache_dir = "{cache_dir}"\nwork_dir = "{tmp_path / "vjobs-work"}"\n'
                    f'[images.broken]\nrootfs = "{image}"\nrootfs_sha256 = "{digest}"\n')
    return path


def run_vjobs_pilot(site, vjobs_pilot, standin, vjobs_site_file, **options):
    return run_pilot(site, vjobs_pilot, standin.url, user="vjobs", env={"VJOBS_SITE": str(vjobs_site_file)},
                     **options)


def vjobs_result_from_log(site: PilotSite, panda_id: str) -> dict:
    """vjobs-result.json as the pilot archived it with the job's work directory in its log tarball."""
    return json.loads(file_from_log(site, panda_id, "vjobs-result.json"))


def file_from_log(site: PilotSite, panda_id: str, name: str) -> str:
    """A file of the job's work directory, as the pilot archived it in the job's log tarball."""
    with tarfile.open(site.stored(f"{panda_id}.log.tgz")) as archive:
        member = next(m for m in archive.getmembers() if m.name.endswith(f"/{name}"))
        return archive.extractfile(member).read().decode()


def no_vm_left(site: PilotSite) -> bool:
    found = subprocess.run(["pgrep", "-f", f"qemu-system.*{site.root}"], capture_output=True, text=True).stdout
    return not found.strip()


def test_a_pilot_job_runs_its_payload_in_a_vm_and_finishes(site, vjobs_pilot, vjobs_site_file):
    job = make_job(site, 4101, PAYLOAD, inputs={"events.txt": b"muon jet muon\n"}, outputs=("summary.txt",),
                   core_count=2, min_ram_mb=768, max_walltime_s=600, container_name="debian12")
    with PandaStandin(job) as standin:
        run = run_vjobs_pilot(site, vjobs_pilot, standin, vjobs_site_file, timeout_s=400)
        final = standin.final("4101")
    assert not run.timed_out, run.output.read_text()[-3000:]
    assert final["state"] == "finished", (final, run.output.read_text()[-3000:])
    assert final.get("pilotErrorCode", "0") == "0" and final.get("transExitCode") == "0"
    summary = site.stored("summary.txt").read_text()
    assert "input: muon jet muon" in summary  # staged in on the host, read in the guest
    assert "cloud-amd64" in summary and 'PRETTY_NAME="Debian GNU/Linux 12 (bookworm)"' in summary  # the VM
    assert "cores: 2" in summary  # coreCount became the VM's vCPUs
    assert leftover_processes(site) == [] and no_vm_left(site)


def test_the_server_killing_the_job_stops_the_vm(site, vjobs_pilot, vjobs_site_file):
    job = make_job(site, 4102, "#!/bin/bash\necho started; sleep 600\n", container_name="debian12",
                   max_walltime_s=900)
    with PandaStandin(job) as standin:
        def kill_once_running() -> bool:
            if "running" in standin.states("4102"):
                standin.kill("4102")  # answered to the next heartbeat (10 s): the VM is up by then
            return standin.final("4102") is not None

        run = run_vjobs_pilot(site, vjobs_pilot, standin, vjobs_site_file, timeout_s=400,
                              stop_when=kill_once_running)
        final = standin.final("4102")
    assert final["state"] == "failed" and final["pilotErrorCode"] == CANCELLED_BY_SERVER, final
    # The pilot SIGTERMs the payload and SIGKILLs it 3 s later: a result.json saying "cancelled" (in the
    # job's log tarball) means vjobs stopped the VM and finished its teardown within those 3 s.
    result = vjobs_result_from_log(site, "4102")
    assert result["status"] == "cancelled" and result["error"]["code"] == "cancelled", result
    assert leftover_processes(site) == [] and no_vm_left(site), run.output


def test_a_vm_that_cannot_boot_its_base_is_a_pilot_error(site, vjobs_pilot, vjobs_site_file):
    job = make_job(site, 4103, PAYLOAD, container_name="broken", max_walltime_s=600)
    with PandaStandin(job) as standin:
        run_vjobs_pilot(site, vjobs_pilot, standin, vjobs_site_file, timeout_s=600,
                        stop_when=lambda: standin.final("4103") is not None)
        final = standin.final("4103")
    assert final["state"] == "failed", final
    assert final["pilotErrorCode"] == str(CONTAINERFAILURE)
    assert "rootfs_mount_failed" in final["pilotErrorDiag"]
    assert leftover_processes(site) == [] and no_vm_left(site)


def test_a_pool_account_runs_the_pilot_and_its_payload_runs_in_a_vm_of_its_own_vjobs(pilot3_sdist, pool_accounts,
                                                                                     account_cache):
    """The pilot runs as an ordinary account (in its own PID namespace, made by root, with PILOT_NOKILL=1), from
    a pilot tree the account set up with its own ``vjobs pilot3 install``; the payload runs in a VM of the
    account's vjobs, with a site in the account's home. Everything the pilot and vjobs write is the account's."""
    account = pool_accounts[2]
    cache = account_cache(account, debian=True)
    folder = account.home / "pilot3"
    tree = folder / pilot3_sdist.name
    shutil.copytree(pilot3_sdist, tree)
    site = PilotSite(folder / "site")
    vjobs_site = folder / "vjobs-site.toml"
    vjobs_site.write_text(f'driver = "qemu_user"\ncache_dir = "{cache}"\nwork_dir = "{folder / "vjobs-work"}"\n')
    job = make_job(site, 4104, PAYLOAD, inputs={"events.txt": b"jet jet muon\n"}, outputs=("summary.txt",),
                   core_count=1, min_ram_mb=512, max_walltime_s=600, container_name="debian12")
    account.own(folder)
    account.run([account.vjobs, "pilot3", "install", str(tree)], check=True, timeout=120)
    assert account.python in (tree / "pilot/user/vjobs/container.py").read_text()  # the account's vjobs runs it

    with PandaStandin(job) as standin:
        run = run_pilot(site, tree, standin.url, user="vjobs", env={"VJOBS_SITE": str(vjobs_site)}, account=account,
                        timeout_s=400, stop_when=lambda: standin.final("4104") is not None)
        final = standin.final("4104")
    assert final is not None and final["state"] == "finished", (final, run.tail())
    assert final.get("pilotErrorCode", "0") == "0" and final.get("transExitCode") == "0", final
    summary = site.stored("summary.txt")
    assert "input: jet jet muon" in summary.read_text() and "Debian GNU/Linux 12" in summary.read_text()
    # What the pilot and vjobs wrote (the harness, root, writes pilot.cfg and catches pilot.out beside them).
    written = [entry for top in (site.launch, site.storage, folder / "vjobs-work") for entry in [top, *top.rglob("*")]]
    assert site.launch / "pilotlog.txt" in written  # the pilot's own log, written as the account
    strangers = sorted(str(path) for path in written if path.stat().st_uid != account.uid)
    assert strangers == [], f"files of the account's pilot that are not the account's: {strangers}"
    assert leftover_processes(site) == [] and qemu_processes(str(folder)) == []


# A long job that keeps working: it computes on every vCPU for 20 s, then appends a line to a file of its work
# directory every 5 s for 2 minutes, and prints nothing meanwhile: only the work directory's sync can show the
# pilot that it is alive. With the looping limit of 1 minute, checked every 30 s, a job whose work directory
# did not change on the host would be killed about 90 s after it started.
WRITER = """#!/bin/bash
echo "writer on $(nproc) vCPUs"
for cpu in $(seq $(nproc)); do timeout 20 sh -c 'while :; do :; done' & done; wait
for step in $(seq 24); do echo "step $step" >> progress.txt; sleep 5; done
echo "writer done"
"""
# A job that hangs: it computes for 3 s (pilot 3.7 skips its checks for a payload that has used no CPU), writes
# its log, then sleeps, writing nothing.
HUNG = """#!/bin/bash
echo "hung job started"
timeout 3 sh -c 'while :; do :; done'
echo "last words before the hang" > hang.log
sleep 3600
"""
SHORT_LOOPING_CONFIG = {"Pilot": {**PILOT_CONFIG["Pilot"], **SHORT_LOOPING}}
PILOT_LIFETIME_S = 800  # the writer's pilot: its payload's wall time must end before the pilot does


@pytest.fixture
def live_site_file(vjobs_site_file) -> Path:
    """The pilot tests' vjobs site, with the work directory synced back every 10 s."""
    path = vjobs_site_file.with_name("vjobs-live-site.toml")
    path.write_text(f"sync_interval_s = 10\n{vjobs_site_file.read_text()}")
    return path


@pytest.mark.timeout(900)  # the pilot's run ends within 600 s; the session's images may come first
def test_a_job_that_keeps_writing_outlives_the_looping_limit_and_is_reported_with_its_guests_figures(
        site, vjobs_pilot, live_site_file):
    """With the looping check shortened, a payload that writes only into a file of its work directory runs
    past the limit and finishes; the pilot reported the guest's CPU time, its 2 vCPUs as the cores, and the
    memory of the payload's cgroup, while the payload ran and at the end; the payload's wall time ends before
    the pilot's own limit (its --lifetime less its 3-minute grace)."""
    job = make_job(site, 4111, WRITER, outputs=("progress.txt",), core_count=2, min_ram_mb=512,
                   max_walltime_s=600, container_name="debian12")
    with PandaStandin(job) as server:
        run = run_vjobs_pilot(site, vjobs_pilot, server, live_site_file, config=SHORT_LOOPING_CONFIG,
                              options=("--lifetime", str(PILOT_LIFETIME_S)), timeout_s=600,
                              stop_when=lambda: server.final("4111") is not None)
    print(f"pilot run: {run.elapsed_s:.0f} s")
    final = server.final("4111")
    assert final is not None and final["state"] == "finished", (final, run.tail())
    assert site.stored("progress.txt").read_text().splitlines()[-1] == "step 24"
    walltime = int(re.search(r"vjobs\.pilot3\.payload .*--walltime (\d+)", run.output.read_text()).group(1))
    assert PILOT_LIFETIME_S - 180 - 60 - 30 <= walltime <= PILOT_LIFETIME_S - 180 - 60, walltime

    usage = vjobs_result_from_log(site, "4111")["usage"]
    assert usage["cpu_user_s"] > 15  # 20 s of computing on each vCPU
    assert final["cpuConsumptionTime"] == str(round(usage["cpu_user_s"] + usage["cpu_system_s"])), (final, usage)
    assert final["coreCount"] == "2" and int(final["maxRSS"]) > 0, final
    running = [update for update in server.updates if update.get("state") == "running"]
    seen = [update for update in running if int(update.get("cpuConsumptionTime", 0)) > 0]
    assert seen and all(update["coreCount"] == "2" and int(update["maxRSS"]) > 0 for update in seen), running
    summary = json.loads(file_from_log(site, "4111", SUMMARY_NAME))
    assert summary["HW"]["cpu"]["CPUs"] == 2 and summary["Max"]["rss"] == int(final["maxRSS"])
    assert len(file_from_log(site, "4111", SERIES_NAME).splitlines()) > 5  # a row per 10-s sample
    assert leftover_processes(site) == [] and no_vm_left(site)


@pytest.mark.timeout(900)
def test_a_job_that_hangs_is_killed_as_looping_and_keeps_its_log(site, vjobs_pilot, live_site_file):
    """With the looping check shortened, a payload that stops writing is killed with error 1150: the pilot
    SIGTERMs the runner and SIGKILLs it 3 s later; vjobs stopped the VM in time, and what the payload had
    written is in the work directory, which the pilot archived in the job's log tarball."""
    job = make_job(site, 4112, HUNG, core_count=1, min_ram_mb=512, max_walltime_s=600, container_name="debian12")
    with PandaStandin(job) as server:
        run = run_vjobs_pilot(site, vjobs_pilot, server, live_site_file, config=SHORT_LOOPING_CONFIG,
                              timeout_s=600, stop_when=lambda: server.final("4112") is not None)
    print(f"pilot run: {run.elapsed_s:.0f} s")
    final = server.final("4112")
    assert final is not None and final["state"] == "failed", (final, run.tail())
    assert final["pilotErrorCode"] == LOOPING_JOB, (final["pilotErrorCode"], final["pilotErrorDiag"])
    assert vjobs_result_from_log(site, "4112")["status"] == "cancelled"
    assert file_from_log(site, "4112", "hang.log") == "last words before the hang\n"
    assert file_from_log(site, "4112", "payload.stdout") == "hung job started\n"
    assert 2 <= int(final["cpuConsumptionTime"]) <= 6, final  # the guest's: 3 s of computing
    assert leftover_processes(site) == [] and no_vm_left(site)
