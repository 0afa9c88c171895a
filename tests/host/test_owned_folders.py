"""Job folders appear labelled and go away renamed, so a vjobs killed at any moment leaves nothing gc cannot
judge (found by the kill campaign: a kill inside rmtree, or between mkdir and the labels)."""

from __future__ import annotations

import os
import subprocess
import sys

from vjobs.host.identity import abandoned_folder, create_owned_folder, new_owner, remove_owned_folder


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_a_folder_appears_with_its_labels_and_is_removed_whole(tmp_path):
    folder = create_owned_folder(tmp_path / "work" / "job-1", new_owner("job"))
    assert (folder / "owner.json").is_file() and sorted(p.name for p in (tmp_path / "work").iterdir()) == ["job-1"]
    (folder / "disk.raw").write_bytes(b"x")
    assert remove_owned_folder(folder) and list((tmp_path / "work").iterdir()) == []


def test_gc_judges_every_state_a_kill_can_leave(tmp_path):
    half_made_by_the_dead = tmp_path / f".job-a.{_dead_pid()}.creating"
    half_made_by_us = tmp_path / f".job-b.{os.getpid()}.creating"
    half_removed = tmp_path / ".job-c.removing"  # owner.json may already be gone
    ours_alive = create_owned_folder(tmp_path / "job-d", new_owner("job"))
    someone_elses = tmp_path / "not-ours"
    for folder in (half_made_by_the_dead, half_made_by_us, half_removed, someone_elses):
        folder.mkdir()
    assert abandoned_folder(half_made_by_the_dead) and abandoned_folder(half_removed)
    assert not abandoned_folder(half_made_by_us) and not abandoned_folder(ours_alive)
    assert not abandoned_folder(someone_elses)


def test_gc_moves_past_a_driver_whose_daemon_hangs(make_site, monkeypatch):
    """A deadlocked libvirtd once held `vjobs gc` for good, and the xen driver's garbage waited behind it."""
    import threading
    import time

    from vjobs.api import host_context
    from vjobs.host import gc

    release = threading.Event()

    class Hung:
        def collect_garbage(self, owner_is_gone):
            release.wait(30)
            return []

    class Answering:
        def collect_garbage(self, owner_is_gone):
            return ["destroyed VM of a dead vjobs"]

    monkeypatch.setattr(gc, "DRIVER_GC_S", 0.5)
    monkeypatch.setattr(gc, "load_driver", lambda name, site, host: Hung() if name == "kvm" else Answering())
    site = make_site()
    started = time.monotonic()
    try:
        lines = gc.collect_garbage(site, host_context(site))
    finally:
        release.set()
    assert time.monotonic() - started < 5
    assert any(line.startswith("kvm: skipped: no answer within 0.5 s") for line in lines)
    assert "xen: destroyed VM of a dead vjobs" in lines and "qemu_user: destroyed VM of a dead vjobs" in lines
