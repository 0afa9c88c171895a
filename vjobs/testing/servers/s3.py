"""A real OpenStack Swift with its S3 API, for tests: one proxy (s3api + tempauth + memcache), one account, one
container and one object server, and one memcached, all on 127.0.0.1 ports found free, all of it (configs, rings,
device folder, logs) under one folder. Swift reads everything from that folder, not from /etc/swift.

    with SwiftS3Server(tmp_path / "s3") as s3:
        s3.bucket("data")
        fs = s3fs.S3FileSystem(**s3.fsspec_options)

What this Swift (2.30) checks on upload: a single-part ETag is the MD5 of the bytes (a multipart one is
MD5-of-part-MD5s "-N"); a wrong Content-MD5 is refused (BadDigest); a SigV4 body whose SHA-256 differs from its
signed X-Amz-Content-SHA256 is refused (BadDigest) and not stored. x-amz-checksum-* (CRC32, SHA256...) headers
are ignored: a wrong one is accepted, none is returned. aws-chunked bodies (botocore's default checksum trailers
over HTTPS) are refused, hence ``CLIENT_SETTINGS``.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

from vjobs.testing.servers.processes import die_with_parent, end_processes

SWIFT_PYTHON = "/usr/bin/python3"  # Debian's swift lives in the system Python, not in a venv
STORAGE = ("account", "container", "object")
# Each server runs under this instead of /usr/bin/swift-*-server: the same run_wsgi, but with swift.conf (hash
# prefix, storage policies, constraints) read from our folder and the logger's syslog handler dropped (with no
# /dev/log Swift would send syslog over UDP); -v keeps the log on stderr, which goes to a file. Start-up CPU per
# server fell from 1.1 s to 0.15 s by doing Swift's own eventlet monkey-patching first (after the imports it
# re-greens each of their locks with a gc.collect()) and by QUICK_ENV, which skips imports the servers do not need.
LAUNCH = """
import eventlet
eventlet.monkey_patch(all=False, socket=True, select=True, thread=True)
import logging, sys
from swift.common import constraints, storage_policy, utils
from swift.common.wsgi import run_wsgi
utils.set_swift_dir(sys.argv[1])
storage_policy.reload_storage_policies()
constraints.reload_constraints()
utils.ThreadSafeSysLogHandler = lambda **_: logging.NullHandler()
sys.exit(run_wsgi(sys.argv[2], sys.argv[3], verbose=True))
"""
QUICK_ENV = {"EVENTLET_NO_GREENDNS": "yes", "SETUPTOOLS_USE_DISTUTILS": "stdlib"}  # no dnspython, no setuptools
COMMON = """[DEFAULT]
bind_ip = 127.0.0.1
bind_port = {port}
workers = 0
user = root
swift_dir = {root}
devices = {root}/devices
mount_check = false
bind_timeout = 2
log_name = {name}
"""
STORAGE_APP = """
[pipeline:main]
pipeline = {name}-server

[app:{name}-server]
use = egg:swift#{name}
"""
PROXY_APP = """
[pipeline:main]
pipeline = catch_errors gatekeeper proxy-logging cache listing_formats s3api tempauth copy slo dlo proxy-logging \
proxy-server

[app:proxy-server]
use = egg:swift#proxy
account_autocreate = true

[filter:s3api]
use = egg:swift#s3api
location = {region}

[filter:tempauth]
use = egg:swift#tempauth
user_test_tester = testing .admin

[filter:cache]
use = egg:swift#memcache
memcache_servers = 127.0.0.1:{memcached}

[filter:catch_errors]
use = egg:swift#catch_errors
[filter:gatekeeper]
use = egg:swift#gatekeeper
[filter:proxy-logging]
use = egg:swift#proxy_logging
[filter:listing_formats]
use = egg:swift#listing_formats
[filter:copy]
use = egg:swift#copy
[filter:slo]
use = egg:swift#slo
[filter:dlo]
use = egg:swift#dlo
"""
# swift-ring-builder's own main(), called 9 times in one process (9 processes took ~4 s on 2 busy CPUs)
RINGS = """
import sys
from swift.cli.ringbuilder import main
root, *ports = sys.argv[1:]
for name, port in zip(("account", "container", "object"), ports):
    for args in (["create", "6", "1", "1"], ["add", f"r1z1-127.0.0.1:{port}/d1", "1"], ["rebalance"]):
        try:
            main(["swift-ring-builder", f"{root}/{name}.builder", *args])
        except SystemExit as done:
            if done.code:
                sys.exit(f"swift-ring-builder {name}.builder {' '.join(args)}: exit status {done.code}")
"""
SWIFT_CONF = """[swift-hash]
swift_hash_path_prefix = vjobs-test
swift_hash_path_suffix = vjobs-test

