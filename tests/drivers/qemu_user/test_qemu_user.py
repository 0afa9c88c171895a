"""qemu_user specifics: its probe, a missing QEMU, a guest that hangs while booting."""

from __future__ import annotations

import hashlib
import os
import socket

import pytest

import vjobs
from vjobs.images.cpio import CpioWriter
from vjobs.testing.host_state import work_leftovers


def test_probe_says_tcg(make_site):
    verdict = next(v for v in vjobs.probe(make_site()) if v.driver == "qemu_user")
    assert verdict.usable and verdict.acceleration == "tcg" and verdict.hypervisor.startswith("QEMU ")


def _qemu_user_driver(make_site, **settings):
    from vjobs.api import host_context
    from vjobs.drivers.registry import load_driver

    site = make_site(driver="qemu_user", drivers={"qemu_user": {"template": False, **settings}})
    return load_driver("qemu_user", site, host_context(site))


def _spec(tmp_path, built_boot):
    from vjobs.drivers.contract import Disk, Owner, VMSpec
    from vjobs.guest.console import ConsoleLog

    disk = tmp_path / "io.raw"
    disk.write_bytes(bytes(1 << 20))
    owner = Owner(job_id="t1", pid=os.getpid(), boot_id="b" * 32, hostname=socket.gethostname(), run_id="abcd1234")
    return VMSpec(name="vjobs-t1-abcd1234", vcpus=1, memory_mib=256, boot=built_boot,
                  disks=(Disk("io", disk, "raw", False),), console=ConsoleLog(tmp_path / "console.log"),
                  network=False, owner=owner, workdir=tmp_path)


def _open_files() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


def test_create_opens_what_qemu_gets_runs_nothing_and_destroy_lets_it_go(make_site, built_boot, tmp_path):
    driver, spec = _qemu_user_driver(make_site), _spec(tmp_path, built_boot)
    before = _open_files()
    vm = driver.create(spec)
    assert vm.process is None and "-kernel" in vm.prepared.argv  # the command line is written, QEMU not started
    assert len(_open_files() - before) >= 5  # the disk (read-write and read-only), kernel, initramfs, sockets
    vm.destroy()
    vm.destroy()
    assert _open_files() == before
    spec.console.close()


@pytest.mark.vm
def test_qemu_gets_the_checked_descriptors_and_never_opens_a_backing_file(make_site, built_boot, checked_files,
                                                                           tmp_path):
    """QEMU started (paused, every drive open) with a read-only qcow2 that names a backing file which is not
    there: it opens nothing by that name (it would not start), and no image path is on its command line."""
    import dataclasses
    import subprocess

    from vjobs.drivers.contract import Disk

    qcow2 = tmp_path / "base.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-u", "-b", str(tmp_path / "gone.raw"), "-F", "raw",
                    str(qcow2), "1M"], check=True)
    spec = _spec(tmp_path, built_boot)
    spec = dataclasses.replace(spec, disks=(*spec.disks, Disk("rootfs", qcow2, "qcow2", True,
                                                              file=checked_files.open(qcow2, "rootfs"))))
    vm = _qemu_user_driver(make_site).create(spec)
    try:
        argv = " ".join(vm.prepared.argv)
        vm.launch(vm.take_prepared())  # raises if QEMU exits at start
        assert vm.process.poll() is None
        assert '"driver":"qcow2","read-only":true,"file":{"driver":"file","filename":"/dev/fdset/' in argv
        assert '"backing":null' in argv and str(tmp_path) not in argv
    finally:
        vm.destroy()
        spec.console.close()


def test_a_create_that_fails_half_way_leaves_nothing_open(make_site, built_boot, tmp_path):
    driver, spec = _qemu_user_driver(make_site), _spec(tmp_path, built_boot)
    spec.disks[0].path.unlink()
    spec.disks[0].path.mkdir()  # fails to open read-write: last, after the kernel, the initramfs and the sockets
    before = _open_files()
    with pytest.raises(IsADirectoryError):
        driver.create(spec)
    assert _open_files() == before
    spec.console.close()


def test_missing_qemu_is_a_clear_error(make_site, make_job, tmp_path, assert_clean_host):
    site = make_site(driver="qemu_user", drivers={"qemu_user": {"binary": "/nonexistent/qemu-system-x86_64"}})
    result = vjobs.run(make_job(["true"]), site=site, outdir=tmp_path / "out")
    assert result.status == "vm_error" and result.error["code"] == "no_usable_driver"
    assert "not found" in result.error["message"] and "install qemu-system-x86" in result.error["message"]


