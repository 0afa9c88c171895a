"""``vjobs resume``: a checkpoint that cannot be continued here is refused before any VM starts, saying why; one
that can goes on where it was, also after vjobs was killed (periodic checkpoints) and after a batch system's
warning signal."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import pytest

import vjobs
from vjobs.checkpoint.folder import FORMAT, CheckpointFolder
from vjobs.checkpoint.sparse import copy_summed
from vjobs.config.job import job_document, load_job
from vjobs.testing.sites import vjobs_command, write_site


def _machine_type() -> str:
    """The versioned type of q35 in this host's QEMU (``pc-q35-7.2``)."""
    listing = subprocess.run(["qemu-system-x86_64", "-machine", "help"], capture_output=True, text=True,
                             check=True).stdout
    return next(line.split()[0] for line in listing.splitlines() if "(alias of" in line and line.startswith("q35"))


def _synthetic_checkpoint(folder, job_file, *, driver="qemu_user", machine_type=None, disks=()) -> CheckpointFolder:
    """A checkpoint as qemu_user writes one, without a VM: its guest files and disks are placeholders, so a
    test sees what is refused before any of them reaches a hypervisor."""
    checkpoints = CheckpointFolder(folder).make()
    partial = checkpoints.begin()
    (partial / "guest").mkdir()
    (partial / "disks").mkdir()
    for name in ("state", "restore-kernel", "restore-initrd"):
        (partial / "guest" / name).write_bytes(b"placeholder " + name.encode())
    files = {}
    for role in ("io", "scratch"):
        image = partial / "disks" / f"{role}.raw.tmp"
        with open(image, "wb") as file:
            file.truncate(4 << 20)
            file.write(role.encode())
        fd = os.open(image, os.O_RDONLY)
        files[f"disks/{role}.raw"] = {"block_sha256": copy_summed(fd, partial / "disks" / f"{role}.raw")}
        os.close(fd)
        image.unlink()
    identity = {"hypervisor": "QEMU", "machine_type": machine_type or _machine_type(), "accel": "tcg",
                "firmware": None, "vcpus": 1, "memory_mib": 512, "network": False, "disks": ["io", "scratch"],
                "layout": "virtio", "cmdline": "panic=-1"}
    manifest = {"format": FORMAT, "job": job_document(load_job(job_file)), "driver": driver, "guest": identity,
                "run_s": 3.0, "chain": [], "made_at": "2026-12-04T00:00:00+00:00", "made_on": "elsewhere",
                "channel": {}, "files": files,
                "disks": [{"role": "io", "file": "disks/io.raw"}, {"role": "scratch", "file": "disks/scratch.raw"},
                          *disks]}
    checkpoints.commit(partial, manifest)
    return checkpoints


def _resume_refused(checkpoints, site, outdir):
    started = []
    result = vjobs.resume(checkpoints.path, site=site, outdir=outdir,
                          event_hooks={"step_started": [lambda event: started.append(event.subject)]})
    assert result.status == "setup_error", result.status
    assert "vm_create" not in started and "vm_start" not in started  # no VM was made
    assert json.loads((outdir / "result.json").read_text())["status"] == "setup_error"
    return result.error


def test_a_checkpoint_of_another_driver_is_refused(make_job, qemu_user_site, tmp_path):
    checkpoints = _synthetic_checkpoint(tmp_path / "ckpt", make_job(["true"]), driver="kvm")
    error = _resume_refused(checkpoints, qemu_user_site, tmp_path / "out")
    assert error["code"] == "checkpoint_mismatch" and "--driver kvm" in error["message"]


def test_a_machine_this_qemu_does_not_have_is_named(make_job, qemu_user_site, tmp_path):
    checkpoints = _synthetic_checkpoint(tmp_path / "ckpt", make_job(["true"]), machine_type="pc-q35-1.0")
    error = _resume_refused(checkpoints, qemu_user_site, tmp_path / "out")
    assert error["code"] == "checkpoint_mismatch" and "machine type pc-q35-1.0" in error["message"]


def test_a_disk_changed_since_it_was_saved_is_refused(make_job, qemu_user_site, tmp_path):
    checkpoints = _synthetic_checkpoint(tmp_path / "ckpt", make_job(["true"]))
    with open(checkpoints.current().folder / "disks" / "scratch.raw", "r+b") as disk:
        disk.seek(1 << 20)
        disk.write(b"tampered")  # the same size: only its sum tells
    error = _resume_refused(checkpoints, qemu_user_site, tmp_path / "out")
    assert error["code"] == "checkpoint_damaged" and "disks/scratch.raw is not what was saved" in error["message"]


def test_a_guest_state_changed_since_it_was_saved_is_refused(make_job, qemu_user_site, tmp_path):
    checkpoints = _synthetic_checkpoint(tmp_path / "ckpt", make_job(["true"]))
    state = checkpoints.current().folder / "guest" / "state"
    state.write_bytes(state.read_bytes().upper())
    error = _resume_refused(checkpoints, qemu_user_site, tmp_path / "out")
    assert error["code"] == "checkpoint_damaged" and "state is not what was saved" in error["message"]


def test_a_release_image_neither_cached_nor_made_again_here_is_named(make_job, qemu_user_site, tmp_path):
    missing = {"role": "release", "sha256": "0" * 64, "source": str(tmp_path / "gone"), "format": "squashfs"}
    checkpoints = _synthetic_checkpoint(tmp_path / "ckpt", make_job(["true"]), disks=[missing])
    error = _resume_refused(checkpoints, qemu_user_site, tmp_path / "out")
    assert error["code"] == "checkpoint_image_missing" and "0" * 64 in error["message"]


