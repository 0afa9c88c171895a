"""The cache's bound: what vjobs builds into ``cache_dir`` is evicted least recently used first, down to the
site's ``cache_max_gib``, and never while a job uses it.

What ``cache_dir`` holds; an *entry* is one image file or one built folder, evicted whole:

==========================================  ==========================================================  ========
path                                        what                                                        entry?
==========================================  ==========================================================  ========
releases/KEY.squashfs, releases/KEY.erofs   a release or read-only bind image (vjobs/guest/disks.py); its     yes
                                            sidecar KEY.json and build lock KEY.lock go with it
images/default-KEY/, images/debian12-KEY/   the built-in boot image and Debian 12 base                  yes
                                            (store.build_once; build lock images/FAMILY.lock)
rootfs/SHA.raw                              a raw copy of a base image for a driver that attaches raw    yes
                                            only (vjobs/images/rootfs/; build lock rootfs/SHA.lock)
templates/FAMILY-KEY/                       a pre-booted guest, saved (drivers/qemu_user/template.py;   yes
                                            build lock templates/FAMILY.lock)
templates/FAMILY.failed                     its last template failure: jobs boot cold for an hour       no
templates/FAMILY_sN.inuse                   a kvm template slot's lock, held by the job that runs it    no
                                            (drivers/kvm/template.py; its entry is FAMILY_sN-KEY/)
rootfs/SHA.vN.json, checksums.json          a base image's inspection record; sha256 sums by inode      no
rootfs/refused.json                         the inspections that refused a file, by its stamp           no
probes/*.json                               deep-probe verdicts (vjobs/drivers/bootcheck.py) and remembered     no
                                            answers of programs (vjobs/drivers/probecache.py)
xen/shared-KEY.lock                         the xen driver's upload locks                               no
xen/template-NAME.lock, xen/FAMILY.failed   the xen driver's template locks and last template failure   no
                                            (its templates are VDIs in the pool: drivers/xen/template.py)
releases/KEY.PID.partial,                   a build in progress: not counted, never evicted; ``vjobs    no
rootfs/SHA.PID.partial, images/.build-*/,   gc`` removes one whose build lock nobody holds
templates/.build-*/
checksums.PID.tmp, rootfs/*.PID.tmp,        a record being written; ``vjobs gc`` removes one whose      no
templates/*.PID.tmp                         process is gone
evict.lock                                  one eviction at a time                                      no
pilot3/                                     the test suite's PanDA Pilot 3 sdist: not vjobs' own        no
==========================================  ==========================================================  ========

The metadata (records, sums, verdicts) is a few KiB per image: not worth evicting, and losing a record costs
a full hash or inspection on the next job.

A ``CacheHold`` is one job's hold on the cache, handed down explicitly to everything that hands out or adds
an entry for the job: ``vjobs.run`` makes one per job, the container owns it and releases it after the job's
teardown (vjobs/container/lifecycle.py), and the drivers get the same one as ``HostContext.cache_hold``
(vjobs/drivers/contract.py). What uses the cache outside a job makes its own and says how long it keeps it:
``vjobs image build`` and ``vjobs probe`` until they end, the test suite's session fixtures for the session.

- Trusted: ``hold.use(entry)``, at every place that hands a cached entry out, first checks that nobody but
  this process's uid or root could have written it (``trusted``; vjobs/host/roles.py says why): an entry
  that fails is treated as missing. Every entry vjobs builds is ``seal``ed: nobody else may write it.
- Used: ``hold.use(entry)`` then sets the entry's mtime to now (no hashing), when the entry is this
  process's own (an account reads root's entries and never touches them); eviction goes by that mtime,
  oldest first.
- Held: ``hold.use`` also takes a shared ``flock`` on the entry (opened read-only, so an account holds root's
  entries too), kept until the hold is released: for a job, until the job ends. Eviction takes ``LOCK_EX |
  LOCK_NB`` on the entry and on its build lock and skips what it cannot lock: an entry in use by a live job,
  or being built or checked, stays. A lock dies with its process, so a job killed with SIGKILL holds nothing.
- Evicted: after an entry is added (``hold.added``), down to the hold's bound (the site's ``cache_max_gib``;
  a hold made without one evicts nothing), and by ``vjobs gc`` (``evict``). An entry larger than the bound
  alone still serves the job that built it.

The locks are vjobs/host/locks.py's, which check after locking that the path still names the file they
locked: so gc and eviction may unlink a lock file while holding it.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import shutil
import stat
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from vjobs.host import locks
from vjobs.host.identity import boot_id, pid_alive

GIB = 1 << 30
DEFAULT_MAX_GIB = 20.0
TEMP_GRACE_S = 60  # a PID-named temporary file is written and renamed in milliseconds
TEMP_MAX_AGE_S = 3600  # older than this, a PID-named temporary file is garbage even if the PID is alive


@dataclass(frozen=True)
class Kind:
    label: str
    folder: str
    stem: str  # a regex: the part of the names that names the build lock, STEM.lock
    entry: str  # an entry's name (a regex, STEM standing for ``stem``)
    partial: str  # a build in progress, guarded by the same build lock
    own_lock: bool  # the build lock is this entry's alone (not a family's): removed with the entry
    companions: tuple[str, ...] = ()  # STEM + suffix: files that go with the entry (sidecars)

    def stem_of(self, pattern: str, name: str) -> str | None:
        found = re.fullmatch(pattern.replace("STEM", f"(?P<stem>{self.stem})"), name)
        return found["stem"] if found else None

    def companion_stem(self, name: str) -> str | None:
        return next(filter(None, (self.stem_of("STEM" + re.escape(suffix), name) for suffix in self.companions)),
                    None)


KINDS = (
    Kind("release image", "releases", r"[0-9a-f]{32}", r"STEM\.(squashfs|erofs)", r"STEM\.\d+\.partial",
         own_lock=True, companions=(".json",)),
    Kind("built-in image", "images", r"[a-z0-9]+", r"STEM-[0-9a-f]{16}", r"\.build-STEM-.+", own_lock=False),
    Kind("raw copy of a base image", "rootfs", r"[0-9a-f]{64}", r"STEM\.raw", r"STEM\.\d+\.partial", own_lock=True),
    Kind("VM template", "templates", r"[a-z0-9_]+", r"STEM-[0-9a-f]{16}", r"\.build-STEM-.+", own_lock=False),
)
PID_TEMP = re.compile(r".+\.(?P<pid>\d+)\.tmp")


@dataclass(frozen=True)
class Entry:
    kind: Kind
    path: Path
    size: int  # bytes allocated on disk
    used: float  # mtime: the last ``use``

    @property
    def lock(self) -> Path:
        return self.path.parent / f"{self.kind.stem_of(self.kind.entry, self.path.name)}.lock"


def max_bytes(max_gib: float | None) -> int | None:
    return None if max_gib is None or not math.isfinite(max_gib) else int(max_gib * GIB)


# --- holding entries -----------------------------------------------------------------------------------

class CacheHold:
    """The entries one job uses, each under a shared flock from its first ``use`` until ``release`` (the end
    of the job), so that no eviction removes them under its VM; and the site's bound, which adding an entry
    evicts down to. ``with CacheHold(max_gib) as hold:`` releases it at the end of the block."""

    def __init__(self, max_gib: float | None = None):
        self.max_bytes = max_bytes(max_gib)
        self._held: dict[Path, int] = {}

    def __enter__(self) -> CacheHold:
        return self

    def __exit__(self, *_exc) -> None:
        self.release()

    def use(self, entry: Path) -> bool:
        """Mark ``entry`` used now and hold it; False when it is not there (evicted since the caller looked)
        or not ``trusted`` (someone else could have written it): build it again, where this process builds."""
        entry = Path(entry)
        if not trusted(entry):
            return False
        fd = self._held.pop(entry, None)
        if fd is not None and locks.names(entry, fd):
            self._held[entry] = fd
        else:
            locks.release(fd)  # the path names another file now (rebuilt): hold that one
            try:
                fd = locks.hold_shared(entry)  # waits only while an eviction removes it
            except PermissionError:
                return entry.exists()  # not ours to lock, nor to evict
            if fd is None:
                return False
            self._held[entry] = fd
        with contextlib.suppress(OSError):
            if os.stat(entry).st_uid == os.geteuid():  # the administrator's entries are read-only to an account
                os.utime(entry)
        return True

    def added(self, entry: Path, progress: Callable[[str], None] = lambda message: None) -> list[str]:
        """After ``entry`` was built (and used): evict down to this hold's bound, if it has one."""
        lines = [] if self.max_bytes is None else evict(Path(entry).parent.parent, self.max_bytes)
        for line in lines:
            progress(line)
        return lines

    def release(self) -> None:
        for fd in self._held.values():
            locks.release(fd)
        self._held.clear()


