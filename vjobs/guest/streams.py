"""The guest's live channel, on the host: the payload's stdout and stderr while it runs, sync rounds of its
files and usage samples, as framed records; and the one request the host sends back.

The guest agent (vjobs/guest/agent/lib.sh ``serve_host_channel``) writes records on a channel its driver
offers (``VM.guest_channel``, vjobs/drivers/contract.py)::

    b"<kind> <length>\\n" + <length> bytes

    kind 1, 2   what the payload added to its stdout, stderr; length 1..MAX_RECORD (the agent sends 64 KiB)
    kind 3      a sync round: a tar like the results' (vjobs/guest/sync.py); length 1..round_limit_bytes
    kind 4      a usage sample, "name=value" lines (vjobs/guest/collect.py parse_usage); length 1..MAX_SAMPLE

A text header, so that a shell agent writes it with ``printf``. The host writes ``b"sync\\n"`` to ask for a
sync round now (before it stops the VM), on channels that carry both ways.

The channel is a virtio-serial port named ``STREAMS_PORT`` (qemu_user, kvm), or the console itself (xen, whose
XAPI gives a guest its console and no other channel: ``StreamsOnConsole`` below; the driver puts
``STREAMS_ON_CONSOLE`` on the kernel command line to say so).

The host reads the channel as hostile input:

- bounded: stdout and stderr together keep at most ``limit_bytes`` (the job's ``output_mib``, which bounds the
  final copy on the io disk too); beyond it records are read and dropped, and ``dropped`` counts their bytes.
  A round is spooled to a file in the job's folder, never held in memory, and bounded by the io disk's size
  as the results are; one round waits to be applied at a time. The channel is always drained otherwise, so a
  flood never grows host memory (a record is read in chunks and never held whole);
- a stall is fine: nothing comes, nothing is written;
- garbage framing (a bad header, an unknown kind, a length out of range) ends the parsing for good: the rest
  of the channel is drained and discarded, ``broken`` says why, and the job goes on.

The live stdout and stderr are a convenience: at collection the io disk's copies replace them (the
container's ``_publish``), so the final ``stdout`` and ``stderr`` are exactly the guest's.
"""

from __future__ import annotations

import base64
import binascii
import os
import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from vjobs.guest.collect import parse_usage
from vjobs.guest.console import copy_in_thread
from vjobs.host.folders import FILE_MODE

STREAMS = {1: "stdout", 2: "stderr"}
STREAMS_PORT = "vjobs.streams"  # the virtio-serial port's name, which the guest agent looks for
STREAMS_ON_CONSOLE = "vjobs.streams=console"  # on the kernel command line: the channel is the console
SYNC_ROUND, USAGE_SAMPLE = 3, 4
MAX_RECORD = 1 << 16  # the agent writes at most 64 KiB a stream record; more is garbage
MAX_SAMPLE = 1 << 16
SYNC_REQUEST = b"sync\n"
_MAX_HEADER = 24  # "3 1099511627776\n" and room to spare
_DROPPED = 0  # the kind of the rest of a record a checkpoint interrupted, when it is not kept (``_carry``)


def encode_record(kind: int, data: bytes) -> bytes:
    """One record, as the guest agent writes it (for tests and other agents)."""
    return f"{kind} {len(data)}\n".encode() + data


@dataclass(frozen=True)
class Channel:
    """The raw bytes of a VM's live channel, as its driver hands it over: ``read()`` returns the next bytes,
    b"" (or raises) at its end; ``write(data)`` sends to the agent, where the channel carries both ways."""

    read: Callable[[], bytes]
    write: Callable[[bytes], None] | None = None


