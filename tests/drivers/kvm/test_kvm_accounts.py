"""kvm for ordinary accounts: a site grants an account the system libvirtd by adding it to group `libvirt`
(scripts/libvirtd-access.sh sets the socket's group and auth; .ci/libvirt.sh does it for the tests). What that
grant means is shown too: an account in the group sees, and could destroy, another account's domain
(docs/security.md)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from vjobs.config.site import SYSTEM_CACHE_ENV
from vjobs.testing.sites import LIBVIRT_URI, libvirt_reachable, libvirt_settings, write_site

pytestmark = [pytest.mark.vm, pytest.mark.libvirt,
              pytest.mark.skipif(os.geteuid() != 0, reason="making accounts needs root")]


@pytest.fixture
def libvirtd():
    why_not = libvirt_reachable()
    if why_not:
        if os.environ.get("VJOBS_REQUIRE_LIBVIRT"):
            pytest.fail(f"{why_not} (scripts/test.sh should have started it)")
        pytest.skip(f"{why_not}: start it with .ci/libvirt.sh up")


def test_an_account_in_group_libvirt_runs_a_job_on_kvm(libvirtd, pool_accounts, system_cache):
    account, neighbour = pool_accounts[2:4]
    site = write_site(account.home / "site-kvm.toml", {"driver": "kvm", "drivers": {"kvm": libvirt_settings()}})
    job = account.home / "kvm-job.json"
    job.write_text(json.dumps({"id": "kvmaccount", "command": ["sh", "-c", "sleep 4; echo from kvm"]}))
    env = {SYSTEM_CACHE_ENV: str(system_cache)}  # the built-in image is root's (tests/host/test_roles.py)
    running = account.popen([account.vjobs, "run", str(job), "--site", str(site), "--outdir", "out-kvm", "--json"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        # the job's own domain, or the account's template slot it was restored into (vjobs/drivers/kvm/template.py)
        seen = _domains_seen_by(neighbour, ("vjobs-kvmaccount-", f"vjobs-tpl-{account.uid}-"), deadline_s=120)
        stdout, stderr = running.communicate(timeout=300)
    finally:
        if running.poll() is None:
            running.kill()
    result = json.loads(stdout)
    assert result["status"] == "succeeded" and result["driver"] == "kvm", (result["error"], stderr)
    assert (account.home / "out-kvm" / "stdout").read_text() == "from kvm\n"
    # rw access to qemu:///system is root-equivalent: the neighbour lists (and could destroy) the domain
    assert seen, "another account of group libvirt did not see the domain"


def _domains_seen_by(account, prefix: tuple[str, ...], deadline_s: float) -> list[str]:
    """The domains named ``prefix...`` (one of them) that ``account`` lists on the system libvirtd, once there are any."""
    give_up = time.monotonic() + deadline_s
    while time.monotonic() < give_up:
        listed = account.run(["virsh", "-c", LIBVIRT_URI, "list", "--name"], timeout=30)
        assert listed.returncode == 0, listed.stderr
        if found := [name for name in listed.stdout.split() if name.startswith(prefix)]:
            return found
        time.sleep(0.2)
    return []


def test_an_account_in_group_libvirt_saves_and_restores_a_guest(libvirtd, pool_accounts, account_cache):
    """test_kvm_checkpoint.py run by the account's own pytest (as tests/drivers/test_conformance_as_account.py
    runs the suite): the system libvirtd (root) writes the saved state, which must still be the account's to
    read, copy and restore."""
    account = pool_accounts[2]
    cache = account_cache(account)
    suite = account.home / "kvm-checkpoint"
    suite.mkdir(exist_ok=True)
    (suite / "conftest.py").write_text('pytest_plugins = ["vjobs.testing.fixtures"]\n')
    shutil.copy(Path(__file__).with_name("test_kvm_checkpoint.py"), suite)
    account.own(suite)
    done = account.run([account.python, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--basetemp={suite / 'tmp'}",
                        str(suite)], env={"VJOBS_TEST_CACHE": str(cache), "VJOBS_REQUIRE_LIBVIRT": "1"}, cwd=suite,
                       timeout=600)
    summary = done.stdout.strip().splitlines()[-1] if done.stdout.strip() else done.stderr[-2000:]
    assert done.returncode == 0 and "passed" in summary and "skipped" not in summary, \
        done.stdout[-6000:] + done.stderr[-2000:]
