"""Host admission: the VMs of all the vjobs on one host never get more vCPUs or memory together than the
site's budget (``[host] vcpus`` and ``memory_mib``; by default what the machine has). A job waits for its
share, up to ``[host] admission_wait_s``, and is then refused (``admission_timeout``); a job that could never
fit is refused at once (``exceeds_host_budget``).

There is no daemon and no lock that can go stale. Each admitted job holds an exclusive ``flock`` on a share
file of its own, ``<work_dir>/admission/<pid>-<random>.json`` (its vCPUs, memory, pid and job id), for as
long as it runs; the kernel drops that lock when the process ends, however it ends, SIGKILL included
(vjobs/host/locks.py). To
admit a job, vjobs takes the lock on ``<work_dir>/admission/.lock``, counts the share files whose lock is
still held (one whose lock it can take belongs to a process that is gone, and is removed), and creates and
locks the job's own share file when the job fits. Only then does it let go of ``.lock``, so that the next
count sees it.

Jobs share a budget when they share ``work_dir``, which must be on a local file system. There is no queue:
waiting jobs look again every ``POLL_S`` seconds, and the first to look once there is room gets in. The share
file's descriptor is close-on-exec, so a child process (QEMU) does not keep the share after vjobs is gone.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import secrets
import stat
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from vjobs.config.site import HostBudget, SiteConfig
from vjobs.errors import AdmissionRefused
from vjobs.host import locks
from vjobs.result import utc_now

FOLDER = "admission"
LOCK_NAME = ".lock"
POLL_S = 0.25  # how often a waiting job counts again
LOCK_GRACE_S = 5.0  # the longest .lock may stay taken by others (counting takes milliseconds)
REPORT_EVERY_S = 10.0
SHARE_MAX_BYTES = 4096


@dataclass(frozen=True)
class Share:
    """One admitted job's part of the host, as its share file records it."""

    job_id: str
    pid: int
    vcpus: int
    memory_mib: int
    path: Path


@dataclass(frozen=True)
class Scope:
    """Whose budget a job takes its share of: the host's (``[host]``), or a batch job's allocation, whose
    vjobs share it among themselves and nobody else (the batch system shares the host; vjobs/host/allocation.py)."""

    budget: HostBudget
    folder: Path
    named: str  # for messages: whose budget
    setting: str  # for messages: where a figure of it comes from ({field}: vcpus or memory_mib)

    @classmethod
    def host(cls, site: SiteConfig) -> "Scope":
        return cls(site.host, site.work_dir / FOLDER, "this host's budget",
                   f"[host] {{field}} in {site.source}; unset, what the machine has")


@contextlib.contextmanager
def admitted(job_id: str, vcpus: int, memory_mib: int, site: SiteConfig,
             progress: Callable[[str], None] = lambda message: None, *,
             scope: Scope | None = None) -> Iterator[Share]:
    """Hold a share of the host's budget for a VM of ``vcpus`` and ``memory_mib`` while the block runs,
    waiting for it (a ``progress`` message about every 10 s) while other jobs hold the rest.

    Raises ``AdmissionRefused``: "exceeds_host_budget" at once when the VM alone is bigger than the budget,
    "admission_timeout" when no room came within ``[host] admission_wait_s``, "admission_folder_unusable"
    when ``<work_dir>/admission`` cannot be used safely."""
    scope = scope or Scope.host(site)
    _refuse_if_never_fits(job_id, vcpus, memory_mib, scope)
    path = scope.folder
    folder = _open_folder(path, create=True)
    claim = _Claim(folder, path)
    try:
        try:
            _wait_for_room(claim, job_id, vcpus, memory_mib, scope, progress)
        except OSError as exc:
            raise _unusable(path, exc) from exc
        yield claim.share
    finally:
        claim.release()
        os.close(folder)


