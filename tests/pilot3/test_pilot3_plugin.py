"""The Pilot 3 plugin's parts that need no pilot run: the installer, the error-code mapping, the payload
runner's report when vjobs (not the payload) fails, and the guest's figures from the runner's files to the
pilot's job (with fabricated ``usage`` events, and a stand-in for the few pilot modules the plugin imports)."""

from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from vjobs.errors import SetupError
from vjobs.events import Event
from vjobs.pilot3 import errors, monitor, payload
from vjobs.pilot3.plugin import install_plugin
from vjobs.result import Result

HOST_CPU_S = 0.25  # what the stand-in of the pilot's own CPU probe measures
# The pilot modules the plugin imports, reduced to the names it uses.
PILOT_STAND_IN = {
    "pilot/__init__.py": "",
    "pilot/user/__init__.py": "",
    "pilot/util/__init__.py": "",
    "pilot/util/processes.py": f"def get_current_cpu_consumption_time(pid):\n    return {HOST_CPU_S}\n",
    "pilot/util/monitoring.py": "from pilot.util.processes import get_current_cpu_consumption_time\n",
    "pilot/common/__init__.py": "",
    "pilot/common/errorcodes.py": "class ErrorCodes:\n    def add_error_code(self, code, priority=False, msg=''):\n"
                                  "        return [code], [msg]\n",
    "pilot/user/generic/diagnose.py": "def interpret(job):\n    return 0\n",
}
PLUGIN_FILES = ["__init__.py", "common.py", "container.py", "cpu.py", "diagnose.py", "guest.py", "utilities.py"]


def fake_pilot_tree(root):
    generic = root / "pilot" / "user" / "generic"
    generic.mkdir(parents=True)
    for name in ("__init__.py", "container.py", "diagnose.py", "common.py", "cpu.py", "utilities.py"):
        (generic / name).write_text(f"# the pilot's own {name}\n")
    return root


@pytest.fixture
def plugin(tmp_path, monkeypatch):
    """The installed plugin's modules, imported from a fake pilot tree (``plugin.cpu``, ``plugin.container``...)."""
    tree = fake_pilot_tree(tmp_path / "pilot3")
    for name, text in PILOT_STAND_IN.items():
        (tree / name).parent.mkdir(parents=True, exist_ok=True)
        (tree / name).write_text(text)
    install_plugin(tree, python="/opt/vjobs/bin/python")
    monkeypatch.syspath_prepend(str(tree))
    monkeypatch.delenv("VJOBS_SITE", raising=False)
    for name in [m for m in sys.modules if m == "pilot" or m.startswith("pilot.")]:
        monkeypatch.delitem(sys.modules, name)
    import importlib

    yield SimpleNamespace(**{name: importlib.import_module(f"pilot.user.vjobs.{name}")
                             for name in ("container", "cpu", "diagnose", "guest", "utilities")},
                          monitoring=importlib.import_module("pilot.util.monitoring"))
    for name in [m for m in sys.modules if m == "pilot" or m.startswith("pilot.")]:
        del sys.modules[name]


def pilot_job(workdir: Path | str, **fields) -> SimpleNamespace:
    """The fields of a pilot's JobData that the plugin reads and sets."""
    defaults = dict(jobid="7", pid=4242, workdir=str(workdir), imagename="el9", corecount=1, maxwalltime=3600,
                    _rawdata={"minRamCount": "16000"}, cpuconsumptiontime=-1, cpuconsumptionunit="s",
                    cpuconversionfactor=1.0, actualcorecount=0, corecounts=[], piloterrorcodes=[],
                    piloterrordiags=[], infosys=SimpleNamespace(queuedata=SimpleNamespace(maxwdir=0)))
    return SimpleNamespace(**{**defaults, **fields})


def usage_event(**usage) -> Event:
    return Event("usage", "guest", job_id="exec-1", usage=usage)


