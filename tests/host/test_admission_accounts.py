"""One host budget for every account on the node (vjobs/host/admission.py), with real ordinary accounts
(``pool_accounts``) holding real shares through their own vjobs: root's jobs and an account's count against the
same budget; an account cannot remove, write or take another's tokens, nor block anybody's admission by holding
any file of the folder; the tokens of a holder killed with SIGKILL come back, whoever it was. No VM boots here:
a VM runs only while its vjobs holds its share, so holding the share is what these tests look at."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from vjobs.config.site import site_from_dict
from vjobs.errors import AdmissionRefused
from vjobs.host.admission import admitted, prepare_host_folder
from vjobs.testing.admission_holders import AdmissionHolders, said
from vjobs.testing.host_state import held_tokens

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="making accounts needs root")

# What an account may try against the tokens of the folder: for each file (and the folder itself), whether
# it could remove, rename, write, change the mode of, or lock it, and whether it could add a file.
ATTACKER = r"""
import fcntl, json, os, sys
folder = sys.argv[1]
outcome = {}
def attempt(what, action):
    try:
        action()
        outcome[what] = "done"
    except BlockingIOError:
        outcome[what] = "held by another"
    except PermissionError:
        outcome[what] = "denied"
    except OSError as exc:
        outcome[what] = f"failed: {exc.strerror}"
for name in sorted(os.listdir(folder)):
    path = os.path.join(folder, name)
    attempt(f"unlink {name}", lambda: os.unlink(path))
    attempt(f"rename {name}", lambda: os.rename(path, path + ".mine"))
    attempt(f"write {name}", lambda: os.close(os.open(path, os.O_WRONLY)))
    attempt(f"chmod {name}", lambda: os.chmod(path, 0o666))
    attempt(f"lock {name}", lambda: fcntl.flock(os.open(path, os.O_RDONLY), fcntl.LOCK_EX | fcntl.LOCK_NB))
attempt("create", lambda: os.close(os.open(os.path.join(folder, "vcpu.99"), os.O_WRONLY | os.O_CREAT, 0o644)))
attempt("remove the folder", lambda: os.rename(folder, folder + ".mine"))
print(json.dumps(outcome))
"""

# Holds a lock on one file of the folder at a time, as its stdin says: "<name> ex|sh", then "." to let go.
LOCKER = r"""
import fcntl, os, sys
folder = sys.argv[1]
for line in sys.stdin:
    name, mode = line.split()
    fd = os.open(os.path.join(folder, name), os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX if mode == "ex" else fcntl.LOCK_SH)
    print("holding", name, flush=True)
    sys.stdin.readline()
    os.close(fd)
