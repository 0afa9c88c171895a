"""A real WebDAV server (wsgidav on cheroot) in a subprocess on 127.0.0.1, anonymous, so that a test can kill it
mid-transfer and start it again on the same port. Optionally read-only, or corrupting every upload.

Runnable as ``python -m vjobs.testing.servers.webdav --root R --port P [--read-only] [--corrupt-uploads]``.
PUT into a missing collection answers 409, as RFC 4918 says: clients must MKCOL the parents first."""

from __future__ import annotations

import argparse
import io
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

from vjobs.testing.servers.processes import end_processes

START_TIMEOUT_S = 10
WRITE_METHODS = frozenset({"PUT", "MKCOL", "DELETE", "MOVE", "COPY", "PROPPATCH", "LOCK", "UNLOCK"})


class WebDAVServer:
    """wsgidav serving ``root`` on 127.0.0.1:<free port>. The server's output goes to ``log`` (a private
    temporary file removed by ``close()`` unless one is given)."""

    def __init__(self, root: Path, *, read_only: bool = False, corrupt_uploads: bool = False,
                 log: Path | None = None):
        self.root = Path(root)
        self.read_only, self.corrupt_uploads = read_only, corrupt_uploads
        self.port = free_port()
        self._own_log = log is None
        self.log = Path(log) if log is not None else _temporary_file(prefix="vjobs-webdav-", suffix=".log")
        self._process: subprocess.Popen | None = None

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process else None

    def url(self, path: str = "", scheme: str = "http") -> str:
        """``scheme`` "dav" gives the form gfal2 and davix take for the same server."""
        return f"{scheme}://127.0.0.1:{self.port}/{str(path).lstrip('/')}"

    def start(self) -> WebDAVServer:
        if self._process is not None:
            raise RuntimeError(f"the WebDAV server already runs (pid {self.pid})")
        self.root.mkdir(parents=True, exist_ok=True)
        argv = [sys.executable, "-m", __name__, "--root", str(self.root), "--port", str(self.port)]
        argv += ["--read-only"] * self.read_only + ["--corrupt-uploads"] * self.corrupt_uploads
        with open(self.log, "ab") as log:
            self._process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log)
        try:
            self._wait_until_answering()
        except BaseException:
            self.kill()
            raise
        return self

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after 5 s; waits until it is gone."""
        self._end(signal.SIGTERM)

    def kill(self) -> None:
        """SIGKILL at once, as a server that dies mid-transfer would. Safe to call twice."""
        self._end(signal.SIGKILL)

    def restart(self) -> None:
        """Start again on the same port with the same files (stopping it first if it still runs)."""
        self.stop()
        self.start()

    def close(self) -> None:
        self.stop()
        if self._own_log:
            self.log.unlink(missing_ok=True)

    def __enter__(self) -> WebDAVServer:
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.close()

    def _end(self, sig: int) -> None:
        if self._process is None:
            return
        end_processes([self._process], sig, grace_s=5)
        self._process = None

    def _wait_until_answering(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise RuntimeError(f"the WebDAV server exited {self._process.returncode}\n{self._log_tail()}")
            try:
                urllib.request.urlopen(self.url(), timeout=1).close()
                return
            except urllib.error.HTTPError:
                return  # any HTTP answer means it serves
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"the WebDAV server did not answer in {START_TIMEOUT_S} s\n{self._log_tail()}")

    def _log_tail(self, lines: int = 30) -> str:
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        return f"last lines of {self.log}:\n" + "\n".join(text.splitlines()[-lines:])


def _temporary_file(**naming) -> Path:
    descriptor, name = tempfile.mkstemp(**naming)
    os.close(descriptor)
    return Path(name)


def free_port() -> int:
    """A port free on 127.0.0.1 now (the kernel's pick for port 0): fixed ports once collided here."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class ReadOnly:
    """WSGI middleware: answers 403 to every method that would change the store, as a read-only endpoint does."""

    def __init__(self, app):
        self.app = app

    def __call__(self, environ, start_response):
        if environ["REQUEST_METHOD"] not in WRITE_METHODS:
            return self.app(environ, start_response)
        body = b"read-only server\n"
        start_response("403 Forbidden", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
        return [body]


class CorruptUploads:
    """WSGI middleware that deliberately damages data, for tests only: it flips every bit of the middle byte of
    each PUT body before wsgidav stores it, standing in for a transfer that corrupts what it carries. The
    client's request succeeds; only a checksum comparison can notice. Empty bodies pass unchanged."""

    def __init__(self, app):
        self.app = app

    def __call__(self, environ, start_response):
        if environ["REQUEST_METHOD"] == "PUT":
            body = bytearray(_read_body(environ))
            if body:
                body[len(body) // 2] ^= 0xFF
            environ["wsgi.input"] = io.BytesIO(bytes(body))
            environ["CONTENT_LENGTH"] = str(len(body))
            environ.pop("HTTP_TRANSFER_ENCODING", None)  # the body is now plain, of known length
        return self.app(environ, start_response)


def _read_body(environ) -> bytes:
    length = environ.get("CONTENT_LENGTH")
    if length:
        return environ["wsgi.input"].read(int(length))
    if "chunked" in environ.get("HTTP_TRANSFER_ENCODING", "").lower():
        return environ["wsgi.input"].read()  # cheroot decodes the chunks
    return b""


def make_app(root: Path, *, read_only: bool = False, corrupt_uploads: bool = False):
    from wsgidav.wsgidav_app import WsgiDAVApp

    config = {"provider_mapping": {"/": str(root)}, "simple_dc": {"user_mapping": {"*": True}},  # anonymous
              "verbose": 1, "logging": {"enable": False}}
    app = WsgiDAVApp(config)
    if corrupt_uploads:
        app = CorruptUploads(app)
    if read_only:
        app = ReadOnly(app)  # outermost: a read-only server refuses a PUT before anything reads its body
    return app


def main(argv: list[str] | None = None) -> None:
    from cheroot import wsgi

    parser = argparse.ArgumentParser(description="wsgidav on 127.0.0.1, anonymous, for tests")
    parser.add_argument("--root", type=Path, required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--read-only", action="store_true")
    parser.add_argument("--corrupt-uploads", action="store_true")
    args = parser.parse_args(argv)
    app = make_app(args.root, read_only=args.read_only, corrupt_uploads=args.corrupt_uploads)
    wsgi.Server(("127.0.0.1", args.port), app).safe_start()


if __name__ == "__main__":
    main()
