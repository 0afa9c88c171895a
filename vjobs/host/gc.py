"""``vjobs gc``: remove what a killed vjobs left behind (VMs, job folders, unused allocation budgets), and only that.

A thing is vjobs' when it carries vjobs' owner labels (vjobs/host/identity.py), and abandoned when the process named
there cannot be running: another host boot, or a pid that is gone. An admission share needs no collecting (its
tokens come back when its holder ends); a batch allocation's budget folder goes when no process holds any of its
tokens (vjobs/host/admission.py). Anything else is left alone.

Whose: an account's gc removes only that account's leftovers: the job folders of its own work folder (which
must be its own: vjobs/host/folders.py), and the VMs whose labels name its uid. Root's removes any account's,
but only those of owners that are gone: besides its own work folder it looks in every account's, where the
site's ``work_dir`` puts them (``{uid}`` in it, and the default ``/var/tmp/vjobs-UID``), and enters a folder
there only when it belongs to the uid in its name, through descriptors, never through a link the account put
there. A live job of any account is never touched: its vjobs process is alive.

Checkpoint folders (vjobs/checkpoint/folder.py) an account used are named in its work folder: a partial
checkpoint whose writer is gone is removed, a complete one is counted and kept (its owner resumes or removes
it).

Files without owner labels are judged by their locks and names (vjobs/host/cache.py): a partial build whose
build lock nobody holds, a lock file nobody holds whose image is gone, a temporary file or folder named with
a PID that is gone (or older than an hour). Sockets live only in job folders and go with them. Last, the
cache is evicted down to ``cache_max_gib``, once the VMs of dead owners are gone.
"""

from __future__ import annotations

import glob
import os
import re
import shutil
import stat
import tempfile
import threading
from pathlib import Path

from vjobs.checkpoint.folder import garbage as checkpoint_garbage
from vjobs.config.site import STANDARD_WORK_DIR, UID, SiteConfig
from vjobs.drivers.contract import HostContext
from vjobs.drivers.registry import installed_drivers, load_driver
from vjobs.errors import VjobsError
from vjobs.host import cache
from vjobs.host.admission import gc_stale_shares
from vjobs.host.folders import not_own, writable_by_others
from vjobs.host.identity import abandoned_entry, collectable, pid_alive
from vjobs.host.roles import caches

# vjobs' folders in the system's temporary folder, named with their process's pid: an inspection's
# (vjobs/images/rootfs/inspect.py), a kvm console socket's when the VM's folder is too deep for one.
TEMP_FOLDER = re.compile(r"vjobs-(inspect|console)-(\d+)-.+")
DRIVER_GC_S = 60.0  # the most one driver's gc may take (it talks to libvirtd, XAPI): others must still run


def collect_garbage(site: SiteConfig, host: HostContext) -> list[str]:
    removed = collect_files(site)
    try:
        removed += gc_stale_shares(site) if _ours(site.work_dir) else []  # never in a folder another account made
    except (VjobsError, OSError) as exc:  # an unusable admission folder must not stop the rest
        removed.append(f"admission: skipped ({exc})")
    for installed in installed_drivers():
        if installed.load_error:
            continue
        removed += [f"{installed.name}: {line}" for line in _driver_garbage(installed.name, site, host)]
    return removed + cache.evict(host.cache_dir, cache.max_bytes(site.cache_max_gib))


def _driver_garbage(name: str, site: SiteConfig, host: HostContext) -> list[str]:
    """One driver's garbage, within ``DRIVER_GC_S``. One driver's trouble (its daemon down, or hung: the kill
    campaign saw a deadlocked libvirtd hold `vjobs gc` for good) must not stop the others: gc moves on and the
    stuck call is left to finish, or not, on a thread of its own."""
    outcome: list[str] = []

    def collect() -> None:
        try:
            driver = load_driver(name, site, host)
            outcome.extend(driver.collect_garbage(collectable))
        except Exception as exc:  # noqa: BLE001 -- reported, and the next driver's turn
            outcome.append(f"skipped ({type(exc).__name__}: {exc})")

    worker = threading.Thread(target=collect, name=f"gc-{name}", daemon=True)
    worker.start()
    worker.join(DRIVER_GC_S)
    if worker.is_alive():
        return [f"skipped: no answer within {DRIVER_GC_S:g} s (is its hypervisor daemon hung?); run gc again "
                "once it answers"]
    return outcome


