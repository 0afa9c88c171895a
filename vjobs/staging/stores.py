"""One fsspec file system per storage, opened with the site's credentials and timeouts.

Every protocol goes through fsspec (XRootD: fsspec-xrootd over the XRootD client; HTTP and WebDAV: webdav4
over httpx; S3: s3fs over botocore; local files: fsspec's own), so transfer.py is written once. What differs
per protocol is here: how a URL becomes a file system and a path, and whether the server can tell a file's
adler32 itself (XRootD's checksum query; HTTP's ``Want-Digest: adler32``, which XrdHttp and dCache answer).
"""

from __future__ import annotations

import os
import re
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable
from urllib.parse import unquote

from vjobs.staging.locations import Location
from vjobs.staging.settings import StagingSettings

if TYPE_CHECKING:  # fsspec and the protocol libraries load when a job stages, not with every vjobs command
    import fsspec

_DIGEST = re.compile(r"adler32=([0-9a-fA-F]{1,8})(?:[,;\s]|$)")


@dataclass
class Remote:
    """One file on one storage."""

    location: Location
    fs: fsspec.AbstractFileSystem
    path: str
    server_adler32: Callable[[], str | None]  # the server's own checksum of the file; None: it offers none
    secrets: tuple[str, ...] = ()  # strings to scrub from any message about this file
    #: How to upload an open local file (reader, size, progress) where fsspec's write stream is not the best
    #: way; None: write through ``fs.open(path, "wb")``.
    put: Callable[[Any, int, Callable[[int], None]], None] | None = None

    @property
    def shown(self) -> str:
        return self.location.shown


class Stores:
    """File systems by storage (scheme and host), made on first use and shared by the threads of one phase."""

    def __init__(self, settings: StagingSettings):
        self.settings = settings
        self._open: dict[tuple[str, str], tuple[fsspec.AbstractFileSystem, tuple[str, ...]]] = {}
        self._lock = threading.Lock()

    def remote(self, location: Location) -> Remote:
        parts = location.parts
        with self._lock:
            key = (parts.scheme.lower(), parts.netloc)
            if key not in self._open:
                self._open[key] = _OPENERS[location.kind](location, self.settings)
            fs, secrets = self._open[key]
        path, checksum = _PATHS[location.kind](location, fs)
        put = _PUTS[location.kind](fs, path) if location.kind in _PUTS else None
        return Remote(location, fs, path, checksum, secrets, put)


# --- per protocol: (file system, secrets) from a location, and (path, server checksum) in it --------------

def _xrootd_store(location: Location, settings: StagingSettings):
    from fsspec_xrootd import XRootDFileSystem
    from XRootD.client import EnvPutInt

    # The XRootD client's own recovery would retry a dead server for 10 minutes (5 connection attempts of
    # 120 s), wait 30 for an answer, and then fail every request to that server for 30 minutes more
    # (StreamErrorWindow): bounded by the site's timeout instead, as vjobs retries whole files itself. The client
    # reads them at its first use in a process; a vjobs run is one job in one process.
    for name, value in (("ConnectionWindow", settings.timeout_s), ("ConnectionRetry", 1),
                        ("RequestTimeout", settings.timeout_s), ("StreamErrorWindow", 0)):
        EnvPutInt(name, value)
    parts = location.parts
    return XRootDFileSystem(hostid=parts.netloc, protocol=parts.scheme.lower(), timeout=settings.timeout_s,
                            skip_instance_cache=True), ()


def _xrootd_path(location: Location, fs) -> tuple[str, Callable[[], str | None]]:
    path = "/" + location.parts.path.lstrip("/")

    def server_adler32() -> str | None:
        from fsspec.asyn import sync

        try:
            algorithm, value = sync(fs.loop, fs._checksum, path, "adler32")
        except OSError:
            return None  # a server without `xrootd.chksum adler32` answers error 3013
        return value.lower().zfill(8) if algorithm == "adler32" else None
    return path, server_adler32


