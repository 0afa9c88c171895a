"""The host's reader of the guest's live streams (vjobs/guest/streams.py), fed as a hostile guest would."""

import base64
import os
import socket
import subprocess
import threading
import time
from pathlib import Path

from vjobs.guest import streams
from vjobs.guest.console import ConsoleLog
from vjobs.guest.streams import (CARRIER_END, CARRIER_MAX, CARRIER_START, MAX_RECORD, Channel, LiveStreams,
                                 StreamsOnConsole, encode_record)


def test_records_reach_the_files_as_they_come_even_split_across_reads(tmp_path):
    live = LiveStreams(tmp_path, 1 << 20)
    data = encode_record(1, b"first line\n") + encode_record(2, b"oops\n") + encode_record(1, b"second\n")
    for byte in range(len(data)):  # one byte a read: headers and bodies split anywhere
        live.feed(data[byte:byte + 1])
    assert (tmp_path / "stdout").read_bytes() == b"first line\nsecond\n"
    assert (tmp_path / "stderr").read_bytes() == b"oops\n"
    live.close()
    assert (live.kept, live.dropped, live.broken) == (23, 0, None)


def test_a_flood_is_drained_and_dropped_beyond_the_limit_without_blocking_the_writer(tmp_path):
    guest, host = socket.socketpair()
    live = LiveStreams(tmp_path, 10_000)
    live.follow(Channel(read=lambda: host.recv(1 << 16)))
    record = encode_record(1, b"x" * 4096)
    for _ in range(1000):  # 4 MiB: far more than the socket buffers; sendall would block if nobody drained
        guest.sendall(record)
    guest.close()
    live.close(wait_s=10)
    assert (tmp_path / "stdout").stat().st_size == 10_000
    assert (live.kept, live.dropped) == (10_000, 1000 * 4096 - 10_000)


def test_a_stall_writes_nothing_and_ends_cleanly(tmp_path):
    guest, host = socket.socketpair()
    live = LiveStreams(tmp_path, 1 << 20)
    live.follow(Channel(read=lambda: host.recv(1 << 16)))
    guest.sendall(b"1 10\nhalf")  # a record cut short, then silence
    time.sleep(0.3)
    assert (tmp_path / "stdout").read_bytes() == b"half"
    guest.close()
    live.close()
    assert live.broken is None


def test_garbage_framing_stops_parsing_but_keeps_draining(tmp_path):
    guest, host = socket.socketpair()
    live = LiveStreams(tmp_path, 1 << 20)
    live.follow(Channel(read=lambda: host.recv(1 << 16)))
    guest.sendall(encode_record(1, b"good\n") + b"this is not a header at all, nor is what follows\n")
    writer = threading.Thread(target=lambda: [guest.sendall(encode_record(1, b"y" * 4096)) for _ in range(500)])
    writer.start()
    writer.join(20)
    assert not writer.is_alive()  # the guest was never blocked
    guest.close()
    live.close()
    assert (tmp_path / "stdout").read_bytes() == b"good\n"
    assert "garbage" in live.broken


def test_bad_headers_are_garbage(tmp_path):
    for bad in (b"3 4\nabcd", b"1 0\n", f"1 {MAX_RECORD + 1}\n".encode(), b"-1 4\nabcd", b"1  4\nabcd",
                b"1" * 40):
        live = LiveStreams(tmp_path, 1 << 20)
        live.feed(bad)
        live.close()
        assert live.broken, bad
        assert (tmp_path / "stdout").read_bytes() == b""


def test_late_bytes_after_close_are_ignored(tmp_path):
    live = LiveStreams(tmp_path, 1 << 20)
    live.close()
    live.feed(encode_record(1, b"late"))
    assert (tmp_path / "stdout").read_bytes() == b""


# --- the channel on a console (xen): StreamsOnConsole ---------------------------------------------------------

AGENT_LIB = Path(streams.__file__).with_name("agent") / "lib.sh"


def carried(data: bytes) -> bytes:
    """``data`` as the agent puts it on the console: its own console_carrier, run by busybox's sh."""
    done = subprocess.run(["busybox", "sh", "-c", f". {AGENT_LIB}; console_carrier"], input=data,
                          capture_output=True, timeout=60, check=True)
    return done.stdout


def carrier(data: bytes) -> bytes:
    return CARRIER_START + base64.b64encode(data) + CARRIER_END


