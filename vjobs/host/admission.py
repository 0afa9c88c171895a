"""Host admission: the VMs of all the vjobs on one node, whichever account runs them, never get more vCPUs or
memory together than the site's budget (``[host] vcpus`` and ``memory_mib``; by default what the machine
has). A job waits for its share, up to ``[host] admission_wait_s``, and is then refused
(``admission_timeout``); a job that could never fit is refused at once (``exceeds_host_budget``).

The budget is a folder of token files, one per vCPU (``vcpu.<i>``) and one per memory unit (``mem.<j>``; the
unit, a power of two of at least 64 MiB chosen so that there are at most ``MAX_TOKENS``, is in
``budget.json``). A job holds its share by holding an exclusive ``flock`` on as many free tokens as it needs,
for as long as it runs. The kernel drops a process's locks when it ends, however it ends (SIGKILL included),
so a share returns by itself and nothing can go stale; the descriptors are close-on-exec, so QEMU does not
keep a share after vjobs is gone (vjobs/host/locks.py). There is no daemon, no lock of the whole folder and
no queue: a job tries the tokens with ``LOCK_NB``, takes all it needs or lets go of all it took, and looks
again after ``POLL_S`` (plus a random part, so that two jobs that each took half do not collide for ever).
Nobody ever waits while holding a token, so nobody can deadlock. A job uses only the first tokens its own
``[host]`` asks for, so an account whose site config gives a smaller budget stays within it, and never more
than were made.

Why a folder made by root (``[host] budget_dir``, by default ``HOST_BUDGET_DIR``, /var/lib/vjobs/admission):
the budget is one for the node, so every account must count in one place, and no account may be able to
take another's share away or stop the others. Root's folder (0755) and tokens (0644) can be opened and
locked by anyone, but created, removed, renamed or written by root alone. Locking a token is all an
account can do with it, and that only uses the budget, as its own jobs may; a token another process holds
cannot be taken from it, and there is no other file whose lock admission waits for. scripts/install.sh
makes the folder (``prepare_host_folder``); otherwise root's first job does, and root adds tokens when its
``[host]`` asks for more (it never removes one). On a node where the folder does not exist and the caller is
not root (vjobs was not installed by the node's root), the account's jobs share a budget of their own in
``<work_dir>/admission``, and each job says so.

The vjobs of one batch allocation share the allocation in the same way, in a folder of the account's own,
``<work_dir>/admission.<allocation>`` (vjobs/host/allocation.py); ``gc_stale_shares`` removes those folders
once no job holds a token in them.

Messages count the tokens a job could not take and name their holders from /proc/locks (pid and account).
Admission shares the budget among vjobs jobs: it does not confine an account, which could point
``budget_dir`` elsewhere or start QEMU by itself (the batch system and its cgroups do that).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import pwd
import random
import re
import secrets
import shutil
import stat
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from vjobs.config.site import HOST_BUDGET_DIR, HostBudget, SiteConfig
from vjobs.errors import AdmissionRefused
from vjobs.host import locks

__all__ = ["HOST_BUDGET_DIR", "Scope", "Share", "admitted", "gc_stale_shares", "prepare_host_folder"]

FOLDER = "admission"  # in work_dir: an account's own budget, and (admission.<allocation>) an allocation's
BUDGET_FILE = "budget.json"
VCPU, MEMORY = "vcpu", "mem"  # the token names' prefixes
MAX_TOKENS = 512  # of each kind: a job holds an open file for each token it takes
MIN_UNIT_MIB = 64
POLL_S = 0.25  # how often a waiting job tries again (plus up to as much at random)
REPORT_EVERY_S = 10.0
BUDGET_FILE_MAX_BYTES = 4096
TOKEN_NAME = re.compile(rf"({VCPU}|{MEMORY})\.[0-9]+")


@dataclass(frozen=True)
class Share:
    """One admitted job's part of the budget."""

    job_id: str
    pid: int
    vcpus: int
    memory_mib: int
    path: Path  # the budget folder whose tokens it holds


