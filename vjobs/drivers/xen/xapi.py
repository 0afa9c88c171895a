"""Talking to XAPI: sessions, the one place where XAPI failures become vjobs errors, and the HTTP handlers
for raw VDI import and export.

Site settings (``[drivers.xen]``): ``url`` (``https://pool-master`` or ``local`` for dom0's Unix socket),
``username``, ``password_file`` (the secret stays in that file; it is never logged or put in a result),
``sr`` (the storage repository's name label), ``verify_tls``, ``upload_format`` (``vhd``, the default:
sparse, all-zero blocks are not sent; or ``raw``).
"""

from __future__ import annotations

import contextlib
import http.client
import socket
import ssl
import urllib.parse
import xmlrpc.client
from pathlib import Path
from typing import Any, Iterator, Mapping

import XenAPI

from vjobs.drivers.contract import CheckedFile
from vjobs.drivers.xen import vhd
from vjobs.errors import DriverError, VjobsError, VMError

LOCAL_SOCKET = "/var/lib/xcp/xapi"
CHUNK = 1 << 20

# What to tell the user for the XAPI error codes a job can meet; the rest are reported as they come.
ADVICE = {
    "SESSION_AUTHENTICATION_FAILED": (DriverError, "XAPI refused the login: check [drivers.xen] username and "
                                                   "the password in password_file"),
    "HOST_IS_SLAVE": (DriverError, "the url names a pool member, not the pool master: point url at the master"),
    "SR_FULL": (VMError, "the storage repository is full: free space in it or name another one in "
                         "[drivers.xen] sr"),
    "HANDLE_INVALID": (VMError, "an object vjobs created is gone from XAPI (someone else removed it?)"),
    "VM_BAD_POWER_STATE": (VMError, "the VM was not in the power state the operation needs"),
    "HOST_NOT_ENOUGH_FREE_MEMORY": (VMError, "the host has not enough free memory for the job: ask for less "
                                             "memory_mib or run on another host"),
    "BOOTLOADER_FAILED": (VMError, "the host could not load the guest kernel: on a real XAPI host the kernel "
                                   "and initramfs must be dom0 files (e.g. under /boot/guest)"),
}


@contextlib.contextmanager
def xapi_errors(what: str, url: str) -> Iterator[None]:
    """Translate XAPI and transport failures into vjobs errors that say what to fix."""
    try:
        yield
    except VjobsError:
        raise
    except XenAPI.Failure as failure:
        code = failure.details[0] if failure.details else "UNKNOWN"
        error_class, advice = ADVICE.get(code, (VMError, "see XAPI's error code"))
        raise error_class(f"{what}: XAPI at {url} answered {code} {failure.details[1:]}: {advice}",
                          code=f"xapi_{code.lower()}") from failure
    except (OSError, http.client.HTTPException, xmlrpc.client.ProtocolError, xmlrpc.client.Fault) as exc:
        raise DriverError(f"{what}: XAPI at {url} is unreachable or broke off ({type(exc).__name__}: {exc}); "
                          "check [drivers.xen] url and that xapi runs", code="xapi_unreachable") from exc


