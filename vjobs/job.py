"""Job files: read, validate against schemas/job.schema.json, resolve paths, check the host folders exist."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from . import schemas
from .errors import InvalidJob

DEFAULT_WORKDIR = "/work"
# Guest paths the agent mounts itself: a working directory there would be hidden or would hide them.
RESERVED_GUEST_PATHS = ("/proc", "/sys", "/dev", "/run", "/tmp")


@dataclass(frozen=True)
class Resources:
    vcpus: int = 1
    memory_mib: int = 512
    scratch_mib: int = 256
    output_mib: int = 64


@dataclass(frozen=True)
class Release:
    path: Path
    mount: str


@dataclass(frozen=True)
class Job:
    id: str
    command: tuple[str, ...]
    env: Mapping[str, str] = field(default_factory=dict)
    inputs: Path | None = None
    release: Release | None = None
    outputs: tuple[str, ...] = ()
    resources: Resources = Resources()
    walltime_s: float = 3600
    image: str = "default"
    network: bool = False
    workdir: str = DEFAULT_WORKDIR  # the working directory's path in the guest


def load_job(path: str | os.PathLike) -> Job:
    """Read a job file; relative paths in it are relative to the file's folder."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise InvalidJob(f"cannot read job file {path}: {exc.strerror}") from exc
    try:
        document = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InvalidJob(f"{path}: not valid JSON at line {exc.lineno} column {exc.colno}: {exc.msg}") from exc
    return job_from_dict(document, base_dir=path.resolve().parent, source=str(path))


def job_from_dict(document: Any, *, base_dir: Path | None = None, source: str = "job") -> Job:
    """Validate a job given as a dict (the Python API's way in); relative paths resolve against ``base_dir``."""
    problem = schemas.problem("job", document)
    if problem:
        raise InvalidJob(f"{source}: {problem}")
    base_dir = base_dir or Path.cwd()
    release = document.get("release")
    job = Job(
        id=document["id"],
        command=tuple(document["command"]),
        env=dict(document.get("env", {})),
        inputs=_host_dir(document.get("inputs"), base_dir, source, "/inputs"),
        release=Release(_host_dir(release["path"], base_dir, source, "/release/path"), release["mount"])
        if release else None,
        outputs=tuple(document.get("outputs", ())),
        resources=Resources(**document.get("resources", {})),
        walltime_s=document.get("walltime_s", 3600),
        image=document.get("image", "default"),
        network=document.get("network", False),
        workdir=document.get("workdir", DEFAULT_WORKDIR),
    )
    _check_guest_paths(job, source)
    return job


def _check_guest_paths(job: Job, source: str) -> None:
    """The working directory and the release mount must not hide each other or what the agent mounts."""
    for pointer, path in (("/workdir", job.workdir), ("/release/mount", job.release.mount if job.release else None)):
        if path is None:
            continue
        if path.rstrip("/") == "" or any(_within(path, reserved) for reserved in RESERVED_GUEST_PATHS):
            raise InvalidJob(f"{source}: {pointer}: {path!r} is reserved in the guest (/, "
                             f"{', '.join(RESERVED_GUEST_PATHS)} and what is under them); choose another path")
    if job.release and (_within(job.workdir, job.release.mount) or _within(job.release.mount, job.workdir)):
        raise InvalidJob(f"{source}: /workdir {job.workdir!r} and /release/mount {job.release.mount!r} overlap; "
                         "one would hide the other")


def _within(path: str, folder: str) -> bool:
    path, folder = path.rstrip("/") or "/", folder.rstrip("/") or "/"
    return path == folder or path.startswith(folder + "/")


def _host_dir(value: str | None, base_dir: Path, source: str, pointer: str) -> Path | None:
    if value is None:
        return None
    path = (base_dir / value).resolve()
    if not path.is_dir():
        what = "does not exist" if not path.exists() else "is not a folder"
        raise InvalidJob(f"{source}: {pointer}: {path} {what}")
    if not os.access(path, os.R_OK | os.X_OK):
        raise InvalidJob(f"{source}: {pointer}: {path} is not readable by this user (uid {os.getuid()})")
    return path