# --- whose entries are used, and how they are left ------------------------------------------------------

def trusted(entry: Path) -> bool:
    """Whether this process may use ``entry`` (``CACHE/KIND/NAME``): the entry, its folder, the cache above them
    and, for a folder entry, what it holds are owned by this process's uid or by root and writable by nobody
    else, so that no other account could have written any of it (vjobs/host/roles.py). A link is never an
    entry; the cache folder itself may be one (``/var/cache/vjobs -> /srv/vjobs``): its target is checked."""
    me = os.geteuid()

    def sound(info: os.stat_result) -> bool:
        return info.st_uid in (me, 0) and not info.st_mode & 0o022 and not stat.S_ISLNK(info.st_mode)

    try:
        if not sound(os.stat(entry.parent.parent)) or not sound(os.lstat(entry.parent)):
            return False
        info = os.lstat(entry)
        if not sound(info):
            return False
        return not stat.S_ISDIR(info.st_mode) or all(sound(os.lstat(inside)) for inside in entry.iterdir())
    except OSError:
        return False


def seal(entry: Path) -> None:
    """Take away group and other write permission from a new entry and what it holds, whatever the umask it
    was written under: ``trusted`` refuses an entry others may write."""
    for folder, _dirs, files in os.walk(entry):
        for path in (folder, *(os.path.join(folder, name) for name in files)):
            mode = stat.S_IMODE(os.lstat(path).st_mode)
            if mode & 0o022 and not os.path.islink(path):
                os.chmod(path, mode & ~0o022)
    if not os.path.isdir(entry):
        os.chmod(entry, stat.S_IMODE(os.stat(entry).st_mode) & ~0o022)


