"""The host's reader of the guest's live streams (vjobs/guest/streams.py), fed as a hostile guest would."""

import socket
import threading
import time

from vjobs.guest.streams import MAX_RECORD, Channel, LiveStreams, encode_record


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