def test_install_copies_the_generic_user_and_puts_vjobs_files_over_it(tmp_path):
    target = install_plugin(fake_pilot_tree(tmp_path / "pilot3"), python="/opt/vjobs/bin/python")
    assert sorted(p.name for p in target.iterdir()) == PLUGIN_FILES
    assert (target / "common.py").read_text() == "# the pilot's own common.py\n"
    container = (target / "container.py").read_text()
    assert 'VJOBS_PYTHON = "/opt/vjobs/bin/python"' in container and "vjobs.pilot3.payload" in container
    assert (tmp_path / "pilot3" / "pilot" / "user" / "generic" / "container.py").read_text() == \
        "# the pilot's own container.py\n"  # the pilot's own files stay as they were
    install_plugin(tmp_path / "pilot3")  # again, e.g. after an upgrade: replaced whole


def test_install_refuses_a_folder_that_is_no_pilot(tmp_path):
    with pytest.raises(SetupError, match="not a Pilot 3 tree"):
        install_plugin(tmp_path)


@pytest.mark.parametrize("status, code, message, expected", [
    ("succeeded", None, "", None),
    ("failed", None, "", None),
    ("setup_error", "image_not_found", "/image: 'x' is not in this site's catalogue", errors.IMAGENOTFOUND),
    ("setup_error", "image_error", "/image: 'x' has sha256 0, the catalogue says 1", errors.SETUPFAILURE),
    ("setup_error", "limit_exceeded", "too big", errors.SETUPFAILURE),
    ("vm_error", "no_usable_driver", "no KVM", errors.RESOURCEUNAVAILABLE),
    ("vm_error", "boot_timeout", "did not boot", errors.CONTAINERFAILURE),
    ("vm_error", "rootfs_mount_failed", "bad base", errors.CONTAINERFAILURE),
    ("vm_error", "guest_crashed", "panic", errors.PAYLOADEXECUTIONFAILURE),
    ("timeout", "walltime_exceeded", "ran past", errors.REACHEDMAXTIME),
    ("cancelled", "cancelled", "SIGTERM", errors.SIGTERM),
])
def test_vjobs_outcomes_map_to_pilot_error_codes(status, code, message, expected):
    result = Result(job_id="j", status=status, error={"code": code, "message": message} if code else None)
    assert errors.pilot_error_code(result) == expected


def test_the_runner_reports_a_vjobs_failure_in_the_workdir_not_on_stderr(tmp_path, cache_dir, capfd):
    site = tmp_path / "site.toml"
    site.write_text(f'cache_dir = "{cache_dir}"\nwork_dir = "{tmp_path / "vjobs"}"\ndriver = "qemu_user"\n')
    workdir = tmp_path / "PanDA_Pilot-1"
    workdir.mkdir()
    code = payload.main(["--workdir", str(workdir), "--image", "centos7", "--site", str(site), "--", "./run.sh"])
    _, err = capfd.readouterr()
    assert code == 200 and err == ""
    report = json.loads((workdir / errors.REPORT_NAME).read_text())
    assert report["error_code"] == errors.IMAGENOTFOUND and "'centos7'" in report["error_diag"]
    assert report["cause"] is True
    assert json.loads((workdir / payload.RESULT_NAME).read_text())["status"] == "setup_error"


def test_the_wrapper_sizes_the_vm_from_the_panda_job_and_its_queue(plugin, tmp_path):
    """coreCount, minRamCount, maxWalltime, container_name and the queue's maxwdir become vCPUs, memory, wall
    time, image and scratch room."""
    job = pilot_job("/scratch/PanDA_Pilot-7", corecount=8,
                    infosys=SimpleNamespace(queuedata=SimpleNamespace(maxwdir=16336)))
    words = shlex.split(plugin.container.wrapper("./run.sh --events 10", job=job))
    assert words[:4] == ["exec", "/opt/vjobs/bin/python", "-m", "vjobs.pilot3.payload"]
    options = dict(zip(words[4:-2:2], words[5:-2:2]))
    assert options == {"--workdir": "/scratch/PanDA_Pilot-7", "--image": "el9", "--vcpus": "8",
                       "--memory-mib": "16000", "--walltime": "3600", "--scratch-mib": "16336"}
    assert words[-2:] == ["--", "./run.sh --events 10"]
    no_maxwdir = shlex.split(plugin.container.wrapper("./run.sh", job=pilot_job(tmp_path)))
    assert "--scratch-mib" not in no_maxwdir  # vjobs' default then


