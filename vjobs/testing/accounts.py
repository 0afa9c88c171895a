"""Ordinary accounts for tests, as a grid site has them: pool accounts (``vjtpool1``...) with no privilege, run
with the login ``PATH`` Debian gives them (no ``/usr/sbin``) and vjobs installed by pip into a virtualenv of the
system's ``python3``, as README "For sites" tells an account to do.

Made by root (``useradd``), once per test session (vjobs.testing.fixtures: ``pool_accounts``), and removed with
their homes and work folders when it ends. An account left by a session that was killed is removed and made
again: the names are the suite's own (``ACCOUNT_PREFIX``; sessions that run side by side on one machine, from
different checkouts, each set ``VJOBS_TEST_ACCOUNT_PREFIX`` to a prefix of their own, which gives them their
own virtualenvs too).

Its virtualenv has vjobs' ``[test]`` extra too, so that an account runs vjobs' own test suites (the driver
conformance suite) as itself. An account cannot build the built-in images (mmdebstrap needs root or
newuidmap): ``give_built_images`` copies the ones root built for the session into a cache of the account's own.
"""

from __future__ import annotations

import grp
import hashlib
import json
import os
import pwd
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

ACCOUNT_PREFIX = os.environ.get("VJOBS_TEST_ACCOUNT_PREFIX", "vjtpool")  # another, for sessions side by side
SYSTEM_PYTHON = "/usr/bin/python3"
DEBIAN_LOGIN_PATH = "/usr/local/bin:/usr/bin:/bin:/usr/local/games:/usr/games"
# Readable by every account, unlike a checkout under /root; a session with accounts of its own has its own,
# and VJOBS_TEST_VENVS names one outright.
VENV_ROOT = Path(os.environ.get("VJOBS_TEST_VENVS", "/var/tmp/vjobs-test-venvs" + (
    "" if ACCOUNT_PREFIX == "vjtpool" else f"-{ACCOUNT_PREFIX}")))
INSTALL_TIMEOUT_S = 600
COMPLETE = ".vjobs-test-complete"
EXTRAS = "[test]"  # pytest and the rest: an account runs vjobs' test suites (the driver conformance suite) itself
VENV_UNUSED_S = 86400  # a virtualenv no session used for this long is removed; another checkout's may be in use


def login_path() -> str:
    """The ``PATH`` an ordinary account logs in with: ``ENV_PATH`` of /etc/login.defs, else Debian's."""
    try:
        for line in Path("/etc/login.defs").read_text().splitlines():
            words = line.split()
            if len(words) == 2 and words[0] == "ENV_PATH":
                return words[1].removeprefix("PATH=")
    except OSError:
        pass
    return DEBIAN_LOGIN_PATH