def test_an_incomplete_checkpoint_is_refused_at_once(make_job, qemu_user_site, tmp_path):
    checkpoints = _synthetic_checkpoint(tmp_path / "ckpt", make_job(["true"]))
    (checkpoints.current().folder / "guest" / "state").unlink()
    result = vjobs.resume(checkpoints.path, site=qemu_user_site, outdir=tmp_path / "out")
    assert result.status == "setup_error" and "incomplete: guest/state missing" in result.error["message"]


# --- with VMs ------------------------------------------------------------------------------------------

COUNT_TO = 40
COUNT = (f"i=0; while [ $i -lt {COUNT_TO} ]; do i=$((i+1)); echo line $i; echo $i >> count.txt; sleep 0.3; "
         "done")


def _wait_until(ready, process, timeout_s=120.0):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert process.poll() is None, process.communicate()
        try:
            if ready():
                return
        except (OSError, ValueError):
            pass
        time.sleep(0.2)
    raise AssertionError("not seen in time")


def _lines(outdir) -> int:
    return len((outdir / "stdout").read_text().splitlines())


@pytest.mark.vm
def test_periodic_checkpoints_outlive_a_killed_vjobs_and_the_warning_signal_saves_too(make_job, tmp_path,
                                                                                      start_vjobs, cache_dir):
    """Saved every 2 s; vjobs killed with SIGKILL (as a node that dies): `vjobs gc` clears what it left, the
    resume goes on from the last checkpoint. Then the site's checkpoint_signal (SIGUSR1) saves it again and
    the job ends 207; the next resume finishes it, every line once, with the chain of checkpoints."""
    site = tmp_path / "site.toml"
    write_site(site, {"driver": "qemu_user", "cache_dir": str(cache_dir), "work_dir": str(tmp_path / "work"),
                      "checkpoint_interval_s": 2, "host": {"budget_dir": str(tmp_path / "host-budget")}})
    job, folder = make_job(["sh", "-c", COUNT], outputs=["count.txt"]), tmp_path / "ckpt"
    first = start_vjobs(job, site, tmp_path / "out1", "--checkpoint", str(folder))
    _wait_until(lambda: _lines(tmp_path / "out1") >= 12 and (folder / "current.json").exists(), first)
    first.send_signal(signal.SIGKILL)
    first.wait()
    gc = subprocess.run([*vjobs_command(), "gc", "--site", str(site)], capture_output=True, text=True, timeout=120)
    assert gc.returncode == 0 and f"kept the checkpoint folder {folder}" in gc.stdout, gc.stdout + gc.stderr

    second = start_vjobs(folder, site, tmp_path / "out2", command="resume")
    _wait_until(lambda: _lines(tmp_path / "out2") >= 3, second)
    second.send_signal(signal.SIGUSR1)
    output, errors = second.communicate(timeout=120)
    assert second.returncode == 207, errors
    assert json.loads(output)["status"] == "checkpointed"

    third = start_vjobs(folder, site, tmp_path / "out3", command="resume")
    output, errors = third.communicate(timeout=300)
    result = json.loads(output)
    assert third.returncode == 0 and result["status"] == "succeeded", (result["error"], errors)
    lines = [f"line {i}" for i in range(1, COUNT_TO + 1)]
    assert (tmp_path / "out3" / "stdout").read_text().splitlines() == lines
    assert (tmp_path / "out3" / "outputs" / "count.txt").read_text().split() == [str(i) for i in range(1, COUNT_TO + 1)]
    chain = result["provenance"]["checkpoints"]
    assert len(chain) >= 3 and [link["checkpoint"] for link in chain] == sorted(link["checkpoint"] for link in chain)
    assert chain[-1]["run_s"] > chain[0]["run_s"]


def test_a_new_job_does_not_take_over_a_folder_that_holds_a_checkpoint(make_job, qemu_user_site, tmp_path):
    checkpoints = _synthetic_checkpoint(tmp_path / "ckpt", make_job(["true"]))
    result = vjobs.run(make_job(["true"], id="other"), site=qemu_user_site, outdir=tmp_path / "out",
                       checkpoint=checkpoints.path)
    assert result.status == "setup_error" and result.error["code"] == "checkpoint_exists"
    assert checkpoints.current().name == "cp-000001"


@pytest.mark.vm
def test_a_job_larger_than_checkpoint_max_gib_is_not_saved_and_says_so(make_job, make_site, tmp_path):
    """512 MiB of memory against a bound of 0.25 GiB: SIGTERM cancels the job as without a checkpoint folder,
    and the result says why it was not saved; no partial checkpoint is left."""
    site = make_site(driver="qemu_user", checkpoint_max_gib=0.25)
    out, folder = tmp_path / "out", tmp_path / "ckpt"
    job = make_job(["sh", "-c", "echo ready; sleep 600"])
    watcher = subprocess.Popen(["sh", "-c", f"until grep -q ready {out}/stdout 2>/dev/null; do sleep 0.2; done; "
                                            f"kill -TERM {os.getpid()}"])
    try:
        result = vjobs.run(job, site=site, outdir=out, checkpoint=folder)
    finally:
        watcher.wait(timeout=60)
    assert result.status == "cancelled"
    assert "could not be checkpointed" in result.error["message"] and "checkpoint_max_gib" in result.error["message"]
    assert list(folder.iterdir()) == []
