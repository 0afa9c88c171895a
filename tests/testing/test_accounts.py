"""The pool accounts the suite runs vjobs as are what a site has: no privilege, the login PATH, vjobs from pip."""

import json
import os

import pytest

from vjobs.testing.processes import process_table

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


@pytest.mark.vm
def test_the_ram_keepers_an_accounts_jobs_started_are_stopped_as_the_account(pool_accounts, account_cache):
    """account_cache stops them when a test ends: a keeper outlives its job by ten minutes, and a later test
    that counts the account's processes (the accounts campaign) would find it."""
    account = pool_accounts[3]
    cache = account_cache(account)
    site, job = account.home / "keeper-site.toml", account.home / "keeper-job.json"
    site.write_text(f'driver = "qemu_user"\ncache_dir = "{cache}"\n')
    job.write_text(json.dumps({"id": "keeper", "command": ["true"], "walltime_s": 120}))
    account.own(site), account.own(job)
    done = account.run([account.vjobs, "run", "--site", str(site), "--outdir", str(account.home / "keeper-out"),
                        str(job)])
    assert done.returncode == 0, done.stderr[-2000:]
    assert _keepers_of(account), "the job started from a template, whose RAM a keeper holds"

    account.stop_ram_keepers(cache)
    assert _keepers_of(account) == []


def _keepers_of(account) -> list[int]:
    return [proc.pid for proc in process_table().values()
            if proc.uid == account.uid and proc.state != "Z" and any("ram_keeper" in word for word in proc.argv)]
