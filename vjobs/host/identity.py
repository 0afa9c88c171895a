"""Facts about this host that several parts of vjobs need: which boot this is, who owns a VM."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import stat
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from vjobs.host.folders import private_folder

BOOT_ID_FILE = Path("/proc/sys/kernel/random/boot_id")
OWNER_FILE = "owner.json"
# A folder of vjobs' in work_dir is either labelled (OWNER_FILE inside) or hidden under one of these names
# while it is made or removed, so that a kill at any moment leaves nothing `vjobs gc` cannot judge.
CREATING, REMOVING = ".creating", ".removing"
LABELS_MAX_BYTES = 65536  # an owner.json is a few hundred bytes; whoever wrote a bigger one is not vjobs


@dataclass(frozen=True)
class Owner:
    """Who a VM belongs to, recorded with it so that ``vjobs gc`` removes only what a dead vjobs left."""

    job_id: str
    pid: int
    boot_id: str
    hostname: str
    run_id: str  # unique per vjobs run: the VM's name ends with it
    uid: int = field(default_factory=os.geteuid)  # the account: its `vjobs gc` removes only what it owns

    def as_labels(self) -> dict[str, str]:
        return {"vjobs.job_id": self.job_id, "vjobs.pid": str(self.pid), "vjobs.boot_id": self.boot_id,
                "vjobs.hostname": self.hostname, "vjobs.run_id": self.run_id, "vjobs.uid": str(self.uid)}


def boot_id() -> str:
    try:
        return BOOT_ID_FILE.read_text().strip()
    except OSError:
        return "unknown"


def new_owner(job_id: str) -> Owner:
    return Owner(job_id=job_id, pid=os.getpid(), boot_id=boot_id(), hostname=socket.gethostname(),
                 run_id=uuid.uuid4().hex[:8])


def owner_is_gone(labels: dict[str, str] | None) -> bool:
    """True when the vjobs process named in ``labels`` can no longer be running on this host: it ran before
    the last reboot, or its pid is gone. Labels of another host are never ours to judge."""
    if not labels or labels.get("vjobs.hostname") != socket.gethostname():
        return False
    if labels.get("vjobs.boot_id") != boot_id():
        return True
    try:
        pid = int(labels.get("vjobs.pid", ""))
    except (ValueError, TypeError):  # labels another account wrote may hold anything
        return False
    return pid > 0 and not pid_alive(pid)  # 0 and -1 would ask about process groups


def collectable(labels: dict[str, str] | None) -> bool:
    """Whether this process's ``vjobs gc`` may remove what ``labels`` mark: its owner is gone, and it was this
    account's; root's gc removes any account's. Labels without a uid (an earlier vjobs) are left to root."""
    if os.geteuid() != 0 and (labels or {}).get("vjobs.uid") != str(os.geteuid()):
        return False
    return owner_is_gone(labels)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError):  # gone, or a number no pid can be
        return False
    except PermissionError:
        return True
    return True


def create_owned_folder(path: Path, owner: Owner) -> Path:
    """``path`` appears with its owner labels already in it: made under a hidden name, labelled, renamed.
    Its parent is the work folder, made private to this account first, or refused (vjobs/host/folders.py)."""
    staging = path.with_name(f".{path.name}.{os.getpid()}{CREATING}")  # the pid: gc judges it without labels
    private_folder(path.parent)
    staging.mkdir(mode=0o700)
    (staging / OWNER_FILE).write_text(json.dumps(owner.as_labels()))
    staging.rename(path)
    return path


def remove_owned_folder(path: Path) -> bool:
    """Renamed out of the way, then removed: a folder half removed (vjobs killed during it) is never taken for
    a folder of someone else's. True when nothing is left."""
    doomed = path.with_name(f".{path.name}{REMOVING}")
    try:
        path.rename(doomed)
    except FileNotFoundError:
        return True
    except OSError:
        doomed = path  # cannot rename (odd file system): remove in place
    shutil.rmtree(doomed, ignore_errors=True)
    return not doomed.exists()


def abandoned_folder(folder: Path) -> bool:
    """Whether ``vjobs gc`` may remove this folder of ``work_dir``: one being removed, or one whose owner is
    gone, whether it was made completely or not."""
    parent = os.open(folder.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        return abandoned_entry(parent, folder.name)
    finally:
        os.close(parent)


def abandoned_entry(work_fd: int, name: str) -> bool:
    """``abandoned_folder`` for the entry ``name`` of the work folder open as ``work_fd``. Read through
    descriptors, never through a link: root's gc reads other accounts' folders, whose owners may have put
    anything there (a link, a FIFO, a file of gigabytes for owner.json)."""
    if name.startswith(".") and name.endswith(REMOVING):
        return True
    labels = _labels(work_fd, name)
    if labels is not None:
        return owner_is_gone(labels)
    maker = re.fullmatch(rf"\..+\.(\d+){re.escape(CREATING)}", name)
    if maker:  # killed before its labels were written: its maker's pid is in its name
        try:
            made = os.stat(name, dir_fd=work_fd, follow_symlinks=False).st_mtime
        except OSError:
            return False
        return not pid_alive(int(maker[1])) or time.time() - made > 3600
    return False  # not a folder of ours


def _labels(work_fd: int, name: str) -> dict[str, str] | None:
    """The owner labels of the folder ``name``, or None when it has none that vjobs could have written."""
    try:
        folder = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=work_fd)
    except OSError:
        return None
    try:
        labels = os.open(OWNER_FILE, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=folder)
    except OSError:
        return None
    finally:
        os.close(folder)
    try:
        if not stat.S_ISREG(os.fstat(labels).st_mode):
            return None
        document = json.loads(os.read(labels, LABELS_MAX_BYTES))
        return document if isinstance(document, dict) else None
    except (OSError, ValueError):
        return None
    finally:
        os.close(labels)
