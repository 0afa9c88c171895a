"""The payload's stdout and stderr while it runs: framed records from the guest, appended to the outdir's files.

The guest agent writes each chunk of the payload's output as one record on a channel its driver offers
(``VM.live_streams``, vjobs/drivers/contract.py)::

    b"<stream> <length>\\n" + <length> bytes        stream: 1 (stdout) or 2 (stderr); length: 1..MAX_RECORD

A text header, so that a shell agent writes it with ``printf``. The channel is a virtio-serial port named
``STREAMS_PORT`` (qemu_user, kvm), or the console itself (xen, whose XAPI gives a guest its console and no
other channel: ``StreamsOnConsole`` below; the driver puts ``STREAMS_ON_CONSOLE`` on the kernel command line
to say so). The host reads the channel as hostile input:

- bounded: stdout and stderr together keep at most ``limit_bytes`` (the job's ``output_mib``, which bounds the
  final copy on the io disk too); beyond it records are read and dropped, and ``dropped`` counts their bytes.
  The channel is always drained, so a flood never blocks the guest and never grows host memory (a record is
  read in chunks and never held whole);
- a stall is fine: nothing comes, nothing is written;
- garbage framing (a bad header, an unknown stream, a length out of range) ends the parsing for good: the rest
  of the channel is drained and discarded, ``broken`` says why, and the job goes on.

The live files are a convenience: at collection the io disk's copies replace them (the container's
``_publish``), so the final ``stdout`` and ``stderr`` are exactly the guest's.
"""

from __future__ import annotations

import base64
import binascii
import os
import re
import threading
from pathlib import Path
from typing import Callable

from vjobs.host.folders import FILE_MODE

STREAMS = {1: "stdout", 2: "stderr"}
STREAMS_PORT = "vjobs.streams"  # the virtio-serial port's name, which the guest agent looks for
STREAMS_ON_CONSOLE = "vjobs.streams=console"  # on the kernel command line: the channel is the console
MAX_RECORD = 1 << 16  # the agent writes at most 4 KiB a record; more is garbage
_MAX_HEADER = 16  # "2 65536\n" and room to spare


def encode_record(stream: int, data: bytes) -> bytes:
    """One record, as the guest agent writes it (for tests and other agents)."""
    return f"{stream} {len(data)}\n".encode() + data


class LiveStreams:
    """Parses records fed by ``feed`` (or copied from a channel by ``follow``) into ``folder``'s ``stdout`` and
    ``stderr``, created afresh."""

    def __init__(self, folder: Path, limit_bytes: int):
        self.limit_bytes = max(int(limit_bytes), 0)
        self.kept = 0
        self.dropped = 0
        self.broken: str | None = None  # why parsing stopped, once the framing was garbage
        self._header = b""
        self._stream: int | None = None  # the record being read, and how many of its bytes are still to come
        self._left = 0
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._files = {}
        for name in STREAMS.values():  # never through a link, never writable by others (vjobs/host/folders.py)
            fd = os.open(Path(folder) / name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC,
                         FILE_MODE)
            self._files[name] = os.fdopen(fd, "wb", buffering=0)

    def follow(self, read: Callable[[], bytes]) -> None:
        """Copy ``read()``'s chunks in a thread until it returns b"" or raises (the channel closed)."""
        def copy() -> None:
            try:
                while chunk := read():
                    self.feed(chunk)
            except Exception:  # a closed socket or stream, whatever its library raises: the VM is gone
                pass

        self._thread = threading.Thread(target=copy, name="live-streams", daemon=True)
        self._thread.start()

    def feed(self, data: bytes) -> None:
        with self._lock:
            if self._files:  # once closed, late bytes are not the job's any more
                view = memoryview(data)
                while view and self.broken is None:
                    view = self._take_body(view) if self._stream else self._take_header(view)

    def _take_header(self, view: memoryview) -> memoryview:
        end = bytes(view[:_MAX_HEADER]).find(b"\n")
        if end < 0:
            self._header += bytes(view)
            if len(self._header) > _MAX_HEADER:
                self._break(f"a header longer than {_MAX_HEADER} bytes")
            return view[len(view):]
        header, self._header = self._header + bytes(view[:end]), b""
        parts = header.split(b" ")
        if (len(parts) != 2 or not all(part.isdigit() for part in parts) or int(parts[0]) not in STREAMS
                or not 0 < int(parts[1]) <= MAX_RECORD):
            self._break(f"a bad record header {header[:_MAX_HEADER]!r}")
        else:
            self._stream, self._left = int(parts[0]), int(parts[1])
        return view[end + 1:]

    def _take_body(self, view: memoryview) -> memoryview:
        body, rest = view[:self._left], view[self._left:]
        self._left -= len(body)
        keep = max(min(len(body), self.limit_bytes - self.kept), 0)
        if keep:
            name = STREAMS[self._stream]
            self._files[name].write(body[:keep])
            self.kept += keep
        self.dropped += len(body) - keep
        if not self._left:
            self._stream = None
        return rest

    def _break(self, why: str) -> None:
        self.broken = f"the guest's live streams were garbage ({why}); the rest is ignored"

    def close(self, wait_s: float = 2.0) -> None:
        """Wait briefly for the copying thread (its channel is closed by now), then close the files."""
        if self._thread:
            self._thread.join(wait_s)
        with self._lock:
            for file in self._files.values():
                file.close()
            self._files = {}


