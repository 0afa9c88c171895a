"""kvm specifics: the domain description, the probe that tells a working KVM host from a broken one, and the
faults of a libvirt host (daemon down, wrong URI, permission denied, name clash, restart, killed pilot).

The end-to-end behaviour shared with every driver is proven by the conformance suite (vjobs.testing.conformance);
these tests talk to the real libvirtd that scripts/test.sh starts, except the description tests, which use
libvirt's test:///default."""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
import xml.etree.ElementTree as ET
from pathlib import Path

import libvirt
import pytest

import vjobs
from vjobs.drivers.contract import BootImage, Disk, Owner, VMSpec
from vjobs.drivers.kvm import KvmDriver
from vjobs.drivers.kvm.domain import DomainSettings, domain_xml
from vjobs.drivers.kvm.driver import owner_labels
from vjobs.guest.console import ConsoleLog
from vjobs.host.identity import boot_id
from vjobs.images.checked import CheckedFiles
from vjobs.testing.host_state import vjobs_domains_of, work_leftovers
from vjobs.testing.processes import qemu_named_for, qemu_processes
from vjobs.testing.sites import LIBVIRT_URI


def make_spec(tmp_path: Path, files: CheckedFiles, *, name: str = "vjobs-t1-abcd1234", network: bool = False,
              boot: BootImage | None = None) -> VMSpec:
    """A spec with an io disk and a release disk (opened among ``files``, as the core opens a read-only disk)."""
    for name_of_file in ("io.raw", "rel.sqfs", "vmlinuz", "initrd"):
        (tmp_path / name_of_file).write_bytes(b"\0" * 4096)
    disks = (Disk("io", tmp_path / "io.raw", "raw", False),
             Disk("release", tmp_path / "rel.sqfs", "raw", True, file=files.open(tmp_path / "rel.sqfs", "release")))
    owner = Owner(job_id="t1", pid=os.getpid(), boot_id="b" * 32, hostname=socket.gethostname(), run_id="abcd1234")
    boot = boot or BootImage(files.open(tmp_path / "vmlinuz", "kernel"), files.open(tmp_path / "initrd", "initrd"),
                             "panic=-1")
    return VMSpec(name=name, vcpus=1, memory_mib=256, boot=boot, disks=disks,
                  console=ConsoleLog(tmp_path / "console.log"), network=network, owner=owner, workdir=tmp_path)


def xml_of(spec: VMSpec, settings: DomainSettings) -> str:
    return domain_xml(spec, settings, spec.workdir / "kernel-copy", spec.workdir / "initrd-copy")


# --- the domain description -------------------------------------------------------------------------------

def test_domain_xml_names_formats_makes_the_release_read_only_and_has_no_network(tmp_path, checked_files):
    spec = make_spec(tmp_path, checked_files, network=False)
    root = ET.fromstring(xml_of(spec, DomainSettings(virt_type="qemu", network="default")))
    assert root.get("type") == "qemu" and root.findtext("name") == spec.name
    assert [d.find("driver").get("type") for d in root.iter("disk")] == ["raw", "raw"]
    assert [d.find("readonly") is not None for d in root.iter("disk")] == [False, True]
    assert root.find("./devices/interface") is None
    assert root.findtext("./os/kernel") == str(tmp_path / "kernel-copy")  # a copy made from the checked file
    # the release is the checked descriptor (an fd group the driver fills), and no disk has a backing file
    assert [d.find("source").get("fdgroup") for d in root.iter("disk")] == [None, "vjobs-disk1"]
    assert all(d.find("backingStore") is not None and len(d.find("backingStore")) == 0 for d in root.iter("disk"))
    assert "console=ttyS0" in root.findtext("./os/cmdline")
    serial = root.find("./devices/serial")  # a socket vjobs listens on in the VM's folder: read by vjobs, bounded
    source = {"mode": "connect", "path": str(tmp_path / "console.sock")}
    assert serial.get("type") == "unix" and serial.find("source").attrib == source
    channel = root.find("./devices/channel")  # the live streams: a virtio-serial port on a socket, as the console
    assert channel.get("type") == "unix" and channel.find("target").attrib == {"type": "virtio", "name": "vjobs.streams"}
    assert channel.find("source").attrib == {"mode": "connect", "path": str(tmp_path / "streams.sock")}
    assert root.findtext("on_poweroff") == "destroy" and root.findtext("on_crash") == "destroy"


