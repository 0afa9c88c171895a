"""Roles on a node: the administrator and the accounts, and which cache each one builds into and reads.

- **The administrator** (root) installs vjobs once (scripts/install.sh) and builds the built-in images into
  the system cache: ``vjobs image build default`` and ``debian12`` as root, into root's ``cache_dir``
  (``/var/cache/vjobs`` unless the site config or ``$VJOBS_SYSTEM_CACHE`` says otherwise). Root's own jobs
  build what they need there, as they always did.
- **An account** (any other uid: the pool accounts of a grid site) builds into ``cache_dir`` only when that
  folder is its own (a developer's or a test's site config naming a cache of its own). Otherwise
  ``cache_dir`` is the administrator's and read-only to it: its jobs take the built-in images, and the
  templates root made, from there and never build them (``ImageError`` "image_not_found" says who builds a
  missing one, and how); what the account builds for itself (release and bind images, raw copies of base
  images, its own templates, probe verdicts) goes into its own cache, ``$XDG_CACHE_HOME/vjobs`` (default
  ``~/.cache/vjobs``), which only it can read.

The rule under both, wherever a cache entry is handed out (vjobs/host/cache.py ``trusted``, applied by
``CacheHold.use``): vjobs writes only into folders its own uid owns, and uses an entry only when the entry,
its folder and the cache above are owned by its own uid or by root and writable by nobody else. So no entry
one account could have written is used by another account's job, and root never uses an account's. Reading
root's cache an account creates nothing there: no lock file (its shared locks on root's entries are taken on
the entries themselves, opened read-only), no record, no change of an entry's time.
"""

from __future__ import annotations

import os
import pwd
import stat
from dataclasses import dataclass
from pathlib import Path

from vjobs.config.site import SiteConfig
from vjobs.errors import SetupError
from vjobs.host.cache import KINDS

ADMINISTRATOR_BUILDS = ("the administrator builds it once, as root: vjobs image build {name} "
                        "(scripts/install.sh does it)")


@dataclass(frozen=True)
class Caches:
    """Where this process builds (``own``) and where it finds the built-in images and shared templates
    (``images``): ``own`` itself when it builds them, else the administrator's cache, read-only; None when
    the configured cache belongs to another account (nothing of it is trusted). ``why``: what a message
    about a missing built-in image says about ``images``."""

    own: Path
    images: Path | None
    why: str = ""

    @property
    def builds_images(self) -> bool:
        return self.images == self.own

    @property
    def administrators(self) -> Path | None:
        """The administrator's cache this process reads but never writes (None: it builds its own images)."""
        return None if self.builds_images else self.images

    def not_built(self, name: str) -> str:
        """Why the built-in image ``name`` is not there for this account, and who builds it how."""
        where = f"in the system cache {self.images}" if self.images else "anywhere this account trusts"
        reason = f" ({self.why})" if self.why else ""
        return (f"the built-in image {name!r} is not built {where}{reason}: accounts never build the built-in "
                f"images; {ADMINISTRATOR_BUILDS.format(name=name)}")


def caches(site: SiteConfig) -> Caches:
    """This process's caches for ``site``; makes its own cache when it is not there yet. Raises ``SetupError``
    when root is given a cache it does not own, or an account cannot make its own cache."""
    configured = Path(site.cache_dir)
    me = os.geteuid()
    owner = _owner_of(configured)
    if owner == me:
        return Caches(own=_own_folder(configured, shared=me == 0, where=f"cache_dir of {site.source}"),
                      images=configured)
    if me == 0:
        raise SetupError(f"cache_dir {configured} ({site.source}) is, or would be made in, a folder of uid {owner}: "
                         "root writes only into folders it owns (another user could plant links there); chown it "
                         "to root or name another cache_dir", code="cache_not_ours")
    own = _own_folder(account_cache_dir(), shared=False,
                      where="this account's own cache ($XDG_CACHE_HOME/vjobs, default ~/.cache/vjobs)")
    if owner == 0:
        return Caches(own=own, images=configured)
    whose = f"belongs to uid {owner}, neither root nor this account" if owner >= 0 else "cannot be looked at"
    return Caches(own=own, images=None, why=f"cache_dir {configured} ({site.source}) {whose}, so nothing in it "
                                             "is used")


def account_cache_dir() -> Path:
    """An account's own cache: ``$XDG_CACHE_HOME/vjobs``, by default in its home (from the password database
    when ``$HOME`` is not set, as under some batch systems)."""
    home = os.environ.get("HOME") or pwd.getpwuid(os.geteuid()).pw_dir
    return Path(os.environ.get("XDG_CACHE_HOME") or Path(home) / ".cache") / "vjobs"


def _owner_of(folder: Path) -> int:
    """The uid that owns ``folder``, or, when it is not there, the folder it would be made in (the nearest
    one above that exists): whoever owns that may make it."""
    for candidate in (folder, *folder.parents):
        try:
            return candidate.stat().st_uid
        except FileNotFoundError:
            continue
        except OSError:
            return -1  # cannot even look: not ours
    return -1


def _own_folder(folder: Path, *, shared: bool, where: str) -> Path:
    """``folder`` and its entries' folders made (or kept) as vjobs' rule wants them: writable by this uid alone;
    readable by every account when ``shared`` (root's cache, which accounts read), else by this uid alone."""
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        for path in (folder, *(folder / kind.folder for kind in KINDS)):
            path.mkdir(mode=0o755 if shared else 0o700, exist_ok=True)
            mode = stat.S_IMODE(path.stat().st_mode)
            if mode & 0o022:  # made under a umask such as 002: no one else may write where vjobs reads
                os.chmod(path, mode & ~0o022)
    except OSError as exc:
        raise SetupError(f"cannot make {where}, {folder}, as uid {os.geteuid()}: {exc.strerror}; vjobs writes "
                         f"only into folders this user owns: set XDG_CACHE_HOME, or cache_dir in a site config, "
                         "to a folder of yours on a local file system", code="cache_not_writable") from exc
    return folder