class LiveStreams:
    """Parses records fed by ``feed`` (or copied from a channel by ``follow``): streams into ``folder``'s
    ``stdout`` and ``stderr``, created afresh; sync rounds into files under ``spool`` (a folder of the job's),
    handed to the job's thread by ``take_round``; usage samples by ``take_usage``."""

    def __init__(self, folder: Path, limit_bytes: int, *, spool: Path | None = None, round_limit_bytes: int = 0,
                 carried: dict | None = None):
        """``carried``: where the parsing stood when the guest was saved (``position()``), for a guest
        restored from a checkpoint, whose channel goes on from there."""
        self.limit_bytes = max(int(limit_bytes), 0)
        self.round_limit_bytes = round_limit_bytes if spool is not None else 0
        self.spool = spool
        self.kept = 0
        self.dropped = 0
        self.rounds = 0  # sync rounds received whole
        self.samples = 0  # usage samples received
        self.broken: str | None = None  # why parsing stopped, once the framing was garbage
        self._header = b""
        self._kind: int | None = None  # the record being read, and how many of its bytes are still to come
        self._left = 0
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._thread: threading.Thread | None = None
        self._write: Callable[[bytes], None] | None = None
        self._round_file = None  # the round being spooled, and where
        self._round_path: Path | None = None
        self._round_ready: Path | None = None  # a whole round, not yet taken
        self._closing = False  # close() began: a round no longer waits to be taken
        self._sample = bytearray()
        self._usage: dict | None = None  # the latest sample, not yet taken
        self._fed_at = time.monotonic()
        if carried:
            self._carry(carried)
        self._files = {}
        for name in STREAMS.values():  # never through a link, never writable by others (vjobs/host/folders.py)
            fd = os.open(Path(folder) / name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC,
                         FILE_MODE)
            self._files[name] = os.fdopen(fd, "wb", buffering=0)

    def follow(self, channel: Channel) -> None:
        """Copy the channel's chunks in a thread until it ends."""
        self._write = channel.write
        self._thread = copy_in_thread(channel.read, self.feed, "live-streams")

    # --- the job's thread ------------------------------------------------------------------------------

    def request_round(self) -> bool:
        """Ask the agent for a sync round now; False where the channel carries nothing to the guest."""
        if self._write is None:
            return False
        try:
            self._write(SYNC_REQUEST)
            return True
        except OSError:  # the VM is going
            return False

    def take_round(self, wait_s: float = 0.0) -> Path | None:
        """The spool file of a round received whole (the caller applies and removes it), waiting up to
        ``wait_s`` for one; None when none came."""
        with self._changed:
            self._changed.wait_for(lambda: self._round_ready is not None or self._closing, wait_s)
            ready, self._round_ready = self._round_ready, None
            self._changed.notify_all()  # the reader may spool the next one
            return ready

    def take_usage(self) -> dict | None:
        """The latest usage sample's figures, once; None when no new one came."""
        with self._lock:
            usage, self._usage = self._usage, None
            return usage

    def position(self, quiet_s: float = 0.2, wait_s: float = 2.0) -> dict:
        """Where the parsing stands, once the channel has been quiet for ``quiet_s`` (the guest is stopped:
        what its hypervisor had sent is read; at most ``wait_s``): between records, or inside one. A
        checkpoint carries it, for the restored guest's channel to be read on from there."""
        deadline = time.monotonic() + wait_s
        while time.monotonic() - self._fed_at < quiet_s and time.monotonic() < deadline:
            time.sleep(quiet_s / 4)
        with self._lock:
            return {"header": self._header.decode("latin-1"), "kind": self._kind, "left": self._left}

    def _carry(self, carried: dict) -> None:
        """Go on inside the record the guest was writing when it was saved. Its stdout or stderr bytes are
        kept; the rest of a sync round or usage sample is dropped (its spool stayed behind with the old job
        folder): the files it held come back with the results all the same."""
        self._header = str(carried.get("header", "")).encode("latin-1")[:_MAX_HEADER]
        kind, left = carried.get("kind"), int(carried.get("left") or 0)
        if kind is not None and left > 0:
            self._kind, self._left = (kind if kind in STREAMS else _DROPPED), left

    # --- the reader's thread ---------------------------------------------------------------------------

    def feed(self, data: bytes) -> None:
        with self._lock:
            self._fed_at = time.monotonic()
            view = memoryview(data)
            while view and self.broken is None and self._files:  # once closed, late bytes are not the job's
                view = self._take_body(view) if self._kind is not None else self._take_header(view)

    def _take_header(self, view: memoryview) -> memoryview:
        end = bytes(view[:_MAX_HEADER]).find(b"\n")
        if end < 0:
            self._header += bytes(view)
            if len(self._header) > _MAX_HEADER:
                self._break(f"a header longer than {_MAX_HEADER} bytes")
            return view[len(view):]
        header, self._header = self._header + bytes(view[:end]), b""
        parts = header.split(b" ")
        limits = {**dict.fromkeys(STREAMS, MAX_RECORD), SYNC_ROUND: self.round_limit_bytes, USAGE_SAMPLE: MAX_SAMPLE}
        if (len(parts) != 2 or not all(part.isdigit() and len(part) < 16 for part in parts)
                or int(parts[0]) not in limits or not 0 < int(parts[1]) <= limits[int(parts[0])]):
            self._break(f"a bad record header {header[:_MAX_HEADER]!r}")
        else:
            self._kind, self._left = int(parts[0]), int(parts[1])
            if self._kind == SYNC_ROUND:
                self._start_round()
        return view[end + 1:]

    def _take_body(self, view: memoryview) -> memoryview:
        body, rest = view[:self._left], view[self._left:]
        self._left -= len(body)
        if self._kind in STREAMS:
            self._keep(STREAMS[self._kind], body)
        elif self._kind == SYNC_ROUND:
            self._round_file.write(body)
        elif self._kind == USAGE_SAMPLE:
            self._sample += body
        if not self._left:
            self._end_record()
        return rest

    def _keep(self, name: str, body: memoryview) -> None:
        keep = max(min(len(body), self.limit_bytes - self.kept), 0)
        if keep:
            self._files[name].write(body[:keep])
            self.kept += keep
        self.dropped += len(body) - keep

    def _start_round(self) -> None:
        """Spool the next round, once the job's thread has taken the last (the guest waits meanwhile)."""
        self._changed.wait_for(lambda: self._round_ready is None or self._closing)
        if self._closing:  # the job is past taking rounds: the rest of this one is read and dropped
            self._round_file, self._round_path = open(os.devnull, "wb"), None
            return
        path = self._round_path = self.spool / f"round.{self.rounds + 1}.tar"
        self._round_file = os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW
                                             | os.O_CLOEXEC, FILE_MODE), "wb")

    def _end_record(self) -> None:
        if self._kind == SYNC_ROUND:
            self._round_file.close()
            self.rounds += 1
            if not self._closing and self._round_path is not None:
                self._round_ready = self._round_path
                self._changed.notify_all()
            self._round_file = None
        elif self._kind == USAGE_SAMPLE:
            self._usage, _note = parse_usage(bytes(self._sample))
            self._sample.clear()
            self.samples += 1
        self._kind = None

    def _break(self, why: str) -> None:
        self.broken = f"the guest's live channel was garbage ({why}); the rest is ignored"

    def close(self, wait_s: float = 2.0) -> None:
        """Stop taking records (a round still waiting is dropped), wait briefly for the copying thread (its
        channel is closed by now), then close the files."""
        with self._changed:
            self._closing = True
            self._changed.notify_all()
        if self._thread:
            self._thread.join(wait_s)
        with self._lock:
            for file in self._files.values():
                file.close()
            self._files = {}
            if self._round_file is not None:
                self._round_file.close()
                self._round_file = None


