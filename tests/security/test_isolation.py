"""Nothing one account's vjobs writes reaches another account (issue 18), tried with real pool accounts
(vjobs.testing.accounts): while the owner's job runs, a second account tries to list, read and connect to
everything of it on the host, to read its processes, to signal them, and runs `vjobs gc`; root's gc leaves the
live job alone and removes it once the owner's vjobs is killed; and a work folder the second account made in
the owner's place before the owner's first job is never used.

The owner's job boots the built-in guest's kernel and initramfs as an image of the owner's own catalogue (copies
in its home: an account reads nothing of root's test cache), on qemu_user with TCG, and sleeps."""

from __future__ import annotations

import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from vjobs.images.store import sha256_file
from vjobs.testing.processes import process_table
from vjobs.testing.sites import write_site

pytestmark = [pytest.mark.vm, pytest.mark.skipif(os.geteuid() != 0, reason="making accounts needs root")]

SECRET = "s3cr3t-7f1c0e9a"  # in the owner's job environment and inputs: it must surface nowhere the other sees
PAYLOAD_SLEEP_S = 45  # the other account's attempts and two gc runs take well under this
PAYLOAD_STARTED = b"running the payload"

# Run as the other account by its own python3: every path and process of the owner it is given, tried every way
# there is, and what came of each.
ATTEMPTS = r"""
import json, os, signal, socket, stat, sys
targets = json.load(sys.stdin)
report = {}
def attempt(name, action):
    try:
        got = action()
        report[name] = "reached" if got is None else "reached: " + repr(got)[:300]
    except OSError as error:
        report[name] = "refused: " + error.__class__.__name__
for path, kind in targets["paths"].items():
    if kind == "folder":
        attempt("list " + path, lambda: os.listdir(path))
        attempt("create in " + path, lambda: open(os.path.join(path, "planted"), "x").close())
    elif kind == "socket":
        attempt("connect " + path, lambda: socket.socket(socket.AF_UNIX).connect(path))
    else:
        attempt("read " + path, lambda: open(path, "rb").read(16))
        attempt("write " + path, lambda: open(path, "r+b").close())
for name in targets["abstract_sockets"]:
    attempt("connect @" + name, lambda: socket.socket(socket.AF_UNIX).connect("\0" + name))
for pid in targets["pids"]:
    for part in ("environ", "mem", "maps", "fd", "cwd", "root"):
        where = f"/proc/{pid}/{part}"
        listed = part in ("fd", "cwd", "root")
        attempt("read " + where, lambda: os.listdir(where) if listed else open(where, "rb").read(16))
    attempt(f"signal {pid}", lambda: os.kill(pid, signal.SIGKILL))
cmdlines = {}
for pid in targets["pids"]:
    try:
        cmdlines[pid] = open(f"/proc/{pid}/cmdline", "rb").read().decode(errors="replace")
    except OSError:
        pass
print(json.dumps({"attempts": report, "cmdlines": cmdlines}))
"""


@pytest.fixture(scope="module")
def owner_and_other(pool_accounts):
    return pool_accounts[0], pool_accounts[1]


@pytest.fixture(scope="module")
def owners_job(owner_and_other, built_image, tmp_path_factory) -> dict[str, Path]:
    """The owner's site file, job file and catalogue image, all in its home and its own; no work_dir in the site
    file: the default one, /var/tmp/vjobs-UID, is the one at stake."""
    owner, _ = owner_and_other
    base = owner.home / "isolation"
    shutil.rmtree(base, ignore_errors=True)
    (base / "image").mkdir(parents=True)
    (base / "inputs").mkdir()
    for source in (built_image.kernel, built_image.initramfs):
        shutil.copyfile(source, base / "image" / source.name)
    (base / "inputs" / "secret.txt").write_text(f"{SECRET}\n")
    kernel, initramfs = base / "image" / built_image.kernel.name, base / "image" / built_image.initramfs.name
    write_site(base / "site.toml", {
        "driver": "qemu_user", "cache_dir": str(base / "cache"), "drivers": {"qemu_user": {"template": False}},
        "images": {"busybox": {"kernel": str(kernel), "kernel_sha256": sha256_file(kernel),
                               "initramfs": str(initramfs), "initramfs_sha256": sha256_file(initramfs),
                               "cmdline": built_image.cmdline}}})
    (base / "job.json").write_text(json.dumps({
        "id": "isolated", "image": "busybox", "inputs": str(base / "inputs"), "env": {"TOKEN": SECRET},
        "command": ["sh", "-c", 'mkdir -p out && echo "$TOKEN" > out/token && cat secret.txt && '
                    f"sleep {PAYLOAD_SLEEP_S}"],
        "outputs": ["out"], "resources": {"vcpus": 1, "memory_mib": 256, "scratch_mib": 16, "output_mib": 8},
        "walltime_s": 300}))
    subprocess.run(["chown", "-R", f"{owner.uid}:{owner.gid}", str(base)], check=True)
    os.chmod(base, 0o700)  # the owner's own choice for its inputs: vjobs' guarantees are about what vjobs writes
    root_site = write_site(tmp_path_factory.mktemp("root") / "site.toml", {
        "cache_dir": str(tmp_path_factory.mktemp("root-cache")), "work_dir": "/var/tmp/vjobs-{uid}"})
    yield {"site": base / "site.toml", "job": base / "job.json", "outdir": base / "out", "root_site": root_site}
    shutil.rmtree(base, ignore_errors=True)
    shutil.rmtree(owner.work_dir, ignore_errors=True)


