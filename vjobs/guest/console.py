"""A guest's console as vjobs keeps it on the host: bounded, whatever the guest writes.

The guest is untrusted and its console is the one stream it can write to for as long as it runs (at about
0.6 MB/s under TCG, more with KVM). ``ConsoleLog`` keeps the first half of its limit on disk as it arrives
(the kernel's boot messages and the agent's start: what explains a failed boot) and the last half in
memory (what the guest said last: what explains a failed job), counts what lies between, and on
``close()`` writes the tail after a line that says how much was dropped. The file never grows past the
limit plus that line, and the memory kept is half the limit.

Drivers feed it from wherever their hypervisor delivers the console (a socket, a libvirt stream, an HTTP
console): ``write(data)`` from any thread, or ``follow(read)`` to start a thread that copies until EOF.
The core waits on it for the guest agent's first words (``wait_for``): woken by the write that brings them, or
by the end of the streams it follows, never by a timer.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path
from typing import Callable

from vjobs.host.folders import FILE_MODE

DEFAULT_MAX_BYTES = 8 << 20  # site setting console_max_mib
_MARKER_OVERLAP = 256  # a marker split across two writes is still found


class ConsoleLog:
    def __init__(self, path: Path, max_bytes: int = DEFAULT_MAX_BYTES, *, markers: tuple[bytes, ...] = (),
                 what: str = "console output", setting: str = "console_max_mib"):
        """``markers``: byte strings to look out for in everything written, dropped parts included (``saw``)."""
        self.path = Path(path)
        self.max_bytes = max(int(max_bytes), 2)
        self.what, self.setting = what, setting
        self.head_left = self.max_bytes // 2
        self.tail = bytearray()
        self.dropped = 0
        self.total = 0
        self.markers = markers
        self._recent = b""  # the last bytes seen, to find a marker split across two writes
        self._seen: set[bytes] = set()
        self._seen_at: dict[bytes, float] = {}  # time.monotonic() when each marker first came through
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)  # a marker seen, a followed stream ended, closed
        # Never through a link, never writable by others whatever the umask (vjobs/host/folders.py).
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, FILE_MODE)
        self._file = os.fdopen(fd, "wb", buffering=0)
        self._threads: list[threading.Thread] = []
        self._following = 0  # streams that ``follow`` copies from and that have not ended

    # --- feeding ---------------------------------------------------------------------------------------

    def write(self, data: bytes) -> None:
        if not data:
            return
        with self._lock:
            if self._file is None:
                return  # closed: the VM is being torn down, late bytes are not the job's any more
            self.total += len(data)
            self._note_markers(data)
            if self.head_left:
                head, data = data[:self.head_left], data[self.head_left:]
                self._file.write(head)
                self.head_left -= len(head)
            if data:
                self.tail += data
                excess = len(self.tail) - (self.max_bytes - self.max_bytes // 2)
                if excess > 0:
                    del self.tail[:excess]
                    self.dropped += excess

    def follow(self, read: Callable[[], bytes], name: str = "console") -> None:
        """Copy ``read()``'s chunks in a thread until it returns b"" or raises OSError (the other end closed)."""
        def ended() -> None:
            with self._changed:
                self._following -= 1
                self._changed.notify_all()

        with self._lock:
            self._following += 1
            self._threads.append(copy_in_thread(read, self.write, f"{name}-{self.path.name}", ended))

    # --- asking --------------------------------------------------------------------------------------

    def saw(self, marker: bytes) -> bool:
        with self._lock:
            return marker in self._seen

    def seen_at(self, marker: bytes) -> float | None:
        """When ``marker`` first came through (``time.monotonic()``), or None."""
        with self._lock:
            return self._seen_at.get(marker)

    def wait_for(self, marker: bytes, timeout: float) -> bool:
        """Block until ``marker`` (one of ``markers``) has come through: True at once. False after ``timeout``
        seconds, or as soon as nothing can bring it any more: every stream ``follow`` copied from has ended
        (the hypervisor closed it: the guest is gone or going), or the log is closed."""
        if marker not in self.markers:
            raise ValueError(f"{marker!r} is not one of the markers this console looks out for")
        with self._changed:
            self._changed.wait_for(lambda: marker in self._seen or self._ended(), timeout)
            return marker in self._seen

    @property
    def ended(self) -> bool:
        """Nothing more will come: the log is closed, or it was fed by ``follow`` and every such stream ended.
        (A log fed by ``write`` alone never ends before ``close``.)"""
        with self._lock:
            return self._ended()

    def _ended(self) -> bool:
        return self._file is None or (bool(self._threads) and self._following == 0)

    def _note_markers(self, data: bytes) -> None:
        window = self._recent + data
        new = [marker for marker in self.markers if marker in window and marker not in self._seen]
        if new:
            self._seen.update(new)
            self._seen_at.update((marker, time.monotonic()) for marker in new)
            self._changed.notify_all()
        self._recent = window[-_MARKER_OVERLAP:]

    def last(self, size: int) -> bytes:
        """The last ``size`` bytes the guest wrote (for error messages)."""
        with self._lock:
            if self._file is not None and len(self.tail) >= size:
                return bytes(self.tail[-size:])
            try:
                written = self.path.read_bytes()  # at most the head while open, everything once closed
            except OSError:
                written = b""
            return (written + bytes(self.tail))[-size:]

    # --- the end -------------------------------------------------------------------------------------

    def close(self, wait_s: float = 2.0) -> None:
        """Wait briefly for the copying threads (their source is closed by now), then write the tail."""
        for thread in self._threads:
            thread.join(wait_s)
        with self._lock:
            if self._file is None:
                return
            if self.dropped:
                self._file.write(f"\n[vjobs: {self.dropped} bytes of {self.what} dropped here: more than "
                                 f"{self.setting} allows ({self.max_bytes} bytes in all); the first and the last "
                                 f"{self.max_bytes // 2} bytes are kept]\n".encode())
            self._file.write(bytes(self.tail))
            self._file.close()
            self._file = None
            self.tail = bytearray()
            self._changed.notify_all()


def copy_in_thread(read: Callable[[], bytes], write: Callable[[bytes], None], name: str,
                   ended: Callable[[], None] = lambda: None) -> threading.Thread:
    """Copy ``read()``'s chunks to ``write`` in a daemon thread until ``read`` returns b"" or raises (a closed
    socket or stream, whatever its library raises: the VM is gone); ``ended()`` then. The one copying loop of
    the channels a hypervisor offers (a console, the guest's live channel)."""
    def copy() -> None:
        try:
            while chunk := read():
                write(chunk)
        except Exception:
            pass
        finally:
            ended()

    thread = threading.Thread(target=copy, name=name, daemon=True)
    thread.start()
    return thread
