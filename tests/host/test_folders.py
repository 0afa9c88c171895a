"""An account's work and output folders reach no other account (vjobs/host/folders.py), and `vjobs gc` removes only
what it may: an account's own leftovers, or for root those of any account whose vjobs is gone. Run as root, with
other accounts' folders made by chown (tests/security/test_isolation.py does it with real accounts)."""

from __future__ import annotations

import contextlib
import io
import json
import os
import socket
import stat
import subprocess
import sys
import tarfile

import pytest

from vjobs.config.site import site_from_dict
from vjobs.errors import SetupError
from vjobs.guest.collect import read_results
from vjobs.guest.console import ConsoleLog
from vjobs.host import identity
from vjobs.host.folders import output_folder, private_folder
from vjobs.host.gc import collect_files
from vjobs.host.identity import abandoned_folder, boot_id, collectable, create_owned_folder, new_owner
from vjobs.result import Result, conclude_in

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="giving folders to other uids needs root")

OTHER, THIRD = 60001, 60002  # uids of no account: above UID_MIN, as a pool account's are


def mode(path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


def dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


@contextlib.contextmanager
def umask(value: int):
    previous = os.umask(value)
    try:
        yield
    finally:
        os.umask(previous)


# --- the work folder -----------------------------------------------------------------------------------------

def test_a_missing_work_folder_is_made_private_whatever_the_umask(tmp_path):
    with umask(0):
        folder = private_folder(tmp_path / "work")
    assert mode(folder) == 0o700 and os.stat(folder).st_uid == os.geteuid()


def test_a_work_folder_of_ours_made_wider_by_an_earlier_vjobs_is_narrowed(tmp_path):
    (tmp_path / "work").mkdir(0o755)
    private_folder(tmp_path / "work")
    assert mode(tmp_path / "work") == 0o700


def test_a_work_folder_another_account_made_first_is_refused_and_left_empty(tmp_path):
    """The squatter's case: /var/tmp/vjobs-<victim's uid> made before the victim's first job."""
    squatted = tmp_path / "work"
    squatted.mkdir(0o777)
    os.chown(squatted, OTHER, OTHER)
    with pytest.raises(SetupError, match=rf"work_dir {squatted} belongs to uid {OTHER}, not to uid 0") as refused:
        create_owned_folder(squatted / "job-1", new_owner("job"))
    assert refused.value.code == "work_dir_unusable" and list(squatted.iterdir()) == []


def test_a_link_in_the_work_folder_s_place_is_never_followed(tmp_path):
    trap = tmp_path / "trap"
    trap.mkdir()
    (tmp_path / "work").symlink_to(trap)
    with pytest.raises(SetupError, match="is a symbolic link of uid 0 .*not a folder") as refused:
        create_owned_folder(tmp_path / "work" / "job-1", new_owner("job"))
    assert refused.value.code == "work_dir_unusable" and list(trap.iterdir()) == []


def test_a_work_folder_others_may_write_is_refused(tmp_path):
    (tmp_path / "work").mkdir()
    os.chmod(tmp_path / "work", 0o777)
    with pytest.raises(SetupError, match=r"may be written by others \(mode 0777\)"):
        private_folder(tmp_path / "work")


@pytest.mark.parametrize("way_mode, owner, problem", [
    (0o777, 0, r"may be written by others \(mode 0777, not sticky\)"),
    (0o755, OTHER, rf"belongs to uid {OTHER}"),
])
def test_a_work_folder_on_a_way_another_account_may_change_is_refused(tmp_path, way_mode, owner, problem):
    """Whoever may rename the entries of a folder on the way could swap the work folder after the check."""
    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, way_mode)
    os.chown(shared, owner, owner)
    with pytest.raises(SetupError, match=rf"{shared} on its way {problem}"):
        private_folder(shared / "vjobs-0")


def test_a_sticky_folder_on_the_way_is_fine(tmp_path):
    """/tmp and /var/tmp: others may write there, but not rename or remove what is ours."""
    shared = tmp_path / "tmp"
    shared.mkdir()
    os.chmod(shared, 0o1777)
    assert mode(private_folder(shared / "vjobs-0")) == 0o700


def test_work_dir_may_name_the_account_s_uid_and_tmpdir_must_be_absolute(tmp_path, monkeypatch):
    site = site_from_dict({"work_dir": str(tmp_path / "vjobs-{uid}")})
    assert site.work_dir == tmp_path / f"vjobs-{os.getuid()}"
    assert site.work_dir_template == str(tmp_path / "vjobs-{uid}")
    assert site_from_dict({"work_dir": str(tmp_path / "work")}).work_dir_template is None
    monkeypatch.setenv("TMPDIR", "relative/tmp")  # would move the work folder with the current folder
    assert site_from_dict({}).work_dir == type(tmp_path)(f"/var/tmp/vjobs-{os.getuid()}")
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    assert site_from_dict({}).work_dir == tmp_path / f"vjobs-{os.getuid()}"


# --- the output folder, and what vjobs writes for the account ----------------------------------------------------

def test_an_output_folder_vjobs_makes_is_private_one_that_exists_keeps_its_mode(tmp_path):
    with umask(0):
        assert mode(output_folder(tmp_path / "out" / "job")) == 0o700
    (tmp_path / "shown").mkdir(0o755)
    assert mode(output_folder(tmp_path / "shown")) == 0o755


