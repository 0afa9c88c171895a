"""qemu_user's QEMU, started by a root vjobs, runs confined (vjobs/drivers/qemu_user/confine.py): seen from the host while a
job runs."""

from __future__ import annotations

import os
import threading

import pytest

import vjobs
from vjobs.testing.processes import qemu_named_for

pytestmark = [pytest.mark.vm,
              pytest.mark.skipif(os.geteuid() != 0, reason="confinement applies when vjobs runs as root")]


def _running(make_site, make_job, tmp_path, job_id: str, **site):
    outcome = {}
    job = make_job(["sleep", "4"], id=job_id)
    thread = threading.Thread(target=lambda: outcome.update(
        result=vjobs.run(job, site=make_site(driver="qemu_user", **site), outdir=tmp_path / "out")))
    thread.start()
    return thread, outcome


def test_qemu_runs_as_its_own_user_in_its_own_namespaces_with_limits_and_no_file_names(make_site, make_job,
                                                                                        tmp_path, assert_clean_host):
    thread, outcome = _running(make_site, make_job, tmp_path, "confined")
    try:
        qemu = qemu_named_for("confined")
        status = dict(line.split(":", 1) for line in (qemu / "status").read_text().splitlines())
        uids = status["Uid"].split()
        assert "0" not in uids, f"QEMU runs as root: {status['Uid']}"
        assert status["CapEff"].strip() == "0000000000000000" and status["NoNewPrivs"].strip() == "1"
        for namespace in ("mnt", "ipc", "pid", "net"):
            assert os.readlink(qemu / "ns" / namespace) != os.readlink(f"/proc/self/ns/{namespace}"), namespace
        limits = (qemu / "limits").read_text()
        assert "Max core file size        0" in limits and "Max open files            1024" in limits
        cmdline = (qemu / "cmdline").read_bytes()
        assert str(tmp_path).encode() not in cmdline and b"/dev/fdset/" in cmdline  # disks come as descriptors
        mounts = (qemu / "mountinfo").read_text()
        assert any(line.split()[4] == "/tmp" and " - tmpfs " in line for line in mounts.splitlines())
        job_folder = next((tmp_path / "work").glob("confined-*"))
        assert not [p for p in job_folder.rglob("*") if p.is_socket()], "a monitor socket in the file system"
    finally:
        thread.join(120)
    assert outcome["result"].status == "succeeded", outcome["result"].error


def test_an_unknown_run_as_user_is_a_clear_error(make_site, make_job, tmp_path, assert_clean_host):
    site = make_site(driver="qemu_user", drivers={"qemu_user": {"run_as": "no-such-user-here"}})
    result = vjobs.run(make_job(["true"]), site=site, outdir=tmp_path / "out")
    assert result.status == "vm_error"
    assert "run_as = 'no-such-user-here'" in result.error["message"] and "no such user" in result.error["message"]


def test_the_namespace_init_starts_nothing_once_the_vjobs_that_asked_is_not_its_grandparent():
    """The gap the kill campaign found: unshare gone before its --kill-child took hold. The shell that would
    start QEMU sees another grandparent than the vjobs named on its command line and exits at once."""
    import subprocess

    from vjobs.drivers.qemu_user.confine import confinement_for, wrap

    confinement = confinement_for(None, network=False, kvm=False, max_file_bytes=1 << 20)
    argv = wrap(["sh", "-c", "exit 7"], confinement)
    assert subprocess.run(argv, timeout=30).returncode == 7  # vjobs itself asked: the payload runs
    argv[argv.index(str(os.getpid()))] = "1"  # as if vjobs were PID 1's child: the grandparent check fails
    assert subprocess.run(argv, timeout=30).returncode == 125
