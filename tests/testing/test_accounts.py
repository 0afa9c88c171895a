"""The pool accounts the suite runs vjobs as are what a site has: no privilege, the login PATH, vjobs from pip."""

import os

import pytest

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="making accounts needs root")


def test_an_account_is_ordinary_and_runs_its_own_vjobs(pool_accounts):
    account = pool_accounts[0]
    identity = account.run(["id", "-u"], check=True).stdout.strip()
    assert identity == str(account.uid) and account.uid != 0
    path = account.run(["sh", "-c", "echo $PATH"], check=True).stdout.strip()
    assert "/usr/sbin" not in path.split(":") and "/usr/bin" in path.split(":")
    version = account.run([account.vjobs, "--version"], check=True).stdout
    assert version.startswith("vjobs ")
    python = str(account.venv / "bin" / "python")
    where = account.run([python, "-c", "import vjobs, sys; print(vjobs.__file__, sys.base_prefix)"], check=True).stdout
    assert str(account.venv) in where and "/usr" in where.split()[1]


def test_accounts_cannot_read_each_others_homes(pool_accounts):
    first, second = pool_accounts[:2]
    secret = first.home / "secret"
    first.run(["sh", "-c", f"umask 077; echo mine > {secret}"], check=True)
    assert second.run(["cat", str(secret)]).returncode != 0
