"""The Xen test node (vjobs.testing.xen_node): Xen 4.17 and a Debian dom0 under QEMU TCG, the XAPI stand-in in
dom0 reached through a forwarded loopback port; its command-line contract and its session fixture."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
import xmlrpc.client
from pathlib import Path

import pytest

from vjobs.config.site import load_site
from vjobs.testing.servers.processes import end_processes
from vjobs.testing.sites import REPO, XapiPool

pytestmark = [pytest.mark.vm, pytest.mark.realxen]

READY_LINE = re.compile(r"XAPI at (http://127\.0\.0\.1:\d+), site file (\S+) \(QEMU pid (\d+)\)")


def test_the_command_writes_a_site_for_a_real_xen_and_stops_on_sigterm(tmp_path, cache_dir, xen_node):
    # xen_node first: the node's files are built into the session's cache once, and this boot reuses them
    site_file = tmp_path / "site.toml"
    command = subprocess.Popen([sys.executable, "-m", "vjobs.testing.xen_node", "--site-out", str(site_file),
                                "--cache-dir", str(cache_dir)], stdout=subprocess.PIPE, text=True, cwd=REPO,
                               env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        line = command.stdout.readline()
        ready = READY_LINE.search(line)
        assert ready, f"not the ready line: {line!r}"
        url, qemu_pid = ready[1], int(ready[3])
        site = load_site(site_file)
        assert ready[2] == str(site_file) and site.pinned_driver == "xen"
        xen = site.drivers["xen"]
        assert xen["url"] == url and xen["require_dom0"] is False
        password = Path(xen["password_file"]).read_text().strip()
        proxy = xmlrpc.client.ServerProxy(url, allow_none=True)
        login = proxy.session.login_with_password(xen["username"], password, "1.0", "vjobs")
        assert login["Status"] == "Success", login
        session = login["Value"]
        host = proxy.session.get_this_host(session, session)["Value"]
        version = proxy.host.get_record(session, host)["Value"]["software_version"]
        assert version["xen"].startswith("4.17."), version  # Xen's own, as xl info gives it in dom0
        proxy.session.logout(session)
        run_dir = Path(xen["password_file"]).parent

        command.send_signal(signal.SIGTERM)
        assert command.wait(timeout=60) == 0
        assert not _alive(qemu_pid) and not run_dir.exists()
    finally:
        end_processes([command], grace_s=30)  # SIGTERM first: the node removes its run folder


def test_the_session_node_runs_a_xapi_on_real_xen(xen_node, realxen_site):
    assert realxen_site.pinned_driver == "xen"
    pool = XapiPool(xen_node.url, xen_node.password_file)
    assert pool.domains() == []  # dom0 aside: xl list in dom0, through the stand-in's plugin
    assert xen_node.console_log.read_text().count("(XEN) Command line:") == 1  # booted once, never rebooted


def _alive(pid: int) -> bool:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:  # reaped by its parent as it ends
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        time.sleep(0.2)
    return True