def gc_stale_shares(site: SiteConfig) -> list[str]:
    """Remove the share files of processes that are gone (every admission does so too, as it counts), and
    the folders of batch allocations (``admission.<scope>``) that no live job uses any more; one line for
    each thing removed."""
    removed = _gc_folder(site.work_dir / FOLDER)
    for folder in sorted(site.work_dir.glob(f"{FOLDER}.*")) if site.work_dir.is_dir() else ():
        removed += _gc_folder(folder)
        leftovers = {entry.name for entry in folder.iterdir()} if folder.is_dir() else {LOCK_NAME}
        if leftovers <= {LOCK_NAME} and _unlocked(folder / LOCK_NAME):
            (folder / LOCK_NAME).unlink(missing_ok=True)
            with contextlib.suppress(OSError):  # a job of the allocation came in meanwhile: it stays
                folder.rmdir()
                removed.append(f"removed the admission folder {folder} (no job of its allocation is left)")
    return removed


def _gc_folder(path: Path) -> list[str]:
    folder = _open_folder(path, create=False)
    if folder is None:
        return []
    try:
        lock = os.open(LOCK_NAME, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=folder)
        try:
            if not locks.lock(lock, until=time.monotonic() + LOCK_GRACE_S):
                return [f"skipped {path}: another process held {LOCK_NAME} for {LOCK_GRACE_S:g} s"]
            return _count(folder, path)[1]
        finally:
            locks.release(lock)
    finally:
        os.close(folder)


def _unlocked(lock_file: Path) -> bool:
    try:
        fd = os.open(lock_file, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        return True
    except OSError:
        return False
    try:
        return locks.try_lock(fd)
    except OSError:
        return False
    finally:
        locks.release(fd)


class _Claim:
    """The job's own share file: created, locked and written under ``.lock``; released by unlinking it and
    closing it (which drops its lock)."""

    def __init__(self, folder: int, path: Path):
        self.folder, self.path = folder, path
        self.fd: int | None = None
        self.share: Share | None = None

    def take(self, job_id: str, vcpus: int, memory_mib: int) -> None:
        name = f"{os.getpid()}-{secrets.token_hex(8)}.json"
        self.share = Share(job_id=job_id, pid=os.getpid(), vcpus=vcpus, memory_mib=memory_mib,
                           path=self.path / name)
        self.fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600,
                          dir_fd=self.folder)
        locks.lock(self.fd)  # a new file: nobody else can hold it, so this never waits
        record = {"job_id": job_id, "pid": os.getpid(), "vcpus": vcpus, "memory_mib": memory_mib,
                  "since": utc_now()}
        os.write(self.fd, json.dumps(record).encode())

    def release(self) -> None:
        if self.fd is None:
            return
        with contextlib.suppress(OSError):  # a file left behind without its lock is removed at the next count
            os.unlink(self.share.path.name, dir_fd=self.folder)
        locks.release(self.fd)
        self.fd = None


def _wait_for_room(claim: _Claim, job_id: str, vcpus: int, memory_mib: int, scope: Scope,
                   progress: Callable[[str], None]) -> None:
    budget = scope.budget
    started = time.monotonic()
    deadline = started + budget.admission_wait_s
    next_report = started  # the first message as soon as the job has to wait
    lock = os.open(LOCK_NAME, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=claim.folder)
    try:
        while True:
            if not locks.lock(lock, until=max(deadline, time.monotonic() + LOCK_GRACE_S)):
                raise AdmissionRefused(
                    f"job {job_id}: another process kept {claim.path / LOCK_NAME} locked for "
                    f"{time.monotonic() - started:.0f} s (a vjobs stopped while counting?); run it later",
                    code="admission_timeout")
            try:
                held = _count(claim.folder, claim.path)[0]
                if (sum(share.vcpus for share in held) + vcpus <= budget.vcpus
                        and sum(share.memory_mib for share in held) + memory_mib <= budget.memory_mib):
                    claim.take(job_id, vcpus, memory_mib)
                    return
            finally:
                locks.unlock(lock)
            now = time.monotonic()
            if now >= deadline:
                raise AdmissionRefused(
                    f"job {job_id}: no room in {scope.named} for {_amount(vcpus, memory_mib)} within "
                    f"{budget.admission_wait_s:g} s ({scope.setting.format(field='admission_wait_s')}): "
                    f"{_holding(held, budget)} ({_listing(held)}); run it later or on another host",
                    code="admission_timeout")
            if now >= next_report:
                progress(f"job {job_id}: waiting for {_amount(vcpus, memory_mib)}: {_holding(held, budget)} "
                         f"(waited {now - started:.0f} s of at most {budget.admission_wait_s:g} s)")
                next_report = now + REPORT_EVERY_S
            time.sleep(min(POLL_S, deadline - now))
    finally:
        locks.release(lock)