@pytest.mark.parametrize("pilot_left_s, expected", [(None, 3600), (100000, 3600), (1000, 1000 - 60), (30, 60)])
def test_the_wall_time_ends_before_the_pilot_does(plugin, tmp_path, monkeypatch, pilot_left_s, expected):
    """The job's maxWalltime, or the time the pilot has left less a margin for the pilot's own ending."""
    monkeypatch.setattr(plugin.container, "pilot_time_left_s", lambda job: pilot_left_s)
    assert plugin.container.walltime_s(pilot_job(tmp_path)) == expected


def test_without_the_pilots_options_its_time_left_is_not_known(plugin, tmp_path, monkeypatch):
    monkeypatch.setattr(sys.modules["__main__"], "args", SimpleNamespace(), raising=False)
    assert plugin.container.pilot_time_left_s(pilot_job(tmp_path)) is None


def test_the_runner_writes_usage_events_as_prmon_does(tmp_path):
    """A row per sample under prmon's header (KiB, seconds, bytes), and prmon's summary: peaks, the latest
    cumulative figures, averages, and the VM as the hardware."""
    clock = iter([1000.0, 1010.0, 1020.0, 1030.0]).__next__
    files = monitor.MonitorFiles(tmp_path, vcpus=2, memory_mib=1024, clock=clock)
    files.record(usage_event(cpu_user_s=4.5, cpu_system_s=0.5, memory_current_mib=100.0, processes=3,
                             io_read_bytes=1000, io_write_bytes=2000))
    files.record(usage_event(cpu_user_s=9.0, cpu_system_s=1.0, memory_current_mib=50.0, processes=1,
                             memory_peak_mib=120.0))  # a figure may be missing: the latest one stands
    rows = [line.split("\t") for line in (tmp_path / monitor.SERIES_NAME).read_text().splitlines()]
    assert rows[0] == ["Time", "nprocs", "pss", "read_bytes", "rss", "stime", "utime", "write_bytes", "wtime"]
    assert rows[1] == ["1010", "3", "102400", "1000", "102400", "0.5", "4.5", "2000", "10"]
    assert rows[2] == ["1020", "1", "51200", "1000", "51200", "1.0", "9.0", "2000", "20"]
    summary = json.loads((tmp_path / monitor.SUMMARY_NAME).read_text())
    assert summary == {
        "Max": {"rss": 122880, "pss": 122880, "nprocs": 3, "utime": 9.0, "stime": 1.0, "read_bytes": 1000,
                "write_bytes": 2000, "wtime": 20},
        "Avg": {"rss": 76800, "pss": 76800, "nprocs": 2.0, "read_bytes": 50, "write_bytes": 100},
        "HW": {"cpu": {"CPUs": 2}, "mem": {"MemTotal": 1048576}}}
    files.conclude({"cpu_user_s": 12.25, "cpu_system_s": 1.5, "memory_peak_mib": 130.0, "note": "x"})  # result.usage
    final = json.loads((tmp_path / monitor.SUMMARY_NAME).read_text())
    assert (final["Max"]["utime"], final["Max"]["stime"], final["Max"]["rss"]) == (12.25, 1.5, 133120)
    assert sorted(p.name for p in tmp_path.iterdir()) == [monitor.SUMMARY_NAME, monitor.SERIES_NAME]


