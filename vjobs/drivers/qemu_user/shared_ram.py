"""A template's RAM, shared by every guest that starts from it, and changeable by none.

A template keeps its guest's RAM as a file beside its saved state (template.py); the state itself is then
only the devices' (a third of a megabyte). Each job's QEMU maps the RAM copy-on-write (``share=off``): it reads
the template's pages until the guest writes one, and only that page becomes its own. So N guests hold the
template's pages once, plus what each one writes, and a restore reads no RAM at all.

But QEMU 7.2 opens a memory backend's file read-write even to map it private, so a guest that escaped into
QEMU could rewrite the template's pages under every other guest on the node and every later job. QEMU is
therefore never given the template's file: it gets a memfd holding a copy, sealed against every change
(writes, truncation, growth, writable shared mappings, punched holes, and new seals). Sharing needs every
QEMU to map the same memfd, and a memfd lives only while something holds it: a keeper
(vjobs/drivers/qemu_user/ram_keeper.py), one per template and account, loads the file once, checks it against
the template's manifest, and hands the memfd to each job over a socket in the account's own cache (0700, so
no other account can reach it or put one there). The keeper exits when idle; the next job starts another.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import select
import signal
import socket
import subprocess
import sys
from pathlib import Path

from vjobs.drivers.qemu_user import ram_keeper
from vjobs.errors import VMError
from vjobs.host import locks

KEEPERS = "ram-keepers"  # in the templates folder of the account's own cache
DEFAULT_IDLE_S = 600.0  # how long a keeper holds a template's RAM with no job starting from it
LOAD_DEADLINE_S = 60.0  # a keeper's load of a 2 GiB guest's RAM on a loaded host: a few seconds
ASK_TIMEOUT_S = 5.0
STOP_WAIT_S = 5.0  # a keeper ends within milliseconds of SIGTERM; freeing gigabytes may take a second


def memfd(ram_file: Path, ram_sum: str, ram_bytes: int, keepers: Path, idle_s: float = DEFAULT_IDLE_S) -> int:
    """A descriptor of the sealed memfd holding ``ram_file`` (a template's, whose manifest says its sum and
    size), from its keeper in the folder ``keepers``, started when there is none. The caller closes it.
    Raises VMError (code ``template_failed``) when no keeper answers or what it sends is not sealed."""
    keepers.mkdir(mode=0o700, parents=True, exist_ok=True)
    name = hashlib.sha256(os.fsencode(ram_file.resolve())).hexdigest()[:24]
    socket_path = keepers / f"{name}.sock"
    with locks.exclusive(keepers / f"{name}.lock"):  # one keeper per template, however many jobs start at once
        fd = _ask(socket_path, ram_sum)
        if fd is None:
            _start_keeper(ram_file, ram_sum, socket_path, idle_s)
            fd = _ask(socket_path, ram_sum)
    if fd is None:
        raise VMError(f"the RAM keeper of {ram_file.parent.name} started but does not answer",
                      code="template_failed")
    try:
        check_sealed(fd, ram_bytes)
    except BaseException:
        os.close(fd)
        raise
    return fd


def check_sealed(fd: int, ram_bytes: int) -> None:
    """Refuse a memfd that anyone could still change, or of another size than the template's RAM."""
    seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
    size = os.fstat(fd).st_size
    if seals & ram_keeper.SEALS != ram_keeper.SEALS or size != ram_bytes:
        raise VMError(f"the template's RAM came unsealed or of the wrong size (seals {seals:#x}, {size} bytes, "
                      f"expected {ram_bytes})", code="template_failed")


def _ask(socket_path: Path, ram_sum: str) -> int | None:
    """The memfd from the keeper listening at ``socket_path``, or None when none listens there or the one that
    does holds other RAM (the template was made anew since it started: it exits once its socket is gone)."""
    try:
        answer = _answer(socket_path)
    except (FileNotFoundError, ConnectionRefusedError):
        return None  # none yet, or one that exited and left its socket: the caller starts one
    except OSError as error:
        raise VMError(f"asking the template's RAM keeper failed: {error}", code="template_failed") from error
    _pid, peer_uid, message, fds = answer
    if not message and not fds:  # it was exiting (idle, or its template replaced) as we asked
        socket_path.unlink(missing_ok=True)
        return None
    if peer_uid != os.geteuid() or not message.startswith(ram_keeper.GREETING) or len(fds) != 1:
        for fd in fds:
            os.close(fd)
        raise VMError(f"{socket_path} is not a RAM keeper of this account's", code="template_failed")
    if message.split()[2:3] != [ram_sum.encode()]:
        os.close(fds[0])
        socket_path.unlink(missing_ok=True)
        return None
    return fds[0]


