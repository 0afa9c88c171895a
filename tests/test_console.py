"""The guest's console is bounded on the host: head and tail kept, the middle dropped and said so."""

from __future__ import annotations

import dataclasses

import pytest

import vjobs
from vjobs.guest.console import ConsoleLog

UP = b"vjobs-agent: up"


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


@pytest.mark.vm
def test_a_guest_flooding_its_console_leaves_at_most_console_max_mib(driver_site, make_job, tmp_path,
                                                                      assert_clean_host):
    """3 MB written to the console through each driver's console path; 64 KiB kept."""
    _, site = driver_site
    site = dataclasses.replace(site, console_max_mib=0.0625)
    flood = "yes vjobs-flood-line | head -c 3000000 > /dev/console; echo last-line-of-the-flood > /dev/console"
    result = vjobs.run(make_job(["sh", "-c", flood], walltime_s=120), site=site, outdir=tmp_path / "out")
    assert result.status == "succeeded", result.error
    console = (tmp_path / "out" / "console.log").read_bytes()
    assert len(console) <= 64 * 1024 + 300
    assert b"vjobs-agent: up" in console[:32 * 1024]
    assert b"bytes of console output dropped here" in console
    assert b"last-line-of-the-flood" in console[-32 * 1024:]