def _http_store(location: Location, settings: StagingSettings):
    from webdav4.fsspec import WebdavFileSystem

    parts = location.parts
    secure = parts.scheme.lower() in ("https", "davs")
    base = f"{'https' if secure else 'http'}://{parts.netloc}"
    http = settings.http
    verify: Any = http.get("ca_path") or http.get("verify_tls", True)
    token = bearer_token(http.get("bearer_token_file")) if secure else None  # a token never goes out in clear
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    fs = WebdavFileSystem(base, timeout=settings.timeout_s, verify=verify, headers=headers,
                          follow_redirects=True, skip_instance_cache=True)
    return fs, (token,) if token else ()


def _http_path(location: Location, fs) -> tuple[str, Callable[[], str | None]]:
    parts = location.parts
    path = unquote(parts.path)  # webdav4 quotes it again itself

    def server_adler32() -> str | None:
        try:
            answer = fs.client.http.head(fs.client.join_url(unquote(parts.path)), headers={"Want-Digest": "adler32"})
        except Exception:  # the upload is verified another way (read-back) when the server says nothing
            return None
        match = _DIGEST.search(answer.headers.get("Digest", "")) if answer.status_code == 200 else None
        return match.group(1).lower().zfill(8) if match else None
    return path, server_adler32


def _http_put(fs, path: str) -> Callable[[Any, int, Callable[[int], None]], None]:
    """webdav4's write stream spools the whole file to a temporary file before the PUT: hand it the open file
    to send as it is read instead (measured: 0.9 s of a 2.6 s upload of 512 MiB went to the spooling)."""
    def put(reader, size: int, progress: Callable[[int], None]) -> None:
        from fsspec.callbacks import Callback

        class Moved(Callback):
            def relative_update(self, inc: int = 1) -> None:
                progress(inc)

        fs.upload_fileobj(reader, path, callback=Moved(), overwrite=True, size=size)
    return put


def _s3_store(location: Location, settings: StagingSettings):
    from s3fs import S3FileSystem

    s3 = settings.s3
    client = {key: value for key, value in (("endpoint_url", s3.get("endpoint_url")),
                                             ("region_name", s3.get("region"))) if value}
    config = {"connect_timeout": settings.timeout_s, "read_timeout": settings.timeout_s,
              "retries": {"max_attempts": 1}}  # vjobs retries whole files itself (transfer.py)
    fs = S3FileSystem(key=s3.get("access_key"), secret=s3.get("secret_key"), client_kwargs=client,
                      config_kwargs=config, skip_instance_cache=True)
    return fs, tuple(secret for secret in (s3.get("secret_key"),) if secret)


def _s3_path(location: Location, fs) -> tuple[str, Callable[[], str | None]]:
    parts = location.parts
    return f"{parts.netloc}/{parts.path.lstrip('/')}", lambda: None  # S3 keeps MD5/CRC, not adler32


def _file_store(location: Location, settings: StagingSettings):
    import fsspec

    return fsspec.filesystem("file"), ()


def _file_path(location: Location, fs) -> tuple[str, Callable[[], str | None]]:
    return location.parts.path, lambda: None


_OPENERS = {"xrootd": _xrootd_store, "http": _http_store, "s3": _s3_store, "file": _file_store}
_PATHS = {"xrootd": _xrootd_path, "http": _http_path, "s3": _s3_path, "file": _file_path}
_PUTS = {"http": _http_put}


def bearer_token(configured_file: str | None = None) -> str | None:
    """A WLCG bearer token, found as the WLCG Bearer Token Discovery document says: the site's file, then
    $BEARER_TOKEN, $BEARER_TOKEN_FILE, $XDG_RUNTIME_DIR/bt_u<uid>, /tmp/bt_u<uid>."""
    if os.environ.get("BEARER_TOKEN") and not configured_file:
        return os.environ["BEARER_TOKEN"].strip()
    uid = os.getuid()
    candidates = [configured_file, os.environ.get("BEARER_TOKEN_FILE"),
                  os.environ.get("XDG_RUNTIME_DIR") and f"{os.environ['XDG_RUNTIME_DIR']}/bt_u{uid}", f"/tmp/bt_u{uid}"]
    for candidate in filter(None, candidates):
        try:
            return Path(candidate).read_text().strip() or None
        except OSError:
            continue
    return None
