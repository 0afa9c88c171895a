"""A command to run in an image, as ``vjobs exec`` and a pilot's payload runner give it, turned into a job.

It is the subset of ``apptainer exec`` that pilots and batch wrappers use: binds (``SRC[:DST[:ro|rw]]``), a
working directory, environment variables, the VM's size and wall time. The job it becomes has ``binds``, a
``cwd`` and no working-directory folder of its own; ``vjobs.execute`` runs it (vjobs/api.py). Where this
differs from a container (copies, not live mounts; no host environment): docs/exec.md.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

from vjobs.config.job import Bind
from vjobs.errors import InvalidJob
from vjobs.guest.binds import folder_size

MIB = 1 << 20
OUTPUT_MARGIN_MIB = 64  # room for stdout, stderr and what the payload adds to its read-write binds


@dataclass(frozen=True)
class ExecRequest:
    """What ``vjobs exec`` takes; e.g. ``ExecRequest("debian12", ["python3", "a.py"], binds=["/data:/srv"])``."""

    image: str  # a catalogue name, a built-in image, or a path to an image folder (vjobs/images/rootfs/folders.py)
    command: Sequence[str]
    binds: Sequence[str] = ()  # SRC[:DST[:ro|rw]], several per string when separated by commas
    pwd: str | None = None  # where the command starts (default: the first bind's DST, else /)
    env: Mapping[str, str] = field(default_factory=dict)
    vcpus: int = 1
    memory_mib: int = 1024
    scratch_mib: int = 1024
    walltime_s: float = 86400
    network: bool = False
    sync_interval_s: int | None = None  # None: the site's (vjobs/guest/sync.py)


def parse_binds(values: Sequence[str]) -> list[Bind]:
    """``SRC[:DST[:ro|rw]]``, several per value when separated by commas (as apptainer takes them)."""
    binds = []
    for value in values:
        for text in filter(None, value.split(",")):
            parts = text.split(":")
            if len(parts) > 3 or (len(parts) == 3 and parts[2] not in ("ro", "rw")):
                raise InvalidJob(f"--bind {text}: expected SRC[:DST[:ro|rw]]")
            source = Path(parts[0]).expanduser().resolve()
            target = parts[1] if len(parts) > 1 and parts[1] else str(source)
            mode = parts[2] if len(parts) == 3 else "rw"
            if not source.exists():
                raise InvalidJob(f"--bind {text}: {source} does not exist on this host")
            if not source.is_dir():
                raise InvalidJob(f"--bind {text}: {source} is not a folder; a VM gets disks, so only folders can be "
                                 "bound: bind the folder that holds it")
            if not target.startswith("/"):
                raise InvalidJob(f"--bind {text}: the guest path {target!r} must be absolute")
            binds.append(Bind(source, target.rstrip("/") or "/", mode))
    return binds


def parse_env(values: Sequence[str]) -> dict[str, str]:
    """``KEY=VALUE`` strings, as ``--env`` takes them."""
    env = {}
    for value in values:
        key, equals, text = value.partition("=")
        if not equals:
            raise InvalidJob(f"--env {value}: expected KEY=VALUE")
        env[key] = text
    return env


def _output_room_mib(request: ExecRequest, binds: list[Bind]) -> int:
    """The read-write binds come back whole through the io disk: room for them as the payload may leave them
    (what it adds is bounded by its scratch room), at least twice their size, and a margin for stdout and
    stderr; without read-write binds, the margin alone."""
    read_write = sum(folder_size(bind.source)[0] for bind in binds if bind.mode == "rw") // MIB
    if not any(bind.mode == "rw" for bind in binds):
        return OUTPUT_MARGIN_MIB
    return OUTPUT_MARGIN_MIB + read_write + max(read_write, request.scratch_mib)


def job_document(request: ExecRequest) -> dict:
    """The job a request runs: the command in the image, the binds, no inputs or outputs of its own."""
    if not request.command:
        raise InvalidJob("vjobs exec: no COMMAND given after the IMAGE")
    binds = parse_binds(request.binds)
    return {
        "id": f"exec-{uuid.uuid4().hex[:8]}",
        "image": request.image,
        "command": list(request.command),
        "env": dict(request.env),
        "workdir": None,
        "cwd": request.pwd or (binds[0].target if binds else "/"),
        "binds": [{"source": str(b.source), "target": b.target, "mode": b.mode} for b in binds],
        "resources": {"vcpus": request.vcpus, "memory_mib": request.memory_mib,
                      "output_mib": _output_room_mib(request, binds), "scratch_mib": request.scratch_mib},
        "walltime_s": request.walltime_s,
        "network": request.network,
        **({} if request.sync_interval_s is None else {"sync_interval_s": request.sync_interval_s}),
    }
