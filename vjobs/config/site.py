"""Site config: a TOML file the worker node's admins write (schemas/site.schema.json). No file works too.

Found, first match wins: ``--site FILE``, ``$VJOBS_SITE``, ``/etc/vjobs/site.toml``.

``cache_dir`` names the same cache for every uid, by default the administrator's: ``$VJOBS_SYSTEM_CACHE`` (for
tests and trials), else ``/var/cache/vjobs``. Whether this process builds there or only reads it, and where an
account builds what is its own instead, is vjobs/host/roles.py's to say.
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from vjobs.config import schemas
from vjobs.config.job import Job
from vjobs.errors import InvalidSite, LimitExceeded
from vjobs.staging import StagingSettings

SYSTEM_SITE_FILE = Path("/etc/vjobs/site.toml")
#: The node's budget folder (vjobs/host/admission.py): made by root, one for every account on the node.
HOST_BUDGET_DIR = Path("/var/lib/vjobs/admission")
SYSTEM_CACHE_DIR = Path("/var/cache/vjobs")
SYSTEM_CACHE_ENV = "VJOBS_SYSTEM_CACHE"  # another system cache, for tests and trials: no site config needed
DEFAULT_PREFERENCE = ("xen", "kvm", "qemu_user")
UID = "{uid}"  # in work_dir: the account's uid, so that one site file gives each account a folder of its own
STANDARD_WORK_DIR = f"/var/tmp/vjobs-{UID}"


@dataclass(frozen=True)
class CatalogueImage:
    """An image the admins allow: their own boot image (kernel and initramfs speaking the vjobs agent
    protocol), a root file system booted by the built-in boot image, or both."""

    kernel: Path | None = None
    kernel_sha256: str | None = None
    initramfs: Path | None = None
    initramfs_sha256: str | None = None
    cmdline: str = "panic=-1 quiet loglevel=3"
    rootfs: Path | None = None
    rootfs_sha256: str | None = None


@dataclass(frozen=True)
class HostBudget:
    """What all the VMs of the vjobs on this host may have together, whichever account runs them (``[host]``;
    vjobs/host/admission.py): by default every CPU this process may run on and all of the machine's memory."""

    vcpus: int = field(default_factory=lambda: len(os.sched_getaffinity(0)))
    memory_mib: int = field(default_factory=lambda: _machine_memory_mib())
    admission_wait_s: float = 3600.0  # how long a job waits for its share before it is refused
    budget_dir: Path = HOST_BUDGET_DIR  # where the node's budget tokens are (root's folder)


@dataclass(frozen=True)
class InspectionLimits:
    """What checking one image file on the host may cost (``[inspection]``; vjobs/images/checked.py): a file
    larger than ``max_file_gib`` is refused before a byte of it is read; the ``qemu-img`` calls on one qcow2,
    to inspect it or to convert it to raw, take ``budget_s`` seconds together at most, each with at most
    ``memory_mib`` of address space."""

    budget_s: float = 120.0
    memory_mib: int = 2048
    max_file_gib: float = 64.0

    @property
    def max_file_bytes(self) -> int:
        return int(self.max_file_gib * (1 << 30))