class Xapi:
    """A logged-in XAPI session; use as a context manager so that it always logs out."""

    def __init__(self, settings: Mapping[str, Any]):
        self.url = settings.get("url", "local")
        self.username = settings.get("username", "root")
        self.password_file = settings.get("password_file")
        self.verify_tls = settings.get("verify_tls", True)
        self.session: XenAPI.Session | None = None

    def __enter__(self) -> "Xapi":
        password = self._password()
        with xapi_errors("login", self.url):
            if self.url == "local":
                self.session = XenAPI.xapi_local()
            else:
                self.session = XenAPI.Session(self.url, ignore_ssl=not self.verify_tls)
            self.session.xenapi.login_with_password(self.username, password, "2.0", "vjobs")
        return self

    def __exit__(self, *exc_info) -> None:
        self.logout()

    def logout(self) -> None:
        if self.session is not None:
            with contextlib.suppress(Exception):  # a dead server has logged us out already
                self.session.xenapi.session.logout()
            self.session = None

    def _password(self) -> str:
        if not self.password_file:
            raise DriverError("[drivers.xen] password_file is not set: put the XAPI password in a file only "
                              "the pilot's user can read and name it there", code="xapi_no_password")
        try:
            return Path(self.password_file).read_text().strip()
        except OSError as exc:
            raise DriverError(f"cannot read [drivers.xen] password_file {self.password_file}: {exc.strerror}",
                              code="xapi_no_password") from exc

    def drop_connection(self) -> None:
        """Forget the HTTP connection under the session: a call that a signal interrupted (a SIGTERM during
        ``event.from``'s long wait) leaves it waiting for that answer, and every later call would fail on it.
        The next call opens a new one; the session stays logged in."""
        if self.session is not None:
            self.session("close")()  # xmlrpc.client.ServerProxy's way to close its transport

    @property
    def api(self):
        return self.session.xenapi

    @property
    def handle(self) -> str:
        return self.session.handle

    # --- HTTP handlers ---------------------------------------------------------------------------------

    def _connection(self) -> http.client.HTTPConnection:
        if self.url == "local":
            return _UnixHTTPConnection(LOCAL_SOCKET)
        parts = urllib.parse.urlsplit(self.url)
        if parts.scheme == "https":
            context = ssl.create_default_context() if self.verify_tls else ssl._create_unverified_context()
            return http.client.HTTPSConnection(parts.hostname, parts.port or 443, context=context)
        return http.client.HTTPConnection(parts.hostname, parts.port or 80)

    def _path(self, handler: str, **query: str) -> str:
        return f"/{handler}?" + urllib.parse.urlencode({"session_id": self.handle, **query})

    def import_vdi(self, vdi: str, source: CheckedFile, upload_format: str = "vhd") -> int:
        """PUT a raw image, read through its open file, into the VDI, as a sparse VHD stream (all-zero blocks
        left out) or as raw bytes; returns the bytes sent. "vhd" sends raw when that is smaller (a small
        squashfs: VHD pads to whole 2 MiB blocks). A cut-off upload raises (the caller destroys the VDI)."""
        length, chunks = source.size, _file_chunks(source)
        if upload_format == "vhd":
            sparse = vhd.plan(source)
            if sparse.length < length:
                length, chunks = sparse.length, vhd.stream(sparse)
            else:
                upload_format = "raw"
        with xapi_errors(f"uploading {source.path.name}", self.url):
            connection = self._connection()
            try:
                connection.putrequest("PUT", self._path("import_raw_vdi", vdi=vdi, format=upload_format))
                connection.putheader("Content-Length", str(length))
                connection.endheaders()
                for chunk in chunks:
                    connection.send(chunk)
                response = connection.getresponse()
                body = response.read(4096)
            finally:
                connection.close()
        if response.status != 200:
            raise VMError(f"uploading {source.path.name} to XAPI failed: HTTP {response.status} "
                          f"{body.decode(errors='replace')[:200]}", code="xapi_upload_failed")
        return length

    def export_raw_vdi(self, vdi: str, target: Path, limit: int, what: str = "the results disk") -> None:
        """GET the VDI's bytes into ``target``, at most ``limit`` bytes (the VDI's own size)."""
        with xapi_errors(f"downloading {what}", self.url):
            connection = self._connection()
            try:
                connection.request("GET", self._path("export_raw_vdi", vdi=vdi, format="raw"))
                response = connection.getresponse()
                if response.status != 200:
                    raise VMError(f"downloading {what} failed: HTTP {response.status}",
                                  code="xapi_download_failed")
                _copy_bounded(response, target, limit, what)
            finally:
                connection.close()

    def open_console(self, location: str) -> tuple[socket.socket, bytes]:
        """The raw byte stream of a vt100 (text) console, as ``xe console`` gets it: HTTP CONNECT to the
        console's location, then the guest's bytes on the same socket. Returns the socket and the first bytes."""
        parts = urllib.parse.urlsplit(location)
        ref = urllib.parse.parse_qs(parts.query).get("ref", [""])[0]
        path = f"{parts.path or '/console'}?" + urllib.parse.urlencode({"ref": ref, "session_id": self.handle})
        if self.url == "local":
            stream = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            stream.connect(LOCAL_SOCKET)
        else:
            default_port = 443 if parts.scheme == "https" else 80
            stream = socket.create_connection((parts.hostname, parts.port or default_port), timeout=30)
            if parts.scheme == "https":
                context = ssl.create_default_context() if self.verify_tls else ssl._create_unverified_context()
                stream = context.wrap_socket(stream, server_hostname=parts.hostname)
        stream.sendall(f"CONNECT {path} HTTP/1.0\r\n\r\n".encode())
        header = b""
        while b"\r\n\r\n" not in header and len(header) < 8192:
            chunk = stream.recv(4096)
            if not chunk:
                break
            header += chunk
        head, _, rest = header.partition(b"\r\n\r\n")
        if b" 200" not in head.split(b"\r\n", 1)[0]:
            stream.close()
            raise VMError(f"XAPI refused the console connection: {head[:100]!r}", code="xapi_console")
        stream.settimeout(None)
        return stream, rest


def _file_chunks(source: CheckedFile) -> Iterator[bytes]:
    for offset in range(0, source.size, CHUNK):
        yield source.read(offset, CHUNK)


def _copy_bounded(response, target: Path, limit: int, what: str) -> None:
    written = 0
    with open(target, "wb") as handle:
        while chunk := response.read(CHUNK):
            written += len(chunk)
            if written > limit:
                raise VMError(f"XAPI sent more than the {limit} bytes of {what}", code="xapi_download_failed")
            handle.write(chunk)


class _UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: str):
        super().__init__("localhost")
        self.socket_path = path

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(self.socket_path)
