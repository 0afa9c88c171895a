"""End to end: real guests boot, run the payload, and come back, through every driver that can run here.

One conformance suite, parametrised over driver set-ups (as Nova runs one test class against every virt
driver). A set-up that cannot exist on this machine is skipped with the reason, never passed silently.
"""

from __future__ import annotations

import io
import json
import tarfile

import pytest

import vjobs

pytestmark = pytest.mark.vm


def run(job_path, driver_site, tmp_path):
    name, site = driver_site
    result = vjobs.run(job_path, site=site, outdir=tmp_path / "out")
    assert result.driver == name
    return result


def test_exit_status_outputs_in_subfolders_and_env(make_job, driver_site, tmp_path, assert_clean_host):
    job = make_job(["sh", "-c", 'mkdir -p out/sub && cat in.txt > out/sub/copy.txt && echo "$GREETING" '
                                '&& echo to-stderr >&2 && ls /opt/release > out/listing && exit 7'],
                   inputs={"in.txt": "input data\n"}, release={"bin/tool": "#!/bin/sh\n"},
                   env={"GREETING": "hello from the guest"}, outputs=["out"])
    result = run(job, driver_site, tmp_path)
    assert result.status == "failed", result.error
    assert result.exit_code == 7
    out = tmp_path / "out"
    assert (out / "outputs" / "out" / "sub" / "copy.txt").read_text() == "input data\n"
    assert (out / "outputs" / "out" / "listing").read_text() == "bin\n"
    assert (out / "stdout").read_text() == "hello from the guest\n"
    assert (out / "stderr").read_text() == "to-stderr\n"
    assert {o["path"] for o in result.outputs} == {"out/sub/copy.txt", "out/listing"}
    assert json.loads((out / "result.json").read_text())["exit_code"] == 7
    assert result.provenance["release_sha256"]


def test_release_is_read_only_in_the_guest(make_job, driver_site, tmp_path, assert_clean_host):
    script = ('touch /opt/release/new 2>/dev/null && echo file-write-worked; '
              'dev=$(grep " /opt/release " /proc/mounts | cut -d" " -f1); '
              'dd if=/dev/zero of=$dev bs=512 count=1 conv=notrunc 2>/dev/null && echo device-write-worked; '
              'echo ro=$(cat /sys/block/${dev#/dev/}/ro)')
    result = run(make_job(["sh", "-c", script], release={"data": "x"}), driver_site, tmp_path)
    assert result.status == "succeeded", result.error
    assert (tmp_path / "out" / "stdout").read_text() == "ro=1\n"


def test_walltime_kills_the_guest(make_job, driver_site, tmp_path, assert_clean_host):
    result = run(make_job(["sleep", "600"], walltime_s=3), driver_site, tmp_path)
    assert result.status == "timeout"
    assert result.exit_code is None
    assert result.error["code"] == "walltime_exceeded"


def test_guest_kernel_crash_is_a_vm_error(make_job, driver_site, tmp_path, assert_clean_host):
    result = run(make_job(["sh", "-c", "echo c > /proc/sysrq-trigger"]), driver_site, tmp_path)
    assert result.status == "vm_error"
    assert result.error["code"] == "guest_crashed"
    assert "sysrq" in (tmp_path / "out" / "console.log").read_text(errors="replace").lower()


def hostile_tar() -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as archive:
        for name, data in (("vjobs/status", b"exit_code=0\n"), ("work/../../evil", b"pwned\n")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def test_hostile_output_archive_is_refused(make_job, driver_site, tmp_path, assert_clean_host):
    """The payload, root in the guest, writes its own archive onto the io disk (one that climbs out of the
    output folder) and powers the VM off before the agent can write the real results. (In its own PID
    namespace `poweroff -f` would only end the payload: the kernel's SysRq poweroff is what stops the VM.)"""
    script = ('for d in /dev/vd? /dev/xvd? /dev/sd?; do [ -b $d ] && [ "$(head -c 13 $d)" = VJOBS-IO-DISK ] '
              '&& dd if=evil.tar of=$d conv=notrunc 2>/dev/null; done; sync; echo o > /proc/sysrq-trigger; '
              'sleep 60')
    result = run(make_job(["sh", "-c", script], inputs={"evil.tar": hostile_tar()}), driver_site, tmp_path)
    assert result.status == "vm_error"
    assert result.error["code"] == "unsafe_output"
    assert not (tmp_path / "evil").exists() and not (tmp_path.parent / "evil").exists()


def test_outputs_over_the_limit_give_a_clear_error(make_job, driver_site, tmp_path, assert_clean_host):
    job = make_job(["sh", "-c", "dd if=/dev/urandom of=big bs=1M count=3 2>/dev/null"], outputs=["big"],
                   resources={"output_mib": 1})
    result = run(job, driver_site, tmp_path)
    assert result.status == "vm_error"
    assert result.error["code"] == "output_too_large"
    assert "output_mib" in result.error["message"]