@dataclass(frozen=True)
class Scope:
    """Whose budget a job takes its share of: the node's (``[host]``, in root's folder, shared by every
    account), an account's own (no folder of root's on this node), or a batch job's allocation, whose vjobs
    share it among themselves and nobody else (the batch system shares the host; vjobs/host/allocation.py)."""

    budget: HostBudget
    folder: Path
    named: str  # for messages: whose budget
    setting: str  # for messages: where a figure of it comes from ({field}: vcpus or memory_mib)
    node_wide: bool = False  # root makes the folder, for every account; else it is the caller's own

    @classmethod
    def host(cls, site: SiteConfig) -> "Scope":
        return cls(site.host, site.host.budget_dir, "this host's budget", _host_setting(site), node_wide=True)

    @classmethod
    def own(cls, site: SiteConfig) -> "Scope":
        """The budget of this account's jobs alone, where root made no folder for the node."""
        return cls(site.host, site.work_dir / FOLDER, "this account's own budget", _host_setting(site))


def _host_setting(site: SiteConfig) -> str:
    return f"[host] {{field}} in {site.source}; unset, what the machine has"


@contextlib.contextmanager
def admitted(job_id: str, vcpus: int, memory_mib: int, site: SiteConfig,
             progress: Callable[[str], None] = lambda message: None, *,
             scope: Scope | None = None) -> Iterator[Share]:
    """Hold a share of the host's budget for a VM of ``vcpus`` and ``memory_mib`` while the block runs,
    waiting for it (a ``progress`` message about every 10 s) while other jobs hold the rest.

    Raises ``AdmissionRefused``: "exceeds_host_budget" at once when the VM alone is bigger than the budget,
    "admission_timeout" when no room came within ``[host] admission_wait_s``, "admission_folder_unusable"
    when the budget folder cannot be used safely."""
    scope = scope or Scope.host(site)
    _refuse_if_never_fits(job_id, vcpus, memory_mib, scope, scope.budget.vcpus, scope.budget.memory_mib,
                          lambda field: scope.setting.format(field=field))
    if scope.node_wide and os.geteuid() != 0 and not _exists(scope.folder):
        progress(f"job {job_id}: there is no host budget folder {scope.folder} (vjobs was not installed on "
                 f"this node by its root: scripts/install.sh), so the budget is this account's own: its jobs "
                 f"count against [host] among themselves, not with other accounts' (docs/scaling.md)")
        scope = Scope.own(site)
    budget = _Budget(scope)
    try:
        budget.refuse_if_never_fits(job_id, vcpus, memory_mib)
        taken = _wait_for_room(budget, job_id, vcpus, memory_mib, progress)
        try:
            yield Share(job_id=job_id, pid=os.getpid(), vcpus=vcpus, memory_mib=memory_mib, path=budget.path)
        finally:
            for fd in taken:
                locks.release(fd)
    finally:
        budget.close()


def prepare_host_folder(site: SiteConfig) -> str:
    """Make the node's budget folder (``[host] budget_dir``) with the tokens of ``site``'s ``[host]``, or
    add the tokens it lacks: what scripts/install.sh runs as root. Returns a line saying what it holds."""
    if os.geteuid() != 0:
        raise AdmissionRefused(f"only root makes the host budget folder {site.host.budget_dir}: every account "
                               "must be able to lock its tokens and none to remove them",
                               code="admission_folder_unusable")
    budget = _Budget(Scope.host(site))
    try:
        return (f"{budget.path}: {_made(budget.fd, VCPU, MAX_TOKENS)} vCPU tokens and "
                f"{_made(budget.fd, MEMORY, MAX_TOKENS)} memory tokens of {budget.unit_mib} MiB, made by root, "
                "for every account on this node")
    finally:
        budget.close()


def gc_stale_shares(site: SiteConfig) -> list[str]:
    """Remove the folders of batch allocations (``<work_dir>/admission.<allocation>``) whose tokens no
    process holds any more; one line for each folder removed. A share of a job that is gone needs no
    removing: its tokens came back when it ended."""
    if not site.work_dir.is_dir():
        return []
    return [f"removed the admission folder {folder} (no job of its allocation is left)"
            for folder in sorted(site.work_dir.glob(f"{FOLDER}.*")) if _remove_if_unused(folder)]


