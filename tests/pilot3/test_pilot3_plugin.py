"""The Pilot 3 plugin's parts that need no pilot run: the installer, the error-code mapping, and the payload
runner's report when vjobs (not the payload) fails."""

from __future__ import annotations

import json

import pytest

from vjobs.errors import SetupError
from vjobs.pilot3 import errors, payload
from vjobs.pilot3.plugin import install_plugin
from vjobs.result import Result


def fake_pilot_tree(root):
    generic = root / "pilot" / "user" / "generic"
    generic.mkdir(parents=True)
    for name in ("__init__.py", "container.py", "diagnose.py", "common.py"):
        (generic / name).write_text(f"# the pilot's own {name}\n")
    return root


def test_install_copies_the_generic_user_and_puts_vjobs_files_over_it(tmp_path):
    target = install_plugin(fake_pilot_tree(tmp_path / "pilot3"), python="/opt/vjobs/bin/python")
    assert sorted(p.name for p in target.iterdir()) == ["__init__.py", "common.py", "container.py", "diagnose.py"]
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


def test_the_wrapper_sizes_the_vm_from_the_panda_job(tmp_path, monkeypatch):
    """coreCount, minRamCount, maxWalltime and container_name become vCPUs, memory, wall time and image."""
    import shlex
    import sys
    from types import SimpleNamespace

    tree = fake_pilot_tree(tmp_path / "pilot3")
    for package in ("pilot", "pilot/user"):
        (tree / package / "__init__.py").write_text("")
    install_plugin(tree, python="/opt/vjobs/bin/python")
    monkeypatch.syspath_prepend(str(tree))
    monkeypatch.delenv("VJOBS_SITE", raising=False)
    for name in [m for m in sys.modules if m == "pilot" or m.startswith("pilot.")]:
        monkeypatch.delitem(sys.modules, name)
    from pilot.user.vjobs import container

    job = SimpleNamespace(workdir="/scratch/PanDA_Pilot-7", imagename="el9", corecount=8, maxwalltime=3600,
                          _rawdata={"minRamCount": "16000"})
    words = shlex.split(container.wrapper("./run.sh --events 10", job=job))
    assert words[:4] == ["exec", "/opt/vjobs/bin/python", "-m", "vjobs.pilot3.payload"]
    options = dict(zip(words[4:-2:2], words[5:-2:2]))
    assert options == {"--workdir": "/scratch/PanDA_Pilot-7", "--image": "el9", "--vcpus": "8",
                       "--memory-mib": "16000", "--walltime": "3600"}
    assert words[-2:] == ["--", "./run.sh --events 10"]