@dataclass(frozen=True)
class Account:
    name: str
    uid: int
    gid: int
    home: Path
    venv: Path | None = None

    @property
    def vjobs(self) -> str:
        """The account's own ``vjobs`` command (from its virtualenv)."""
        if self.venv is None:
            raise RuntimeError(f"{self.name} has no virtualenv with vjobs")
        return str(self.venv / "bin" / "vjobs")

    @property
    def python(self) -> str:
        """The Python of the account's virtualenv (the system's python3, with vjobs and pytest)."""
        if self.venv is None:
            raise RuntimeError(f"{self.name} has no virtualenv with vjobs")
        return str(self.venv / "bin" / "python")

    @property
    def work_dir(self) -> Path:
        """vjobs' default work folder for this account (vjobs.config.site)."""
        return Path("/var/tmp") / f"vjobs-{self.uid}"

    def environment(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        """What a login shell of the account has: nothing of root's environment."""
        env = {"HOME": str(self.home), "USER": self.name, "LOGNAME": self.name, "SHELL": "/bin/sh",
               "PATH": login_path(), "LANG": "C.UTF-8"}
        return {**env, **(extra or {})}

    def command(self, argv: list[str], extra_env: dict[str, str] | None = None) -> list[str]:
        """``argv`` as this account runs it: its uid, gid and groups (setpriv --init-groups), its login
        environment, no capability kept."""
        assignments = [f"{key}={value}" for key, value in self.environment(extra_env).items()]
        return ["setpriv", f"--reuid={self.uid}", f"--regid={self.gid}", "--init-groups", "--inh-caps=-all",
                "--reset-env", "--", "env", "-i", *assignments, *argv]

    def run(self, argv: list[str], *, env: dict[str, str] | None = None, cwd: Path | None = None,
            timeout: float = 300, check: bool = False) -> subprocess.CompletedProcess:
        return subprocess.run(self.command(argv, env), cwd=cwd or self.home, capture_output=True, text=True,
                              timeout=timeout, check=check)

    def popen(self, argv: list[str], *, env: dict[str, str] | None = None, cwd: Path | None = None,
              **options) -> subprocess.Popen:
        return subprocess.Popen(self.command(argv, env), cwd=cwd or self.home, **options)

    def stop_ram_keepers(self, cache: Path) -> None:
        """End the template RAM keepers that the account's jobs started from ``cache``, as the account
        (vjobs/drivers/qemu_user/shared_ram.py). A keeper outlives its job by the site's idle time (ten minutes
        by default), and a test leaves nothing of an account's running for the next test to find."""
        stop = ("import pathlib, sys; from vjobs.drivers.qemu_user import shared_ram; "
                "shared_ram.stop_keepers(pathlib.Path(sys.argv[1]) / 'templates' / shared_ram.KEEPERS)")
        self.run([self.python, "-I", "-c", stop, str(cache)], timeout=60, check=True)

    def own(self, path: Path) -> Path:
        """Gives ``path`` and everything under it to the account (what root set up for it), links not
        followed; returns ``path``."""
        for entry in [Path(path), *Path(path).rglob("*")]:
            os.chown(entry, self.uid, self.gid, follow_symlinks=False)
        return Path(path)


def create_accounts(count: int, *, groups: tuple[str, ...] = (), prefix: str = ACCOUNT_PREFIX) -> list[Account]:
    """``count`` fresh ordinary accounts ``<prefix>1``..., each in the supplementary ``groups`` that exist."""
    if os.geteuid() != 0:
        raise PermissionError("creating test accounts needs root")
    existing_groups = [group for group in groups if _group_exists(group)]
    accounts = []
    for index in range(1, count + 1):
        name = f"{prefix}{index}"
        remove_account(name)  # one a killed session left
        options = ["--create-home", "--shell", "/bin/sh", "--user-group"]
        if existing_groups:
            options += ["--groups", ",".join(existing_groups)]
        subprocess.run(["useradd", *options, name], check=True, capture_output=True, timeout=60)
        accounts.append(existing_account(name))
    return accounts


def existing_account(name: str) -> Account:
    entry = pwd.getpwnam(name)
    return Account(name=name, uid=entry.pw_uid, gid=entry.pw_gid, home=Path(entry.pw_dir))


def remove_account(name: str) -> None:
    """The account, its home and what vjobs left for it in /var/tmp; nothing when it does not exist."""
    try:
        entry = pwd.getpwnam(name)
    except KeyError:
        return
    # Its processes first: userdel refuses an account that still runs something (a test that failed midway).
    for pid in _processes_of(entry.pw_uid):
        try:
            os.kill(pid, 9)
        except ProcessLookupError:
            pass
    subprocess.run(["userdel", "--remove", name], capture_output=True, timeout=60)
    for leftover in (Path("/var/tmp") / f"vjobs-{entry.pw_uid}", Path("/tmp") / f"vjobs-{entry.pw_uid}"):
        shutil.rmtree(leftover, ignore_errors=True)


def remove_accounts(accounts: list[Account]) -> None:
    for account in accounts:
        remove_account(account.name)


def _processes_of(uid: int) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if entry.stat().st_uid == uid:
                    pids.append(int(entry.name))
            except OSError:
                continue
    return pids


def _group_exists(name: str) -> bool:
    try:
        grp.getgrnam(name)
        return True
    except KeyError:
        return False


def account_venv(source: Path) -> Path:
    """A virtualenv of the system's python3 with vjobs from ``source`` (a checkout) installed by pip, as an
    account installs it, readable by every account. Kept between sessions by the content of ``source``'s
    package and metadata: a change of either makes a new one (and removes the old)."""
    key = _source_key(source)
    venv = VENV_ROOT / key
    if (venv / COMPLETE).is_file():
        (venv / COMPLETE).touch()  # in use: see VENV_UNUSED_S
        return venv
    VENV_ROOT.mkdir(mode=0o755, exist_ok=True)
    os.chmod(VENV_ROOT, 0o755)
    for old in VENV_ROOT.iterdir():  # sessions of other checkouts may run beside this one: only the unused go
        if old != venv and _unused_for(old, VENV_UNUSED_S):
            shutil.rmtree(old, ignore_errors=True)
    shutil.rmtree(venv, ignore_errors=True)  # one a killed session left half made
    # Made where it stays (a virtualenv's scripts name their interpreter by path); complete once COMPLETE is in.
    subprocess.run([SYSTEM_PYTHON, "-m", "venv", str(venv)], check=True, capture_output=True,
                   timeout=INSTALL_TIMEOUT_S)
    # A copy of the tree, not an editable install: a checkout under /root is not readable by accounts.
    installed = subprocess.run([str(venv / "bin" / "pip"), "install", "-q", f"{source}{EXTRAS}"],
                               capture_output=True, text=True, timeout=INSTALL_TIMEOUT_S)
    if installed.returncode != 0:
        raise RuntimeError(f"pip install {source}{EXTRAS} into {venv}: exit {installed.returncode}: "
                           f"{installed.stderr.strip()[-1500:]}")
    (venv / COMPLETE).touch()
    return venv


def _unused_for(venv: Path, seconds: float) -> bool:
    try:
        return time.time() - (venv / COMPLETE).stat().st_mtime > seconds
    except OSError:  # not complete: being made, or left half made
        return time.time() - venv.stat().st_mtime > seconds


def _source_key(source: Path) -> str:
    digest = hashlib.sha256(EXTRAS.encode())
    for path in sorted([source / "pyproject.toml", *(source / "vjobs").rglob("*")]):
        if path.is_file() and "__pycache__" not in path.parts:
            digest.update(str(path.relative_to(source)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]


def give_built_images(account: Account, source_cache: Path, cache: Path,
                      families: Iterable[str] = ("default", "debian12")) -> Path:
    """``cache``, a cache of ``account``'s own, with copies of the built images of ``families`` from
    ``source_cache`` (root's), their manifests naming the copies: the account's jobs boot them and build
    nothing. An image already there is kept; returns ``cache``."""
    families = tuple(families)
    images = Path(cache) / "images"
    images.mkdir(parents=True, exist_ok=True)
    for folder in sorted((Path(source_cache) / "images").glob("*-*")):
        target = images / folder.name
        if not folder.is_dir() or folder.name.rsplit("-", 1)[0] not in families or target.exists():
            continue
        staging = images / f".{folder.name}.copying"
        shutil.rmtree(staging, ignore_errors=True)
        shutil.copytree(folder, staging)
        _relocate_manifest(staging / "manifest.json", folder, target)
        staging.rename(target)
    return account.own(Path(cache))


def _relocate_manifest(manifest: Path, source: Path, target: Path) -> None:
    """The manifest's paths of files in ``source`` made paths of the same files in ``target`` (a manifest
    names its files by absolute path)."""
    def moved(value):
        if isinstance(value, str) and (value == str(source) or value.startswith(f"{source}/")):
            return str(target) + value[len(str(source)):]
        return value

    document = json.loads(manifest.read_text())
    manifest.write_text(json.dumps({key: moved(value) for key, value in document.items()}, indent=2))


def with_venv(accounts: list[Account], venv: Path) -> list[Account]:
    return [Account(name=a.name, uid=a.uid, gid=a.gid, home=a.home, venv=venv) for a in accounts]


def checkout() -> Path:
    """The checkout the running vjobs comes from (its ``pyproject.toml`` beside the package)."""
    import vjobs

    root = Path(vjobs.__file__).resolve().parent.parent
    if not (root / "pyproject.toml").is_file():
        raise RuntimeError(f"vjobs at {root} is not a checkout: the accounts' virtualenv needs one")
    return root


__all__ = ["Account", "account_venv", "checkout", "create_accounts", "existing_account", "give_built_images",
           "login_path", "remove_account", "remove_accounts", "with_venv"]
