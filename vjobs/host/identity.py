"""Facts about this host that several parts of vjobs need: which boot this is, who owns a VM."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

BOOT_ID_FILE = Path("/proc/sys/kernel/random/boot_id")
OWNER_FILE = "owner.json"
# A folder of vjobs' in work_dir is either labelled (OWNER_FILE inside) or hidden under one of these names
# while it is made or removed, so that a kill at any moment leaves nothing `vjobs gc` cannot judge.
CREATING, REMOVING = ".creating", ".removing"


@dataclass(frozen=True)
class Owner:
    """Who a VM belongs to, recorded with it so that ``vjobs gc`` removes only what a dead vjobs left."""

    job_id: str
    pid: int
    boot_id: str
    hostname: str
    run_id: str  # unique per vjobs run: the VM's name ends with it

    def as_labels(self) -> dict[str, str]:
        return {"vjobs.job_id": self.job_id, "vjobs.pid": str(self.pid), "vjobs.boot_id": self.boot_id,
                "vjobs.hostname": self.hostname, "vjobs.run_id": self.run_id}


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
    except ValueError:
        return False
    return not pid_alive(pid)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def create_owned_folder(path: Path, owner: Owner) -> Path:
    """``path`` appears with its owner labels already in it: made under a hidden name, labelled, renamed."""
    staging = path.with_name(f".{path.name}.{os.getpid()}{CREATING}")  # the pid: gc judges it without labels
    path.parent.mkdir(parents=True, exist_ok=True)
    staging.mkdir()
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
    if folder.name.startswith(".") and folder.name.endswith(REMOVING):
        return True
    try:
        return owner_is_gone(json.loads((folder / OWNER_FILE).read_text()))
    except (OSError, ValueError):
        maker = re.fullmatch(rf"\..+\.(\d+){re.escape(CREATING)}", folder.name)
        if maker:  # killed before its labels were written: its maker's pid is in its name
            try:
                return not pid_alive(int(maker[1])) or time.time() - folder.lstat().st_mtime > 3600
            except OSError:
                return False
        return False  # not a folder of ours
