"""The stand-in's HTTP front: XML-RPC on POST / (XAPI's result format), and XAPI's HTTP handlers
PUT /import_raw_vdi (format=raw or vhd), GET /export_raw_vdi, CONNECT /console. Loopback only; a test stand-in, not a server
to expose."""

from __future__ import annotations

import select
import shutil
import subprocess
import tempfile
import threading
import urllib.parse
import xmlrpc.client
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from vjobs.testing.xapi_standin.calls import SESSION_FREE_CALLS, Calls
from vjobs.testing.xapi_standin.model import Store, XapiFailure

CHUNK = 1 << 20
VHD_OVERHEAD = 8 << 20  # headers, BAT and bitmaps of a VHD stream on top of the disk's own size


class XapiStandin:
    """A XAPI stand-in on ``host:port`` (port 0: any free port). Use as a context manager, or
    ``start()``/``stop()``. ``faults`` injects failures, ``stats`` counts what was received."""

    def __init__(self, state_dir: Path | None = None, *, username: str = "root", password: str = "secret",
                 sr_name: str = "vjobs-sr", sr_size_mib: int = 4096, host_memory_mib: int = 8192,
                 runner: str = "qemu"):
        self._own_state = state_dir is None
        self.state_dir = Path(state_dir or tempfile.mkdtemp(prefix="xapi-standin-"))
        self.store = Store()
        self.calls = Calls(self.store, self.state_dir, username, password, sr_name, sr_size_mib,
                           host_memory_mib, url=lambda: self.url, runner=runner)
        self.httpd: ThreadingHTTPServer | None = None
        self.thread: threading.Thread | None = None
        self.calling = threading.local()  # the Host header of the request each handler thread answers

    @property
    def faults(self):
        return self.calls.faults

    @property
    def stats(self):
        return self.calls.stats

    @property
    def url(self) -> str:
        """The stand-in's address as the client of the call being answered reached it (its Host header): in a
        Xen node's dom0 it listens on 0.0.0.0, and the host reaches it through a forwarded loopback port."""
        reached = getattr(self.calling, "host", None)
        if reached:
            return f"http://{reached}"
        host, port = self.httpd.server_address[:2]
        return f"http://{host}:{port}"

    def start(self, host: str = "127.0.0.1", port: int = 0) -> "XapiStandin":
        handler = type("Handler", (_Handler,), {"standin": self})
        self.httpd = ThreadingHTTPServer((host, port), handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, name="xapi-standin", daemon=True)
        self.thread.start()
        return self

    def stop(self) -> None:
        self.calls.stop_all_guests()
        if self.httpd is not None:
            self.httpd.shutdown()
            self.httpd.server_close()
            self.httpd = None
        if self._own_state:
            shutil.rmtree(self.state_dir, ignore_errors=True)

    def __enter__(self) -> "XapiStandin":
        return self.start() if self.httpd is None else self

    def __exit__(self, *exc_info) -> None:
        self.stop()

    # --- XML-RPC ---------------------------------------------------------------------------------------

    def dispatch(self, method: str, params: tuple) -> dict:
        self.stats.calls[method] = self.stats.calls.get(method, 0) + 1
        try:
            value = self._call(method, list(params))
        except XapiFailure as failure:
            return {"Status": "Failure", "ErrorDescription": failure.details}
        except Exception as exc:  # a bug or a malformed call: XAPI's catch-all
            return {"Status": "Failure", "ErrorDescription": ["INTERNAL_ERROR", f"{type(exc).__name__}: {exc}"]}
        if isinstance(value, int) and not isinstance(value, bool):
            value = str(value)
        return {"Status": "Success", "Value": value}

    def _call(self, method: str, args: list):
        cls, _, name = method.partition(".")
        if cls not in self.store.CLASSES and cls != "event":
            raise XapiFailure("MESSAGE_METHOD_UNKNOWN", method)
        handler = getattr(self.calls, f"{cls}__{name}", None)
        if method in SESSION_FREE_CALLS:
            return handler(*args)
        if not args:
            raise XapiFailure("MESSAGE_PARAMETER_COUNT_MISMATCH", method, 1, 0)
        session = args.pop(0)
        self.calls.check_session(session)
        if handler is None:
            return self.calls.generic(cls, name, args)
        return handler(session, *args) if cls == "session" else handler(*args)

    def session_valid(self, session: str) -> bool:
        return session in self.store.objects["session"]


def _vhd_into_raw(vhd: Path, raw: Path) -> str | None:
    """Write a received VHD's contents into the VDI's raw file with qemu-img (an independent VHD reader:
    XAPI uses its own vhd-tool); the VHD's own size field counts, not its CHS geometry."""
    try:
        done = subprocess.run(["qemu-img", "convert", "-n", "--image-opts",
                               f"driver=vpc,force_size_calc=current_size,file.filename={vhd}", "-O", "raw",
                               str(raw)], capture_output=True, text=True)
        return None if done.returncode == 0 else done.stderr.strip()[-300:]
    finally:
        vhd.unlink(missing_ok=True)


