"""Confining a hypervisor process that vjobs starts itself (qemu_user's QEMU), when vjobs runs as root.

QEMU's own documentation says not to rely on it for isolation under TCG, and a guest that escapes into
QEMU must find nothing worth having. So QEMU started by a root vjobs:
- runs as an unprivileged user of its own (``[drivers.qemu_user] run_as``, default ``vjobs-qemu``, which
  scripts/install.sh creates), no supplementary groups but the one that owns /dev/kvm when it uses KVM,
  no capabilities, no new privileges;
- opens no host file by name: every disk, the kernel, the initramfs, its monitor and its console come in
  as file descriptors vjobs opened (vjobs/drivers/qemu_user/qemu.py), so it needs no access to the job's files, the cache,
  or anything else, and its monitor socket exists nowhere in the file system;
- lives in its own mount, IPC and PID namespaces (and network namespace when the job has no network),
  with private /tmp, /var/tmp and /dev/shm, so it can neither see nor signal any other process;
- has resource limits: no core dumps, no file larger than its largest writable disk, at most
  ``MAX_OPEN_FILES`` descriptors;
- dies with vjobs, even under SIGKILL: the parent-death signal is set again after the switch of user,
  which clears it;
- ends only when vjobs ends it: it starts with SIGHUP, SIGINT and SIGTERM blocked (``env --block-signal``,
  which QEMU keeps). A batch system that ends a job signals every process of it, QEMU too (Slurm's
  requeue, preemption and scancel send SIGTERM, then SIGKILL after KillWait); a QEMU that quit at once would
  leave vjobs nothing to checkpoint or to bring the last files back from. vjobs kills it with SIGKILL.
A vjobs that is not root starts QEMU as itself with the same descriptors, limits and blocked signals (no
namespaces).
"""

from __future__ import annotations

import ctypes
import os
import pwd
import resource
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from vjobs.errors import DriverError
from vjobs.host.tools import unprivileged_user

MAX_OPEN_FILES = 1024
KVM_DEVICE = Path("/dev/kvm")
_PR_SET_PDEATHSIG = 1

# Runs as root inside the new namespaces, before the switch of user. This shell is PID 1 of QEMU's PID
# namespace and stays there, QEMU its child: when it dies, the kernel kills everything in the namespace. It
# dies with unshare (--kill-child), which dies with vjobs (preexec). QEMU's own parent-death signal cannot
# be relied on alone: a change of user clears it, and setpriv sets it again only a moment later (the kill
# campaign hit that moment once in 300 kills). The first lines close the last gap: unshare died before its
# --kill-child took hold, so this shell's parent is no longer the one vjobs ($1) started.
_NAMESPACE_INIT = ('read -r _ _ _ parent _ < /proc/self/stat; '
                   'read -r _ _ _ grandparent _ < "/proc/$parent/stat" || exit 125; '
                   '[ "$grandparent" = "$1" ] || exit 125; shift; '
                   'for folder in /tmp /var/tmp /dev/shm; do '
                   '[ -d "$folder" ] || continue; '
                   'mount -t tmpfs -o size=1m,mode=1777,nosuid,nodev,noexec vjobs-qemu "$folder" || exit 126; '
                   'done; "$@"')


@dataclass(frozen=True)
class Confinement:
    user: str | None  # None: run as vjobs' own user (vjobs is not root)
    uid: int | None = None
    gid: int | None = None
    groups: tuple[int, ...] = ()
    own_network: bool = True  # a network namespace with nothing in it: for jobs without a network
    max_file_bytes: int = resource.RLIM_INFINITY


def confinement_for(run_as: str | None, *, network: bool, kvm: bool, max_file_bytes: int) -> Confinement:
    """How to confine a QEMU for one VM. ``run_as``: the site's user, or None for the default."""
    if os.geteuid() != 0:
        return Confinement(None, max_file_bytes=max_file_bytes)
    user = _qemu_user(run_as)
    groups = (KVM_DEVICE.stat().st_gid,) if kvm and KVM_DEVICE.exists() else ()
    return Confinement(user.pw_name, user.pw_uid, user.pw_gid, groups, own_network=not network,
                       max_file_bytes=max_file_bytes)


def _qemu_user(run_as: str | None) -> pwd.struct_passwd:
    try:
        return unprivileged_user(run_as)  # vjobs-qemu by default, nobody on a host set up without the installer
    except KeyError:
        raise DriverError(f"[drivers.qemu_user] run_as = {run_as!r}: no such user on this host; create it "
                          "(scripts/install.sh creates vjobs-qemu) or name another") from None
    except ValueError:
        raise DriverError(f"[drivers.qemu_user] run_as = {run_as!r} is root: QEMU must run as an unprivileged "
                          "user") from None


# What QEMU starts with blocked (see the module's description): signals only vjobs should act on.
BLOCKED = ["env", "--block-signal=HUP,INT,TERM", "--"]


def wrap(argv: list[str], confinement: Confinement) -> list[str]:
    """``argv`` preceded by what puts it in its namespaces and switches its user, and blocks the signals a
    batch system sends to every process of a job."""
    argv = [*BLOCKED, *argv]
    if confinement.user is None:
        return argv
    namespaces = ["unshare", "--mount", "--ipc", "--pid", "--fork", "--kill-child", "--propagation", "private"]
    if confinement.own_network:
        namespaces.append("--net")
    groups = ["--groups", ",".join(map(str, confinement.groups))] if confinement.groups else ["--clear-groups"]
    switch = ["setpriv", f"--reuid={confinement.uid}", f"--regid={confinement.gid}", *groups,
              "--no-new-privs", "--inh-caps=-all", "--bounding-set=-all", "--pdeathsig", "SIGKILL", "--"]
    return [*namespaces, "--", "sh", "-c", _NAMESPACE_INIT, "vjobs-qemu", str(os.getpid()), *switch, *argv]


def preexec(confinement: Confinement) -> Callable[[], None]:
    """Runs in the child between fork and exec: limits, and death with vjobs. Async-signal-safe enough:
    no locks, no allocation beyond ctypes' call."""
    parent = os.getpid()  # taken before the fork: the child compares its parent with it

    def limit_and_tie() -> None:
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        resource.setrlimit(resource.RLIMIT_NOFILE, (MAX_OPEN_FILES, MAX_OPEN_FILES))
        resource.setrlimit(resource.RLIMIT_FSIZE, (confinement.max_file_bytes, confinement.max_file_bytes))
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        # vjobs died between fork and prctl: nobody would ever kill us. Not `getppid() == 1`: under a
        # subreaper (systemd --user, tini -s, a pilot) the orphan's new parent is not PID 1.
        if os.getppid() != parent:
            os._exit(1)
    return limit_and_tie