[storage-policy:0]
name = Policy-0
default = yes
"""


def why_not_available() -> str | None:
    """None when Swift and memcached can run here, else what is missing."""
    missing = [tool for tool in ("swift-ring-builder", "memcached") if not shutil.which(tool)]
    if missing or not os.access(SWIFT_PYTHON, os.X_OK):
        return f"not installed: {', '.join(missing or [SWIFT_PYTHON])}"
    probe = subprocess.run([SWIFT_PYTHON, "-c", "import swift.common.middleware.s3api"], capture_output=True)
    return f"Swift's s3api cannot be imported: {probe.stderr.decode()[-300:]}" if probe.returncode else None


# botocore Config settings for this Swift: path-style, no retries, checksums only when an operation requires them
CLIENT_SETTINGS = {"s3": {"addressing_style": "path"}, "retries": {"total_max_attempts": 1}, "connect_timeout": 5,
                   "read_timeout": 30, "request_checksum_calculation": "when_required",
                   "response_checksum_validation": "when_required"}


def _free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


class _Exited(RuntimeError):
    pass


class SwiftS3Server:
    access_key, secret_key, region = "test:tester", "testing", "us-east-1"

    def __init__(self, root: Path, timeout: float = 30.0):
        self.root, self.timeout = Path(root), timeout
        self.processes: dict[str, subprocess.Popen] = {}
        self.endpoint_url = ""
        self.startup_seconds = 0.0

    def __enter__(self) -> SwiftS3Server:
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()

    @property
    def fsspec_options(self) -> dict:
        """Keyword arguments for ``s3fs.S3FileSystem`` (and fsspec's ``storage_options``)."""
        return {"key": self.access_key, "secret": self.secret_key, "config_kwargs": CLIENT_SETTINGS,
                "client_kwargs": {"endpoint_url": self.endpoint_url, "region_name": self.region}}

    def client(self, secret_key: str | None = None, **config):
        """A botocore S3 client for this server (``secret_key`` to try a wrong one; ``config`` overrides
        CLIENT_SETTINGS)."""
        import botocore.session
        from botocore.config import Config

        return botocore.session.get_session().create_client(
            "s3", endpoint_url=self.endpoint_url, region_name=self.region, aws_access_key_id=self.access_key,
            aws_secret_access_key=secret_key or self.secret_key, config=Config(**{**CLIENT_SETTINGS, **config}))

    def bucket(self, name: str) -> str:
        self.client().create_bucket(Bucket=name)
        return name

    def start(self, attempts: int = 3) -> SwiftS3Server:
        """Starts everything and waits until an S3 ListBuckets succeeds. A server that exits while starting (a
        port taken between finding it free and binding it: Swift gives up after bind_timeout) means another try
        on other ports; RuntimeError, with the logs' tails, when none works or the timeout passes."""
        begun = time.monotonic()
        for attempt in range(1, attempts + 1):
            try:
                self._configure()
                self._launch()
                self._wait_ready(begun + self.timeout)
                break
            except _Exited:
                self.stop()
                if attempt == attempts:
                    raise
            except BaseException:
                self.stop()
                raise
        self.startup_seconds = time.monotonic() - begun
        return self

    def _configure(self) -> None:
        root = self.root
        (root / "devices" / "d1").mkdir(parents=True, exist_ok=True)
        (root / "log").mkdir(exist_ok=True)
        (root / "swift.conf").write_text(SWIFT_CONF)
        proxy, memcached, *ports = _free_ports(5)
        self.ports = {"proxy": proxy, "memcached": memcached, **dict(zip(STORAGE, ports))}
        for name in STORAGE:
            (root / f"{name}-server.conf").write_text(
                COMMON.format(port=self.ports[name], root=root, name=name) + STORAGE_APP.format(name=name))
        (root / "proxy-server.conf").write_text(COMMON.format(port=proxy, root=root, name="proxy") +
                                                PROXY_APP.format(region=self.region, memcached=memcached))
        rings = subprocess.run([SWIFT_PYTHON, "-c", RINGS, str(root), *(str(self.ports[n]) for n in STORAGE)],
                               env={**os.environ, **QUICK_ENV},
                               capture_output=True, text=True, timeout=60)
        if rings.returncode:
            raise RuntimeError(f"building the rings failed: {rings.stdout}{rings.stderr}")
        self.endpoint_url = f"http://127.0.0.1:{proxy}"

    def _launch(self) -> None:
        commands = {"memcached": ["memcached", "-l", "127.0.0.1", "-p", str(self.ports["memcached"]), "-U", "0",
                                  "-u", "root", "-t", "1", "-m", "16", "-v"]}
        for name in (*STORAGE, "proxy"):
            commands[name] = [SWIFT_PYTHON, "-c", LAUNCH, str(self.root), str(self.root / f"{name}-server.conf"),
                              f"{name}-server"]
        for name, command in commands.items():
            with open(self.root / "log" / f"{name}.log", "ab") as log:
                self.processes[name] = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                                        cwd=self.root, env={**os.environ, **QUICK_ENV},
                                                        preexec_fn=die_with_parent)

    def _wait_ready(self, deadline: float) -> None:
        from botocore.exceptions import BotoCoreError, ClientError

        client = self.client(read_timeout=5)
        while True:
            exited = {name: p.returncode for name, p in self.processes.items() if p.poll() is not None}
            if exited:
                raise _Exited(f"Swift S3 servers exited while starting: {exited}\n{self.log_tails()}")
            try:
                client.list_buckets()
                return
            except (BotoCoreError, ClientError) as exc:
                last = exc
            if time.monotonic() > deadline:
                raise RuntimeError(f"Swift S3 at {self.endpoint_url} not ready in {self.timeout} s: {last}\n"
                                   f"{self.log_tails()}")
            time.sleep(0.1)

    def log_tails(self, lines: int = 20) -> str:
        tails = []
        for log in sorted((self.root / "log").glob("*.log")):
            tail = log.read_text(errors="replace").splitlines()[-lines:]
            tails.append(f"--- {log.name} (last {len(tail)} lines)\n" + "\n".join(tail))
        return "\n".join(tails)

    def stop(self) -> None:
        """Stops every process this started (SIGTERM, then SIGKILL after 10 s) and waits for it. Safe to repeat."""
        end_processes(self.processes.values())
        self.processes.clear()