def start(owner, job: dict[str, Path]) -> subprocess.Popen:
    """The owner's ``vjobs run`` (setpriv and env exec it: the process is vjobs itself)."""
    return owner.popen([owner.vjobs, "run", str(job["job"]), "--site", str(job["site"]), "--outdir",
                        str(job["outdir"]), "--json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for_payload(owner, process: subprocess.Popen, timeout: float = 180) -> Path:
    """The job folder, once the guest runs the payload."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, process.communicate()
        for log in owner.work_dir.glob("*/console.*.log"):
            if PAYLOAD_STARTED in log.read_bytes():
                return log.parent
        time.sleep(0.2)
    raise AssertionError("the payload never started")


def everything_of(owner, folders: list[Path]) -> dict:
    """What the owner has on the host, as root sees it: every path under ``folders`` (and the folders), every
    process of the owner, and the names of the Unix sockets those processes hold that others could connect to
    by name (abstract ones; those with a path are among the paths)."""
    paths = {}
    for top in folders:
        paths[str(top)] = "folder"
        for folder, dirs, files in os.walk(top):
            paths.update({os.path.join(folder, name): "folder" for name in dirs})
            for name in files:
                path = os.path.join(folder, name)
                paths[path] = "socket" if _is_socket(path) else "file"
    pids = sorted(proc.pid for proc in process_table().values() if proc.uid == owner.uid)
    inodes = set()
    for pid in pids:
        for fd in Path(f"/proc/{pid}/fd").glob("*"):
            try:
                target = os.readlink(fd)
            except OSError:
                continue
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    abstract = []
    for line in Path("/proc/net/unix").read_text().splitlines()[1:]:
        fields = line.split()
        if len(fields) >= 8 and fields[6] in inodes and fields[7].startswith("@"):
            abstract.append(fields[7][1:])
    return {"paths": paths, "pids": pids, "abstract_sockets": abstract}


def _is_socket(path: str) -> bool:
    try:
        return stat.S_ISSOCK(os.lstat(path).st_mode)
    except FileNotFoundError:
        return False


def listening_sockets_of(uid: int) -> list[str]:
    """TCP and UDP sockets of ``uid`` that anyone on the host could reach."""
    found = []
    for table in ("tcp", "tcp6", "udp", "udp6"):
        for line in Path(f"/proc/net/{table}").read_text().splitlines()[1:]:
            fields = line.split()
            listening = table.startswith("udp") or fields[3] == "0A"
            if int(fields[7]) == uid and listening:
                found.append(f"{table} {fields[1]}")
    return found


def gc_as_root(job: dict[str, Path]) -> list[str]:
    done = subprocess.run([sys.executable, "-m", "vjobs", "gc", "--site", str(job["root_site"]), "--json"],
                          capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def qemu_of(uid: int) -> list[int]:
    return [proc.pid for proc in process_table().values() if proc.uid == uid and proc.is_qemu]


def end(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.kill()
    process.communicate()


def test_another_account_reaches_nothing_of_a_running_job_and_its_gc_and_root_s_leave_it_alone(
        owner_and_other, owners_job):
    owner, other = owner_and_other
    process = start(owner, owners_job)
    try:
        job_folder = wait_for_payload(owner, process)
        work_mode = os.stat(owner.work_dir).st_mode & 0o7777
        folder_mode = os.stat(job_folder).st_mode & 0o7777
        outdir_mode = os.stat(owners_job["outdir"]).st_mode & 0o7777
        targets = everything_of(owner, [owner.work_dir, owners_job["outdir"]])
        assert qemu_of(owner.uid) and len(targets["paths"]) > 8, targets  # disks, logs, labels, vm.1, ...
        trying = other.popen(["/usr/bin/python3", "-c", ATTEMPTS], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
        said, complaints = trying.communicate(json.dumps(targets), timeout=120)
        assert trying.returncode == 0, complaints
        seen = json.loads(said)
        allowed = {what: how for what, how in seen["attempts"].items() if how != "refused: PermissionError"}
        assert allowed == {}
        assert all(SECRET not in cmdline for cmdline in seen["cmdlines"].values()), seen["cmdlines"]
        assert listening_sockets_of(owner.uid) == [] and targets["abstract_sockets"] == []

        others_gc = other.run([other.vjobs, "gc", "--json"], timeout=180)
        assert others_gc.returncode == 0, others_gc.stderr
        assert str(owner.work_dir) not in others_gc.stdout and job_folder.is_dir()
        roots_gc = gc_as_root(owners_job)
        assert not any(str(owner.work_dir) in line for line in roots_gc), roots_gc
        assert job_folder.is_dir() and process.poll() is None

        stdout, stderr = process.communicate(timeout=PAYLOAD_SLEEP_S + 240)
    finally:
        end(process)
    result = json.loads(stdout)
    assert (result["status"], result["exit_code"]) == ("succeeded", 0), stderr
    assert (work_mode, folder_mode, outdir_mode) == (0o700, 0o700, 0o700)
    assert (owners_job["outdir"] / "outputs" / "out" / "token").read_text() == f"{SECRET}\n"
    assert not job_folder.exists()


def test_root_s_gc_removes_a_killed_job_that_the_other_account_s_gc_leaves(owner_and_other, owners_job):
    owner, other = owner_and_other
    process = start(owner, owners_job)
    try:
        job_folder = wait_for_payload(owner, process)
        os.kill(process.pid, signal.SIGKILL)  # vjobs itself (setpriv and env exec it)
        process.wait(30)
        deadline = time.monotonic() + 30
        while qemu_of(owner.uid) and time.monotonic() < deadline:
            time.sleep(0.2)  # QEMU dies with vjobs (its parent-death signal)
        assert qemu_of(owner.uid) == []
        assert job_folder.is_dir()
        others_gc = other.run([other.vjobs, "gc", "--json"], timeout=180)
        assert others_gc.returncode == 0, others_gc.stderr
        assert job_folder.is_dir()  # the owner is gone, but it is not the other account's to remove
        assert f"removed job folder {job_folder} (its VM's files and sockets)" in gc_as_root(owners_job)
        assert not job_folder.exists()
    finally:
        end(process)


@pytest.mark.parametrize("squat", ["folder", "link"])
def test_a_work_folder_another_account_made_first_is_never_used(owner_and_other, owners_job, squat):
    """The other account makes /var/tmp/vjobs-<owner's uid> before the owner's first job (or a link there to a
    folder of its own): the owner's job is refused with a clear error and writes nothing into it."""
    owner, other = owner_and_other
    shutil.rmtree(owner.work_dir, ignore_errors=True)
    trap = other.home / "trap"
    made = other.run(["sh", "-c", f"umask 0; mkdir -p {trap} && "
                      + (f"ln -s {trap} {owner.work_dir}" if squat == "link" else f"mkdir {owner.work_dir}")])
    assert made.returncode == 0, made.stderr
    try:
        process = start(owner, owners_job)
        stdout, stderr = process.communicate(timeout=300)
        result = json.loads(stdout)
        assert (result["status"], result["error"]["code"]) == ("setup_error", "work_dir_unusable"), result
        named = "is a symbolic link of" if squat == "link" else "belongs to"
        assert f"work_dir {owner.work_dir} {named} uid {other.uid} ({other.name})" in result["error"]["message"]
        assert list(trap.iterdir()) == []
        if squat == "folder":
            assert list(owner.work_dir.iterdir()) == []
            assert any(line.startswith(f"left {owner.work_dir} alone: it belongs to uid {other.uid}")
                       for line in gc_as_root(owners_job))
    finally:
        if owner.work_dir.is_symlink():
            owner.work_dir.unlink()
        shutil.rmtree(owner.work_dir, ignore_errors=True)
        shutil.rmtree(trap, ignore_errors=True)
