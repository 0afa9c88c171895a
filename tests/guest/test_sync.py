"""Sync rounds on the host (vjobs/guest/sync.py): what a round carries comes into the host folders by the
final collection's rules, deletions too, and a round the reader refuses changes nothing. The rounds are built
as the agent builds them (a tar whose first member vjobs/sync lists every file the guest has)."""

from __future__ import annotations

import io
import os
import socket
import tarfile
import threading
import time

from vjobs.config.job import job_from_dict
from vjobs.guest.binds import snapshot
from vjobs.guest.streams import SYNC_REQUEST, Channel, LiveStreams, encode_record
from vjobs.guest.sync import WorkSync

MTIME = 1_700_000_000


def round_tar(present: list[str], files: dict[str, bytes], mtime: float = MTIME, extra=()) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.USTAR_FORMAT) as archive:
        members = [("vjobs/sync", "".join(f"{name}\n" for name in present).encode(), MTIME),
                   *((name, data, mtime) for name, data in files.items()), *extra]
        for name, data, when in members:
            info = tarfile.TarInfo(name)
            info.size, info.mtime = len(data), when
            archive.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def write(path, text, mtime=MTIME):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    os.utime(path, (mtime, mtime))


def make_sync(tmp_path, outputs=()):
    bind = tmp_path / "bind"
    write(bind / "input.dat", "in")
    write(bind / "old.log", "old")
    job = job_from_dict({"id": "j", "command": ["true"], "outputs": list(outputs),
                         "binds": [{"source": str(bind), "target": "/data", "mode": "rw"}]})
    return bind, WorkSync(job, tmp_path / "out", {0: snapshot(bind)})


def apply(sync, tmp_path, data: bytes, number=[0]):
    number[0] += 1
    spooled = tmp_path / f"round.{number[0]}.tar"
    spooled.write_bytes(data)
    return sync.apply_round(spooled, tmp_path / f"work.{number[0]}", 1 << 30)


def test_a_round_brings_new_and_changed_files_with_the_guests_mtime_and_removes_what_is_gone(tmp_path):
    bind, sync = make_sync(tmp_path)
    applied = apply(sync, tmp_path, round_tar(["binds/0/input.dat", "binds/0/run/progress.log"],
                                              {"binds/0/run/progress.log": b"event 100\n"}, mtime=MTIME + 60))
    assert (applied.changed, applied.removed, applied.refused) == (1, 1, None)
    assert (bind / "run" / "progress.log").read_text() == "event 100\n"
    assert int((bind / "run" / "progress.log").stat().st_mtime) == MTIME + 60
    assert not (bind / "old.log").exists()  # the payload removed it
    assert (bind / "input.dat").read_text() == "in"
    assert not list(tmp_path.glob("round.*.tar")) and not list(tmp_path.glob("work.*"))  # spool removed


def test_a_later_round_removes_what_an_earlier_one_brought(tmp_path):
    bind, sync = make_sync(tmp_path)
    apply(sync, tmp_path, round_tar(["binds/0/input.dat", "binds/0/old.log", "binds/0/tmp.part"],
                                    {"binds/0/tmp.part": b"partial"}))
    assert (bind / "tmp.part").exists()
    applied = apply(sync, tmp_path, round_tar(["binds/0/input.dat", "binds/0/old.log"], {}))
    assert applied.removed == 1 and not (bind / "tmp.part").exists()
    records = sync.finish(tmp_path / "no-final-binds")
    assert records[0]["removed"] == [] and records[0]["changed"] == []  # brought and removed: no trace


def test_a_file_the_host_changed_meanwhile_is_not_removed(tmp_path):
    bind, sync = make_sync(tmp_path)
    write(bind / "old.log", "the pilot appended to it", mtime=MTIME + 5)
    applied = apply(sync, tmp_path, round_tar(["binds/0/input.dat"], {}))
    assert applied.removed == 0
    assert (bind / "old.log").read_text() == "the pilot appended to it"


def test_a_guest_mtime_in_the_future_is_clamped_to_the_hosts_clock(tmp_path):
    bind, sync = make_sync(tmp_path)
    apply(sync, tmp_path, round_tar(["binds/0/input.dat", "binds/0/old.log", "binds/0/f"], {"binds/0/f": b"x"},
                                    mtime=time.time() + 10 * 365 * 86400))
    assert (bind / "f").stat().st_mtime <= time.time()


