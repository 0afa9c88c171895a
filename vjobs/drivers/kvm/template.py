"""kvm's pre-booted templates: a pool of saved libvirt domains, one running job per saved domain at a time.

What a template is, and what every driver's share, is in vjobs/drivers/templates.py. libvirt saves a domain
with ``virDomainSave`` and restores it with ``virDomainRestoreFlags`` and a new description; but libvirt 9.0
refuses a restore under another name or UUID (its ABI-stability check), and two running domains cannot share
either. So one saved domain serves one running job at a time: a *slot* is the template guest booted and saved
under its own domain name (``vjobs-tpl-UID-POOL-KEY-sN``), a cache entry of its own
(``templates/FAMILY_sN-KEY``, vjobs/host/cache.py), and a job holds the slot's lock
(``templates/FAMILY_sN.inuse``, vjobs/host/locks.py) for its VM's life. libvirt also refuses a restore with
more disks than were saved, so the job's disks are hot-plugged after the restore, onto the template's
virtio-scsi controller, while the guest is still paused.

When every slot is busy, the job makes the next one (one cold boot and a save, about 1.3 cold boots), up to
MAX_SLOTS: the pool grows to the node's peak of concurrent jobs once and every later job at that level starts
from a template; past MAX_SLOTS jobs boot cold (a slot costs ~75 MB of cache for each guest shape).

Whose templates: a slot lives in the account's own cache (``cache_dir/templates``), its saved state made by
the account as its own file, 0600 (kvm/saved_guest.py ``claim``), and its domain name carries the account's
uid and a hash of that cache folder. A job restores only slots of its own cache: never the administrator's
shared cache, and never another account's, whose guest memory it must not start from. (libvirtd reads the
file as root, so any member of its group could ask it to restore any path: that group is root's equal.)
Before each restore the state and stand-ins are checked against the sums taken when they were saved.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from vjobs.drivers.contract import CheckedFile, CheckedFiles, VMSpec
from vjobs.drivers.kvm.domain import DomainSettings
from vjobs.drivers.standins import INITRAMFS, KERNEL
from vjobs.drivers.templates import STATE, Recipe, install, saved_state, template_cmdline
from vjobs.errors import ImageError, VMError
from vjobs.guest.console import ConsoleLog
from vjobs.guest.protocol import TEMPLATE_READY_MARKER
from vjobs.host import locks
from vjobs.host.cache import CacheHold
from vjobs.images.store import build_once

FORMAT = 1  # of a slot's saved state and manifest; a change makes every slot anew
MAX_SLOTS = 16  # saved domains per guest shape and account: past this many concurrent jobs, cold boots
BUILD_DEADLINE_S = 60.0  # one cold boot of the template guest through libvirt (~4 s under TCG), on a loaded host


def recipe_for(spec: VMSpec, settings: DomainSettings, versions: dict[str, str]) -> Recipe:
    boot = spec.boot
    return Recipe(qemu=f"libvirt {versions['libvirt']}, QEMU {versions['qemu']}", machine=settings.machine,
                  accel=f"libvirt_{settings.virt_type}", tb_size_mib=settings.tb_cache_mib, firmware=None,
                  memory_mib=spec.memory_mib, vcpus=spec.vcpus, kernel_sha256=boot.kernel.sha256(),
                  initramfs_sha256=boot.initramfs.sha256(), cmdline=boot.cmdline, format=FORMAT)


def template_spec(spec: VMSpec, domain: str, scratch: Path) -> VMSpec:
    """The template guest's own spec: the job's shape under the slot's domain name, its template command line,
    no disks, its own console and folder."""
    return dataclasses.replace(spec, name=domain, disks=(), network=False, workdir=scratch,
                               boot=dataclasses.replace(spec.boot, cmdline=template_cmdline(spec)),
                               console=ConsoleLog(scratch / "console.log", markers=(TEMPLATE_READY_MARKER,)))


@dataclass
class Slot:
    """One saved domain, taken by one job: its files opened and checked, its lock held until ``release``."""

    name: str  # its cache entry's, FAMILY_sN-KEY
    domain: str  # the domain name it was saved under, and is restored under
    state: CheckedFile
    kernel: CheckedFile  # the stand-ins libvirt's QEMU gets as kernel and initramfs (vjobs/drivers/standins.py)
    initramfs: CheckedFile
    lock: int | None  # the descriptor that holds ``FAMILY_sN.inuse``

    def check_unchanged(self) -> None:
        for file in (self.state, self.kernel, self.initramfs):
            file.check_unchanged()

    def release(self) -> None:
        lock, self.lock = self.lock, None
        locks.release(lock)


class TemplatePool:
    """The slots in ``cache_dir/templates`` of this account's cache. ``hold``: the job's hold on the cache, which
    keeps the slot it uses; ``files``: the job's open files, among which the slot's are opened."""

    def __init__(self, cache_dir: Path, hold: CacheHold, files: CheckedFiles, progress=lambda message: None):
        self.folder = cache_dir / "templates"
        self.hold = hold
        self.files = files
        self.progress = progress
        self.pool_id = hashlib.sha256(os.fsencode(self.folder.resolve())).hexdigest()[:6]

    def domain_name(self, recipe: Recipe, number: int) -> str:
        return f"vjobs-tpl-{os.getuid()}-{self.pool_id}-{recipe.key[:8]}-s{number}"

    def take(self, recipe: Recipe, make: Callable[[Path, str], None]) -> Slot:
        """A free slot for ``recipe``, locked for the caller: a saved one if any is free, else a new one made with
        ``make(output, domain)`` (which boots the template guest under ``domain`` and saves it into the folder
        ``output``). Raises VMError when none can be had (all MAX_SLOTS busy, a failure within the memo's hour,
        a slot that cannot be made or is not what was saved)."""
        self.folder.mkdir(parents=True, exist_ok=True)
        failed_before = recipe.memo(self.folder).raise_if_recent()
        fresh = failed_before == "restore"  # a pool whose restore failed is made anew, not trusted again
        for wanted_saved in (True, False):
            for number in range(MAX_SLOTS):
                entry = self._entry(recipe, number)
                if (saved_state(entry, recipe) is not None) != wanted_saved:
                    continue
                lock = self._try_lock(recipe, number)
                if lock is None:
                    continue
                try:
                    return self._ready(recipe, number, entry, lock, make, fresh)
                except BaseException:
                    locks.release(lock)
                    raise
        raise VMError(f"all {MAX_SLOTS} saved domains of this shape are in use", code="template_busy")

    def _ready(self, recipe: Recipe, number: int, entry: Path, lock: int, make, fresh: bool) -> Slot:
        domain = self.domain_name(recipe, number)

        def build(scratch: Path) -> Path:
            self.progress(f"template: booting a {recipe.family} guest once, to save it as {domain}")
            output = scratch / "template"
            output.mkdir()
            started = time.monotonic()
            make(output, domain)
            manifest = install(output, entry, recipe, self.folder, started, domain=domain)
            self.progress(f"template: {entry.name} saved in {manifest['made_s']} s "
                          f"({manifest['state_bytes'] >> 20} MiB)")
            return entry / STATE

        try:
            build_once(entry, "VM template", lambda: saved_state(entry, recipe), build, hold=self.hold, force=fresh)
        except VMError as error:
            recipe.memo(self.folder).remember(f"making it failed: {error}", stage="make")
            raise
        try:
            sums = json.loads((entry / "manifest.json").read_text())["sha256"]
            state, kernel, initramfs = (self.files.verified(entry / name, f"the template {entry.name}", sums[name])
                                        for name in (STATE, KERNEL, INITRAMFS))
        except (OSError, ValueError, KeyError, ImageError) as error:
            recipe.memo(self.folder).remember(f"its files are not what was saved: {error}")
            raise VMError(f"the template {entry.name} is damaged: {error}", code="template_failed") from error
        return Slot(entry.name, domain, state, kernel, initramfs, lock)

    def _entry(self, recipe: Recipe, number: int) -> Path:
        return self.folder / f"{recipe.family}_s{number}-{recipe.key}"

    def _try_lock(self, recipe: Recipe, number: int) -> int | None:
        """The slot's lock, held by the returned descriptor; None when another job holds it."""
        fd = os.open(self.folder / f"{recipe.family}_s{number}.inuse", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        if locks.try_lock(fd):
            return fd
        os.close(fd)
        return None