# --- eviction ------------------------------------------------------------------------------------------

def entries(cache_dir: Path) -> list[Entry]:
    found = []
    for kind in KINDS:
        with contextlib.suppress(OSError):
            for path in (Path(cache_dir) / kind.folder).iterdir():
                if kind.stem_of(kind.entry, path.name) and not path.is_symlink():
                    with contextlib.suppress(OSError):
                        found.append(Entry(kind, path, _allocated(path), path.stat().st_mtime))
    return found


def evict(cache_dir: Path, limit: int) -> list[str]:
    """Remove least recently used entries until they take ``limit`` bytes or less; skip those in use or
    being built. One eviction at a time, so that each sees what the one before left."""
    cache_dir = Path(cache_dir)
    if not cache_dir.is_dir():
        return []
    lines = []
    with locks.exclusive(cache_dir / "evict.lock"):
        found = sorted(entries(cache_dir), key=lambda entry: (entry.used, str(entry.path)))
        total = sum(entry.size for entry in found)
        for entry in found:
            if total <= limit:
                break
            if _remove(entry):
                total -= entry.size
                lines.append(f"evicted {entry.kind.label} {entry.path} ({entry.size / (1 << 20):.1f} MiB, last "
                             f"used {time.strftime('%Y-%m-%d %H:%M', time.localtime(entry.used))})")
        if total > limit:
            lines.append(f"the cache {cache_dir} holds {total / GIB:.2f} GiB, above cache_max_gib "
                         f"({limit / GIB:g}): the rest is in use by running jobs or being built")
    return lines


def _remove(entry: Entry) -> bool:
    with locks.try_exclusive(entry.lock) as free:
        if not free or not remove_unused(entry.path):
            return False  # being built or checked, or in use by a job
        for suffix in entry.kind.companions:
            (entry.path.parent / f"{entry.lock.stem}{suffix}").unlink(missing_ok=True)
        if entry.kind.own_lock:
            entry.lock.unlink(missing_ok=True)
        return True