def test_the_agents_carriers_come_back_exact_and_leave_the_console_text_alone():
    """What the payload prints travels in base64: an escape of ours or an agent marker in it is no console text."""
    channel = (encode_record(1, b"\x1b]vjobs-streams;vjobs-agent: up\x07\n") + os.urandom(10_000)
               + encode_record(2, b"oops\n"))
    wrapped = carried(channel)
    pieces = wrapped.split(CARRIER_END)[:-1]
    assert len(pieces) >= 4 and all(len(piece) <= len(CARRIER_START) + CARRIER_MAX for piece in pieces)
    between = len(pieces[0]) + len(CARRIER_END)  # the agent's lines fall between two carriers, never in one
    console = b"vjobs-agent: up\n" + wrapped[:between] + b"a line\n" + wrapped[between:] + b"the end\n"
    for size in (1, 7, 4096):  # cut anywhere, escape sequences included
        demux = StreamsOnConsole()
        text = b"".join(demux.split(console[at:at + size]) for at in range(0, len(console), size))
        demux.end()
        assert demux.broken is None
        assert b"".join(iter(demux.read, b"")) == channel
    assert text == b"vjobs-agent: up\na line\nthe end\n"


def test_console_text_and_live_streams_through_the_followers(tmp_path):
    """As the xen driver wires it: the console's reader splits, the ConsoleLog gets the text, LiveStreams the
    records; the console's end is the channel's end."""
    guest, host = socket.socketpair()
    demux = StreamsOnConsole()
    console = ConsoleLog(tmp_path / "console.log")
    console.follow(demux.console_text(lambda: host.recv(65536)))
    live = LiveStreams(tmp_path, 1 << 20)
    live.follow(Channel(read=demux.read))
    guest.sendall(b"boot\n" + carried(encode_record(1, b"first\n")) + b"more\n\x1b]vjob")
    guest.close()
    live.close()
    console.close()
    assert (tmp_path / "stdout").read_bytes() == b"first\n"
    assert (tmp_path / "console.log").read_bytes() == b"boot\nmore\n\x1b]vjob"  # a cut escape is text at the end
    assert demux.read() == b""


def test_a_carrier_that_is_not_base64_ends_the_channel_and_its_text_stays_console_text():
    demux = StreamsOnConsole()
    text = demux.split(carrier(b"kept") + CARRIER_START + b"QUJD[ 12.3] a kernel line\n" + carrier(b"late"))
    assert text.startswith(b"\n[vjobs: the guest's live channel on its console stopped: a carrier held b'['")
    assert text.endswith(b"[ 12.3] a kernel line\n")  # the later carrier is still taken out, and ignored
    assert demux.read() == b"kept" and demux.read() == b""
    assert demux.split(carrier(b"later")) == b""
    assert demux.read() == b""


def test_bad_base64_and_an_endless_carrier_end_the_channel_with_bounded_memory():
    padding = StreamsOnConsole()
    padding.split(CARRIER_START + b"QQ=Q" + CARRIER_END)
    assert "did not decode" in padding.broken
    endless = StreamsOnConsole()
    text = b"".join(endless.split(CARRIER_START + b"A" * 65536) for _ in range(3))
    assert f"longer than {CARRIER_MAX} bytes" in endless.broken
    note, rest = text.split(b"]\n", 1)
    assert note.count(b"[vjobs:") == 1
    assert rest == b"A" * (3 * (65536 - CARRIER_MAX))  # each carrier held to its bound, the rest is console text


def test_a_flood_nobody_reads_ends_the_channel_at_the_pending_bound():
    demux = StreamsOnConsole(pending_max=10_000)
    for _ in range(10):
        demux.split(carrier(b"x" * 3072))
    assert "nobody read more than 10000 bytes" in demux.broken
    assert len(demux.read()) == 9216 and demux.read() == b""


def test_a_reader_that_falls_behind_holds_up_the_console_and_loses_nothing():
    """As a virtio-serial port holds up its writer: LiveStreams waits while the job takes a sync round."""
    demux = StreamsOnConsole(pending_max=10_000)
    got = []

    def read_slowly() -> None:
        while data := demux.read():
            got.append(data)
            time.sleep(0.05)

    reader = threading.Thread(target=read_slowly)
    reader.start()
    time.sleep(0.1)  # reading (the container follows the channel before the payload starts)
    sent = os.urandom(20 * 3072)
    for at in range(0, len(sent), 3072):
        demux.split(carrier(sent[at:at + 3072]))
    demux.end()
    reader.join(10)
    assert demux.broken is None and b"".join(got) == sent


def test_a_stalled_carrier_blocks_nothing_and_ends_with_the_console():
    demux = StreamsOnConsole()
    got = []
    reader = threading.Thread(target=lambda: got.append(demux.read()))
    reader.start()
    assert demux.split(CARRIER_START + b"QUJD") == b""  # half a carrier, then silence
    time.sleep(0.2)
    assert reader.is_alive()
    demux.end()
    reader.join(5)
    assert got == [b""] and demux.broken is None