class _Handler(BaseHTTPRequestHandler):
    standin: XapiStandin
    protocol_version = "HTTP/1.1"
    # Headers and body go out in separate writes: with Nagle's algorithm on, each call waited ~40 ms for
    # the client's delayed ACK.
    disable_nagle_algorithm = True

    def log_message(self, *args) -> None:  # quiet: tests read results, not access logs
        pass

    def _query(self) -> dict[str, str]:
        return {k: v[0] for k, v in urllib.parse.parse_qs(urllib.parse.urlsplit(self.path).query).items()}

    def _reply(self, status: int, body: bytes = b"", content_type: str = "text/plain") -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _vdi(self) -> tuple[str, Path] | None:
        query = self._query()
        if not self.standin.session_valid(query.get("session_id", "")):
            self._reply(403, b"SESSION_INVALID")
            return None
        try:
            return query.get("vdi", ""), self.standin.calls.vdi_path(query.get("vdi", ""))
        except XapiFailure:
            self._reply(404, b"HANDLE_INVALID VDI")
            return None

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        params, method = xmlrpc.client.loads(body)
        self.standin.calling.host = self.headers.get("Host")
        try:
            answer = self.standin.dispatch(method, params)
        finally:
            self.standin.calling.host = None
        self._reply(200, xmlrpc.client.dumps((answer,), methodresponse=True).encode(), "text/xml")

    def do_PUT(self) -> None:
        if not self.path.startswith("/import_raw_vdi"):
            return self._reply(404, b"no such handler")
        found = self._vdi()
        if found is None:
            return
        vdi, path = found
        length = int(self.headers.get("Content-Length", -1))
        record = self.standin.store.get("VDI", vdi)
        upload_format = self._query().get("format", "raw")
        if upload_format not in ("raw", "vhd"):
            return self._reply(400, f"unsupported format {upload_format}".encode())
        limit = int(record["virtual_size"]) + (VHD_OVERHEAD if upload_format == "vhd" else 0)
        if length < 0 or length > limit:
            return self._reply(400, f"VDI_IO_ERROR: {length} bytes for a VDI of {record['virtual_size']}".encode())
        target = path.with_suffix(".vhd") if upload_format == "vhd" else path
        faults, label = self.standin.faults, record["name_label"]
        cut_after = None
        if faults.cut_upload_after_bytes is not None and faults.cut_upload_of in label:
            cut_after, faults.cut_upload_after_bytes = faults.cut_upload_after_bytes, None
        received = 0
        with open(target, "r+b" if target == path else "wb") as handle:
            while received < length:
                chunk = self.rfile.read(min(CHUNK, length - received))
                if not chunk:
                    break
                handle.write(chunk)
                received += len(chunk)
                self.standin.stats.bytes_imported[label] = self.standin.stats.bytes_imported.get(label, 0) + len(chunk)
                if cut_after is not None and received >= cut_after:
                    self.close_connection = True
                    self.connection.shutdown(2)  # the connection drops half way, as a network can
                    return
        if received < length:
            self.close_connection = True
            return
        if upload_format == "vhd":
            problem = _vhd_into_raw(target, path)
            if problem:
                return self._reply(500, f"VDI_IO_ERROR: {problem}".encode())
        self._reply(200)

    def do_GET(self) -> None:
        if not self.path.startswith("/export_raw_vdi"):
            return self._reply(404, b"no such handler")
        found = self._vdi()
        if found is None:
            return
        _, path = found
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(path.stat().st_size))
        self.end_headers()
        with open(path, "rb") as handle:
            shutil.copyfileobj(handle, self.wfile, CHUNK)

    def do_CONNECT(self) -> None:
        """The console: the guest's bytes from its start, followed until the VM halts; what the client sends is
        typed on it (a real console carries both ways)."""
        query = self._query()
        if not self.standin.session_valid(query.get("session_id", "")):
            return self._reply(403, b"SESSION_INVALID")
        store = self.standin.store
        try:
            vm = store.get("console", query.get("ref", ""))["VM"]
        except XapiFailure:
            return self._reply(404, b"HANDLE_INVALID console")
        runner = self.standin.calls.runners.get(vm)
        self.wfile.write(b"HTTP/1.0 200 OK\r\n\r\n")
        self.close_connection = True
        if runner is None:
            return
        position = 0
        while True:
            halted = store.objects["VM"].get(vm, {}).get("power_state") != "Running"
            try:
                with open(runner.console_log, "rb") as log:
                    log.seek(position)
                    data = log.read()
            except FileNotFoundError:
                data = b""
            if data:
                try:
                    self.wfile.write(data)
                    self.wfile.flush()
                except OSError:
                    return  # the client hung up
                position += len(data)
            elif halted:
                return
            # A file has no change notification we can wait on portably: a short wait, for the client's input.
            elif select.select([self.connection], [], [], 0.05)[0]:
                typed = self.connection.recv(4096)
                if not typed:
                    return  # the client hung up
                runner.type_on_console(typed)