def remove_unused(entry: Path) -> bool:
    """Remove ``entry`` unless a job holds it; for a builder that holds the entry's build lock itself."""
    try:
        with locks.try_exclusive(entry, create=False) as free:
            return free and _delete(entry)
    except OSError:
        return False


# --- what dead builds and writers left (`vjobs gc`) -----------------------------------------------------

def leftovers(cache_dir: Path) -> list[str]:
    """Remove from the cache what nobody alive is using: partial builds whose build lock nobody holds, their
    lock files and sidecars once the entry is gone, PID-named temporary files of gone processes, and probe
    verdicts of an earlier host boot."""
    cache_dir = Path(cache_dir)
    lines: list[str] = []
    for kind in KINDS:
        folder = cache_dir / kind.folder
        try:
            names = sorted(path.name for path in folder.iterdir())
        except OSError:
            continue
        stems = {stem for name in names if (stem := kind.stem_of(kind.entry, name))}
        for name in names:
            path = folder / name
            if stem := kind.stem_of(kind.partial, name):
                if _remove_unlocked(path, folder / f"{stem}.lock"):
                    lines.append(f"removed the partial build {path} (its builder is gone)")
            elif (stem := kind.companion_stem(name)) and stem not in stems:
                if _remove_unlocked(path, folder / f"{stem}.lock"):
                    lines.append(f"removed {path} (the {kind.label} it describes is gone)")
        for name in names:
            stem = name.removesuffix(".lock")
            if name != stem and kind.stem_of("STEM", stem) and stem not in stems and \
                    _remove_unlocked(folder / name, folder / name):
                lines.append(f"removed the lock file {folder / name} (unheld; no {kind.label} uses it)")
    for folder in (cache_dir, cache_dir / "rootfs", cache_dir / "templates"):
        with contextlib.suppress(OSError):
            for path in sorted(folder.iterdir()):
                if (match := PID_TEMP.fullmatch(path.name)) and stale_temp(path, int(match["pid"])):
                    path.unlink(missing_ok=True)
                    lines.append(f"removed the temporary file {path} (its writer is gone)")
    return lines + _old_probe_verdicts(cache_dir / "probes")


def stale_temp(path: Path, pid: int) -> bool:
    """A temporary file or folder named with its writer's PID (0: none) is garbage when that process is gone
    and it is not brand new, or when it is older than any write takes (the PID may be another's by now)."""
    try:
        age = time.time() - path.lstat().st_mtime
    except OSError:
        return False
    return age > TEMP_MAX_AGE_S or (age > TEMP_GRACE_S and not (pid > 0 and pid_alive(pid)))


def _remove_unlocked(path: Path, lock: Path) -> bool:
    """Remove ``path`` if nobody holds ``lock`` (the same file when ``path`` is a lock file itself)."""
    with locks.try_exclusive(lock) as free:
        if not free:
            return False
        if path == lock:
            lock.unlink(missing_ok=True)  # while held: vjobs/host/locks.py says why that is safe
            return True
        return _delete(path)


def _old_probe_verdicts(folder: Path) -> list[str]:
    lines, this_boot = [], boot_id()
    with contextlib.suppress(OSError):
        for path in sorted(folder.glob("*.json")):
            try:
                stale = json.loads(path.read_text()).get("boot_id") != this_boot
            except (OSError, ValueError, AttributeError):  # unreadable, or being written just now
                stale = stale_temp(path, 0)
            if stale:
                path.unlink(missing_ok=True)
                lines.append(f"removed the probe verdict {path} (an earlier host boot's)")
    return lines


# --- files ---------------------------------------------------------------------------------------------

def _delete(path: Path) -> bool:
    try:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)
    except OSError:
        return False
    return True


def _allocated(path: Path) -> int:
    if not path.is_dir():
        return path.stat().st_blocks * 512
    total = 0
    for folder, _dirs, files in os.walk(path):
        for name in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(folder, name)).st_blocks * 512
    return total
