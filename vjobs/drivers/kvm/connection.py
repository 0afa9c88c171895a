"""Talking to libvirtd: the process-wide event loop, opening connections, and the one place where a
``libvirt.libvirtError`` becomes a vjobs error that says what to do."""

from __future__ import annotations

import contextlib
import errno
import threading
from typing import Callable, Iterator

import libvirt

from vjobs.errors import VjobsError, VMError

_loop_lock = threading.Lock()
_loop_running = False

START_ADVICE = ("start it as root (`virtlogd -d && libvirtd -d`, or `systemctl start libvirtd`) or fix "
                "[drivers.kvm] uri in the site config")


def ensure_event_loop() -> None:
    """libvirt delivers domain events and notices a dead daemon only through a registered event loop, which
    must exist before a connection is opened; one per process, run by a daemon thread."""
    global _loop_running
    with _loop_lock:
        if _loop_running:
            return
        # errors come back as exceptions; libvirt's default handler would also print each one on stderr
        libvirt.registerErrorHandler(lambda _context, _error: None, None)
        libvirt.virEventRegisterDefaultImpl()
        threading.Thread(target=_run_event_loop, name="libvirt-events", daemon=True).start()
        _loop_running = True


def _run_event_loop() -> None:
    while True:
        libvirt.virEventRunDefaultImpl()


def open_connection(uri: str) -> libvirt.virConnect:
    ensure_event_loop()
    with libvirt_errors("connecting", uri):
        return libvirt.open(uri)


@contextlib.contextmanager
def connection(uri: str) -> Iterator[libvirt.virConnect]:
    conn = open_connection(uri)
    try:
        yield conn
    finally:
        close_quietly(conn)


def close_quietly(conn: libvirt.virConnect) -> None:
    with contextlib.suppress(libvirt.libvirtError):
        conn.close()


@contextlib.contextmanager
def libvirt_errors(action: str, uri: str) -> Iterator[None]:
    try:
        yield
    except libvirt.libvirtError as exc:
        raise translate(exc, action, uri) from exc


def translate(exc: libvirt.libvirtError, action: str, uri: str) -> VjobsError:
    message = exc.get_error_message() or str(exc)
    code = exc.get_error_code()
    for matches, error_code, advice in _ADVICE:
        if matches(exc, message):
            return VMError(f"{action}: libvirt at {uri}: {message}: {advice}", code=error_code)
    return VMError(f"{action}: libvirt at {uri} failed: {message} (libvirt error {code})", code="libvirt_error")


def _socket_errno(exc: libvirt.libvirtError, message: str) -> int | None:
    """The errno of a failed connect() to libvirt's socket; None for any other error (a domain's own files
    can fail with the same errno, and then the advice about the daemon would be wrong)."""
    if exc.get_error_code() == libvirt.VIR_ERR_SYSTEM_ERROR and "connect socket" in message:
        return exc.get_int1()
    return None


def is_gone(exc: libvirt.libvirtError) -> bool:
    """The domain no longer exists or no longer runs: what a destroy of a finished domain meets."""
    return exc.get_error_code() in (libvirt.VIR_ERR_NO_DOMAIN, libvirt.VIR_ERR_OPERATION_INVALID)


# (test, error code, what to tell the user), first match wins
_ADVICE: list[tuple[Callable[[libvirt.libvirtError, str], bool], str, str]] = [
    (lambda exc, msg: "virtlogd" in msg, "virtlogd_unreachable",
     "virtlogd is not running: start it as root (`virtlogd -d`, or `systemctl start virtlogd`)"),
    (lambda exc, msg: _socket_errno(exc, msg) == errno.EACCES
     or exc.get_error_code() in (libvirt.VIR_ERR_AUTH_FAILED, libvirt.VIR_ERR_AUTH_UNAVAILABLE),
     "permission_denied",
     "permission denied on libvirt's socket: run vjobs as root or as a member of the socket's group "
     "(usually `libvirt`), or use uri = \"qemu:///session\""),
    (lambda exc, msg: _socket_errno(exc, msg) in (errno.ENOENT, errno.ECONNREFUSED), "libvirtd_unreachable",
     f"libvirtd is not running there: {START_ADVICE}"),
    (lambda exc, msg: exc.get_error_code() == libvirt.VIR_ERR_NO_CONNECT
     or (exc.get_error_code() == libvirt.VIR_ERR_INTERNAL_ERROR and "URI" in msg), "libvirt_uri_invalid",
     "no libvirt driver takes this URI: fix [drivers.kvm] uri in the site config (e.g. qemu:///system)"),
    (lambda exc, msg: exc.get_error_code() in (libvirt.VIR_ERR_DOM_EXIST, libvirt.VIR_ERR_OPERATION_FAILED)
     and "already exists" in msg, "domain_exists",
     "a domain of that name already runs there: another vjobs run with the same run id, or a copy left "
     "behind; `vjobs gc` removes vjobs' leftovers, `virsh destroy NAME` any domain"),
    (lambda exc, msg: exc.get_error_code() in (libvirt.VIR_ERR_RPC, libvirt.VIR_ERR_INTERNAL_ERROR)
     and ("socket is closed" in msg or "End of file" in msg), "hypervisor_lost",
     f"the connection to libvirtd broke off: was it restarted or stopped? If it is not running, {START_ADVICE}"),
]
