"""Fixtures every folder of tests may use. The ones another package's tests may want too (sites, jobs, images,
a clean host) are the plugin vjobs.testing.fixtures, loaded here; a folder's own ones are in its conftest.py.

Here: the repository (``repo``), ``vjobs run`` as a batch system starts it (``start_vjobs``,
``wait_for_payload``), a base image the guest cannot mount (``corrupt_base``), and real servers started once
per session and always stopped by their PIDs: XRootD and WebDAV, S3 (Swift), Slurm."""

from __future__ import annotations

import hashlib
import itertools
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from vjobs.testing.servers.netns import LoopbackNetns, Relay
from vjobs.testing.servers.processes import end_processes
from vjobs.testing.servers.xrootd import XRootDServer

pytest_plugins = ["vjobs.testing.fixtures"]


@pytest.fixture(scope="session")
def repo() -> Path:
    """The repository's root folder (scripts, examples and benchmarks the tests run)."""
    return Path(__file__).resolve().parent.parent


# --- vjobs as a batch system runs it -------------------------------------------------------------------------

@pytest.fixture
def start_vjobs():
    """``start_vjobs(job, site_file, outdir)``: ``vjobs run --json`` as a child process (a test sends it the
    signals a batch system would); one still running after the test is ended by its PID."""
    started: list[subprocess.Popen] = []

    def start(job: Path, site: Path, outdir: Path, *more: str, command: str = "run") -> subprocess.Popen:
        """``more``: further options (``--checkpoint DIR``); ``command="resume"``: ``job`` is a checkpoint folder."""
        started.append(subprocess.Popen([sys.executable, "-m", "vjobs", command, str(job), "--site", str(site),
                                         "--outdir", str(outdir), "--json", *more], stdout=subprocess.PIPE,
                                        stderr=subprocess.PIPE, text=True))
        return started[-1]

    yield start
    end_processes(started)


@pytest.fixture
def wait_for_payload():
    """``wait_for_payload(work_dir, process)``: returns once a job under ``work_dir`` started its payload (its
    console says so); fails if ``process`` ends first or nothing starts within ``timeout`` seconds."""
    def wait(work: Path, process: subprocess.Popen, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert process.poll() is None, process.communicate()
            for log in work.glob("*/console.*.log"):
                if b"running the payload" in log.read_bytes():
                    return
            time.sleep(0.2)
        raise AssertionError("the payload never started")
    return wait


@pytest.fixture(scope="session")
def corrupt_base(tmp_path_factory) -> tuple[Path, str]:
    """(image, sha256) of a squashfs whose superblock is fine (the host accepts it) and whose tables are
    garbage: the guest cannot mount it."""
    folder = tmp_path_factory.mktemp("broken-base")
    tree = folder / "tree"
    (tree / "bin").mkdir(parents=True)
    (tree / "bin" / "sh").write_text("#!/bin/false\n")
    image = folder / "broken.squashfs"
    subprocess.run(["mksquashfs", str(tree), str(image), "-comp", "lz4", "-noappend", "-quiet"], check=True)
    data = bytearray(image.read_bytes())
    data[96:] = bytes(len(data) - 96)  # keep the 96-byte superblock, zero the rest
    image.write_bytes(bytes(data))
    return image, hashlib.sha256(bytes(data)).hexdigest()


# --- real servers: XRootD (in a loopback-only network namespace, reached through a relay), WebDAV, S3, Slurm -----

# The XRootD client reads its connection settings once per process, at its first use: vjobs sets them from
# [staging] timeout_s before that (one job, one process), but this session's first XRootD client may be a test's.
# The same short bounds for every test, whichever comes first.
for _name, _value in (("XRD_CONNECTIONWINDOW", "5"), ("XRD_CONNECTIONRETRY", "1"), ("XRD_STREAMERRORWINDOW", "0"),
                      ("XRD_REQUESTTIMEOUT", "30")):
    os.environ.setdefault(_name, _value)


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


_bucket_numbers = itertools.count(1)


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """The session's OpenStack Swift with its S3 API (s3api + tempauth + memcached) on 127.0.0.1 (about 1.5-5 s
    to start). Skips where Swift or memcached is missing."""
    from vjobs.testing.servers.s3 import SwiftS3Server, why_not_available

    why_not = why_not_available()
    if why_not:
        server_unavailable(f"OpenStack Swift with s3api cannot run here ({why_not}): apt-get install swift swift-proxy "
                           "swift-account swift-container swift-object memcached")
    with SwiftS3Server(tmp_path_factory.mktemp("swift-s3")) as server:
        yield server


@pytest.fixture
def s3_bucket(s3_server):
    """(server, name of a fresh empty bucket of this test's own)."""
    return s3_server, s3_server.bucket(f"test-bucket-{next(_bucket_numbers)}")


@pytest.fixture(scope="session")
def slurm_cluster(request):
    """A real one-node Slurm cluster (vjobs.testing.servers.slurm) in ``grid_netns``, so that its batch jobs
    reach the XRootD server there: slurmctld and slurmd with one 2-CPU node (4096 MiB), stopped (and its left
    jobs cancelled) at the end of the session whatever happened. Skipped, with the reason, where Slurm is not
    installed or we are not root."""
    from vjobs.testing.servers.slurm import SlurmCluster, why_not_available

    why_not = why_not_available()
    if why_not:
        server_unavailable(f"no Slurm cluster: {why_not}")
    netns = request.getfixturevalue("grid_netns")
    # Under /tmp and open to all, not in pytest's base folder (0700): an ordinary account's sbatch reads slurm.conf.
    root = Path(tempfile.mkdtemp(prefix="vjobs-slurm-"))
    root.chmod(0o755)
    try:
        with SlurmCluster(netns, root, cpus=2, memory_mib=4096) as cluster:
            yield cluster
    finally:
        shutil.rmtree(root, ignore_errors=True)