class _Budget:
    """A budget folder, opened (made first when it is the caller's to make) and checked: its memory unit,
    and how many tokens of each kind a job of this scope may use."""

    def __init__(self, scope: Scope):
        self.scope, self.path = scope, scope.folder
        self.fd = -1
        self.open()

    def open(self) -> None:
        try:
            self.fd = _open_folder(self.scope)
            owner = os.fstat(self.fd).st_uid
            self.ours = owner == os.geteuid()  # the owner makes the tokens: root's folder, or our own
            self.maker = "root" if owner == 0 else f"uid {owner}"
            self.unit_mib = _memory_unit(self.fd, self.path, self.ours, self.scope)
            self.wanted = {VCPU: min(self.scope.budget.vcpus, MAX_TOKENS),
                           MEMORY: min(-(-self.scope.budget.memory_mib // self.unit_mib), MAX_TOKENS)}
            if self.ours:
                _make_tokens(self.fd, self.wanted, public=self.scope.node_wide)
            self.usable = {kind: _made(self.fd, kind, wanted) for kind, wanted in self.wanted.items()}
        except OSError as exc:
            self.close()
            raise _unusable(self.path, exc) from exc
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    @property
    def memory_mib(self) -> int:
        return min(self.scope.budget.memory_mib, self.usable[MEMORY] * self.unit_mib)

    def need(self, vcpus: int, memory_mib: int) -> dict[str, int]:
        return {VCPU: vcpus, MEMORY: -(-memory_mib // self.unit_mib)}

    def refuse_if_never_fits(self, job_id: str, vcpus: int, memory_mib: int) -> None:
        """Against what was made: fewer tokens than this scope's ``[host]`` asks for, when the folder's
        maker asked for fewer."""
        need = self.need(vcpus, memory_mib)
        if all(need[kind] <= self.usable[kind] for kind in need):
            return
        _refuse_if_never_fits(job_id, vcpus, memory_mib, self.scope,
                              self.usable[VCPU] if need[VCPU] > self.usable[VCPU] else vcpus,
                              self.memory_mib if need[MEMORY] > self.usable[MEMORY] else memory_mib,
                              lambda field: f"the tokens {self.maker} made in {self.path}, from {self.maker}'s "
                                            f"[host] {field}")

    def take(self, need: dict[str, int]) -> list[int] | None:
        """Locks on ``need`` free tokens of each kind (vCPUs first: fewer, and the usual shortage), or None
        and nothing held when there are not enough."""
        if os.fstat(self.fd).st_nlink == 0:  # our own folder, removed by gc as unused: made again
            self.close()
            self.open()
        taken: list[int] = []
        try:
            for kind, count in need.items():
                usable = self.usable[kind]
                first = random.randrange(usable) if usable else 0  # concurrent takers start apart
                got = 0
                for index in range(usable):
                    if got == count:
                        break
                    fd = self._lock(f"{kind}.{(first + index) % usable}")
                    if fd is not None:
                        taken.append(fd)
                        got += 1
                if got < count:
                    break
            else:
                return taken
        except BaseException:
            _release_all(taken)
            raise
        _release_all(taken)
        return None

    def busy(self) -> dict[str, list[tuple[int, int, int]]]:
        """For messages: the tokens of each kind that someone holds, as (major, minor, inode) of their file."""
        held: dict[str, list[tuple[int, int, int]]] = {VCPU: [], MEMORY: []}
        for kind, usable in self.usable.items():
            for index in range(usable):
                fd = self._open_token(f"{kind}.{index}")
                if fd is None:
                    continue
                try:
                    if not locks.try_lock(fd):
                        info = os.fstat(fd)
                        held[kind].append((os.major(info.st_dev), os.minor(info.st_dev), info.st_ino))
                finally:
                    locks.release(fd)
        return held

    def _lock(self, name: str) -> int | None:
        """The token ``name``, locked and still named so (gc may remove an unused folder of ours), or None."""
        fd = self._open_token(name)
        if fd is None:
            return None
        if locks.try_lock(fd) and locks.names_at(self.fd, name, fd):
            return fd
        locks.release(fd)
        return None

    def _open_token(self, name: str) -> int | None:
        try:
            fd = _open_file(self.fd, name)
        except FileNotFoundError:
            if not self.ours:
                return None
            try:  # ours, and removed by gc as we came in: made again
                _make_file(self.fd, name, b"", public=self.scope.node_wide)
                fd = _open_file(self.fd, name)
            except FileNotFoundError:  # the whole folder went: the next try opens it again
                return None
        try:
            _check_file(fd, self.fd, self.path / name)
        except BaseException:
            os.close(fd)
            raise
        return fd


def _wait_for_room(budget: _Budget, job_id: str, vcpus: int, memory_mib: int,
                   progress: Callable[[str], None]) -> list[int]:
    wait_s = budget.scope.budget.admission_wait_s
    started = time.monotonic()
    deadline = started + wait_s
    next_report = started  # the first message as soon as the job has to wait
    need = budget.need(vcpus, memory_mib)
    while True:
        try:
            taken = budget.take(need)
            now = time.monotonic()
            busy = budget.busy() if taken is None and (now >= deadline or now >= next_report) else None
        except OSError as exc:
            raise _unusable(budget.path, exc) from exc
        if taken is not None:
            return taken
        if busy is not None:
            holders = _holders(busy)
            held = _holding(busy, holders, budget)
            if now >= deadline:
                raise AdmissionRefused(
                    f"job {job_id}: no room in {budget.scope.named} for {_amount(vcpus, memory_mib)} within "
                    f"{wait_s:g} s ({budget.scope.setting.format(field='admission_wait_s')}): {held} "
                    f"({_listing(holders, budget.unit_mib)}); run it later or on another host",
                    code="admission_timeout")
            progress(f"job {job_id}: waiting for {_amount(vcpus, memory_mib)}: {held} "
                     f"(waited {now - started:.0f} s of at most {wait_s:g} s)")
            next_report = now + REPORT_EVERY_S
        time.sleep(min(POLL_S + random.uniform(0, POLL_S), deadline - now))


# --- the folder and its files ------------------------------------------------------------------------------

def _open_folder(scope: Scope) -> int:
    """The budget folder, opened without following a link, made first when missing (by root for the node,
    by anyone for their own), refused unless root or the caller owns it and nobody else may write there."""
    path = scope.folder
    try:
        try:
            folder = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            _publish_folder(scope)
            folder = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        raise AdmissionRefused(f"the admission folder {path} vanished as it was made",
                               code="admission_folder_unusable") from None
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENOTDIR):
            raise AdmissionRefused(f"the admission folder {path} is a symbolic link or not a folder: vjobs does "
                                   "not follow it; remove it", code="admission_folder_unusable") from exc
        raise
    info = os.fstat(folder)
    if info.st_uid not in (0, os.geteuid()) or info.st_mode & 0o022:
        os.close(folder)
        raise AdmissionRefused(f"the admission folder {path} belongs to uid {info.st_uid} (mode "
                               f"{stat.S_IMODE(info.st_mode):o}), and vjobs uses one only when root or uid "
                               f"{os.geteuid()} owns it and nobody else may write there; remove it, or set "
                               "[host] budget_dir to another", code="admission_folder_unusable")
    return folder


def _publish_folder(scope: Scope) -> None:
    """Make the folder whole under a temporary name, then rename it into place, so that nobody ever sees
    it without its memory unit and tokens (two makers at once: the first rename wins)."""
    path, public = scope.folder, scope.node_wide
    if public:
        _make_parents(path.parent)
    else:
        path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.parent / f".{path.name}.new-{secrets.token_hex(6)}"
    os.mkdir(temporary, 0o700)
    try:
        os.chmod(temporary, 0o755 if public else 0o700)
        folder = os.open(temporary, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            unit = _memory_unit(folder, temporary, True, scope)
            _make_tokens(folder, {VCPU: min(scope.budget.vcpus, MAX_TOKENS),
                                  MEMORY: min(-(-scope.budget.memory_mib // unit), MAX_TOKENS)}, public=public)
        finally:
            os.close(folder)
        with contextlib.suppress(FileExistsError):  # ENOTEMPTY too: another maker's came first
            try:
                os.rename(temporary, path)
            except OSError as exc:
                if exc.errno != errno.ENOTEMPTY:
                    raise
    finally:
        shutil.rmtree(temporary, ignore_errors=True)  # nothing left once renamed


def _make_parents(folder: Path) -> None:
    """The folders above root's budget folder, each one made 0755 whatever the umask: accounts pass them."""
    missing = []
    while not folder.exists():
        missing.append(folder)
        folder = folder.parent
    for path in reversed(missing):
        with contextlib.suppress(FileExistsError):
            os.mkdir(path, 0o755)
            os.chmod(path, 0o755)


def _memory_unit(folder: int, path: Path, ours: bool, scope: Scope) -> int:
    """The folder's memory unit from its budget.json, which the owner writes once (the smallest power of
    two of at least MIN_UNIT_MIB that gives at most MAX_TOKENS memory tokens for this scope's memory)."""
    try:
        fd = _open_file(folder, BUDGET_FILE)
    except FileNotFoundError:
        if not ours:
            raise AdmissionRefused(f"the admission folder {path} has no {BUDGET_FILE}: root must make it again "
                                   "(remove the folder while no job runs; scripts/install.sh or root's next job "
                                   "makes it)", code="admission_folder_unusable") from None
        unit = MIN_UNIT_MIB
        while -(-scope.budget.memory_mib // unit) > MAX_TOKENS:
            unit *= 2
        _make_file(folder, BUDGET_FILE, json.dumps({"memory_unit_mib": unit}).encode() + b"\n",
                   public=scope.node_wide)
        fd = _open_file(folder, BUDGET_FILE)
    try:
        _check_file(fd, folder, path / BUDGET_FILE)
        unit = json.loads(os.read(fd, BUDGET_FILE_MAX_BYTES))["memory_unit_mib"]
        if not isinstance(unit, int) or unit < MIN_UNIT_MIB or unit & (unit - 1):
            raise ValueError(f"memory_unit_mib {unit!r}")
        return unit
    except (ValueError, KeyError, TypeError) as exc:
        raise AdmissionRefused(f"{path / BUDGET_FILE} is not a budget vjobs wrote ({exc}): remove the folder while "
                               "no job runs; its owner's next job makes it again",
                               code="admission_folder_unusable") from None
    finally:
        os.close(fd)


def _make_tokens(folder: int, wanted: dict[str, int], *, public: bool) -> None:
    for kind, count in wanted.items():
        for index in range(count):
            name = f"{kind}.{index}"
            try:
                os.stat(name, dir_fd=folder, follow_symlinks=False)
            except FileNotFoundError:
                _make_file(folder, name, b"", public=public)


def _made(folder: int, kind: str, wanted: int) -> int:
    """How many of the first ``wanted`` tokens of ``kind`` exist (the first missing one ends them)."""
    for index in range(wanted):
        try:
            os.stat(f"{kind}.{index}", dir_fd=folder, follow_symlinks=False)
        except FileNotFoundError:
            return index
    return wanted


def _make_file(folder: int, name: str, content: bytes, *, public: bool) -> None:
    """``name`` in ``folder``, whole and with its mode (0644 in root's folder for the node, else 0600) from
    the moment it appears, whatever the umask; kept as it is if someone made it first."""
    temporary = f".new-{secrets.token_hex(6)}"
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600,
                 dir_fd=folder)
    try:
        try:
            os.write(fd, content)
            os.fchmod(fd, 0o644 if public else 0o600)
        finally:
            os.close(fd)
        with contextlib.suppress(FileExistsError):
            os.link(temporary, name, src_dir_fd=folder, dst_dir_fd=folder, follow_symlinks=False)
    finally:
        os.unlink(temporary, dir_fd=folder)


def _open_file(folder: int, name: str) -> int:
    # Read-only is enough to flock; O_NONBLOCK: a FIFO does not stop us (and is refused by _check_file).
    return os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=folder)


def _check_file(fd: int, folder: int, path: Path) -> None:
    info, owner = os.fstat(fd), os.fstat(folder).st_uid
    if not stat.S_ISREG(info.st_mode) or info.st_uid != owner or info.st_mode & 0o022:
        raise AdmissionRefused(f"{path} is not a file the folder's owner (uid {owner}) made for vjobs alone to "
                               "write: remove the folder while no job runs; its owner's next job makes it again",
                               code="admission_folder_unusable")


def _release_all(fds: list[int]) -> None:
    for fd in fds:
        locks.release(fd)
    fds.clear()


def _remove_if_unused(path: Path) -> bool:
    """Remove one of our allocation folders when no process holds any of its tokens: its tokens are held by
    gc itself while they are removed, so a job coming in meanwhile takes none of them (it makes new ones)."""
    try:
        folder = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return False
    held: list[int] = []
    try:
        if os.fstat(folder).st_uid != os.geteuid():
            return False
        names = os.listdir(folder)
        for name in filter(TOKEN_NAME.fullmatch, names):
            try:
                held.append(_open_file(folder, name))
            except FileNotFoundError:
                continue
            if not locks.try_lock(held[-1]):
                return False  # a job of the allocation runs
        for name in names:
            with contextlib.suppress(FileNotFoundError, IsADirectoryError, PermissionError):
                os.unlink(name, dir_fd=folder)
    except OSError:
        return False
    finally:
        _release_all(held)
        os.close(folder)
    try:
        os.rmdir(path)
    except OSError:  # a job of the allocation came in meanwhile: it stays
        return False
    return True


def _exists(path: Path) -> bool:
    try:
        os.lstat(path)
    except FileNotFoundError:
        return False
    return True


def _unusable(path: Path, exc: OSError) -> AdmissionRefused:
    return AdmissionRefused(f"cannot use the admission folder {path}: {exc.strerror or exc}",
                            code="admission_folder_unusable")


# --- messages ------------------------------------------------------------------------------------------------

def _refuse_if_never_fits(job_id: str, vcpus: int, memory_mib: int, scope: Scope, budget_vcpus: int,
                          budget_mib: int, setting: Callable[[str], str]) -> None:
    for field, asked, budget, unit in (("vcpus", vcpus, budget_vcpus, "vCPUs"),
                                       ("memory_mib", memory_mib, budget_mib, "MiB")):
        if asked > budget:
            raise AdmissionRefused(
                f"job {job_id}: /resources/{field} = {asked} is more than {scope.named} of {budget} {unit} "
                f"({setting(field)}): it could never start here; ask for less",
                code="exceeds_host_budget")


@dataclass
class _Holder:
    pid: int
    account: str
    tokens: dict[str, int]


def _holders(busy: dict[str, list[tuple[int, int, int]]], proc_locks: Path = Path("/proc/locks")) -> list[_Holder]:
    """Who holds the ``busy`` tokens, from the kernel's list of locks (the processes this one can see)."""
    kinds = {key: kind for kind, keys in busy.items() for key in keys}
    found: dict[int, _Holder] = {}
    try:
        lines = proc_locks.read_text().splitlines()
    except OSError:
        return []
    for line in lines:
        # "12: FLOCK  ADVISORY  WRITE 4321 fd:01:131090 0 EOF"; a waiter's line has "->" after the number
        fields = line.split()
        if len(fields) < 6 or fields[1] != "FLOCK":
            continue
        try:
            major, minor, inode = fields[5].split(":")
            key, pid = (int(major, 16), int(minor, 16), int(inode)), int(fields[4])
        except ValueError:
            continue
        if key in kinds and pid > 0:
            holder = found.setdefault(pid, _Holder(pid, _account_of(pid), {VCPU: 0, MEMORY: 0}))
            holder.tokens[kinds[key]] += 1
    return sorted(found.values(), key=lambda holder: holder.pid)


def _account_of(pid: int) -> str:
    try:
        uid = os.stat(f"/proc/{pid}").st_uid
    except OSError:
        return "?"
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return f"uid {uid}"


def _amount(vcpus: int, memory_mib: int) -> str:
    return f"{vcpus} vCPU{'s' if vcpus != 1 else ''} and {memory_mib} MiB"


def _holding(busy: dict[str, list], holders: list[_Holder], budget: _Budget) -> str:
    if len(holders) == 1:
        jobs = "1 job holds"
    elif holders or not any(busy.values()):
        jobs = f"{len(holders) or 'no'} jobs hold"
    else:
        jobs = "jobs not visible from here hold"
    held_mib = min(len(busy[MEMORY]) * budget.unit_mib, budget.memory_mib)
    return (f"{jobs} {len(busy[VCPU])} of {budget.usable[VCPU]} vCPUs and {held_mib} of {budget.memory_mib} MiB")


def _listing(holders: list[_Holder], unit_mib: int, most: int = 5) -> str:
    names = [f"pid {holder.pid} of {holder.account}: {_amount(holder.tokens[VCPU], holder.tokens[MEMORY] * unit_mib)}"
             for holder in holders[:most]]
    return "; ".join(names + ([f"{len(holders) - most} more"] if len(holders) > most else [])) or "none"
