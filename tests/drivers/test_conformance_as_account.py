"""The driver conformance suite (vjobs.testing.conformance), the whole of it, run by an ordinary account as a
grid site runs jobs: pytest started as a pool account (vjobs.testing.accounts: no privilege, the login PATH),
on the suite of the vjobs that account installed with pip, with a site of its own (cache and work folders in
its home; the built images copied in by root, since an account builds no base image). For qemu_user (QEMU
run by the account itself) and kvm (the system libvirtd, which a site lets the group ``libvirt`` reach).

The account's pytest loads the suite as another package's tests would (a conftest.py and a subclass); its
summary line must say that every test of the driver passed and none was skipped (kvm included: its console
is a socket in the job's folder, not libvirt's pty, which an account may not open).
"""

from __future__ import annotations

import os
import re

import pytest

from vjobs.testing.accounts import Account

pytestmark = [pytest.mark.vm, pytest.mark.timeout(900),
              pytest.mark.skipif(os.geteuid() != 0, reason="making accounts needs root")]

SUITE_TIMEOUT_S = 800  # the whole suite for one driver: about 50 s (qemu_user), 95 s (kvm) as root on 2 cores
TEST_TIMEOUT_S = 300  # each test of it, as tests/ has it in pyproject.toml

CONFTEST = 'pytest_plugins = ["vjobs.testing.fixtures"]\n'
SUITE = '''from vjobs.testing.conformance import DriverConformance


class TestConformance(DriverConformance):
    pass
'''

# What lets the group libvirt use the system libvirtd without polkit (scripts/install.sh sets it up).
LIBVIRT_GRANT = ('libvirtd.conf: unix_sock_group = "libvirt", unix_sock_rw_perms = "0770", auth_unix_rw = "none"; '
                 "the account in the group libvirt")


def why_libvirt_refuses(account: Account) -> str | None:
    """None when the account reaches the system libvirtd, else libvirt's reason."""
    probe = "from vjobs.testing.sites import libvirt_reachable; print(libvirt_reachable() or '')"
    done = account.run([account.python, "-c", probe], env=_passed_on(), timeout=60)
    return done.stdout.strip() or (done.stderr.strip()[-500:] if done.returncode else None)


def _passed_on() -> dict[str, str]:
    """The test settings the account's pytest gets from ours (its environment is otherwise its login one)."""
    return {name: os.environ[name] for name in ("VJOBS_TEST_LIBVIRT_URI",) if name in os.environ}


# The kvm driver reads the guest's console from the pty libvirt gives the domain, opened by path: it belongs to
# the user QEMU runs as (root here, libvirt-qemu on a stock install), never to the account, whose every job
# then ends "no_usable_driver ... PermissionError: [Errno 13] Permission denied: '/dev/pts/N'". That failure
# alone is expected (until vjobs/drivers/kvm gives the account a console it may read); any other fails.


@pytest.mark.parametrize("driver", ["qemu_user", pytest.param("kvm", marks=pytest.mark.libvirt)])
def test_an_ordinary_account_passes_the_conformance_suite(driver, pool_accounts, account_cache):
    account = pool_accounts[0]
    settings = _passed_on()
    if driver == "kvm":
        why_not = why_libvirt_refuses(account)
        if why_not:
            say = pytest.fail if os.environ.get("VJOBS_REQUIRE_LIBVIRT") else pytest.skip
            say(f"{account.name} (groups kvm, libvirt) cannot use the system libvirtd: {why_not}. A site grants "
                f"it with {LIBVIRT_GRANT}")
        settings["VJOBS_REQUIRE_LIBVIRT"] = "1"  # the account's kvm_site fails, not skips, without libvirtd
    cache = account_cache(account, debian=True)
    suite = account.home / f"conformance-{driver}"
    suite.mkdir(exist_ok=True)
    (suite / "conftest.py").write_text(CONFTEST)
    (suite / "test_conformance.py").write_text(SUITE)
    account.own(suite)

    # Test ids end in [DRIVER] or [DRIVER-IMAGE]: -k on the driver's name picks its tests alone.
    done = account.run([account.python, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-k", driver,
                        f"--timeout={TEST_TIMEOUT_S}", f"--basetemp={suite / 'tmp'}", str(suite)],
                       env={"VJOBS_TEST_CACHE": str(cache), **settings}, cwd=suite, timeout=SUITE_TIMEOUT_S)

    summary = done.stdout.strip().splitlines()[-1] if done.stdout.strip() else done.stderr[-2000:]
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-2000:]
    counts = dict((kind, int(number)) for number, kind in re.findall(r"(\d+) (\w+)", summary))
    assert counts.get("passed") and set(counts) <= {"passed", "deselected"}, summary  # none skipped
