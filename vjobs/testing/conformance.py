"""The driver conformance suite: what every driver must do, proven with real guests, run against every driver
installed in the ``vjobs.drivers`` entry-point group (as OpenStack Nova runs one test class against every virt
driver). A driver from another package runs it too: it is installed, so it is a parameter.

What it proves, through ``vjobs.run`` and ``vjobs exec``: the exit status, outputs in subfolders, stdout,
stderr and the environment come back; the release and the base image are read-only at the device level; the
wall time kills the guest; a guest kernel crash is a VM error; a hostile results archive is refused; outputs
over the limit are refused; a console flood is bounded; a base image runs Python and keeps its overlay to
itself, also as a qcow2 of a GPT disk (converted for a driver that takes raw disks only); while a payload
runs, its stdout, its read-write binds' changes and deletions and its usage reach the host (and ``vjobs ps``),
and a SIGTERM brings back what it wrote before the VM stops; with a checkpoint folder, a SIGTERM saves the VM
and ``vjobs.resume`` continues it elsewhere, where it was.

The contract with the tests that run it: each installed driver NAME needs a fixture ``NAME_site`` (a
``SiteConfig`` pinned to that driver, ``-`` and ``.`` in NAME written ``_``), beside the fixtures of the
``vjobs.testing.fixtures`` plugin. That plugin brings ``qemu_user_site``, ``kvm_site`` and ``xen_site`` for
vjobs' own drivers; a driver without one fails every test of the suite, with a message saying what to write.
Another package's driver runs the suite with two files in its tests folder::

    # conftest.py
    import pytest

    pytest_plugins = ["vjobs.testing.fixtures"]

    @pytest.fixture
    def firecracker_site(make_site):  # the entry point is named "firecracker"
        return make_site(driver="firecracker", drivers={"firecracker": {"binary": "/usr/bin/firecracker"}})

    # test_conformance.py
    from vjobs.testing.conformance import DriverConformance

    class TestConformance(DriverConformance):
        pass

``pytest -m vm -k firecracker`` runs it for that driver alone; every test boots real guests (the ``vm`` mark).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import importlib.metadata
import io
import json
import os
import re
import shutil
import signal
import tarfile
import threading
import time
from pathlib import Path

import pytest

import vjobs
from vjobs.cli import exec_command
from vjobs.cli.commands import build_parser
from vjobs.config.site import SiteConfig
from vjobs.drivers.registry import NAMESPACE
from vjobs.testing.host_state import work_leftovers
from vjobs.testing.processes import qemu_processes


def installed_drivers() -> list[str]:
    """The names of the drivers installed here (entry points in ``vjobs.drivers``), none of them imported."""
    return sorted({entry_point.name for entry_point in importlib.metadata.entry_points(group=NAMESPACE)})


def site_fixture_name(driver: str) -> str:
    """The fixture that gives the suite a site for ``driver``: ``NAME_site``."""
    return re.sub(r"\W", "_", driver) + "_site"


def _run(job: Path, driver_site: tuple[str, SiteConfig], outdir: Path) -> vjobs.Result:
    name, site = driver_site
    result = vjobs.run(job, site=site, outdir=outdir)
    assert result.driver == name, (result.status, result.error)  # why the driver did not run, if it did not
    return result


def _sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _hostile_tar() -> bytes:
    """A results archive that says "exit 0" and climbs out of the output folder."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as archive:
        for name, data in (("vjobs/status", b"exit_code=0\n"), ("work/../../evil", b"pwned\n")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


# A Python analysis run from the release on the base image: counts the kinds of events in its input.
SUMMARY = '''\
import json, os, platform, sys
counts = {}
for line in open(sys.argv[1]):
    kind = line.split()[0]
    counts[kind] = counts.get(kind, 0) + 1
os.makedirs("out", exist_ok=True)
json.dump({"python": platform.python_version(), "cwd": os.getcwd(), "counts": counts,
           "env": {k: os.environ[k] for k in sorted(os.environ) if k not in ("PWD", "OLDPWD", "SHLVL", "_")}},
          open("out/summary.json", "w"), sort_keys=True)
'''

# Root in the guest tries every way to write the base; each line says what happened.
ATTACK = r'''
for sys in /sys/block/*; do
    dev=/dev/${sys##*/}
    [ "$(cat $sys/ro)" = 1 ] || continue
    blockdev --setrw $dev 2>/dev/null
    echo "ro-device $dev ro=$(cat $sys/ro)"
    dd if=/dev/zero of=$dev bs=4096 count=1 conv=notrunc,fsync 2>/dev/null && echo "dd-wrote $dev"
    mkdir -p /mnt/try
    if mount -o rw $dev /mnt/try 2>/dev/null; then
        touch /mnt/try/planted 2>/dev/null && echo "rw-mount-wrote $dev"
        mount -o remount,rw /mnt/try 2>/dev/null && touch /mnt/try/planted2 2>/dev/null && echo "remount-wrote $dev"
        umount /mnt/try
    fi
done
echo overwritten > /usr/bin/python3 && echo "overlay-write-ok"
mv /opt /opt-renamed && test -d /opt-renamed && echo "rename-base-dir-ok"
touch /etc/left-by-first-job
rm -rf /usr/share/python3 /etc/passwd && echo "delete-ok"
'''


@pytest.mark.vm
class DriverConformance:
    """The suite; a test module runs it by subclassing (pytest collects a class named ``Test...``). A subclass
    may lower the console flood for a driver whose console is slow by nature (a Xen PV console), keeping it
    several times ``console_max_mib``."""

    console_flood_bytes = 3_000_000
    console_flood_walltime_s = 120

    @pytest.fixture(params=installed_drivers())
    def driver_site(self, request) -> tuple[str, SiteConfig]:
        """(driver name, site pinned to it) for each installed driver, from its ``NAME_site`` fixture; and the
        built-in image the jobs boot, built once per session."""
        name = request.param
        fixture = site_fixture_name(name)
        try:
            site = request.getfixturevalue(fixture)
        except pytest.FixtureLookupError:
            site = None  # and the failure below says what to do, without this exception's chain
        if site is None:
            pytest.fail(f"the driver {name!r} is installed (an entry point in {NAMESPACE}) but no fixture "
                        f"{fixture!r} gives the conformance suite a site for it: define one in conftest.py, "
                        f"e.g. `@pytest.fixture def {fixture}(make_site): return make_site(driver={name!r}, "
                        f"drivers={{{name!r}: {{...}}}})` (see vjobs.testing.conformance)", pytrace=False)
        request.getfixturevalue("built_image")
        return name, site

    # --- a job in, its results out ----------------------------------------------------------------------------

    def test_exit_status_outputs_in_subfolders_and_env(self, make_job, driver_site, tmp_path, assert_clean_host):
        job = make_job(["sh", "-c", 'mkdir -p out/sub && cat in.txt > out/sub/copy.txt && echo "$GREETING" '
                                    '&& echo to-stderr >&2 && ls /opt/release > out/listing && exit 7'],
                       inputs={"in.txt": "input data\n"}, release={"bin/tool": "#!/bin/sh\n"},
                       env={"GREETING": "hello from the guest"}, outputs=["out"])
        result = _run(job, driver_site, tmp_path / "out")
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

    def test_inputs_may_be_changed_renamed_and_deleted_in_the_guest_alone(self, make_job, driver_site, tmp_path,
                                                                        assert_clean_host):
        """The inputs come on a read-only image under an overlay: every change is the guest's own copy."""
        script = ('echo more >> data/a.txt && rm data/b.txt && mv c.txt renamed.txt && mv data moved && '
                  'ls -A moved && cat moved/a.txt renamed.txt && [ ! -e c.txt ] && echo new > data.txt && echo ok')
        job = make_job(["sh", "-c", script], inputs={"data/a.txt": "a\n", "data/b.txt": "b\n", "c.txt": "c\n"},
                       outputs=["moved", "renamed.txt", "data.txt"])
        result = _run(job, driver_site, tmp_path / "out")
        assert result.status == "succeeded", result.error
        assert (tmp_path / "out" / "stdout").read_text() == "a.txt\na\nmore\nc\nok\n"
        outputs = tmp_path / "out" / "outputs"
        assert (outputs / "moved" / "a.txt").read_text() == "a\nmore\n"
        assert {o["path"] for o in result.outputs} == {"moved/a.txt", "renamed.txt", "data.txt"}
        inputs = tmp_path / "inputs"
        assert sorted(str(p.relative_to(inputs)) for p in inputs.rglob("*")) == ["c.txt", "data", "data/a.txt",
                                                                                 "data/b.txt"]
        assert (inputs / "data" / "a.txt").read_text() == "a\n"

    def test_release_is_read_only_in_the_guest(self, make_job, driver_site, tmp_path, assert_clean_host):
        script = ('touch /opt/release/new 2>/dev/null && echo file-write-worked; '
                  'dev=$(grep " /opt/release " /proc/mounts | cut -d" " -f1); '
                  'dd if=/dev/zero of=$dev bs=512 count=1 conv=notrunc 2>/dev/null && echo device-write-worked; '
                  'echo ro=$(cat /sys/block/${dev#/dev/}/ro)')
        result = _run(make_job(["sh", "-c", script], release={"data": "x"}), driver_site, tmp_path / "out")
        assert result.status == "succeeded", result.error
        assert (tmp_path / "out" / "stdout").read_text() == "ro=1\n"

    def test_walltime_kills_the_guest(self, make_job, driver_site, tmp_path, assert_clean_host):
        result = _run(make_job(["sleep", "600"], walltime_s=3), driver_site, tmp_path / "out")
        assert result.status == "timeout"
        assert result.exit_code is None
        assert result.error["code"] == "walltime_exceeded"

    def test_guest_kernel_crash_is_a_vm_error(self, make_job, driver_site, tmp_path, assert_clean_host):
        result = _run(make_job(["sh", "-c", "echo c > /proc/sysrq-trigger"]), driver_site, tmp_path / "out")
        assert result.status == "vm_error"
        assert result.error["code"] == "guest_crashed"
        assert "sysrq" in (tmp_path / "out" / "console.log").read_text(errors="replace").lower()

    def test_hostile_output_archive_is_refused(self, make_job, driver_site, tmp_path, assert_clean_host):
        """The payload, root in the guest, writes its own archive onto the io disk (one that climbs out of the
        output folder) and powers the VM off before the agent can write the real results. (In its own PID
        namespace `poweroff -f` would only end the payload: the kernel's SysRq poweroff is what stops the VM.)"""
        script = ('for d in /dev/vd? /dev/xvd? /dev/sd?; do [ -b $d ] && [ "$(head -c 13 $d)" = VJOBS-IO-DISK ] '
                  '&& dd if=evil.tar of=$d conv=notrunc 2>/dev/null; done; sync; echo o > /proc/sysrq-trigger; '
                  'sleep 60')
        result = _run(make_job(["sh", "-c", script], inputs={"evil.tar": _hostile_tar()}), driver_site,
                      tmp_path / "out")
        assert result.status == "vm_error"
        assert result.error["code"] == "unsafe_output"
        assert not (tmp_path / "evil").exists() and not (tmp_path.parent / "evil").exists()

    def test_outputs_over_the_limit_give_a_clear_error(self, make_job, driver_site, tmp_path, assert_clean_host):
        job = make_job(["sh", "-c", "dd if=/dev/urandom of=big bs=1M count=3 2>/dev/null"], outputs=["big"],
                       resources={"output_mib": 1})
        result = _run(job, driver_site, tmp_path / "out")
        assert result.status == "vm_error"
        assert result.error["code"] == "output_too_large"
        assert "output_mib" in result.error["message"]

    def test_a_guest_flooding_its_console_leaves_at_most_console_max_mib(self, driver_site, make_job, tmp_path,
                                                                          assert_clean_host):
        """``console_flood_bytes`` (3 MB) written to the console through the driver's console path; 64 KiB kept."""
        name, site = driver_site
        site = dataclasses.replace(site, console_max_mib=0.0625)
        flood = (f"yes vjobs-flood-line | head -c {self.console_flood_bytes} > /dev/console; "
                 "echo last-line-of-the-flood > /dev/console")
        result = _run(make_job(["sh", "-c", flood], walltime_s=self.console_flood_walltime_s), (name, site),
                      tmp_path / "out")
        assert result.status == "succeeded", result.error
        console = (tmp_path / "out" / "console.log").read_bytes()
        assert len(console) <= 64 * 1024 + 300
        assert b"vjobs-agent: up" in console[:32 * 1024]
        assert b"bytes of console output dropped here" in console
        assert b"last-line-of-the-flood" in console[-32 * 1024:]

    # --- an operating-system base image (the built-in Debian 12) ----------------------------------------------

    def test_python_from_the_base_reads_inputs_and_release_and_writes_outputs(self, make_job, driver_site,
                                                                               debian_image, tmp_path,
                                                                               assert_clean_host):
        job = make_job(["python3", "/opt/release/summary.py", "events.txt"], image="debian12",
                       inputs={"events.txt": "muon 1\njet 2\nmuon 3\n"}, release={"summary.py": SUMMARY},
                       env={"ANALYSIS": "z"}, outputs=["out"])
        result = _run(job, driver_site, tmp_path / "out")
        assert result.status == "succeeded", (result.error, (tmp_path / "out" / "stderr").read_text())
        summary = json.loads((tmp_path / "out" / "outputs" / "out" / "summary.json").read_text())
        assert summary["python"].startswith("3.11")
        assert summary["cwd"] == "/work"
        assert summary["counts"] == {"muon": 2, "jet": 1}
        assert set(summary["env"]) == {"ANALYSIS", "HOME", "LANG", "PATH", "USER"}  # the job's env on defaults
        assert summary["env"]["HOME"] == "/root" and summary["env"]["LANG"] == "C.UTF-8"
        assert result.provenance["rootfs_sha256"] == debian_image.rootfs_sha256
        assert result.provenance["rootfs_filesystem"] == "squashfs"
        assert _sha256(debian_image.rootfs) == debian_image.rootfs_sha256

    def test_root_cannot_write_the_base_and_changes_stay_in_the_overlay(self, make_job, driver_site, debian_image,
                                                                         tmp_path, assert_clean_host):
        before = _sha256(debian_image.rootfs)
        first = _run(make_job(["sh", "-c", ATTACK], image="debian12", id="attack"), driver_site, tmp_path / "a")
        assert first.status == "succeeded", first.error
        lines = (tmp_path / "a" / "stdout").read_text().splitlines()
        read_only = [line for line in lines if line.startswith("ro-device")]
        assert len(read_only) == 1 and read_only[0].endswith("ro=1"), lines  # the base's disk, still read-only
        assert not [line for line in lines if "wrote" in line], lines
        assert {"overlay-write-ok", "rename-base-dir-ok", "delete-ok"} <= set(lines)
        assert _sha256(debian_image.rootfs) == before

        check = ("test ! -e /etc/left-by-first-job && test -d /opt && test -s /etc/passwd && "
                 "python3 -c 'import json; print(json.dumps(\"clean\"))'")
        second = _run(make_job(["sh", "-c", check], image="debian12", id="after"), driver_site, tmp_path / "b")
        assert second.status == "succeeded", (second.error, (tmp_path / "b" / "stderr").read_text())
        assert (tmp_path / "b" / "stdout").read_text() == '"clean"\n'
        assert _sha256(debian_image.rootfs) == before

    def test_a_qcow2_gpt_ext4_base(self, make_job, driver_site, debian_formats, make_site, tmp_path,
                                   assert_clean_host):
        name, pinned = driver_site
        image = debian_formats["qcow2"]
        digest = _sha256(image)
        site = make_site(images={"base": {"rootfs": str(image), "rootfs_sha256": digest}}, driver=name,
                         drivers=dict(pinned.drivers))
        job = make_job(["sh", "-c", "python3 -c 'print(1 + 1)' && grep ' / ' /proc/mounts | cut -d' ' -f3"],
                       image="base")
        result = vjobs.run(job, site=site, outdir=tmp_path / "out")
        assert result.status == "succeeded", (result.error, (tmp_path / "out" / "stderr").read_text())
        assert (tmp_path / "out" / "stdout").read_text() == "2\noverlay\n"
        assert result.provenance["rootfs_filesystem"] == "ext4"
        assert result.provenance["rootfs_container"] == "qcow2"
        assert _sha256(image) == digest

    # --- vjobs exec: binds, working directory, environment, streams and exit status ---------------------------

    @pytest.mark.parametrize("image", ["default", "debian12"])
    def test_exec_binds_streams_and_exit_status(self, image, driver_site, tmp_path, capfd, request,
                                                assert_clean_host):
        if image == "debian12":
            request.getfixturevalue("debian_image")  # built once per session, before the clock of this test
        work, data = tmp_path / "payload", tmp_path / "data"
        (work / "sub").mkdir(parents=True)
        (work / "input.txt").write_text("in\n")
        data.mkdir()
        (data / "table.txt").write_text("read only\n")
        script = ('echo "pwd=$(pwd) greeting=$GREETING"; cat /data/table.txt; echo to-stderr >&2; '
                  'cat input.txt > sub/copy.txt; echo made > new.txt; touch /data/x 2>/dev/null || echo data-read-only; '
                  'exit 7')
        words = ["exec", "--bind", f"{work}:/srv", "--bind", f"{data}:/data:ro", "--env", "GREETING=hi", image,
                 "sh", "-c", script]
        code = exec_command.run_exec(build_parser().parse_args(words), site=driver_site[1])
        out, err = capfd.readouterr()
        assert code == 7
        assert out == "pwd=/srv greeting=hi\nread only\ndata-read-only\n"
        assert err == "to-stderr\n"
        assert (work / "sub" / "copy.txt").read_text() == "in\n" and (work / "new.txt").read_text() == "made\n"
        assert sorted(p.name for p in data.iterdir()) == ["table.txt"]

    # --- a long job, seen live: streams, sync rounds, usage (vjobs/guest/streams.py, vjobs/guest/sync.py) -----

    def test_streams_sync_and_usage_reach_the_host_while_the_payload_runs(self, make_job, driver_site, tmp_path,
                                                                        assert_clean_host):
        name, site = driver_site
        bind, out = _bind_folder(tmp_path), tmp_path / "out"
        script = ('rm /data/gone.txt; i=0; while [ $i -lt 10 ]; do i=$((i + 1)); echo "step $i" >> /data/progress.log; '
                  'echo "line $i"; n=0; while [ $n -lt 20000 ]; do n=$((n + 1)); done; sleep 1; done')
        job = make_job(["sh", "-c", script], sync_interval_s=1,
                       binds=[{"source": str(bind), "target": "/data", "mode": "rw"}])
        samples = []
        seen = _watch_while_running(lambda: vjobs.run(job, site=site, outdir=out,
                                                      event_hooks={"usage": [samples.append]}), {
            "stdout": lambda: (out / "stdout").read_bytes().startswith(b"line 1\n"),
            "new file in the bind": lambda: (bind / "progress.log").read_text().startswith("step 1\n"),
            "removal in the bind": lambda: not (bind / "gone.txt").exists(),
            "usage.json": lambda: json.loads((out / "usage.json").read_text())["cpu_user_s"] >= 0,
            "vjobs ps": lambda: any(job["phase"] == "run" and job["usage"] for job in vjobs.running(site)),
        })
        result = seen.pop("result")
        assert result.status == "succeeded", (result.error, (out / "console.log").read_text(errors="replace"))
        assert [what for what, when in seen.items() if when is None] == [], "not seen while the payload ran"
        assert b"vjobs-streams" not in (out / "console.log").read_bytes()  # a channel on the console is taken out
        assert (bind / "progress.log").read_text() == "".join(f"step {i}\n" for i in range(1, 11))
        assert result.returned_binds[0]["removed"] == ["gone.txt"]
        assert "progress.log" in result.returned_binds[0]["changed"]
        assert result.sync["rounds"] >= 1 and result.sync["interval_s"] == 1
        assert samples and samples[-1].usage["cpu_user_s"] > 0 and result.usage["cpu_user_s"] > 0
        assert vjobs.running(site) == []

    def test_a_sigterm_brings_back_what_the_payload_wrote_before_the_vm_stops(self, make_job, driver_site,
                                                                            tmp_path, assert_clean_host):
        """No periodic sync (interval 0): what the payload wrote reaches the host only by the last round that
        the signal asks for, within ``sync_on_stop_s``; the result says cancelled."""
        name, site = driver_site
        bind, out = _bind_folder(tmp_path), tmp_path / "out"
        job = make_job(["sh", "-c", "echo written > /data/late.txt; rm /data/gone.txt; echo ready; sleep 600"],
                       sync_interval_s=0, binds=[{"source": str(bind), "target": "/data", "mode": "rw"}])

        _terminate_when(lambda: (out / "stdout").read_bytes() == b"ready\n")
        result = vjobs.run(job, site=site, outdir=out)
        assert result.status == "cancelled", result.error
        assert (bind / "late.txt").read_text() == "written\n" and not (bind / "gone.txt").exists()
        assert result.sync["rounds"] == 1
        assert (out / "stdout").read_bytes() == b"ready\n"

    def test_a_checkpointed_job_resumes_elsewhere_where_it_was(self, make_job, driver_site, tmp_path,
                                                               assert_clean_host):
        """SIGTERM with a checkpoint folder: the VM is saved, the job ends ``checkpointed`` (207) with no VM
        left. Resumed with another work_dir and an empty cache, its inputs gone (the release image made
        again from its folder, by its sum), the payload goes on: a count in a shell variable continues, every
        line once, and its read-write bind and outputs come back whole."""
        name, site = driver_site
        bind, out, folder = _bind_folder(tmp_path), tmp_path / "out", tmp_path / "checkpoint"
        job = make_job(["sh", "-c", COUNT], inputs={"start.txt": "0\n"}, release={"version.txt": "r42\n"},
                       outputs=["count.txt", "release.txt"], sync_interval_s=1,
                       binds=[{"source": str(bind), "target": "/data", "mode": "rw"}])
        _terminate_when(lambda: b"line 5\n" in (out / "stdout").read_bytes())
        saved = vjobs.run(job, site=site, outdir=out, checkpoint=folder)
        assert saved.status == "checkpointed" and saved.exit_status() == 207, saved.error
        assert f"vjobs resume {folder}" in saved.error["message"]
        assert qemu_processes(str(tmp_path)) == [] and vjobs.running(site) == []
        assert (folder / "current.json").is_file() and len(saved.provenance["checkpoints"]) == 1
        shutil.rmtree(tmp_path / "inputs")
        elsewhere = dataclasses.replace(site, work_dir=tmp_path / "work2", cache_dir=tmp_path / "cache2")
        result = vjobs.resume(folder, site=elsewhere, outdir=tmp_path / "out2")
        assert result.status == "succeeded", (result.error, _console(tmp_path / "out2"))
        counted = "".join(f"{i}\n" for i in range(1, COUNT_TO + 1))
        assert (tmp_path / "out2" / "stdout").read_text() == "".join(f"line {i}\n" for i in range(1, COUNT_TO + 1))
        assert (tmp_path / "out2" / "outputs" / "count.txt").read_text() == counted
        assert (tmp_path / "out2" / "outputs" / "release.txt").read_text() == "r42\n"
        assert (bind / "log.txt").read_text() == counted
        assert result.provenance["start"]["mode"] == "restored"
        assert [link["checkpoint"] for link in result.provenance["checkpoints"]] == ["cp-000001"]
        assert work_leftovers(tmp_path / "work2") == []
        assert not (folder / "current.json").exists() and list(folder.iterdir()) == []  # spent once the job ended


# Counts in a shell variable (the guest's memory), a line each 0.3 s into stdout, an output and a rw bind.
COUNT_TO = 30
COUNT = (f"i=$(cat start.txt); while [ $i -lt {COUNT_TO} ]; do i=$((i+1)); echo line $i; echo $i >> count.txt; "
         "echo $i >> /data/log.txt; sleep 0.3; done; cat /opt/release/version.txt > release.txt")


def _terminate_when(ready, timeout_s: float = 300) -> None:
    """SIGTERM this process once ``ready()`` (errors count as not yet): its main thread runs the job, whose
    signal guard takes it."""
    def watch() -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with contextlib.suppress(FileNotFoundError):
                if ready():
                    os.kill(os.getpid(), signal.SIGTERM)
                    return
            time.sleep(0.2)

    threading.Thread(target=watch, daemon=True).start()


def _console(outdir: Path) -> str:
    with contextlib.suppress(OSError):
        return (outdir / "console.log").read_text(errors="replace")[-3000:]
    return ""


def _bind_folder(tmp_path: Path) -> Path:
    bind = tmp_path / "bind"
    bind.mkdir()
    (bind / "keep.txt").write_text("kept\n")
    (bind / "gone.txt").write_text("the payload removes this\n")
    return bind


def _watch_while_running(run, checks: dict) -> dict:
    """Run ``run()`` in a thread; poll each check (a callable, true once seen; errors count as not yet) until
    the run ends. Returns when each was first seen (None: never while it ran) and the run's return value."""
    returned = []
    thread = threading.Thread(target=lambda: returned.append(run()))
    thread.start()
    seen = dict.fromkeys(checks)
    while thread.is_alive():
        for what, check in checks.items():
            if seen[what] is None:
                with contextlib.suppress(Exception):
                    if check() and thread.is_alive():
                        seen[what] = time.monotonic()
        time.sleep(0.2)
    thread.join()
    return {**seen, "result": returned[0] if returned else None}
