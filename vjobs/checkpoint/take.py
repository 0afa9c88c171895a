"""Taking a running job's checkpoint: the driver saves the guest, the core copies the job's own disks (its
writable ones, its inputs' image) while it is stopped, and the checkpoint becomes the current one only once complete (folder.py)."""

from __future__ import annotations

import os
import socket
import time
from typing import Any, Callable

from vjobs._version import __version__
from vjobs.checkpoint import folder as checkpoint_folder
from vjobs.checkpoint.folder import Checkpoint, CheckpointFolder
from vjobs.checkpoint.sparse import copy_summed
from vjobs.config.job import Job
from vjobs.drivers.contract import VM
from vjobs.errors import CheckpointError
from vjobs.guest.disks import JobDisks
from vjobs.result import utc_now

GUEST, DISKS = "guest", "disks"


def estimated_bytes(vm: VM, disks: JobDisks) -> int:
    """At most what a checkpoint of ``vm`` takes: its memory, and what the job's own disks hold."""
    held = sum(os.stat(disk.path).st_blocks * 512 for disk in disks.own())
    return (vm.spec.memory_mib << 20) + held


def take(vm: VM, disks: JobDisks, into: CheckpointFolder, manifest: dict[str, Any], *, within_s: float,
         channel_position: Callable[[], dict] | None = None, max_bytes: int | None = None) -> Checkpoint:
    """Stop ``vm``'s guest and save it, with the job's own disks, as the current checkpoint in ``into``, in at
    most ``within_s`` seconds; the guest stays stopped (``vm.resume()`` lets it go on). ``manifest``: what the
    container knows of the job (its document, driver, chain, time used, read-only disks);
    ``channel_position``: the live channel's parsing position once the guest is stopped. Raises
    ``CheckpointError`` (or the driver's ``VMError``); the checkpoint before stays current."""
    if max_bytes is not None and (needed := estimated_bytes(vm, disks)) > max_bytes:
        raise CheckpointError(f"a checkpoint of this job needs up to {needed >> 20} MiB (its memory and what its "
                              f"disks hold), more than the site's checkpoint_max_gib ({max_bytes / (1 << 30):g} GiB)",
                              code="checkpoint_too_large")
    partial = into.begin()
    started = time.monotonic()
    deadline = started + within_s
    try:
        (partial / GUEST).mkdir()
        (partial / DISKS).mkdir()
        identity = vm.save_guest(partial / GUEST, deadline)
        saved_s = time.monotonic() - started
        files = {}
        for disk in disks.own():
            name = f"{DISKS}/{disk.role}.raw"
            if disk.readonly:  # the inputs' image: as vjobs made it, through the descriptor the VM was given
                files[name] = {"block_sha256": copy_summed(disk.file.fd, partial / name, deadline)}
                continue
            fd = os.open(vm.fetch_disk(disk), os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
            try:
                files[name] = {"block_sha256": copy_summed(fd, partial / name, deadline)}
            finally:
                os.close(fd)
        document = {**manifest, "format": checkpoint_folder.FORMAT, "made_at": utc_now(),
                    "made_on": socket.gethostname(), "vjobs_version": __version__, "guest": identity,
                    "channel": channel_position() if channel_position else {}, "files": files,
                    "timings": {"save_guest": round(saved_s, 3)}}
        document["timings"]["total"] = round(time.monotonic() - started, 3)
        return into.commit(partial, document)
    except OSError as error:  # a full disk, or TimeoutError: past the bound
        into.abandon(partial)
        raise CheckpointError(f"writing the checkpoint into {into.path} failed: {error}") from error
    except BaseException:  # the driver's VMError, a signal: the partial checkpoint goes, the one before stays
        into.abandon(partial)
        raise


def disk_records(disks: JobDisks, job: Job) -> list[dict[str, Any]]:
    """What a checkpoint says of each of the job's disks, in the order the guest has them: the job's own (its
    writable ones, its inputs' image) are files of the checkpoint; the other read-only ones are named by their
    sha256 and where they came from."""
    release = str(job.release.path) if job.release else None
    binds = iter(str(bind.source) for bind in job.binds if bind.mode == "ro")
    records = []
    own = disks.own()
    for disk in disks.all():
        if disk in own:
            records.append({"role": disk.role, "file": f"{DISKS}/{disk.role}.raw"})
        elif disk.role == "rootfs":
            records.append({"role": "rootfs", "sha256": disk.file.sha256(), "format": disk.format})
        else:
            source = next(binds) if disk.role == "bind" else release
            records.append({"role": disk.role, "sha256": disk.cache_key, "source": source,
                            "format": disk.path.suffix.lstrip(".")})
    return records