# --- the channel on a console (xen) -------------------------------------------------------------------------
#
# The agent (lib.sh ``console_carrier``) cuts the channel's bytes into pieces of at most CARRIER_PIECE, as they
# come, and writes each on the console as one escape sequence, with one write() (so that no line of the agent's
# falls inside one):
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
PENDING_MAX = 1 << 20  # channel bytes kept for a reader that does not read; more ends the channel
_NOT_BASE64 = re.compile(rb"[^A-Za-z0-9+/=]")


class StreamsOnConsole:
    """Splits a console that carries the live-streams channel (xen) into the console's own text, for its
    ``ConsoleLog``, and the channel, for ``LiveStreams`` (``read``). Fed from the console's one reading thread
    (``console_text``, or ``split``); read from another.

    As hostile as the channel itself: a carrier that is not base64, or longer than ``CARRIER_MAX``, ends the
    channel for good (``broken``; a line in the console log says so, the text after it is console text
    again, and later carriers are still taken out of the console but ignored), as does a reader that leaves
    more than ``PENDING_MAX`` bytes unread. So the host holds at most one carrier and ``PENDING_MAX`` bytes,
    and the console's bound (``ConsoleLog``) holds for its text. A kernel message that falls inside a carrier
    (the kernel writes the console without waiting for the agent's write to end; only warnings and worse, with
    the built-in image's ``loglevel=4``) breaks it too: the live copies stop there, and the final stdout and
    stderr come with the results as always."""

    def __init__(self, pending_max: int = PENDING_MAX):
        self.pending_max = pending_max
        self.broken: str | None = None
        self._held = b""  # the end of the last text read, which may be the beginning of a CARRIER_START
        self._carrier: bytearray | None = None  # the carrier being read; None: console text
        self._pending = bytearray()  # the channel's bytes that ``read`` has not returned yet
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
            fits = len(self._pending) + len(piece) <= self.pending_max
            if fits:
                self._pending += piece
                self._changed.notify_all()
        return b"" if fits else self._break(f"the host left more than {self.pending_max} bytes of them unread")

    def _break(self, why: str) -> bytes:
        """Ends the channel for good, the first time: a line for the console log; later: nothing."""
        if self.broken is not None:
            return b""
        self.broken = f"the guest's live streams on its console stopped: {why}; the rest is ignored"
        self.end()
        return f"\n[vjobs: {self.broken}]\n".encode()

    def end(self) -> None:
        """The console ended (or the channel broke): ``read`` returns what is pending, then b""."""
        with self._changed:
            self._ended = True
            self._changed.notify_all()

    def read(self) -> bytes:
        """The channel's next bytes, as they come; b"" at its end (``VM.live_streams``)."""
        with self._changed:
            self._changed.wait_for(lambda: self._pending or self._ended)
            data, self._pending = bytes(self._pending), bytearray()
            return data


def _carrier_start_begun(data: bytes) -> int:
    """How many of ``data``'s last bytes are the beginning of a ``CARRIER_START`` that a read cut short."""
    for size in range(min(len(CARRIER_START) - 1, len(data)), 0, -1):
        if data.endswith(CARRIER_START[:size]):
            return size
    return 0