@dataclass(frozen=True)
class SiteConfig:
    source: str = "built-in defaults"
    pinned_driver: str | None = None
    preference: tuple[str, ...] = DEFAULT_PREFERENCE
    cache_dir: Path = field(default_factory=lambda: system_cache_dir())  # the administrator's (host/roles.py)
    work_dir: Path = field(default_factory=lambda: work_dir_of(_default_work_dir_template(), os.getuid()))
    # Where every account's work_dir is, with {uid}: the default, or the site's when it names {uid}; None when
    # the site names one folder. Root's `vjobs gc` looks there for what dead vjobs of any account left.
    work_dir_template: str | None = field(default_factory=lambda: _default_work_dir_template())
    cache_max_gib: float = 20.0  # the cache's bound: least recently used images evicted (vjobs/host/cache.py)
    boot_timeout_s: float = 30.0
    boot_retries: int = 1
    allow_network: bool = False
    release_format: str = "squashfs"
    payload_user: str = "root"  # or "unprivileged": see docs/base-images.md
    console_max_mib: float = 8
    stop_grace_s: float = 10.0
    live_channel: bool = True  # a running payload is seen live (docs/sync.md); False: at the end only
    sync_interval_s: int = 60  # a running payload's files come back this often (vjobs/guest/sync.py); 0: off
    sync_on_stop_s: float = 2.0  # how long the last round may take when vjobs is stopped (a pilot kills in 3 s)
    # Checkpoints (vjobs/checkpoint/, ``vjobs run --checkpoint DIR``): every checkpoint_interval_s (0: only on a
    # signal), on SIGTERM and on checkpoint_signal (a batch system's warning); a save must end within
    # checkpoint_grace_s (Slurm's KillWait is 30 s) and may take checkpoint_max_gib at most.
    checkpoint_interval_s: int = 0
    checkpoint_signal: str = "SIGUSR1"
    checkpoint_grace_s: float = 25.0
    checkpoint_max_gib: float = 64.0
    host: HostBudget = field(default_factory=HostBudget)
    inspection: InspectionLimits = field(default_factory=InspectionLimits)
    staging: StagingSettings = field(default_factory=StagingSettings)
    limits: Mapping[str, float] = field(default_factory=dict)
    images: Mapping[str, CatalogueImage] = field(default_factory=dict)
    drivers: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)

    @property
    def bind_limit_bytes(self) -> int:
        """The largest host folder a job may bind; a bigger one is refused before it is read whole."""
        return int(self.limits.get("bind_mib", DEFAULT_BIND_MIB)) << 20

    @property
    def console_max_bytes(self) -> int:
        return int(self.console_max_mib * (1 << 20))

    @property
    def checkpoint_max_bytes(self) -> int:
        return int(self.checkpoint_max_gib * (1 << 30))

    def sync_interval_for(self, job: Job) -> int:
        """How often the job's files come back while it runs: the job's own setting, else the site's."""
        return self.sync_interval_s if job.sync_interval_s is None else job.sync_interval_s

    def driver_settings(self, name: str) -> Mapping[str, Any]:
        return self.drivers.get(name, {})

    def check_limits(self, job: Job) -> None:
        """Refuse a job that asks for more than the site allows, naming the field and the limit."""
        asked = {**vars(job.resources), "walltime_s": job.walltime_s}
        for name, limit in self.limits.items():
            if name in asked and asked[name] > limit:
                pointer = "/walltime_s" if name == "walltime_s" else f"/resources/{name}"
                raise LimitExceeded(f"job {job.id}: {pointer} = {asked[name]} is above this site's limit of "
                                    f"{limit} (limits.{name} in {self.source}); ask for less")
        if job.network and not self.allow_network:
            raise LimitExceeded(f"job {job.id}: /network: this site gives guests no network "
                                f"(allow_network in {self.source} is false)")


DEFAULT_BIND_MIB = 10240


def system_cache_dir() -> Path:
    """Where root builds the built-in images for every account when no site config names a ``cache_dir``."""
    return Path(os.environ.get(SYSTEM_CACHE_ENV) or SYSTEM_CACHE_DIR)


def _default_work_dir_template() -> str:
    """``$TMPDIR/vjobs-{uid}``, or ``/var/tmp/vjobs-{uid}`` when TMPDIR is unset or relative (a relative one
    would move the work folder with the current folder). Made private, and refused when another account made
    it first (vjobs/host/folders.py)."""
    tmpdir = os.environ.get("TMPDIR", "")
    return str(Path(tmpdir) / f"vjobs-{UID}") if os.path.isabs(tmpdir) else STANDARD_WORK_DIR


def work_dir_of(template: str, uid: int) -> Path:
    return Path(template.replace(UID, str(uid)))


