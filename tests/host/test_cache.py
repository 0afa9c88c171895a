"""The cache's bound (vjobs/host/cache.py) and `vjobs gc`: real files, real locks held by real child processes."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

import vjobs
from vjobs.config.site import site_from_dict
from vjobs.errors import InvalidSite
from vjobs.guest.disks import release_image
from vjobs.host import cache, locks
from vjobs.host.gc import collect_files
from vjobs.host.identity import boot_id

KIB = 1024


def release_entry(root: Path, key: str, used: float, size: int = 256 * KIB) -> Path:
    """A release image as disks.py leaves it: the image, its sidecar and its build lock."""
    image = root / "releases" / f"{key * 32}.squashfs"
    image.parent.mkdir(parents=True, exist_ok=True)
    image.write_bytes(os.urandom(size))
    (image.parent / f"{key * 32}.json").write_text('{"sha256": "x"}')
    (image.parent / f"{key * 32}.lock").touch()
    os.utime(image, (used, used))
    return image


def image_folder(root: Path, used: float) -> Path:
    folder = root / "images" / f"default-{'a' * 16}"
    folder.mkdir(parents=True)
    (folder / "vmlinuz").write_bytes(os.urandom(256 * KIB))
    os.utime(folder, (used, used))
    return folder


def in_child(code: str) -> subprocess.Popen:
    """A Python child that runs ``code``, says so, and sleeps until it is killed."""
    child = subprocess.Popen([sys.executable, "-c", f"{code}\nprint('ready', flush=True)\nimport time\n"
                              "time.sleep(600)"], stdout=subprocess.PIPE, text=True)
    assert child.stdout.readline() == "ready\n"
    return child


def lock_in_child(path: Path) -> subprocess.Popen:
    """A child that holds the lock file ``path`` as a builder does, until it is killed."""
    return in_child(f"from vjobs.host import locks\nheld = locks.exclusive({str(path)!r})\nheld.__enter__()")


def kill(child: subprocess.Popen) -> None:
    child.send_signal(signal.SIGKILL)
    child.wait()


def dead_pid() -> int:
    child = subprocess.Popen(["true"])
    child.wait()
    return child.pid


def test_least_recently_used_go_first_until_the_bound_holds(tmp_path):
    now = time.time()
    oldest = release_entry(tmp_path, "1", now - 400)
    folder = image_folder(tmp_path, now - 300)
    newer = release_entry(tmp_path, "2", now - 200)
    raw = tmp_path / "rootfs" / f"{'c' * 64}.raw"
    raw.parent.mkdir()
    raw.write_bytes(os.urandom(256 * KIB))
    record = tmp_path / "rootfs" / f"{'c' * 64}.v1.json"  # metadata: never evicted
    record.write_text("{}")
    sizes = {entry.path: entry.size for entry in cache.entries(tmp_path)}
    assert set(sizes) == {oldest, folder, newer, raw}
    limit = sizes[newer] + sizes[raw]

    lines = cache.evict(tmp_path, limit)

    assert len(lines) == 2 and lines[0].startswith(f"evicted release image {oldest} (")
    assert lines[1].startswith(f"evicted built-in image {folder} (")
    assert not oldest.exists() and not folder.exists() and newer.exists() and raw.exists() and record.exists()
    assert not (oldest.parent / f"{'1' * 32}.json").exists() and not (oldest.parent / f"{'1' * 32}.lock").exists()
    assert (newer.parent / f"{'2' * 32}.json").exists()
    assert sum(entry.size for entry in cache.entries(tmp_path)) <= limit


def test_use_marks_the_entry_used_and_says_when_it_is_gone(tmp_path):
    image = release_entry(tmp_path, "1", time.time() - 1000)
    with cache.CacheHold() as hold:
        assert hold.use(image)
        assert time.time() - image.stat().st_mtime < 5
        assert not hold.use(tmp_path / "releases" / f"{'9' * 32}.squashfs")


def test_an_entry_held_by_a_live_process_is_never_evicted(tmp_path):
    now = time.time()
    held = release_entry(tmp_path, "1", now - 400)
    free = release_entry(tmp_path, "2", now - 300)
    child = in_child(f"from vjobs.host import cache\nhold = cache.CacheHold()\nassert hold.use({str(held)!r})")
    try:
        os.utime(held, (now - 400, now - 400))  # the oldest still
        lines = cache.evict(tmp_path, 0)
        assert held.exists() and not free.exists()
        assert "in use by running jobs" in lines[-1]
    finally:
        kill(child)
    assert cache.evict(tmp_path, 0)[0].startswith(f"evicted release image {held} ")
    assert not held.exists()


def test_a_build_in_progress_is_neither_counted_nor_removed(tmp_path):
    releases = tmp_path / "releases"
    releases.mkdir()
    key = "3" * 32
    partial = releases / f"{key}.{os.getpid()}.partial"
    partial.write_bytes(os.urandom(256 * KIB))
    child = lock_in_child(releases / f"{key}.lock")
    try:
        assert cache.entries(tmp_path) == [] and cache.evict(tmp_path, 0) == []
        assert cache.leftovers(tmp_path) == [] and partial.exists()
    finally:
        kill(child)
    assert cache.leftovers(tmp_path) == [f"removed the partial build {partial} (its builder is gone)",
                                         f"removed the lock file {releases / (key + '.lock')} (unheld; no release "
                                         "image uses it)"]
    assert list(releases.iterdir()) == []


def test_adding_a_release_image_evicts_down_to_the_holds_bound(tmp_path):
    trees = {}
    for name in ("old", "new"):
        trees[name] = tmp_path / name
        trees[name].mkdir()
        (trees[name] / "data").write_bytes(os.urandom(64 * KIB))
    with cache.CacheHold() as hold:  # no bound: nothing evicted
        old, _ = release_image(trees["old"], tmp_path / "cache" / "releases", "squashfs", lambda m: None, hold=hold)
    os.utime(old, (time.time() - 600,) * 2)
    messages = []
    with cache.CacheHold(1e-9) as hold:  # a bound smaller than any image
        new, _ = release_image(trees["new"], tmp_path / "cache" / "releases", "squashfs", messages.append,
                               hold=hold)
        assert not old.exists() and not old.with_suffix(".json").exists() and new.exists()
        assert any(m.startswith(f"evicted release image {old} ") for m in messages)
        again, _ = release_image(trees["new"], tmp_path / "cache" / "releases", "squashfs", messages.append,
                                 hold=hold)
    assert again == new and new.exists()  # the job's own image stays, though alone it is above the bound


def test_a_lock_file_unlinked_by_its_holder_is_not_locked_twice(tmp_path):
    path = tmp_path / "x.lock"
    got = threading.Event()

    def waiter():
        with locks.exclusive(path):
            got.set()
            time.sleep(0.2)

    thread = threading.Thread(target=waiter)
    with locks.exclusive(path):
        thread.start()
        time.sleep(0.2)
        path.unlink()  # as gc does, while holding it
    assert got.wait(5)
    with locks.try_exclusive(path) as free:  # the waiter now holds the file at the path, not a stale one
        assert not free
    thread.join()


def test_gc_removes_what_dead_owners_left_and_leaves_live_ones(tmp_path):
    site = site_from_dict({"cache_dir": str(tmp_path / "cache"), "work_dir": str(tmp_path / "work")})
    labels = {"vjobs.hostname": socket.gethostname(), "vjobs.boot_id": boot_id()}
    folders, sockets = {}, []
    for who, pid in (("dead", dead_pid()), ("live", os.getpid())):
        folders[who] = tmp_path / "work" / f"t1-{who}"
        (folders[who] / "vm.1").mkdir(parents=True)
        (folders[who] / "owner.json").write_text(json.dumps({**labels, "vjobs.pid": str(pid)}))
        listener = socket.socket(socket.AF_UNIX)
        listener.bind(str(folders[who] / "vm.1" / "qmp.sock"))
        sockets.append(listener)
    old = time.time() - 120
    temps = {who: tmp_path / "cache" / f"checksums.{pid}.tmp" for who, pid in (("dead", dead_pid()),
                                                                                 ("live", os.getpid()))}
    for temp in temps.values():
        temp.parent.mkdir(exist_ok=True)
        temp.write_text("{")
        os.utime(temp, (old, old))
    (tmp_path / "cache" / "rootfs").mkdir()
    locks = {who: tmp_path / "cache" / "rootfs" / f"{letter * 64}.lock" for who, letter in (("dead", "d"),
                                                                                           ("live", "e"))}
    for lock in locks.values():
        lock.touch()
    probes = tmp_path / "cache" / "probes"
    probes.mkdir()
    (probes / "old.json").write_text(json.dumps({"boot_id": "an earlier boot", "ok": True, "detail": ""}))
    (probes / "now.json").write_text(json.dumps({"boot_id": boot_id(), "ok": True, "detail": ""}))
    inspect_temp = Path(tempfile.gettempdir()) / f"vjobs-inspect-{dead_pid()}-test{os.getpid()}"
    inspect_temp.mkdir()
    os.utime(inspect_temp, (old, old))
    child = lock_in_child(locks["live"])
    try:
        removed = collect_files(site)
    finally:
        kill(child)
        for listener in sockets:
            listener.close()
    assert not folders["dead"].exists() and (folders["live"] / "vm.1" / "qmp.sock").exists()
    assert not temps["dead"].exists() and temps["live"].exists()
    assert not locks["dead"].exists() and locks["live"].exists()
    assert not (probes / "old.json").exists() and (probes / "now.json").exists()
    assert not inspect_temp.exists()
    assert len(removed) == 5, removed


@pytest.mark.parametrize("value", [0, -1, "20G", True, 2e6])
def test_cache_max_gib_is_checked(value):
    with pytest.raises(InvalidSite, match=r"site.toml: /cache_max_gib: "):
        site_from_dict({"cache_max_gib": value}, source="site.toml")


def test_cache_max_gib_default_and_value():
    assert site_from_dict({}).cache_max_gib == cache.DEFAULT_MAX_GIB == 20
    assert site_from_dict({"cache_max_gib": 0.5}).cache_max_gib == 0.5


@pytest.mark.vm
def test_a_job_evicts_an_old_release_and_keeps_its_own(tmp_path, make_site, make_job, built_image,
                                                       assert_clean_host):
    own_cache = tmp_path / "cache"
    folder = own_cache / "images" / built_image.kernel.parent.name  # the session's boot image, linked in
    folder.mkdir(parents=True)
    for name in ("vmlinuz", "initramfs.cpio"):
        os.link(built_image.kernel.parent / name, folder / name)
    manifest = {**built_image.to_json(), "kernel": str(folder / built_image.kernel.name),
                "initramfs": str(folder / built_image.initramfs.name)}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    (tmp_path / "old-release").mkdir()
    (tmp_path / "old-release" / "tool").write_text("old")
    with cache.CacheHold() as hold:
        old, _ = release_image(tmp_path / "old-release", own_cache / "releases", "squashfs", lambda m: None,
                               hold=hold)
    os.utime(old, (time.time() - 86400,) * 2)

    site = make_site(driver="qemu_user", cache_dir=str(own_cache), cache_max_gib=0.001)  # ~1 MiB: below the boot image
    job = make_job(["cat", "/opt/release/tool"], release={"tool": "new"})
    result = vjobs.run(job, site=site, outdir=tmp_path / "out")

    assert result.status == "succeeded", result.error
    assert (tmp_path / "out" / "stdout").read_text() == "new"
    assert not old.exists()
    kept = {entry.path: entry.kind.label for entry in cache.entries(own_cache)}
    # what the job used: the boot image, its own release, the template its guest started from
    assert folder in kept and sorted(kept.values()) == ["VM template", "built-in image", "release image"]
