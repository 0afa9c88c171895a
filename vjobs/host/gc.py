"""``vjobs gc``: remove what a killed vjobs left behind (VMs, job folders, unused allocation budgets), and only that.

A thing is vjobs' when it carries vjobs' owner labels (vjobs/host/identity.py), and abandoned when the process named
there cannot be running: another host boot, or a pid that is gone. An admission share needs no collecting (its
tokens come back when its holder ends); a batch allocation's budget folder goes when no process holds any of its
tokens (vjobs/host/admission.py). Anything else is left alone.

Files without owner labels are judged by their locks and names (vjobs/host/cache.py): a partial build whose
build lock nobody holds, a lock file nobody holds whose image is gone, a temporary file or folder named with
a PID that is gone (or older than an hour). Sockets live only in job folders and go with them. Last, the
cache is evicted down to ``cache_max_gib``, once the VMs of dead owners are gone.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
import threading
from pathlib import Path

from vjobs.config.site import SiteConfig
from vjobs.drivers.contract import HostContext
from vjobs.drivers.registry import installed_drivers, load_driver
from vjobs.errors import VjobsError
from vjobs.host import cache
from vjobs.host.admission import gc_stale_shares
from vjobs.host.identity import abandoned_folder, owner_is_gone

DRIVER_GC_S = 60.0  # the most one driver's gc may take (it talks to libvirtd, XAPI): others must still run


def collect_garbage(site: SiteConfig, host: HostContext) -> list[str]:
    removed = collect_files(site)
    try:
        removed += gc_stale_shares(site)
    except (VjobsError, OSError) as exc:  # an unusable admission folder must not stop the rest
        removed.append(f"admission: skipped ({exc})")
    for installed in installed_drivers():
        if installed.load_error:
            continue
        removed += [f"{installed.name}: {line}" for line in _driver_garbage(installed.name, site, host)]
    return removed + cache.evict(site.cache_dir, cache.max_bytes(site.cache_max_gib))


def _driver_garbage(name: str, site: SiteConfig, host: HostContext) -> list[str]:
    """One driver's garbage, within ``DRIVER_GC_S``. One driver's trouble (its daemon down, or hung: the kill
    campaign saw a deadlocked libvirtd hold `vjobs gc` for good) must not stop the others: gc moves on and the
    stuck call is left to finish, or not, on a thread of its own."""
    outcome: list[str] = []

    def collect() -> None:
        try:
            driver = load_driver(name, site, host)
            outcome.extend(driver.collect_garbage(owner_is_gone))
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
    """What dead vjobs processes left in ``work_dir``, the cache and the system's temporary folder."""
    return _job_folders(site) + cache.leftovers(site.cache_dir) + _temp_folders(Path(tempfile.gettempdir()))


def _temp_folders(folder: Path) -> list[str]:
    """``vjobs-inspect-PID-*`` (vjobs/images/rootfs/inspect.py) of gone processes, if they are ours."""
    removed = []
    for path in sorted(folder.glob("vjobs-inspect-*")):
        match = re.fullmatch(r"vjobs-inspect-(\d+)-.+", path.name)
        try:
            ours = path.lstat().st_uid == os.geteuid()
        except OSError:
            continue
        if match and ours and cache.stale_temp(path, int(match[1])):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(f"removed the temporary folder {path} (its process is gone)")
    return removed


def _job_folders(site: SiteConfig) -> list[str]:
    removed = []
    if not site.work_dir.is_dir():
        return removed
    for folder in sorted(site.work_dir.iterdir()):
        if folder.is_dir() and not folder.is_symlink() and abandoned_folder(folder):
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(f"removed job folder {folder} (its VM's files and sockets)")
    return removed