def _count(folder: int, path: Path) -> tuple[list[Share], list[str]]:
    """Under ``.lock``: the shares whose holder still runs, and a line for each share of a process that is
    gone (its file removed)."""
    live, removed = [], []
    for name in sorted(os.listdir(folder)):
        if name.startswith(".") or not name.endswith(".json"):
            continue
        try:
            fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=folder)
        except OSError:
            continue  # released meanwhile, or nothing of ours
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                continue
            share = _read_share(fd, path / name)
            if not locks.try_lock(fd):  # its holder runs
                if share is not None:
                    live.append(share)
                continue
            with contextlib.suppress(FileNotFoundError):  # or its holder released it just now
                os.unlink(name, dir_fd=folder)
            what = f"job {share.job_id}, pid {share.pid}" if share else "unreadable"
            removed.append(f"removed the admission share {path / name} ({what}): its process is gone")
        finally:
            locks.release(fd)
    return live, removed


def _read_share(fd: int, path: Path) -> Share | None:
    try:
        record = json.loads(os.read(fd, SHARE_MAX_BYTES))
        return Share(job_id=str(record["job_id"]), pid=int(record["pid"]), vcpus=int(record["vcpus"]),
                     memory_mib=int(record["memory_mib"]), path=path)
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _open_folder(path: Path, *, create: bool) -> int | None:
    """The admission folder, opened without following a link, refused unless it is ours alone to write."""
    try:
        if create:
            path.parent.mkdir(parents=True, exist_ok=True)
            with contextlib.suppress(FileExistsError):
                os.mkdir(path, 0o700)
        folder = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        if create:
            raise AdmissionRefused(f"the admission folder {path} vanished as it was created",
                                   code="admission_folder_unusable") from None
        return None
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENOTDIR):
            raise AdmissionRefused(f"the admission folder {path} is a symbolic link or not a folder: vjobs does "
                                   "not follow it; remove it", code="admission_folder_unusable") from exc
        raise _unusable(path, exc) from exc
    info = os.fstat(folder)
    if info.st_uid != os.geteuid() or info.st_mode & 0o022:
        os.close(folder)
        raise AdmissionRefused(f"the admission folder {path} belongs to uid {info.st_uid} (mode "
                               f"{stat.S_IMODE(info.st_mode):o}), and only uid {os.geteuid()} may write there; "
                               "remove it, or give this vjobs a work_dir of its own",
                               code="admission_folder_unusable")
    return folder


def _unusable(path: Path, exc: OSError) -> AdmissionRefused:
    return AdmissionRefused(f"cannot use the admission folder {path}: {exc.strerror or exc}",
                            code="admission_folder_unusable")


def _refuse_if_never_fits(job_id: str, vcpus: int, memory_mib: int, scope: Scope) -> None:
    for field, asked, budget, unit in (("vcpus", vcpus, scope.budget.vcpus, "vCPUs"),
                                       ("memory_mib", memory_mib, scope.budget.memory_mib, "MiB")):
        if asked > budget:
            raise AdmissionRefused(
                f"job {job_id}: /resources/{field} = {asked} is more than {scope.named} of {budget} {unit} "
                f"({scope.setting.format(field=field)}): it could never start here; ask for less",
                code="exceeds_host_budget")


def _amount(vcpus: int, memory_mib: int) -> str:
    return f"{vcpus} vCPU{'s' if vcpus != 1 else ''} and {memory_mib} MiB"


def _holding(held: list[Share], budget: HostBudget) -> str:
    jobs = f"{len(held)} job holds" if len(held) == 1 else f"{len(held) or 'no'} jobs hold"
    return (f"{jobs} {sum(share.vcpus for share in held)} of {budget.vcpus} vCPUs and "
            f"{sum(share.memory_mib for share in held)} of {budget.memory_mib} MiB")


def _listing(held: list[Share], most: int = 5) -> str:
    names = [f"{share.job_id}: {_amount(share.vcpus, share.memory_mib)}, pid {share.pid}" for share in held[:most]]
    return "; ".join(names + ([f"{len(held) - most} more"] if len(held) > most else [])) or "none"