# --- the channel on a console (xen) -------------------------------------------------------------------------
#
# The agent (lib.sh ``console_carrier``) cuts the channel's bytes into pieces of at most CARRIER_PIECE, as they
# come, and writes each on the console as one escape sequence, with one write() (so that no line of the agent's
# falls inside one); the host's lines (``SYNC_REQUEST``) it reads as typed on the console:
#
#     ESC "]vjobs-streams;" <the piece in base64> BEL
#
# An OSC sequence, which a terminal attached to the console (``xe console``) does not show. The payload's bytes
# are in base64 there, so nothing the payload prints can end a carrier early or look like console text (an
# agent marker), and console text cannot look like a carrier's inside unless written as one (by the guest's
# root, who could as well write its own records: the core's bounds hold either way).

CARRIER_START = b"\x1b]vjobs-streams;"
CARRIER_END = b"\x07"
CARRIER_PIECE = 3072  # bytes of the channel a carrier holds at most (lib.sh's dd bs=)
CARRIER_MAX = CARRIER_PIECE * 4 // 3  # their base64; a longer carrier is garbage
PENDING_MAX = 1 << 20  # channel bytes kept for the reader: more waits for it, or ends a channel nobody reads
_NOT_BASE64 = re.compile(rb"[^A-Za-z0-9+/=]")


