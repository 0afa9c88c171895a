"""Job files: read, validate against schemas/job.schema.json, resolve paths, check the host folders exist."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from vjobs.config import schemas
from vjobs.errors import InvalidJob
from vjobs.staging.locations import BadLocation, Wanted
from vjobs.staging.locations import check as check_url

DEFAULT_WORKDIR = "/work"
# Guest paths the agent mounts itself: a working directory there would be hidden or would hide them.
RESERVED_GUEST_PATHS = ("/proc", "/sys", "/dev", "/run")
# A fresh /tmp is mounted before the binds, so a path under it works (pilots' work folders often live in
# /tmp), but /tmp itself stays the payload's.
RESERVED_EXACT = ("/", "/tmp")


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
class Bind:
    """A host folder in the guest: "ro" as a read-only disk (imaged, cached by content), "rw" copied in and
    what the payload created or changed there copied back (vjobs/guest/binds.py)."""

    source: Path
    target: str
    mode: str = "rw"


@dataclass(frozen=True)
class StageOut:
    """Where the outputs go after collection (vjobs/staging/)."""

    destination: str
    when: str = "succeeded"  # or "ended": also after a failed or timed-out payload
    overwrite: bool = False


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
    sync_interval_s: int | None = None  # None: the site's (vjobs/guest/sync.py)
    image: str = "default"  # a catalogue or built-in name, or an absolute path (an image folder; ":TAG")
    network: bool = False
    workdir: str | None = DEFAULT_WORKDIR  # the working directory's path in the guest; None: no such folder
    cwd: str | None = None  # where the payload starts; None: the workdir (or /)
    binds: tuple[Bind, ...] = ()
    stage_in: tuple[Wanted, ...] = ()  # remote inputs fetched on the host into the working directory
    stage_out: StageOut | None = None

    @property
    def start_dir(self) -> str:
        return self.cwd or self.workdir or "/"


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


def job_from_dict(document: Any, *, base_dir: Path | None = None, source: str = "job",
                  resumed: bool = False) -> Job:
    """Validate a job given as a dict (the Python API's way in); relative paths resolve against ``base_dir``.
    ``resumed``: a checkpoint's job (``job_document``), whose host folders need not exist any more here: its
    inputs are on its disks already, its images are found by their sums (vjobs/checkpoint/resume.py)."""
    problem = schemas.problem("job", document)
    if problem:
        raise InvalidJob(f"{source}: {problem}")
    base_dir = base_dir or Path.cwd()
    _host_dir = _given_host_dir if resumed else _existing_host_dir
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
        sync_interval_s=document.get("sync_interval_s"),
        image=_image(document.get("image", "default"), base_dir),
        network=document.get("network", False),
        workdir=document.get("workdir", DEFAULT_WORKDIR),
        cwd=document.get("cwd"),
        binds=tuple(Bind(_host_dir(bind["source"], base_dir, source, f"/binds/{index}/source"), bind["target"],
                         bind.get("mode", "rw")) for index, bind in enumerate(document.get("binds", ()))),
        stage_in=tuple(Wanted(**entry) for entry in document.get("stage_in", ())),
        stage_out=StageOut(**document["stage_out"]) if "stage_out" in document else None,
    )
    _check_guest_paths(job, source)
    _check_staging(job, source)
    return job


def _check_staging(job: Job, source: str) -> None:
    """URLs vjobs can use, one file per working-directory path, and somewhere for the files to be."""
    urls = [(f"/stage_in/{index}/url", item.url) for index, item in enumerate(job.stage_in)]
    if job.stage_out:
        urls.append(("/stage_out/destination", job.stage_out.destination))
    for pointer, url in urls:
        try:
            check_url(url)
        except BadLocation as exc:
            raise InvalidJob(f"{source}: {pointer}: {exc}") from None
    files: dict[str, int] = {}  # path -> the entry that puts a file there
    folders: dict[str, int] = {}  # every folder above those files -> the first entry that needs it
    for index, item in enumerate(job.stage_in):
        path = item.path.rstrip("/")
        above = [path.rsplit("/", depth)[0] for depth in range(1, path.count("/") + 1)]
        clash = files.get(path, folders.get(path, next((files[f] for f in above if f in files), None)))
        if clash is not None:
            raise InvalidJob(f"{source}: /stage_in/{index}/path {item.path!r} collides with /stage_in/{clash}/path "
                             f"{job.stage_in[clash].path!r}: each remote input needs a path of its own")
        files[path] = index
        for folder in above:
            folders.setdefault(folder, index)
        if job.inputs and (job.inputs / item.path).exists():
            raise InvalidJob(f"{source}: /stage_in/{index}/path {item.path!r} is also in the inputs folder "
                             f"{job.inputs}: one of them would silently replace the other; rename one")
    if job.workdir is None and job.stage_in:
        raise InvalidJob(f"{source}: /workdir: a job with stage_in needs a working directory to put the files in")
    if job.stage_out and not job.outputs:
        raise InvalidJob(f"{source}: /stage_out: the job lists no outputs, so nothing would be staged out; add "
                         "/outputs patterns or remove /stage_out")


def _check_guest_paths(job: Job, source: str) -> None:
    """The working directory, the release and the binds must not hide each other or what the agent mounts."""
    places = [("/workdir", job.workdir), ("/release/mount", job.release.mount if job.release else None)]
    places += [(f"/binds/{index}/target", bind.target) for index, bind in enumerate(job.binds)]
    places = [(pointer, path) for pointer, path in places if path is not None]
    for pointer, path in places:
        if (path.rstrip("/") or "/") in RESERVED_EXACT or any(_within(path, r) for r in RESERVED_GUEST_PATHS):
            raise InvalidJob(f"{source}: {pointer}: {path!r} is reserved in the guest (/, /tmp, and "
                             f"{', '.join(RESERVED_GUEST_PATHS)} with what is under them); choose another path")
    for index, (pointer, path) in enumerate(places):
        for other_pointer, other in places[index + 1:]:
            if _within(path, other) or _within(other, path):
                raise InvalidJob(f"{source}: {pointer} {path!r} and {other_pointer} {other!r} overlap (one is, or is "
                                 "inside, the other): one would hide the other or be made inside a read-only "
                                 "mount; choose separate paths")
    if job.workdir is None and (job.inputs or job.outputs):
        raise InvalidJob(f"{source}: /workdir: a job with inputs or outputs needs a working directory")


def _within(path: str, folder: str) -> bool:
    path, folder = path.rstrip("/") or "/", folder.rstrip("/") or "/"
    return path == folder or path.startswith(folder + "/")


def job_document(job: Job) -> dict[str, Any]:
    """The job as a document ``job_from_dict`` reads back (its host paths absolute): what a checkpoint keeps."""
    document = {
        "id": job.id, "command": list(job.command), "env": dict(job.env), "outputs": list(job.outputs),
        "resources": vars(job.resources), "walltime_s": job.walltime_s, "image": job.image, "network": job.network,
        "workdir": job.workdir,
        "binds": [{"source": str(bind.source), "target": bind.target, "mode": bind.mode} for bind in job.binds],
        "stage_in": [{key: value for key, value in vars(entry).items() if value is not None}
                     for entry in job.stage_in]}
    optional = {"inputs": str(job.inputs) if job.inputs else None, "cwd": job.cwd,
                "sync_interval_s": job.sync_interval_s,
                "release": {"path": str(job.release.path), "mount": job.release.mount} if job.release else None,
                "stage_out": vars(job.stage_out) if job.stage_out else None}
    return {**document, **{key: value for key, value in optional.items() if value is not None}}


def _image(value: str, base_dir: Path) -> str:
    """A name as it is; a path (it has a ``/``: a folder holding an image, vjobs/images/rootfs/folders.py) made
    absolute against ``base_dir``, an OCI layout's ``:TAG`` kept. The folder is looked at when the job runs."""
    return value if "/" not in value or value.startswith("/") else str(base_dir / value)


def _given_host_dir(value: str | None, *_where) -> Path | None:
    """A checkpoint's host path, absolute as ``job_document`` wrote it, taken as it is."""
    return None if value is None else Path(value)


def _existing_host_dir(value: str | None, base_dir: Path, source: str, pointer: str) -> Path | None:
    if value is None:
        return None
    try:
        path = (base_dir / value).resolve()
        is_dir = path.is_dir()
    except (OSError, ValueError) as exc:  # a NUL byte, a name longer than the file system allows, a loop
        why = "holds a NUL byte" if "\0" in value else getattr(exc, "strerror", None) or str(exc)
        raise InvalidJob(f"{source}: {pointer}: not a usable host path ({why}): {value[:200]!r}") from exc
    if not is_dir:
        what = "does not exist" if not path.exists() else "is not a folder"
        raise InvalidJob(f"{source}: {pointer}: {path} {what}")
    if not os.access(path, os.R_OK | os.X_OK):
        raise InvalidJob(f"{source}: {pointer}: {path} is not readable by this user (uid {os.getuid()})")
    return path
