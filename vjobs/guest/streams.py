"""The payload's stdout and stderr while it runs: framed records from the guest, appended to the outdir's files.

The guest agent writes each chunk of the payload's output as one record on a channel its driver offers
(``VM.live_streams``, vjobs/drivers/contract.py)::

    b"<stream> <length>\\n" + <length> bytes        stream: 1 (stdout) or 2 (stderr); length: 1..MAX_RECORD

A text header, so that a shell agent writes it with ``printf``. The host reads the channel as hostile input:

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

import os
import threading
from pathlib import Path
from typing import Callable

from vjobs.host.folders import FILE_MODE

STREAMS = {1: "stdout", 2: "stderr"}
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