def test_the_runners_files_are_names_the_looping_check_skips(plugin):
    """Pilot 3's looping-job check ignores files whose names contain "prmon" (the generic user's
    remove_unwanted_files): the runner's files never make a hung payload look alive."""
    assert plugin.guest.SUMMARY_NAME == monitor.SUMMARY_NAME
    assert all("prmon" in name for name in (monitor.SUMMARY_NAME, monitor.SERIES_NAME))


def test_the_runner_never_writes_through_a_link(tmp_path):
    (tmp_path / "elsewhere").write_text("keep\n")
    (tmp_path / monitor.SERIES_NAME).symlink_to(tmp_path / "elsewhere")
    files = monitor.MonitorFiles(tmp_path, vcpus=1, memory_mib=512)
    files.record(usage_event(cpu_user_s=1.0, cpu_system_s=0.0))  # no exception into the job's thread either
    assert (tmp_path / "elsewhere").read_text() == "keep\n"
    assert json.loads((tmp_path / monitor.SUMMARY_NAME).read_text())["Max"]["utime"] == 1.0


def test_the_pilot_sees_the_guests_figures(plugin, tmp_path):
    """The memory monitor's figures, the vCPUs as the cores, and the guest's CPU time for the payload's PID
    once the wrapper has run (the pilot's own probe for other processes, and before any sample)."""
    job = pilot_job(tmp_path, corecount=2)
    plugin.container.wrapper("./run.sh", job=job)
    assert plugin.monitoring.get_current_cpu_consumption_time(job.pid) == HOST_CPU_S  # no sample yet
    assert plugin.utilities.get_memory_monitor_info(str(tmp_path)) == {}
    files = monitor.MonitorFiles(tmp_path, vcpus=2, memory_mib=2048, clock=iter([0.0, 60.0, 60.0]).__next__)
    files.record(usage_event(cpu_user_s=70.2, cpu_system_s=3.1, memory_current_mib=300.0, processes=4,
                             io_read_bytes=6000, io_write_bytes=12000))

    assert plugin.monitoring.get_current_cpu_consumption_time(job.pid) == pytest.approx(73.3)
    assert plugin.monitoring.get_current_cpu_consumption_time(job.pid + 1) == HOST_CPU_S
    plugin.cpu.set_core_counts(job=job, walltime=60)
    assert (job.corecount, job.actualcorecount, job.corecounts) == (2, 2, [2])
    assert plugin.utilities.get_memory_monitor_info(str(tmp_path), name="") == {
        "maxRSS": 307200, "maxPSS": 307200, "avgRSS": 307200, "avgPSS": 307200,
        "totRBYTES": 6000, "totWBYTES": 12000, "rateRBYTES": 100, "rateWBYTES": 200}

    files.conclude({"cpu_user_s": 80.6, "cpu_system_s": 3.2})
    job.cpuconsumptiontime = 1  # the pilot's own, from os.times(), just before interpret()
    assert plugin.diagnose.interpret(job) == 0
    assert (job.cpuconsumptiontime, job.corecount) == (84, 2)
    assert plugin.monitoring.get_current_cpu_consumption_time(job.pid) == HOST_CPU_S  # the job is over


@pytest.mark.parametrize("text", ["", "not json", "[1, 2]", '{"Max": {"utime": "9", "stime": 1}, "HW": 3}',
                                  '{"Max": {"utime": -1, "stime": 1}, "HW": {"cpu": {"CPUs": true}}}'])
def test_a_summary_the_plugin_cannot_use_is_no_figure(plugin, tmp_path, text):
    (tmp_path / monitor.SUMMARY_NAME).write_text(text)
    summary = plugin.guest.read_summary(str(tmp_path))
    assert plugin.guest.cpu_seconds(summary) is None and plugin.guest.vcpus(summary) is None
    assert plugin.guest.memory_fields(summary) == {}
