"""qemu_user's QEMU, started by a root vjobs, runs confined (vjobs/drivers/qemu_user/confine.py): seen from the host while a
job runs."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest

import vjobs

pytestmark = [pytest.mark.vm,
              pytest.mark.skipif(os.geteuid() != 0, reason="confinement applies when vjobs runs as root")]


def _qemu_of(job_name: str, deadline_s: float = 30) -> Path:
    """The QEMU that runs the job, not one that makes a template for it first (an empty cache)."""
    give_up = time.monotonic() + deadline_s
    while time.monotonic() < give_up:
        for proc in Path("/proc").iterdir():
            try:
                if not proc.name.isdigit() or not (proc / "comm").read_text().startswith("qemu-system"):
                    continue
                argv = (proc / "cmdline").read_bytes().split(b"\0")
                names = [argv[i + 1].removeprefix(b"guest=").split(b",")[0]  # libvirt: guest=NAME,debug-...
                         for i, arg in enumerate(argv[:-1]) if arg == b"-name"]
                if any(name.startswith(f"vjobs-{job_name}-".encode()) and not name.endswith(b"-template")
                       for name in names):
                    return proc
            except OSError:
                continue
        time.sleep(0.05)
    raise AssertionError(f"no QEMU for job {job_name} appeared")


def _seccomp_mode_once_settled(qemu: Path, deadline_s: float = 30) -> str:
    """QEMU installs its filter while it parses its options, a moment after exec: a QEMU found at once can
    still show mode 0. Wait for the filter, not a fixed time; a QEMU that never installs one fails."""
    give_up = time.monotonic() + deadline_s
    while True:
        status = dict(line.split(":", 1) for line in (qemu / "status").read_text().splitlines())
        mode = status["Seccomp"].strip()
        if mode != "0" or time.monotonic() > give_up:
            return mode
        time.sleep(0.05)


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
        qemu = _qemu_of("confined")
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


@pytest.mark.libvirt
def test_libvirts_qemu_keeps_its_seccomp_sandbox_and_mount_namespace(libvirt_site, make_job, tmp_path,
                                                                      assert_clean_host):
    """Under libvirt QEMU's confinement is libvirt's (qemu.conf): here it runs as root (docs/security.md says
    why), so what must hold is the rest: its seccomp filter and its own mount namespace."""
    outcome = {}
    job = make_job(["sleep", "4"], id="libvirtconfined")
    thread = threading.Thread(target=lambda: outcome.update(
        result=vjobs.run(job, site=libvirt_site, outdir=tmp_path / "out")))
    thread.start()
    try:
        qemu = _qemu_of("libvirtconfined")
        assert _seccomp_mode_once_settled(qemu) == "2"  # a filter is installed
        assert os.readlink(qemu / "ns" / "mnt") != os.readlink("/proc/self/ns/mnt")
    finally:
        thread.join(180)
    assert outcome["result"].status == "succeeded", outcome["result"].error


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