class StreamsOnConsole:
    """Splits a console that carries the guest's live channel (xen) into the console's own text, for its
    ``ConsoleLog``, and the channel, for ``LiveStreams`` (``read``). Fed from the console's one reading thread
    (``console_text``, or ``split``); read from another.

    As hostile as the channel itself: a carrier that is not base64, or longer than ``CARRIER_MAX``, ends the
    channel for good (``broken``; a line in the console log says so, the text after it is console text
    again, and later carriers are still taken out of the console but ignored). So the host holds at most one
    carrier and ``pending_max`` bytes, and the console's bound (``ConsoleLog``) holds for its text. Once
    ``read`` has been called, a reader that falls ``pending_max`` bytes behind (LiveStreams waits for the job to
    take a sync round) holds up the console's reading, as a virtio-serial port holds up its writer; before,
    nobody reads, and as many unread bytes end the channel. A kernel message that falls inside a carrier (the
    kernel writes the console without waiting for the agent's write to end; only warnings and worse, with the
    built-in image's ``loglevel=4``) breaks it too: the live copies stop there, and the final stdout and stderr
    come with the results as always."""

    def __init__(self, pending_max: int = PENDING_MAX):
        self.pending_max = pending_max
        self.broken: str | None = None
        self._held = b""  # the end of the last text read, which may be the beginning of a CARRIER_START
        self._carrier: bytearray | None = None  # the carrier being read; None: console text
        self._pending = bytearray()  # the channel's bytes that ``read`` has not returned yet
        self._reading = False  # ``read`` was called: a reader will take what is pending
        self._ended = False
        self._changed = threading.Condition()

    def console_text(self, read: Callable[[], bytes]) -> Callable[[], bytes]:
        """``read`` (the console's raw bytes, b"" or an exception at its end) as a ``read`` of its text alone,
        for ``ConsoleLog.follow``; its end is the channel's end too."""
        def read_text() -> bytes:
            try:
                while chunk := read():
                    if text := self.split(chunk):
                        return text
            except BaseException:
                self.end()
                raise
            self.end()
            text, self._held = self._held, b""  # a console that ended on what looked like a carrier's start
            return text
        return read_text

    def split(self, data: bytes) -> bytes:
        """The console's own text in ``data``; the carriers in it go to the channel."""
        text = bytearray()
        data, self._held = self._held + data, b""
        while data:
            if self._carrier is not None:
                data = self._take_carrier(data, text)
                continue
            start = data.find(CARRIER_START)
            if start < 0:
                held = _carrier_start_begun(data)
                text += data[:len(data) - held]
                self._held = data[len(data) - held:]
                break
            text += data[:start]
            data = data[start + len(CARRIER_START):]
            self._carrier = bytearray()
        return bytes(text)

    def _take_carrier(self, data: bytes, text: bytearray) -> bytes:
        """Reads the carrier under way from ``data``; what follows it (console text) is returned."""
        room = CARRIER_MAX - len(self._carrier)
        end = data.find(CARRIER_END, 0, room + 1)
        body = data[:end] if end >= 0 else data[:room]
        if bad := _NOT_BASE64.search(body):
            self._carrier = None
            text += self._break(f"a carrier held {bytes(body[bad.start():bad.start() + 1])!r}, which is not base64")
            return data[bad.start():]
        self._carrier += body
        if end >= 0:
            carrier, self._carrier = bytes(self._carrier), None
            text += self._deliver(carrier)
            return data[end + 1:]
        if len(data) > room:
            self._carrier = None
            text += self._break(f"a carrier longer than {CARRIER_MAX} bytes")
            return data[room:]
        return b""

    def _deliver(self, carrier: bytes) -> bytes:
        """The carrier's bytes onto the channel; a note for the console log if that broke it."""
        if self.broken is not None:
            return b""  # taken out of the console, and ignored
        try:
            piece = base64.b64decode(carrier, validate=True)
        except binascii.Error:
            return self._break("a carrier's base64 did not decode")
        with self._changed:
            self._changed.wait_for(lambda: self._fits(piece) or self._ended or not self._reading)
            if self._ended:
                return b""
            fits = self._fits(piece)
            if fits:
                self._pending += piece
                self._changed.notify_all()
        return b"" if fits else self._break(f"nobody read more than {self.pending_max} bytes of it")

    def _fits(self, piece: bytes) -> bool:
        return len(self._pending) + len(piece) <= self.pending_max

    def _break(self, why: str) -> bytes:
        """Ends the channel for good, the first time: a line for the console log; later: nothing."""
        if self.broken is not None:
            return b""
        self.broken = f"the guest's live channel on its console stopped: {why}; the rest is ignored"
        self.end()
        return f"\n[vjobs: {self.broken}]\n".encode()

    def end(self) -> None:
        """The console ended, the channel broke, or the VM is destroyed: ``read`` returns what is pending, then
        b""; later carriers are taken out of the console and dropped."""
        with self._changed:
            self._ended = True
            self._changed.notify_all()

    def read(self) -> bytes:
        """The channel's next bytes, as they come; b"" at its end (a ``Channel``'s ``read``)."""
        with self._changed:
            self._reading = True
            self._changed.wait_for(lambda: self._pending or self._ended)
            data, self._pending = bytes(self._pending), bytearray()
            self._changed.notify_all()  # the console's reader may go on
            return data


def _carrier_start_begun(data: bytes) -> int:
    """How many of ``data``'s last bytes are the beginning of a ``CARRIER_START`` that a read cut short."""
    for size in range(min(len(CARRIER_START) - 1, len(data)), 0, -1):
        if data.endswith(CARRIER_START[:size]):
            return size
    return 0
