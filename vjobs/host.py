"""Facts about this host that several parts of vjobs need: which boot this is, who owns a VM."""

from __future__ import annotations

import os
import socket
import uuid
from pathlib import Path

from .driver import Owner

BOOT_ID_FILE = Path("/proc/sys/kernel/random/boot_id")


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