def test_results_are_never_written_into_another_account_s_folder(tmp_path):
    theirs = tmp_path / "theirs"
    theirs.mkdir(0o777)
    os.chown(theirs, OTHER, OTHER)
    result = conclude_in(Result(job_id="t1", status="succeeded", exit_code=0), theirs)
    assert result.status == "setup_error" and result.error["code"] == "outdir_unusable"
    assert f"belongs to uid {OTHER}" in result.error["message"] and list(theirs.iterdir()) == []


def test_nothing_vjobs_writes_for_the_account_is_writable_by_others_whatever_the_umask(tmp_path):
    members = {"vjobs/status": b"exit_code=0\n", "vjobs/stdout": b"out\n", "work/deep/er/file": b"1\n"}
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.GNU_FORMAT) as archive:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    (tmp_path / "io.raw").write_bytes(buffer.getvalue().ljust(1 << 20, b"\0"))
    with umask(0):
        conclude_in(Result(job_id="t1", timings={"total": 0.0}), tmp_path / "out")
        console = ConsoleLog(tmp_path / "out" / "console.log")
        console.write(b"booted\n")
        console.close()
        read_results(tmp_path / "io.raw", tmp_path / "got", 1 << 20)
    assert mode(tmp_path / "out") == 0o700
    assert mode(tmp_path / "out" / "result.json") == mode(tmp_path / "out" / "console.log") == 0o644
    folders = [tmp_path / "got" / "outputs" / "deep", tmp_path / "got" / "outputs" / "deep" / "er"]
    assert [mode(folder) for folder in folders] == [0o755, 0o755]
    assert mode(tmp_path / "got" / "stdout") == mode(folders[-1] / "file") == 0o644


# --- vjobs gc ----------------------------------------------------------------------------------------------------

def labels(pid: int, uid: int | None = None) -> dict[str, str]:
    found = {"vjobs.hostname": socket.gethostname(), "vjobs.boot_id": boot_id(), "vjobs.pid": str(pid)}
    return found if uid is None else {**found, "vjobs.uid": str(uid)}


def work_folder(path, uid: int):
    path.mkdir(0o700)
    os.chown(path, uid, uid)
    return path


def job_folder(work, name: str, owner_labels: dict, uid: int):
    """A job folder as the vjobs of ``uid`` leaves it, labelled."""
    folder = work / name
    folder.mkdir()
    (folder / "owner.json").write_text(json.dumps(owner_labels))
    for path in (folder, folder / "owner.json"):
        os.chown(path, uid, uid)
    return folder


def test_root_s_gc_removes_dead_vjobs_leftovers_of_every_account_and_nothing_else(tmp_path):
    """Root looks where the site puts every account's work folder ({uid}); it enters only a folder that
    belongs to the uid it is named after, never through a link, and leaves live jobs alone."""
    site = site_from_dict({"cache_dir": str(tmp_path / "cache"), "work_dir": str(tmp_path / "vjobs-{uid}")})
    dead, alive = dead_pid(), os.getpid()  # alive: any live process, of whatever account
    others = work_folder(tmp_path / f"vjobs-{OTHER}", OTHER)
    gone = job_folder(others, "t1-dead", labels(dead), OTHER)
    running = job_folder(others, "t1-live", labels(alive), OTHER)
    planted = job_folder(others, "t1-planted", labels(dead), THIRD)  # in OTHER's folder, not OTHER's
    squatted = job_folder(work_folder(tmp_path / f"vjobs-{THIRD}", OTHER), "t1-dead", labels(dead), OTHER)
    elsewhere = job_folder(work_folder(tmp_path / "elsewhere", THIRD), "t1-dead", labels(dead), THIRD)
    (tmp_path / f"vjobs-{OTHER + 10}").symlink_to(tmp_path / "elsewhere")
    removed = collect_files(site)
    assert not gone.exists() and running.exists() and planted.exists()
    assert squatted.exists() and elsewhere.exists()
    assert f"removed job folder {gone} (its VM's files and sockets)" in removed
    squatter = f"left {tmp_path / f'vjobs-{THIRD}'} alone: it belongs to uid {OTHER}"
    assert any(line.startswith(squatter) for line in removed)


def test_gc_reads_labels_an_account_wrote_without_hanging_or_following(tmp_path):
    """owner.json as a FIFO (a read would block forever), a link to a file, or gigabytes: not vjobs' labels."""
    work = tmp_path / "work"
    for name in ("fifo", "link", "huge"):
        (work / name).mkdir(parents=True)
    os.mkfifo(work / "fifo" / "owner.json")
    (tmp_path / "labels.json").write_text(json.dumps(labels(dead_pid())))
    (work / "link" / "owner.json").symlink_to(tmp_path / "labels.json")
    with open(work / "huge" / "owner.json", "wb") as handle:
        handle.truncate(1 << 30)
    assert [abandoned_folder(work / name) for name in ("fifo", "link", "huge")] == [False, False, False]


def test_an_account_s_gc_removes_only_vms_labelled_with_its_own_uid(monkeypatch):
    """Driver garbage (kvm domains, xen VMs and VDIs) is judged by labels: an account's gc never destroys
    another account's, even a dead one; root's destroys any dead one, unlabelled (an earlier vjobs) too."""
    dead, alive = dead_pid(), os.getpid()
    monkeypatch.setattr(identity.os, "geteuid", lambda: 1234)
    assert collectable(labels(dead, 1234)) and not collectable(labels(alive, 1234))
    assert not collectable(labels(dead, 4321)) and not collectable(labels(dead))
    monkeypatch.setattr(identity.os, "geteuid", lambda: 0)
    assert collectable(labels(dead, 4321)) and collectable(labels(dead)) and not collectable(labels(alive, 4321))
    assert new_owner("t1").as_labels()["vjobs.uid"] == "0"