def _machine_memory_mib() -> int:
    """MemTotal from /proc/meminfo, else the physical pages as sysconf counts them."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) // 1024
    except (OSError, ValueError, IndexError):
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") >> 20


def find_site_file(explicit: str | os.PathLike | None = None) -> Path | None:
    if explicit:
        return Path(explicit)
    if os.environ.get("VJOBS_SITE"):
        return Path(os.environ["VJOBS_SITE"])
    return SYSTEM_SITE_FILE if SYSTEM_SITE_FILE.is_file() else None


def load_site(explicit: str | os.PathLike | None = None) -> SiteConfig:
    path = find_site_file(explicit)
    if path is None:
        return SiteConfig()
    try:
        document = tomllib.loads(path.read_text())
    except OSError as exc:
        raise InvalidSite(f"cannot read site config {path}: {exc.strerror}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise InvalidSite(f"{path}: not valid TOML: {exc}") from exc
    return site_from_dict(document, base_dir=path.resolve().parent, source=str(path))


def site_from_dict(document: Mapping[str, Any], *, base_dir: Path | None = None,
                   source: str = "site config") -> SiteConfig:
    problem = schemas.problem("site", document)
    if problem:
        raise InvalidSite(f"{source}: {problem}")
    base_dir = base_dir or Path.cwd()
    options: dict[str, Any] = {"source": source}
    if "driver" in document:
        options["pinned_driver"] = document["driver"]
    if "prefer" in document:
        options["preference"] = tuple(document["prefer"])
    if "cache_dir" in document:
        options["cache_dir"] = _site_path(document["cache_dir"], base_dir, f"{source}: cache_dir")
    if "work_dir" in document:
        template = str(_site_path(document["work_dir"], base_dir, f"{source}: work_dir"))
        options["work_dir"] = work_dir_of(template, os.getuid())
        options["work_dir_template"] = template if UID in template else None
    if "cache_max_gib" in document:
        options["cache_max_gib"] = float(document["cache_max_gib"])
    for key in ("boot_timeout_s", "boot_retries", "allow_network", "release_format", "payload_user", "limits",
                "drivers", "console_max_mib", "stop_grace_s", "live_channel", "sync_interval_s",
                "sync_on_stop_s", "checkpoint_interval_s", "checkpoint_signal", "checkpoint_grace_s",
                "checkpoint_max_gib"):
        if key in document:
            options[key] = document[key]
    if "host" in document:
        options["host"] = _host_budget(document["host"], base_dir, source)
    if "inspection" in document:
        options["inspection"] = InspectionLimits(**document["inspection"])
    if "staging" in document:
        options["staging"] = StagingSettings.from_site(document["staging"])
    options["images"] = {name: _catalogue_image(entry, base_dir) for name, entry in
                         document.get("images", {}).items()}
    return SiteConfig(**options)


def _site_path(value: str, base_dir: Path, where: str) -> Path:
    """A path from the site config, refused with the key's name when no file system could hold it."""
    if "\0" in value:
        raise InvalidSite(f"{where}: the path holds a NUL byte: {value[:200]!r}")
    path = base_dir / value
    if len(os.fsencode(str(path))) >= 4096 or any(len(os.fsencode(part)) > 255 for part in path.parts):
        raise InvalidSite(f"{where}: the path is longer than a file system allows (4095 bytes, 255 a name)")
    return path


def _host_budget(entry: Mapping[str, Any], base_dir: Path, source: str) -> HostBudget:
    wait = entry.get("admission_wait_s", HostBudget.admission_wait_s)
    budget_dir = _site_path(entry["budget_dir"], base_dir, f"{source}: host.budget_dir") \
        if "budget_dir" in entry else HOST_BUDGET_DIR
    try:
        return HostBudget(**{**entry, "admission_wait_s": float(wait), "budget_dir": budget_dir})
    except OverflowError:  # an integer no clock can add: the schema has no maximum
        raise InvalidSite(f"{source}: /host/admission_wait_s: {wait} seconds is more than a clock can count") from None


def _catalogue_image(entry: Mapping[str, Any], base_dir: Path) -> CatalogueImage:
    paths = {key: _site_path(entry[key], base_dir, f"images: {key}") for key in ("kernel", "initramfs", "rootfs")
             if key in entry}
    return CatalogueImage(**{**entry, **paths})
