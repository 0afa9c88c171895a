"""The guest's console on the host (vjobs/guest/console.py): bounded, head and tail kept, the middle dropped and
said so; and waited on: the wait for a marker is woken by the marker itself, or by the end of the stream the
console follows when the guest dies first; it never polls. (The same bound on a real guest's flood, through every
driver: vjobs.testing.conformance.)"""

from __future__ import annotations

import os
import threading

import pytest

from vjobs.guest.console import ConsoleLog
from vjobs.guest.protocol import AGENT_UP_MARKER

UP = AGENT_UP_MARKER
LONG = 300.0  # a timeout no test waits out: a wait that is not woken fails the join below, long before


def test_a_small_console_is_kept_whole(tmp_path):
    log = ConsoleLog(tmp_path / "c.log", 1000)
    log.write(b"hello ")
    log.write(b"world")
    log.close()
    assert (tmp_path / "c.log").read_bytes() == b"hello world"


def test_a_flood_keeps_head_and_tail_and_says_what_was_dropped(tmp_path):
    log = ConsoleLog(tmp_path / "c.log", 1000)
    log.write(b"H" * 400 + b"start")
    for _ in range(1000):
        log.write(b"x" * 97 + b"\n")
    log.write(b"the last words")
    log.close()
    kept = (tmp_path / "c.log").read_bytes()
    head, notice, tail = kept[:500], kept[500:-500], kept[-500:]
    assert head.startswith(b"H" * 400 + b"start")
    assert tail.endswith(b"the last words")
    assert b"dropped here" in notice and b"console_max_mib" in notice
    dropped = 405 + 98_000 + 14 - 1000
    assert f"{dropped} bytes".encode() in notice
    assert len(kept) < 1000 + 300


def test_markers_are_seen_across_writes_and_in_the_dropped_middle(tmp_path):
    log = ConsoleLog(tmp_path / "c.log", 100, markers=(UP,))
    log.write(b"z" * 300 + b"vjobs-ag")
    assert not log.saw(UP)
    log.write(b"ent: up" + b"z" * 300)
    assert log.saw(UP)
    log.close()
    assert UP not in (tmp_path / "c.log").read_bytes()  # it was in the dropped middle, and still seen


def test_last_bytes_come_from_head_and_tail(tmp_path):
    log = ConsoleLog(tmp_path / "c.log", 100)
    log.write(b"abc")
    assert log.last(2) == b"bc"
    log.write(b"d" * 200 + b"end")
    assert log.last(3) == b"end"
    log.close()
    assert log.last(3) == b"end"


def test_writes_after_close_are_ignored(tmp_path):
    log = ConsoleLog(tmp_path / "c.log", 100)
    log.write(b"kept")
    log.close()
    log.write(b"late")
    assert (tmp_path / "c.log").read_bytes() == b"kept"


# --- waiting for a marker ------------------------------------------------------------------------------------

def waiting(log: ConsoleLog, marker: bytes = UP) -> tuple[threading.Thread, list]:
    answers: list = []
    thread = threading.Thread(target=lambda: answers.append(log.wait_for(marker, LONG)), daemon=True)
    thread.start()
    return thread, answers


def woken(thread: threading.Thread) -> bool:
    thread.join(30)
    return not thread.is_alive()


def test_the_marker_wakes_the_wait(tmp_path):
    log = ConsoleLog(tmp_path / "c.log", markers=(UP,))
    thread, answers = waiting(log)
    log.write(b"booting...\nvjobs-ag")
    log.write(b"ent: up\n")
    assert woken(thread) and answers == [True]
    log.close()


def test_a_marker_already_seen_returns_at_once(tmp_path):
    log = ConsoleLog(tmp_path / "c.log", markers=(UP,))
    log.write(b"vjobs-agent: up\n")
    assert log.wait_for(UP, LONG)
    log.close()


def test_the_end_of_the_followed_stream_wakes_the_wait(tmp_path):
    read_end, write_end = os.pipe()
    log = ConsoleLog(tmp_path / "c.log", markers=(UP,))
    log.follow(lambda: os.read(read_end, 4096))
    thread, answers = waiting(log)
    os.write(write_end, b"Kernel panic - not syncing\n")
    assert not log.ended
    os.close(write_end)  # the hypervisor closed the console: the guest is gone
    assert woken(thread) and answers == [False]
    assert log.ended and not log.wait_for(UP, LONG)  # and a later wait returns at once
    log.close()
    os.close(read_end)


def test_closing_the_log_wakes_the_wait(tmp_path):
    log = ConsoleLog(tmp_path / "c.log", markers=(UP,))
    thread, answers = waiting(log)
    log.close()
    assert woken(thread) and answers == [False]


def test_a_log_fed_by_write_does_not_end_before_it_is_closed(tmp_path):
    log = ConsoleLog(tmp_path / "c.log", markers=(UP,))
    log.write(b"hello")
    assert not log.ended and not log.wait_for(UP, 0.01)
    log.close()
    assert log.ended


def test_only_a_marker_the_log_looks_out_for_can_be_waited_for(tmp_path):
    log = ConsoleLog(tmp_path / "c.log")
    with pytest.raises(ValueError):
        log.wait_for(UP, 1)
    log.close()