def collect_files(site: SiteConfig) -> list[str]:
    """What dead vjobs processes left in ``work_dir``, the cache this process writes (an account's own, never
    the administrator's: vjobs/host/roles.py) and the system's temporary folder."""
    return (_job_folders(site) + cache.leftovers(caches(site).own) + _temp_folders(Path(tempfile.gettempdir()))
            + (checkpoint_garbage(site.work_dir) if _ours(site.work_dir) else []))


def _temp_folders(folder: Path) -> list[str]:
    """``TEMP_FOLDER``s of gone processes, if they are ours. A console socket's folder is there only while its
    process creates a domain: garbage as soon as that process is gone."""
    removed = []
    for path in sorted(folder.glob("vjobs-*")):
        match = TEMP_FOLDER.fullmatch(path.name)
        try:
            ours = path.lstat().st_uid == os.geteuid()
        except OSError:
            continue
        if match and ours and (cache.stale_temp(path, int(match[2])) if match[1] == "inspect" else
                               not pid_alive(int(match[2]))):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(f"removed the temporary folder {path} (its process is gone)")
    return removed


def _job_folders(site: SiteConfig) -> list[str]:
    """The abandoned job folders of this account's work folder; for root, of every account's too."""
    removed = _abandoned_in(site.work_dir, os.geteuid())
    if os.geteuid() == 0:
        for uid, folder in account_work_dirs(site):
            if folder != site.work_dir:
                removed += _abandoned_in(folder, uid)
    return removed


def _ours(folder: Path) -> bool:
    """A real folder of this account's alone (vjobs/host/folders.py): one to remove things from."""
    try:
        info = os.lstat(folder)
    except OSError:
        return False
    return stat.S_ISDIR(info.st_mode) and not_own(info) is None


def account_work_dirs(site: SiteConfig) -> list[tuple[int, Path]]:
    """(uid, folder) of each account's work folder that root's gc finds where the site puts them: none when
    the site names one folder for all (no ``{uid}`` in its work_dir)."""
    if site.work_dir_template is None:
        return []
    found = {}
    for template in (site.work_dir_template, STANDARD_WORK_DIR):
        before, _, after = template.partition(UID)
        for path in sorted(glob.glob(glob.escape(before) + "[0-9]*" + glob.escape(after))):
            uid = path[len(before):len(path) - len(after)]
            if uid.isdigit():
                found[Path(path)] = int(uid)
    return [(uid, path) for path, uid in found.items()]


def _abandoned_in(work_dir: Path, uid: int) -> list[str]:
    """Remove the folders of ``work_dir`` (the work folder of ``uid``) whose owners are gone. The folder is
    opened without following a link and must belong to ``uid`` alone; each entry is judged and removed
    relative to it, and only one that ``uid`` owns."""
    try:
        work_fd = os.open(work_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        return []
    except OSError as exc:
        return [f"left {work_dir} alone: {exc.strerror or exc} (vjobs does not follow a link there)"]
    try:
        info = os.fstat(work_fd)
        problem = not_own(info) if uid == os.geteuid() else _not_of(info, uid)
        if problem:
            return [f"left {work_dir} alone: it {problem}, so it is not a work folder of vjobs'"]
        removed = []
        for name in sorted(os.listdir(work_fd)):
            try:
                entry = os.stat(name, dir_fd=work_fd, follow_symlinks=False)
            except FileNotFoundError:
                continue
            if stat.S_ISDIR(entry.st_mode) and entry.st_uid == uid and abandoned_entry(work_fd, name):
                shutil.rmtree(name, dir_fd=work_fd, ignore_errors=True)
                removed.append(f"removed job folder {work_dir / name} (its VM's files and sockets)")
        return removed
    finally:
        os.close(work_fd)


def _not_of(info: os.stat_result, uid: int) -> str | None:
    """What makes a folder found in another account's place not that account's work folder, in words."""
    if info.st_uid != uid:
        return f"belongs to uid {info.st_uid}, not to uid {uid} whose name it bears"
    if writable_by_others(info):
        return f"may be written by others (mode {stat.S_IMODE(info.st_mode):04o})"
    return None