def test_domain_gets_a_network_only_when_the_job_asks_and_the_site_has_one(tmp_path, checked_files):
    spec = make_spec(tmp_path, checked_files, network=True)
    with_network = ET.fromstring(xml_of(spec, DomainSettings(network="default")))
    assert with_network.find("./devices/interface/source").get("network") == "default"
    no_site_network = ET.fromstring(xml_of(spec, DomainSettings(network=None)))
    assert no_site_network.find("./devices/interface") is None


def test_libvirt_accepts_the_description_and_keeps_owner_metadata(tmp_path, checked_files):
    """libvirt's own parser (test:///default, no daemon) reads back what vjobs wrote. That driver takes no
    descriptors, so the fd groups are left out here; the real libvirtd takes them (the tests below)."""
    spec = make_spec(tmp_path, checked_files)
    description = ET.fromstring(xml_of(spec, DomainSettings(virt_type="test")))
    for source in description.iter("source"):
        source.attrib.pop("fdgroup", None)
    conn = libvirt.open("test:///default")
    try:
        dom = conn.createXML(ET.tostring(description, encoding="unicode"), 0)
        described = ET.fromstring(dom.XMLDesc())
        assert [d.find("readonly") is not None for d in described.iter("disk")] == [False, True]
        assert [d.find("driver").get("type") for d in described.iter("disk")] == ["raw", "raw"]
        assert owner_labels(dom) == spec.owner.as_labels()
        dom.destroy()
    finally:
        conn.close()