"""


@pytest.fixture
def shared(tmp_path):
    """A folder every account can pass (tmp_path, under root's 0700 pytest folder, is not), with the
    budget folder in it that the tests' sites name: root makes it, as it makes the node's."""
    folder = Path(tempfile.mkdtemp(prefix="vjobs-test-budget-", dir="/var/tmp"))
    os.chmod(folder, 0o755)
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


def host(shared: Path, **budget) -> dict:
    return {"host": {"vcpus": 1, "memory_mib": 1024, "admission_wait_s": 30, "budget_dir": str(shared / "budget"),
                     **budget}}


@pytest.fixture
def holders(tmp_path):
    """``start(account, document, job_id, vcpus, memory_mib, hold="stdin")``: a holder
    (vjobs.testing.admission_holders) as ``account`` (None: root, with this checkout and the test's work
    folder); each still running after the test is killed by its pid."""
    with AdmissionHolders() as started:
        def start(account, document, job_id, vcpus, memory_mib, hold="stdin"):
            if account is None:
                document = {"work_dir": str(tmp_path / "work"), **document}
            return started.start(document, job_id, vcpus, memory_mib, hold=hold, account=account)

        yield start


def root_site(tmp_path, document):
    return site_from_dict({"work_dir": str(tmp_path / "work"), **document}, source="test site")


def test_the_accounts_vjobs_is_this_checkout(pool_accounts):
    python = str(pool_accounts[0].venv / "bin" / "python")
    out = pool_accounts[0].run([python, "-c", "from vjobs.host.admission import prepare_host_folder"])
    assert out.returncode == 0, out.stderr  # a vjobs of before one host budget has no prepare_host_folder


def test_a_root_job_and_an_accounts_job_never_hold_the_budget_at_once(pool_accounts, shared, holders, tmp_path):
    account = pool_accounts[0]
    document = host(shared)
    prepare_host_folder(root_site(tmp_path, document))  # as scripts/install.sh does
    holder = holders(account, document, "theirs", 1, 512)
    assert said(holder) == f"admitted {shared / 'budget'}", holder.stderr.read() if holder.poll() is not None else ""
    with pytest.raises(AdmissionRefused) as refused:  # root's job: the account's VM holds the only vCPU
        with admitted("mine", 1, 512, root_site(tmp_path, host(shared, admission_wait_s=0))):
            pytest.fail("root's job was admitted beside the account's")
    assert refused.value.code == "admission_timeout"
    assert (f"1 job holds 1 of 1 vCPUs and 512 of 1024 MiB (pid {holder.pid} of {account.name}: 1 vCPU and "
            "512 MiB)") in str(refused.value)

    waiting = holders(None, document, "mine", 1, 512)  # root's job waits...
    assert said(waiting, timeout=2) is None and waiting.poll() is None
    started = time.monotonic()
    holder.send_signal(signal.SIGKILL)  # ... until the account's vjobs is killed: its share comes back
    assert holder.wait(10) == -signal.SIGKILL
    assert said(waiting, timeout=10) == f"admitted {shared / 'budget'}" and time.monotonic() - started < 3

    late = holders(account, host(shared, admission_wait_s=0), "theirs-again", 1, 128)  # and the other way
    assert said(late).startswith("refused admission_timeout") and late.wait(10) == 3
    waiting.stdin.close()
    assert waiting.wait(10) == 0 and held_tokens(shared / "budget") == []


def test_an_account_cannot_remove_write_or_take_anothers_tokens(pool_accounts, shared, holders, tmp_path):
    first, second = pool_accounts[:2]
    document = host(shared, vcpus=2, memory_mib=128)  # vcpu.0, vcpu.1, mem.0, mem.1 (64 MiB each)
    prepare_host_folder(root_site(tmp_path, document))
    holder = holders(first, document, "first", 2, 128)  # every token
    assert said(holder) == f"admitted {shared / 'budget'}"
    attack = second.run([str(second.venv / "bin" / "python"), "-c", ATTACKER, str(shared / "budget")], check=True)
    outcome = json.loads(attack.stdout)
    files = ["budget.json", "mem.0", "mem.1", "vcpu.0", "vcpu.1"]
    for name in files:
        for what in ("unlink", "rename", "write", "chmod"):
            assert outcome.pop(f"{what} {name}") == "denied", (what, name)
        assert outcome.pop(f"lock {name}") == ("done" if name == "budget.json" else "held by another"), name
    assert outcome == {"create": "denied", "remove the folder": "denied"}
    assert sorted(os.listdir(shared / "budget")) == files
    assert held_tokens(shared / "budget") == files[1:]  # still the first account's, all of them
    holder.stdin.close()
    assert holder.wait(10) == 0 and held_tokens(shared / "budget") == []


def test_an_account_holding_any_file_of_the_folder_blocks_nobody(pool_accounts, shared, holders, tmp_path):
    """Whatever single file of the folder an account locks, or the folder itself, another account's job and
    root's still get the room that is left (a token it holds is a token of its own share, as its jobs' are)."""
    blocker, other = pool_accounts[1:3]
    document = host(shared, vcpus=2, memory_mib=128, admission_wait_s=0)
    prepare_host_folder(root_site(tmp_path, document))
    locker = blocker.popen([str(blocker.venv / "bin" / "python"), "-c", LOCKER, str(shared / "budget")],
                           stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        for name in [".", *sorted(os.listdir(shared / "budget"))]:
            for mode in ("ex", "sh"):
                locker.stdin.write(f"{name} {mode}\n")
                locker.stdin.flush()
                assert said(locker) == f"holding {name}"
                with admitted("root's", 1, 64, root_site(tmp_path, document)):  # one vCPU, one memory token
                    pass
                theirs = holders(other, document, "other's", 1, 64, hold="0")
                assert said(theirs) == f"admitted {shared / 'budget'}", (name, mode, theirs.stderr.read())
                assert theirs.wait(10) == 0
                locker.stdin.write(".\n")
                locker.stdin.flush()
    finally:
        locker.kill()
        locker.wait()


def test_the_tokens_of_a_killed_holder_come_back_whoever_held_them(pool_accounts, shared, holders, tmp_path):
    first, second = pool_accounts[2:4]
    document = host(shared, vcpus=2, memory_mib=256)
    prepare_host_folder(root_site(tmp_path, document))
    killed = holders(first, document, "killed", 2, 256)
    assert said(killed) == f"admitted {shared / 'budget'}" and len(held_tokens(shared / "budget")) == 6
    killed.send_signal(signal.SIGKILL)
    assert killed.wait(10) == -signal.SIGKILL
    assert held_tokens(shared / "budget") == []  # nothing cleaned up: the kernel let go
    after = holders(second, host(shared, vcpus=2, memory_mib=256, admission_wait_s=0), "after", 2, 256)
    assert said(after) == f"admitted {shared / 'budget'}"
    after.stdin.close()
    assert after.wait(10) == 0


def test_an_account_stays_within_what_root_made(pool_accounts, shared, holders, tmp_path):
    account = pool_accounts[0]
    prepare_host_folder(root_site(tmp_path, host(shared)))  # root's [host]: 1 vCPU
    big = holders(account, host(shared, vcpus=4, admission_wait_s=0), "big", 2, 128)  # the account's says 4
    assert said(big) == (f"refused exceeds_host_budget job big: /resources/vcpus = 2 is more than this host's "
                         f"budget of 1 vCPUs (the tokens root made in {shared / 'budget'}, from root's [host] vcpus): "
                         "it could never start here; ask for less")
    assert big.wait(10) == 3
    (shared / "budget" / "budget.json").unlink()
    broken = holders(account, host(shared, admission_wait_s=0), "broken", 1, 128)
    line = said(broken)
    assert line.startswith("refused admission_folder_unusable the admission folder")
    assert "has no budget.json: root must make it again" in line and broken.wait(10) == 3


def test_without_roots_folder_an_accounts_budget_is_its_own(pool_accounts, shared, holders, tmp_path):
    account = pool_accounts[3]
    document = host(shared)  # no budget folder: vjobs was not installed on this node by root
    first = holders(account, document, "one", 1, 128)
    assert said(first) == f"admitted {account.work_dir / 'admission'}"
    assert not (shared / "budget").exists()
    assert (f"there is no host budget folder {shared / 'budget'} (vjobs was not installed on this node by its "
            "root: scripts/install.sh), so the budget is this account's own") in first.stderr.readline()
    own = account.work_dir / "admission"
    info = own.stat()
    assert (info.st_uid, info.st_mode & 0o777) == (account.uid, 0o700)
    second = holders(account, host(shared, admission_wait_s=0), "two", 1, 128)  # the account's own 1 vCPU is taken
    assert said(second).startswith("refused admission_timeout job two: no room in this account's own budget")
    with admitted("root's", 1, 128, root_site(tmp_path, document)):  # root makes the node's folder, and is not
        assert (shared / "budget" / "vcpu.0").stat().st_uid == 0  # counted with the account's own budget
    first.stdin.close()
    assert first.wait(10) == 0
