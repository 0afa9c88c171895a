"""``vjobs gc``: remove what a killed vjobs left behind (VMs, job folders), and only that.

A thing is vjobs' when it carries vjobs' owner labels (vjobs/host.py), and abandoned when the process named
there cannot be running: another host boot, or a pid that is gone. Anything else is left alone.
"""

from __future__ import annotations

import json
import shutil

from .driver import HostContext
from .host import owner_is_gone
from .plugins import installed_drivers, load_driver
from .site import SiteConfig


def collect_garbage(site: SiteConfig, host: HostContext) -> list[str]:
    removed = _job_folders(site)
    for installed in installed_drivers():
        if installed.load_error:
            continue
        driver = load_driver(installed.name, site, host)
        try:
            removed += [f"{installed.name}: {line}" for line in driver.collect_garbage(owner_is_gone)]
        except Exception as exc:  # one driver's trouble (its daemon is down) must not stop the others
            removed.append(f"{installed.name}: skipped ({type(exc).__name__}: {exc})")
    return removed


def _job_folders(site: SiteConfig) -> list[str]:
    removed = []
    if not site.work_dir.is_dir():
        return removed
    for folder in sorted(site.work_dir.iterdir()):
        try:
            labels = json.loads((folder / "owner.json").read_text())
        except (OSError, ValueError):
            continue  # not a job folder of ours, or one still being created
        if owner_is_gone(labels):
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(f"removed job folder {folder}")
    return removed