def test_an_unsafe_round_is_refused_whole_and_changes_nothing(tmp_path):
    bind, sync = make_sync(tmp_path)
    applied = apply(sync, tmp_path, round_tar(["binds/0/input.dat"], {"binds/0/new": b"x"},
                                              extra=[("../../escape", b"x", MTIME)]))
    assert applied.refused and "unsafe" in applied.refused
    assert sorted(path.name for path in bind.iterdir()) == ["input.dat", "old.log"]
    assert sync.refused == 1 and sync.rounds == 0


def test_a_round_without_its_listing_removes_nothing(tmp_path):
    bind, sync = make_sync(tmp_path)
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as archive:
        info = tarfile.TarInfo("binds/0/new")
        info.size = 1
        archive.addfile(info, io.BytesIO(b"x"))
    assert apply(sync, tmp_path, buffer.getvalue()).refused
    assert (bind / "old.log").exists() and not (bind / "new").exists()


def test_outputs_are_mirrored_into_the_outdir_and_the_final_collection_carries_deletions(tmp_path):
    bind, sync = make_sync(tmp_path, outputs=["*.root"])
    apply(sync, tmp_path, round_tar(["work/a.root", "binds/0/input.dat", "binds/0/old.log"], {"work/a.root": b"A"}))
    assert (tmp_path / "out" / "outputs" / "a.root").read_bytes() == b"A"
    apply(sync, tmp_path, round_tar(["binds/0/input.dat", "binds/0/old.log"], {}))
    assert not (tmp_path / "out" / "outputs" / "a.root").exists()
    returned = tmp_path / "final"
    write(returned / "0" / "input.dat", "in")  # old.log is gone at the end
    assert sync.finish(returned) == [{"source": str(bind), "target": "/data", "changed": [],
                                      "removed": ["old.log"]}]
    assert not (bind / "old.log").exists()
    assert sync.summary(60)["rounds"] == 2


def test_the_channel_carries_rounds_and_samples_one_round_waiting_at_a_time(tmp_path):
    guest, host = socket.socketpair()
    (tmp_path / "spool").mkdir()
    live = LiveStreams(tmp_path, 1 << 20, spool=tmp_path / "spool", round_limit_bytes=1 << 20)
    live.follow(Channel(read=lambda: host.recv(1 << 16), write=host.sendall))
    first, second = round_tar([], {}), round_tar(["work/x"], {"work/x": b"x"})
    guest.sendall(encode_record(3, first) + encode_record(4, b"cpu_user_s=1.5\nmemory_peak_mib=12\nbogus=1\n"))
    sent = threading.Thread(target=lambda: guest.sendall(encode_record(3, second) + encode_record(1, b"after\n")))
    sent.start()
    time.sleep(0.3)
    assert (tmp_path / "stdout").read_bytes() == b""  # the second round waits for the first to be taken ...
    taken = live.take_round(wait_s=5)
    assert taken.read_bytes() == first
    taken.unlink()
    assert live.take_round(wait_s=5).read_bytes() == second  # ... and comes once it is
    sent.join(5)
    assert live.take_usage() == {"cpu_user_s": 1.5, "memory_peak_mib": 12.0}
    assert live.take_usage() is None
    assert live.request_round()
    assert guest.recv(100) == SYNC_REQUEST
    guest.close()
    live.close()
    assert (tmp_path / "stdout").read_bytes() == b"after\n"
    assert (live.rounds, live.samples, live.broken) == (2, 1, None)


def test_a_round_larger_than_the_io_disk_is_garbage(tmp_path):
    live = LiveStreams(tmp_path, 1 << 20, spool=tmp_path, round_limit_bytes=1000)
    live.feed(b"3 1001\n")
    live.close()
    assert "garbage" in live.broken and live.take_round() is None


def test_a_file_that_came_back_as_a_hard_link_is_not_taken_for_removed(tmp_path):
    """The guest made `hard` a second name of input.txt; its tar holds one of them as a hard link, which the
    reader rejects: the name is still in the guest, so the host's file stays."""
    bind, sync = make_sync(tmp_path)
    returned = tmp_path / "final"
    write(returned / "0" / "old.log", "old")
    write(returned / "0" / "hard", "in")
    records = sync.finish(returned, [{"path": "binds/0/input.dat", "reason": "hard link: only regular files "
                                                                              "and folders come back"}])
    assert (bind / "input.dat").read_text() == "in" and records[0]["removed"] == []
