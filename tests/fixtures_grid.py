"""Fixtures that start real grid storage servers: XRootD inside a loopback-only network namespace (host-side code
reaches it through a relay) and WebDAV on 127.0.0.1. conftest.py takes them with ``from fixtures_grid import *``.
Every server is stopped by its PID in the fixture's teardown, whether the test passed or not."""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest

from vjobs.testing.servers.netns import LoopbackNetns, Relay
from vjobs.testing.servers.xrootd import XRootDServer

# The XRootD client reads its connection settings once per process, at its first use: vjobs sets them from
# [staging] timeout_s before that (one job, one process), but this session's first XRootD client may be a test's.
# The same short bounds for every test, whichever comes first.
for _name, _value in (("XRD_CONNECTIONWINDOW", "5"), ("XRD_CONNECTIONRETRY", "1"), ("XRD_STREAMERRORWINDOW", "0"),
                      ("XRD_REQUESTTIMEOUT", "30")):
    os.environ.setdefault(_name, _value)

__all__ = ["grid_netns", "xrootd_server", "xrootd_relay", "xrootd", "make_webdav", "webdav", "XRootDEndpoint"]


def server_unavailable(reason: str) -> None:
    """Skip a test whose server cannot run here; CI (scripts/test.sh sets VJOBS_REQUIRE_SERVERS=1) fails it
    instead, so that a server that stopped installing is never passed silently."""
    if os.environ.get("VJOBS_REQUIRE_SERVERS"):
        pytest.fail(f"a required test server is unavailable: {reason}")
    pytest.skip(reason)


def why_no_netns() -> str | None:
    if os.geteuid() != 0:
        return "needs root: XRootD runs in a throwaway network namespace (ip netns add)"
    missing = [tool for tool in ("ip", "nsenter") if shutil.which(tool) is None]
    return f"needs {' and '.join(missing)} (iproute2, util-linux) for a network namespace" if missing else None


@pytest.fixture(scope="session")
def grid_netns():
    """A network namespace holding only lo, for servers that cannot bind to loopback only."""
    why_not = why_no_netns()
    if why_not:
        server_unavailable(why_not)
    with LoopbackNetns("vjobs-grid") as netns:
        yield netns


@pytest.fixture(scope="session")
def xrootd_server(grid_netns):
    """The session's XRootD server, inside ``grid_netns``. Its data folder is under /tmp, not pytest's tmp_path:
    the xrootd user must be able to reach it, and pytest's base folder is 0700."""
    if shutil.which("xrootd") is None:
        server_unavailable("needs the xrootd binary (Debian package xrootd-server)")
    data = Path(tempfile.mkdtemp(prefix="vjobs-xrootd-data-"))
    try:
        with XRootDServer(grid_netns, data) as server:
            yield server
    finally:
        shutil.rmtree(data, ignore_errors=True)


@pytest.fixture(scope="session")
def xrootd_relay(grid_netns, xrootd_server):
    with Relay(grid_netns, xrootd_server.port) as relay:
        yield relay


@dataclass
class XRootDEndpoint:
    """The session's XRootD server as host-side code sees it: root:// URLs on 127.0.0.1 through the relay."""

    server: XRootDServer
    relay: Relay

    @property
    def data(self) -> Path:
        """The server's data folder (files the server writes belong to the xrootd user)."""
        return self.server.data

    def url(self, path: str) -> str:
        return f"root://127.0.0.1:{self.relay.port}//{str(path).lstrip('/')}"


@pytest.fixture
def xrootd(xrootd_server, xrootd_relay) -> XRootDEndpoint:
    """The session's XRootD server, started again first if an earlier test stopped or killed it."""
    if not xrootd_server.running:
        xrootd_server.restart()
    return XRootDEndpoint(xrootd_server, xrootd_relay)


@pytest.fixture
def make_webdav(tmp_path):
    """Starts WebDAV servers for this test: ``make_webdav(read_only=True)``, ``make_webdav(corrupt_uploads=True)``.
    Each gets a fresh root under tmp_path and keeps its log there; all are stopped after the test."""
    from vjobs.testing.servers.webdav import WebDAVServer

    started = []

    def make(**options) -> WebDAVServer:
        name = f"webdav{len(started)}"
        server = WebDAVServer(tmp_path / name, log=tmp_path / f"{name}.log", **options)
        started.append(server)
        return server.start()

    yield make
    for server in started:
        server.close()


@pytest.fixture
def webdav(make_webdav):
    """A fresh, writable WebDAV server on 127.0.0.1 for this test."""
    return make_webdav()