@pytest.mark.vm
@pytest.mark.libvirt
def test_read_only_disks_reach_qemu_as_the_descriptors_libvirt_was_handed(kvm_site, built_boot, checked_files,
                                                                          tmp_path):
    """A read-only qcow2 that names a backing file which is not there, owned by someone else: the domain starts
    (QEMU opened nothing by that name), QEMU's command line names a descriptor set and not the file, libvirt left
    the file's owner as it was, and the domain is transient."""
    import dataclasses

    from vjobs.api import host_context
    from vjobs.testing.processes import qemu_named_for

    qcow2 = tmp_path / "base.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-u", "-b", str(tmp_path / "gone.raw"), "-F", "raw",
                    str(qcow2), "1M"], check=True)
    os.chown(qcow2, 1234, 1234)
    qcow2.chmod(0o640)
    job = f"fdpass{uuid.uuid4().hex[:8]}"
    spec = make_spec(tmp_path, checked_files, name=f"vjobs-{job}-abcd1234", boot=built_boot)
    spec = dataclasses.replace(spec, disks=(*spec.disks, Disk("rootfs", qcow2, "qcow2", True,
                                                              file=checked_files.open(qcow2, "rootfs"))))
    vm = KvmDriver({"uri": LIBVIRT_URI, "virt_type": "qemu", "template": False}, host_context(kvm_site)).create(spec)
    conn = libvirt.open(LIBVIRT_URI)
    try:
        dom = conn.lookupByName(spec.name)
        assert dom.state()[0] == libvirt.VIR_DOMAIN_PAUSED and not dom.isPersistent()
        cmdline = (qemu_named_for(job) / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        assert cmdline.count("/dev/fdset/") == 2 and str(qcow2) not in cmdline  # the release and the qcow2
        assert str(spec.workdir / "kernel") in cmdline  # the kernel: a private copy of the checked file
        assert (qcow2.stat().st_uid, qcow2.stat().st_gid, qcow2.stat().st_mode & 0o777) == (1234, 1234, 0o640)
    finally:
        vm.destroy()
        conn.close()
        spec.console.close()


# --- the probe --------------------------------------------------------------------------------------------

def libvirt_advertises(virt_type: str) -> bool:
    """Does the libvirtd under test list x86_64 hvm guests of this domain type (for kvm: it found /dev/kvm)?"""
    conn = libvirt.open(LIBVIRT_URI)
    try:
        caps = ET.fromstring(conn.getCapabilities())
    finally:
        conn.close()
    return caps.find(f"./guest[os_type='hvm']/arch[@name='x86_64']/domain[@type='{virt_type}']") is not None


def probe_json(tmp_path: Path, cache: Path, virt_type: str) -> dict:
    """`vjobs probe --json`'s verdict on the kvm driver with this virt_type, as a site admin would run it."""
    site = tmp_path / f"{virt_type}.toml"
    site.write_text(f'cache_dir = "{cache}"\nwork_dir = "{tmp_path / "work"}"\n'
                    f'[drivers.kvm]\nuri = "{LIBVIRT_URI}"\nvirt_type = "{virt_type}"\n')
    done = subprocess.run([sys.executable, "-m", "vjobs", "probe", "--json", "--site", str(site)],
                          capture_output=True, text=True, timeout=240)
    return next(v for v in json.loads(done.stdout) if v["driver"] == "kvm")


def remember_failed_boot(cache: Path, key: str, detail: str) -> None:
    """What the deep probe (vjobs/drivers/bootcheck.py) records after a guest hung for this host boot, so that
    the next probe answers from it instead of booting: here, a hang on any host, given to the probe."""
    record = cache / "probes" / (key.replace("/", "_").replace(":", "_") + ".json")
    record.parent.mkdir(parents=True)
    record.write_text(json.dumps({"boot_id": boot_id(), "ok": False, "detail": detail}))


@pytest.mark.vm
def test_probe_json_says_kvm_cannot_boot_guests_and_tcg_through_libvirt_can(kvm_site, cache_dir, tmp_path):
    """On any host with libvirtd: a KVM under which guests hang (given explicitly: the deep probe's verdict for
    this host boot says so) is not usable, and the verdict says whether libvirt advertised it and what to set
    instead; TCG through libvirt really boots."""
    hang = "a guest did not finish booting within 15 s (0 bytes of console output): guests hang here"
    remember_failed_boot(tmp_path / "kvm-cache", f"kvm-{LIBVIRT_URI}-kvm", hang)
    kvm, tcg = probe_json(tmp_path, tmp_path / "kvm-cache", "kvm"), probe_json(tmp_path, cache_dir, "qemu")
    assert not kvm["usable"] and kvm["acceleration"] is None
    assert 'set [drivers.kvm] virt_type = "qemu" to use TCG' in kvm["reason"]
    boots = [c for c in kvm["checks"] if c["name"].startswith("boot")]
    if libvirt_advertises("kvm"):
        assert "although libvirt advertises KVM" in kvm["reason"] and hang in kvm["reason"]
        assert [c["ok"] for c in boots] == [False]
    else:  # libvirt found no usable /dev/kvm: no guest is booted to find out
        assert "no <domain type='kvm'/>" in kvm["reason"] and boots == []
    assert tcg["usable"] and tcg["acceleration"] == "tcg"
    assert "booted and powered off" in tcg["acceleration_reason"]


def _cpu_can_virtualise() -> bool:
    flags = Path("/proc/cpuinfo").read_text()
    return " vmx" in flags or " svm" in flags


@pytest.mark.vm
def test_the_deep_probe_finds_that_guests_hang_under_a_kvm_libvirt_advertises(kvm_site, cache_dir, tmp_path):
    """The hang itself, observed: needs a host whose libvirt advertises KVM (/dev/kvm is there) while its CPU
    shows no vmx or svm to guests, as on the machines vjobs was developed on, where every guest hangs under KVM.
    Elsewhere it is skipped, saying so; the verdict's wording is proven on any host by the test above."""
    if _cpu_can_virtualise() or not libvirt_advertises("kvm"):
        pytest.skip("needs libvirt advertising KVM on a CPU without vmx/svm (a KVM no guest boots under); here "
                    f"libvirt advertises KVM: {libvirt_advertises('kvm')}, vmx/svm: {_cpu_can_virtualise()}")
    kvm = probe_json(tmp_path, cache_dir, "kvm")
    assert not kvm["usable"] and "although libvirt advertises KVM" in kvm["reason"]
    assert [c["ok"] for c in kvm["checks"] if c["name"].startswith("boot")] == [False]


# --- libvirtd faults --------------------------------------------------------------------------------------

def _kvm_verdict(make_site, uri: str):
    site = make_site(driver="kvm", drivers={"kvm": {"uri": uri, "virt_type": "qemu"}})
    return next(v for v in vjobs.probe(site) if v.driver == "kvm"), site


def test_libvirtd_not_running_names_the_uri_and_what_to_start(make_site, make_job, tmp_path, assert_clean_host):
    uri = "qemu+unix:///system?socket=/nonexistent/libvirt-sock"
    verdict, site = _kvm_verdict(make_site, uri)
    assert not verdict.usable
    assert uri in verdict.reason and "libvirtd -d" in verdict.reason
    result = vjobs.run(make_job(["true"]), site=site, outdir=tmp_path / "out")
    assert result.status == "vm_error" and result.error["code"] == "no_usable_driver"
    assert uri in result.error["message"] and "not running" in result.error["message"]


def test_wrong_uri_says_to_fix_the_site_config(make_site):
    verdict, _ = _kvm_verdict(make_site, "nosuchhypervisor:///system")
    assert not verdict.usable
    assert "nosuchhypervisor:///system" in verdict.reason and "[drivers.kvm] uri" in verdict.reason


def _probe_as_nobody(uri: str, queue) -> None:
    os.setgroups([])
    os.setgid(65534)
    os.setuid(65534)
    verdict = KvmDriver({"uri": uri}, host=None).probe()
    queue.put(verdict.reason)


def test_permission_denied_on_the_socket(tmp_path):
    folder = Path(tempfile.mkdtemp(prefix="vjobs-sock-"))
    try:
        folder.chmod(0o755)
        listener = socket.socket(socket.AF_UNIX)
        listener.bind(str(folder / "libvirt-sock"))
        listener.listen()
        (folder / "libvirt-sock").chmod(0o600)  # root's: an unprivileged vjobs cannot connect
        uri = f"qemu+unix:///system?socket={folder}/libvirt-sock"
        context = multiprocessing.get_context("fork")
        queue = context.Queue()
        child = context.Process(target=_probe_as_nobody, args=(uri, queue))
        child.start()
        reason = queue.get(timeout=30)
        child.join(30)
        assert "permission denied" in reason and "member of the socket's group" in reason
    finally:
        listener.close()
        subprocess.run(["rm", "-rf", str(folder)], check=True)


@pytest.fixture
def blocker(kvm_site, built_image, tmp_path):
    """A running domain that is not vjobs': SeaBIOS looking for something to boot, forever."""
    conn = libvirt.open(LIBVIRT_URI)
    name = f"not-vjobs-{uuid.uuid4().hex[:8]}"
    dom = conn.createXML(f"<domain type='qemu'><name>{name}</name><memory unit='MiB'>32</memory>"
                         "<os><type arch='x86_64' machine='q35'>hvm</type></os><devices/></domain>", 0)
    yield name
    try:
        dom.destroy()
    except libvirt.libvirtError:
        pass
    conn.close()


@pytest.mark.vm
@pytest.mark.libvirt
def test_domain_with_the_same_name_already_running(kvm_site, blocker, built_boot, checked_files, tmp_path):
    from vjobs.api import host_context

    driver = KvmDriver({"uri": LIBVIRT_URI, "virt_type": "qemu", "template": False}, host_context(kvm_site))
    with pytest.raises(vjobs.VMError) as failure:
        # it releases what it made: there is no VM to destroy
        driver.create(make_spec(tmp_path, checked_files, name=blocker, boot=built_boot))
    assert failure.value.code == "domain_exists" and "vjobs gc" in str(failure.value)
    conn = libvirt.open(LIBVIRT_URI)
    assert conn.lookupByName(blocker).isActive()  # vjobs' failure did not take the other domain down
    conn.close()


@pytest.mark.vm
@pytest.mark.libvirt
def test_create_makes_the_domain_paused_and_destroy_removes_it(kvm_site, built_boot, checked_files, tmp_path):
    from vjobs.api import host_context

    driver = KvmDriver({"uri": LIBVIRT_URI, "virt_type": "qemu", "template": False}, host_context(kvm_site))
    spec = make_spec(tmp_path, checked_files, name=f"vjobs-t1-{uuid.uuid4().hex[:8]}", boot=built_boot)
    vm = driver.create(spec)
    conn = libvirt.open(LIBVIRT_URI)
    try:
        assert conn.lookupByName(spec.name).state()[0] == libvirt.VIR_DOMAIN_PAUSED  # its disks are open
        vm.destroy()
        with pytest.raises(libvirt.libvirtError):
            conn.lookupByName(spec.name)
    finally:
        conn.close()
        spec.console.close()


@pytest.mark.vm
@pytest.mark.libvirt
def test_a_work_dir_too_deep_for_socket_paths_puts_them_in_a_private_temporary_folder(kvm_site, make_site, make_job,
                                                                                     tmp_path, assert_clean_host):
    """The console's and the live streams' sockets (vjobs/drivers/kvm/driver.py DomainSockets) in a folder of
    the system's temporary folder, both connected, and the folder gone after the job."""
    deep = tmp_path / ("d" * 60) / ("e" * 60)
    site = make_site(driver="kvm", drivers=dict(kvm_site.drivers), work_dir=str(deep))
    result = vjobs.run(make_job(["sh", "-c", "echo out; echo err >&2"]), site=site, outdir=tmp_path / "out")
    assert result.status == "succeeded", result.error
    assert (tmp_path / "out" / "stdout").read_text() == "out\n"
    assert b"vjobs-agent: up" in (tmp_path / "out" / "console.log").read_bytes()
    assert not list(Path(tempfile.gettempdir()).glob(f"vjobs-console-{os.getpid()}-*"))


@pytest.mark.vm
@pytest.mark.libvirt
def test_libvirtd_restarted_while_a_job_runs(kvm_site, make_job, tmp_path, repo, assert_clean_host):
    results = []
    runner = threading.Thread(target=lambda: results.append(
        vjobs.run(make_job(["sleep", "600"]), site=kvm_site, outdir=tmp_path / "out")))
    runner.start()
    deadline = time.monotonic() + 120
    while not any(b"running the payload" in log.read_bytes() for log in (tmp_path / "work").glob("*/console.*.log")):
        assert time.monotonic() < deadline and runner.is_alive(), "the payload never started"
        time.sleep(0.2)
    subprocess.run([str(repo / ".ci" / "libvirt.sh"), "restart"], check=True, timeout=120)
    runner.join(120)
    assert not runner.is_alive()
    result = results[0]
    assert result.status == "vm_error" and result.error["code"] == "hypervisor_lost"
    assert "restarted" in result.error["message"]


@pytest.mark.vm
@pytest.mark.libvirt
def test_killed_pilot_leaves_a_domain_that_gc_removes_and_nothing_else(kvm_site, blocker, make_job, tmp_path,
                                                                      cache_dir, start_vjobs, wait_for_payload):
    site_file = tmp_path / "site.toml"
    site_file.write_text(f'driver = "kvm"\ncache_dir = "{cache_dir}"\nwork_dir = "{tmp_path / "work"}"\n'
                         f'[drivers.kvm]\nuri = "{LIBVIRT_URI}"\nvirt_type = "qemu"\n')
    process = start_vjobs(make_job(["sleep", "600"]), site_file, tmp_path / "out")
    wait_for_payload(tmp_path / "work", process)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert vjobs_domains_of(process.pid), "libvirt's domain outlives the pilot: gc's work"
    gc = subprocess.run([sys.executable, "-m", "vjobs", "gc", "--site", str(site_file)], capture_output=True,
                        text=True, timeout=120)
    assert gc.returncode == 0, gc.stderr
    # the job's own domain, or the template slot it was restored into: gc goes by its owner labels
    assert "destroyed domain vjobs-" in gc.stdout and "(job t1," in gc.stdout and "removed job folder" in gc.stdout
    assert vjobs_domains_of(process.pid) == []
    assert work_leftovers(tmp_path / "work") == []
    assert qemu_processes(str(tmp_path)) == []
    conn = libvirt.open(LIBVIRT_URI)
    assert conn.lookupByName(blocker).isActive()  # not vjobs': left alone
    conn.close()


@pytest.mark.libvirt
def test_gc_removes_a_domain_a_killed_vjobs_left_defined(kvm_site, checked_files, tmp_path):
    """A vjobs killed between defining a domain and making it transient leaves a definition; gc removes it."""
    import dataclasses

    from vjobs.api import host_context

    run_id = uuid.uuid4().hex[:8]  # the test's own: gc below removes what carries it, and nothing else
    spec = make_spec(tmp_path, checked_files, name=f"vjobs-t1-{run_id}")
    spec = dataclasses.replace(spec, owner=dataclasses.replace(spec.owner, run_id=run_id))
    conn = libvirt.open(LIBVIRT_URI)
    try:
        conn.defineXML(xml_of(spec, DomainSettings(virt_type="qemu")))
        driver = KvmDriver({"uri": LIBVIRT_URI, "virt_type": "qemu", "template": False}, host_context(kvm_site))
        removed = driver.collect_garbage(lambda labels: labels.get("vjobs.run_id") == run_id)
        assert removed == [f"destroyed domain {spec.name} on {LIBVIRT_URI} (job t1, pid {os.getpid()})"]
        with pytest.raises(libvirt.libvirtError, match="Domain not found"):
            conn.lookupByName(spec.name)
    finally:
        conn.close()


# --- confinement -----------------------------------------------------------------------------------------

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


@pytest.mark.vm
@pytest.mark.libvirt
@pytest.mark.skipif(os.geteuid() != 0, reason="confinement applies when vjobs runs as root")
def test_libvirts_qemu_keeps_its_seccomp_sandbox_and_mount_namespace(kvm_site, make_job, tmp_path,
                                                                      assert_clean_host):
    """Under libvirt QEMU's confinement is libvirt's (qemu.conf): here it runs as root (docs/security.md says
    why), so what must hold is the rest: its seccomp filter and its own mount namespace."""
    outcome = {}
    job = make_job(["sleep", "4"], id="libvirtconfined")
    thread = threading.Thread(target=lambda: outcome.update(
        result=vjobs.run(job, site=kvm_site, outdir=tmp_path / "out")))
    thread.start()
    try:
        qemu = qemu_named_for("libvirtconfined")
        assert _seccomp_mode_once_settled(qemu) == "2"  # a filter is installed
        assert os.readlink(qemu / "ns" / "mnt") != os.readlink("/proc/self/ns/mnt")
    finally:
        thread.join(180)
    assert outcome["result"].status == "succeeded", outcome["result"].error
