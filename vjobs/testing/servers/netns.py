"""A throwaway network namespace that holds only ``lo``, and a relay into it from the caller's namespace.

Daemons that listen on every address (XRootD, Slurm) run inside the namespace, so every packet they send stays
on this machine. The test process stays in the host namespace and reaches them through a ``Relay``."""

from __future__ import annotations

import ctypes
import os
import secrets
import socket
import struct
import subprocess
import threading
from pathlib import Path

CLONE_NEWNET = 0x40000000  # os.CLONE_NEWNET and os.setns arrive only with Python 3.12
_libc = ctypes.CDLL(None, use_errno=True)


class LoopbackNetns:
    """A network namespace with only ``lo`` up, holding 127.0.0.1 and 127.0.0.2: with 127.0.0.1 alone, glibc's
    AI_ADDRCONFIG finds no address for a passive lookup and some daemons cannot open their port. Needs root,
    ``ip`` and ``nsenter``. Processes started in it keep it alive after ``close()`` until they end."""

    def __init__(self, prefix: str = "vjobs-test"):
        self.name = f"{prefix}-{os.getpid()}-{secrets.token_hex(3)}"
        self.path = Path("/run/netns") / self.name
        self._closed = False
        _ip("netns", "add", self.name)
        try:
            _ip("-n", self.name, "link", "set", "lo", "up")
            _ip("-n", self.name, "addr", "add", "127.0.0.2/8", "dev", "lo")
        except BaseException:
            self.close()
            raise

    def command(self, argv: list[str]) -> list[str]:
        """``argv`` to run inside the namespace. nsenter, not ``ip netns exec``, which remounts /sys and so hides
        /sys/fs/cgroup from what it starts."""
        return ["nsenter", f"--net={self.path}", *argv]

    def socket(self, family: int = socket.AF_INET, type: int = socket.SOCK_STREAM) -> socket.socket:
        """A socket that lives in the namespace. A socket keeps the namespace it was made in, and setns moves only
        the calling thread, so a short-lived thread enters the namespace, makes the socket and ends."""
        made: dict = {}

        def make():
            try:
                fd = os.open(self.path, os.O_RDONLY)
                try:
                    if _libc.setns(fd, CLONE_NEWNET) != 0:
                        raise OSError(ctypes.get_errno(), f"setns into {self.path}")
                finally:
                    os.close(fd)
                made["socket"] = socket.socket(family, type)
            except BaseException as exc:  # handed to the caller's thread
                made["error"] = exc

        thread = threading.Thread(target=make, name=f"setns-{self.name}")
        thread.start()
        thread.join()
        if "error" in made:
            raise made["error"]
        return made["socket"]

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            _ip("netns", "delete", self.name)

    def __enter__(self) -> LoopbackNetns:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def _ip(*args: str) -> None:
    done = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if done.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)} failed: {done.stderr.strip()}")


class Relay:
    """Accepts on 127.0.0.1:<free port> in the caller's namespace and forwards each connection, byte for byte,
    to 127.0.0.1:``port`` inside ``netns``, so host-side clients use plain 127.0.0.1 URLs while the server sees
    only loopback traffic. ``accepted`` counts the connections taken so far (a client that reconnects after
    ``drop_all()`` shows up there)."""

    def __init__(self, netns: LoopbackNetns, port: int):
        self._netns, self._target_port = netns, port
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._listener.getsockname()[1]
        self.accepted = 0
        self._connections: set[_Connection] = set()
        self._lock = threading.Lock()
        self._acceptor = threading.Thread(target=self._accept_all, name=f"relay-{self.port}", daemon=True)
        self._acceptor.start()

    def _accept_all(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return  # the listener was shut down by close()
            try:
                upstream = self._netns.socket()
            except OSError:
                client.close()
                continue
            try:
                upstream.connect(("127.0.0.1", self._target_port))
            except OSError:  # nothing listens there: the client sees its connection end
                client.close()
                upstream.close()
                continue
            self._start(_Connection(client, upstream, on_closed=self._forget))

    def _start(self, connection: _Connection) -> None:
        with self._lock:
            self.accepted += 1
            self._connections.add(connection)
        connection.start()

    def _forget(self, connection: _Connection) -> None:
        with self._lock:
            self._connections.discard(connection)

    def drop_all(self) -> None:
        """Cuts every open connection at once, both ways, as a server that goes away mid-transfer would: the
        peers see the stream end and then a reset. New connections are still accepted."""
        with self._lock:
            connections = list(self._connections)
        for connection in connections:
            connection.drop()
        for connection in connections:
            connection.join()

    def close(self) -> None:
        try:
            self._listener.shutdown(socket.SHUT_RDWR)  # wakes the blocked accept(); close() alone does not
        except OSError:
            pass
        self._listener.close()
        self._acceptor.join(timeout=5)
        self.drop_all()

    def __enter__(self) -> Relay:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


class _Connection:
    """One relayed connection: two sockets and a pump thread for each direction. An orderly end of one
    direction is passed on as a half-close; an error or a drop cuts both directions."""

    def __init__(self, client: socket.socket, upstream: socket.socket, on_closed):
        self._sockets = (client, upstream)
        self._on_closed = on_closed
        self._open_directions = 2
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._pump, args=pair, daemon=True)
                         for pair in ((client, upstream), (upstream, client))]

    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    def _pump(self, source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
            sink.shutdown(socket.SHUT_WR)
        except OSError:
            self.drop()  # the other pump may wait forever on a peer that never learns of this one's end
        with self._lock:
            self._open_directions -= 1
            last = self._open_directions == 0
        if last:
            for sock in self._sockets:
                sock.close()
            self._on_closed(self)

    def drop(self) -> None:
        for sock in self._sockets:
            try:
                # A zero linger makes the final close() send a reset; shutdown wakes the pumps blocked on it.
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass  # already closed

    def join(self) -> None:
        for thread in self._threads:
            if thread.is_alive() and thread is not threading.current_thread():
                thread.join(timeout=5)
