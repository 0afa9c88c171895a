"""What runs on this node, for ``vjobs ps``: each running job keeps a record of itself in its job folder.

The container rewrites ``running.json`` in its folder under ``work_dir`` (atomically) when it enters a phase
and when a usage sample comes from the guest (vjobs/container/lifecycle.py); the folder goes with the job.
``running_jobs`` reads them: an account its own work folder's, root every account's as ``vjobs gc`` finds them
(vjobs/host/gc.py), and only those of a vjobs process that is alive. Other accounts' folders are read through
descriptors, never through a link, and a record is believed only as far as its shape goes: their owners
may have written anything there.
"""

from __future__ import annotations

import json
import os
import pwd
import stat
import time
from pathlib import Path

from vjobs.config.site import SiteConfig
from vjobs.host.folders import write_atomically
from vjobs.host.identity import abandoned_entry

RECORD_NAME = "running.json"
RECORD_MAX_BYTES = 65536
FIELDS = {"job_id": str, "uid": int, "pid": int, "vcpus": int, "memory_mib": int, "phase": str, "started_s": float}


def write_record(folder: Path, record: dict) -> None:
    write_atomically(folder / RECORD_NAME, json.dumps(record) + "\n")


def running_jobs(site: SiteConfig) -> list[dict]:
    """The records of the jobs running now, oldest first, each with ``account`` and ``elapsed_s`` added."""
    from vjobs.host.gc import account_work_dirs  # gc knows where every account's work folder is

    folders = {site.work_dir: os.geteuid()}
    if os.geteuid() == 0:
        folders.update({folder: uid for uid, folder in account_work_dirs(site)})
    records = [record for folder, uid in folders.items() for record in _records_in(folder, uid)]
    now = time.time()
    for record in records:
        record["account"] = _account(record["uid"])
        record["elapsed_s"] = round(max(now - record["started_s"], 0.0), 1)
    return sorted(records, key=lambda record: record["started_s"])


def _records_in(work_dir: Path, uid: int) -> list[dict]:
    try:
        work_fd = os.open(work_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return []
    try:
        info = os.fstat(work_fd)
        if info.st_uid != uid or info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
            return []
        records = []
        for name in sorted(os.listdir(work_fd)):
            record = _record(work_fd, name, uid)
            if record is not None:
                records.append(record)
        return records
    finally:
        os.close(work_fd)


def _record(work_fd: int, name: str, uid: int) -> dict | None:
    try:
        entry = os.stat(name, dir_fd=work_fd, follow_symlinks=False)
        if not stat.S_ISDIR(entry.st_mode) or entry.st_uid != uid or abandoned_entry(work_fd, name):
            return None
        folder_fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=work_fd)
    except OSError:
        return None
    try:
        fd = os.open(RECORD_NAME, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=folder_fd)
        with os.fdopen(fd, "rb") as handle:
            if not stat.S_ISREG(os.fstat(handle.fileno()).st_mode):
                return None
            record = json.loads(handle.read(RECORD_MAX_BYTES + 1)[:RECORD_MAX_BYTES])
    except (OSError, ValueError):
        return None
    finally:
        os.close(folder_fd)
    if not isinstance(record, dict) or record.get("uid") != uid:
        return None
    for key, kind in FIELDS.items():
        value = record.get(key)
        if not isinstance(value, kind) and not (kind is float and isinstance(value, int)):
            return None
    return record


def _account(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)