def _answer(socket_path: Path) -> tuple[int, int, bytes, list[int]]:
    """Connect to the keeper at ``socket_path`` and take what it sends: (its PID, its UID, the message, the
    descriptors; an empty message and none when it was exiting). Raises OSError when nobody listens."""
    folder = os.open(socket_path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC) as connection:
            connection.settimeout(ASK_TIMEOUT_S)
            connection.connect(ram_keeper.socket_address(folder, socket_path.name))
            pid, uid = _peer(connection)
            try:
                message, fds, _flags, _address = socket.recv_fds(connection, 256, 1)
            except ConnectionResetError:
                message, fds = b"", []
            return pid, uid, message, fds
    finally:
        os.close(folder)


def _peer(connection: socket.socket) -> tuple[int, int]:
    """The PID and UID of the process at the other end of a unix socket, as the kernel knows them."""
    credentials = connection.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12)
    return int.from_bytes(credentials[0:4], sys.byteorder), int.from_bytes(credentials[4:8], sys.byteorder)


def _start_keeper(ram_file: Path, ram_sum: str, socket_path: Path, idle_s: float) -> None:
    """Start a keeper in a session of its own (it outlives this job) and wait for its ``ready``."""
    socket_path.unlink(missing_ok=True)  # a dead keeper's: nobody answered on it
    keeper = subprocess.Popen([sys.executable, "-I", ram_keeper.__file__, str(ram_file), ram_sum, str(socket_path),
                               str(idle_s)], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                              stderr=subprocess.DEVNULL, start_new_session=True, close_fds=True)
    with keeper.stdout:  # the keeper says one line, then closes its stdout and goes on serving
        said = select.select([keeper.stdout], [], [], LOAD_DEADLINE_S)[0]
        answer = keeper.stdout.readline().decode(errors="replace").strip() if said else ""
    if not said:
        keeper.kill()
        keeper.wait()
        raise VMError(f"the template's RAM keeper did not load {ram_file} within {LOAD_DEADLINE_S:g} s",
                      code="template_failed")
    if answer != "ready":
        keeper.wait()  # it exits after saying why
        raise VMError(f"the template's RAM keeper failed: {answer or 'it said nothing'}", code="template_failed")


def stop_keepers(keepers: Path) -> list[int]:
    """End the keepers that serve from the folder ``keepers`` (``vjobs gc``, a test session's end), each by the
    PID the kernel gives for its socket's peer, and remove their sockets; returns those PIDs. Guests that map
    their RAM keep it; the next job starts a keeper again."""
    stopped = []
    for socket_path in sorted(keepers.glob("*.sock")) if keepers.is_dir() else []:
        with locks.exclusive(socket_path.with_suffix(".lock")):  # no job is asking it or starting another
            pid = _stop_keeper(socket_path)
        if pid is not None:
            stopped.append(pid)
    return stopped


def _stop_keeper(socket_path: Path) -> int | None:
    """Stop the keeper listening at ``socket_path`` and remove the socket; its PID, or None when none was."""
    try:
        pid, _uid, _message, fds = _answer(socket_path)
    except OSError:
        pid, fds = None, []  # none listens there any more
    for fd in fds:
        os.close(fd)
    if pid is not None:
        _end(pid)
    socket_path.unlink(missing_ok=True)
    return pid


def _end(pid: int) -> None:
    """SIGTERM the keeper ``pid`` and wait until it has exited (SIGKILL after STOP_WAIT_S): a ``vjobs gc`` that
    says it stopped a keeper leaves none running, even while the kernel frees the RAM that keeper held."""
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        return  # it exited on its own since it answered
    try:
        signal.pidfd_send_signal(pidfd, signal.SIGTERM)
        if not select.select([pidfd], [], [], STOP_WAIT_S)[0]:
            signal.pidfd_send_signal(pidfd, signal.SIGKILL)
            select.select([pidfd], [], [], STOP_WAIT_S)
    except ProcessLookupError:
        pass  # it is gone already
    finally:
        os.close(pidfd)