@pytest.fixture
def silent_image(tmp_path, built_image):
    """The built-in kernel with an /init that never says a word: a boot that hangs silently."""
    initramfs = tmp_path / "silent.cpio"
    with open(initramfs, "wb") as handle:
        writer = CpioWriter(handle)
        writer.add_dir("bin")
        writer.add_file("init", b"#!/bin/busybox sh\n/bin/busybox sleep 3600\n", mode=0o755)
        writer.add_file("bin/busybox", open("/bin/busybox", "rb").read(), mode=0o755)
        writer.close()
    digest = lambda path: hashlib.sha256(path.read_bytes()).hexdigest()
    return {"kernel": str(built_image.kernel), "kernel_sha256": digest(built_image.kernel),
            "initramfs": str(initramfs), "initramfs_sha256": digest(initramfs)}


@pytest.mark.vm
def test_silent_boot_hang_is_retried_once_then_vm_error(make_site, make_job, silent_image, tmp_path,
                                                         assert_clean_host):
    site = make_site(driver="qemu_user", boot_timeout_s=6, images={"silent": silent_image})
    result = vjobs.run(make_job(["true"], image="silent"), site=site, outdir=tmp_path / "out")
    assert result.status == "vm_error" and result.error["code"] == "boot_timeout"
    assert result.provenance["boot_attempts"] == 2
    assert "boot attempt 2" in (tmp_path / "out" / "console.log").read_text()


@pytest.mark.vm
def test_qemu_that_exits_at_start_is_reported_with_its_own_message(make_site, make_job, fake_image, tmp_path,
                                                                   assert_clean_host):
    """A kernel file QEMU cannot load: QEMU exits before the guest exists, and says why."""
    site = make_site(driver="qemu_user", images={"broken": fake_image})
    result = vjobs.run(make_job(["true"], image="broken"), site=site, outdir=tmp_path / "out")
    assert result.status == "vm_error" and result.error["code"] == "hypervisor_failed"
    assert "QEMU exited at start" in result.error["message"] and "kernel" in result.error["message"].lower()


@pytest.fixture
def host_web_server(tmp_path):
    """An HTTP server on the host's loopback, serving one file: what a job with a network fetches."""
    import functools
    import http.server
    import threading

    root = tmp_path / "www"
    root.mkdir()
    (root / "calibration.txt").write_text("constants from the conditions database\n")
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server.server_address[1]
    server.shutdown()


@pytest.mark.vm
def test_job_that_asks_for_a_network_gets_one_when_the_site_allows(make_site, make_job, host_web_server, tmp_path,
                                                                  assert_clean_host):
    # 10.0.2.2 is the host as QEMU's user-mode network shows it to the guest
    job = make_job(["wget", "-q", "-O", "-", f"http://10.0.2.2:{host_web_server}/calibration.txt"], network=True)
    result = vjobs.run(job, site=make_site(driver="qemu_user", allow_network=True), outdir=tmp_path / "out")
    assert result.status == "succeeded", (result.error, (tmp_path / "out" / "console.log").read_text())
    assert (tmp_path / "out" / "stdout").read_text() == "constants from the conditions database\n"


@pytest.mark.vm
def test_job_without_network_has_no_interface(make_site, make_job, tmp_path, assert_clean_host):
    result = vjobs.run(make_job(["sh", "-c", "ls /sys/class/net"]), site=make_site(driver="qemu_user"),
                       outdir=tmp_path / "out")
    assert result.status == "succeeded"
    assert (tmp_path / "out" / "stdout").read_text() == "lo\n"


@pytest.mark.vm
@pytest.mark.parametrize("machine, wanted, unwanted", [
    ("q35", {"virtio_pci", "virtio_blk", "squashfs"}, {"virtio_mmio", "virtio_scsi", "virtio_net"}),
    ("microvm", {"virtio_mmio", "virtio_blk", "squashfs"}, set()),  # no virtio on PCI: every module
])
def test_the_agent_loads_the_modules_its_vms_devices_need(machine, wanted, unwanted, make_site, make_job, tmp_path,
                                                          assert_clean_host):
    """Under TCG each module costs boot time, so a q35 guest without a network card, a SCSI controller or
    Xen loads none of their drivers; a guest whose devices it cannot tell from PCI loads them all."""
    site = make_site(driver="qemu_user", drivers={"qemu_user": {"machine": machine, "template": False}})
    job = make_job(["cut", "-d", " ", "-f1", "/proc/modules"], release={"data.txt": "x\n"})
    result = vjobs.run(job, site=site, outdir=tmp_path / "out")
    assert result.status == "succeeded", result.error
    loaded = set((tmp_path / "out" / "stdout").read_text().split())
    assert wanted <= loaded and not unwanted & loaded, loaded


@pytest.mark.vm
def test_a_work_dir_deeper_than_a_unix_socket_path_allows(make_job, make_site, built_image, tmp_path):
    """A pilot's work directory can be deep; QEMU's monitor socket (108 bytes at most) must not care."""
    deep = tmp_path / ("d" * 60) / ("e" * 60)
    site = make_site(driver="qemu_user", work_dir=str(deep))
    result = vjobs.run(make_job(["true"]), site=site, outdir=tmp_path / "out")
    assert result.status == "succeeded", result.error
    assert work_leftovers(deep) == []
