"""Continuing a checkpoint (``vjobs resume DIR``): everything checked before a VM starts.

The checkpoint's own files are checked against its manifest's sums as they are opened (the saved guest:
``CheckedFiles.verified``) or copied (the job's own disks: its writable ones and its inputs' image, into the new
job folder: sparse.py). What it only
names is found by its sha256: the release and read-only bind images in this host's caches (built again from
their folder when it is here: squashfs images are reproducible), the base image through the site's catalogue.
A checkpoint made by another driver, or for a machine this host's hypervisor cannot load, is refused with
what differs (``Driver.restore_problem``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from vjobs.checkpoint.folder import Checkpoint, CheckpointFolder
from vjobs.checkpoint.sparse import copy_summed
from vjobs.checkpoint.take import GUEST
from vjobs.config.job import Job, job_from_dict
from vjobs.drivers.contract import Disk, Driver, SavedGuest
from vjobs.errors import CheckpointError, VjobsError
from vjobs.guest.disks import RELEASES, BaseDisk, JobDisks, cached_image_with_sum, release_image
from vjobs.host.cache import CacheHold
from vjobs.images.checked import CheckedFiles


@dataclass(frozen=True)
class Resumable:
    """A checkpoint to continue: its folder, the checkpoint itself, and the job it holds."""

    folder: CheckpointFolder
    checkpoint: Checkpoint
    job: Job

    @property
    def manifest(self) -> dict[str, Any]:
        return self.checkpoint.manifest

    @property
    def driver(self) -> str:
        return self.manifest["driver"]

    @property
    def run_s(self) -> float:
        """How long the payload had run when the guest was saved, over the whole chain."""
        return float(self.manifest.get("run_s", 0.0))

    def chain(self) -> list[dict[str, Any]]:
        """The checkpoints this run continues, oldest first, this one last."""
        return [*self.manifest.get("chain", []), link(self.checkpoint)]

    def check_driver(self, driver: Driver) -> None:
        """Refuse another driver than the one that saved the guest, or a host whose hypervisor cannot load it."""
        if driver.name != self.driver:
            raise CheckpointError(f"{self.checkpoint.folder} was made by the {self.driver} driver and this run "
                                  f"chose {driver.name}: resume it with --driver {self.driver}", code="checkpoint_mismatch")
        problem = driver.restore_problem(self.manifest["guest"])
        if problem:
            raise CheckpointError(f"{self.checkpoint.folder} cannot be resumed on this host: {problem}",
                                  code="checkpoint_mismatch")

    def saved_guest(self, files: CheckedFiles) -> SavedGuest:
        """The driver's files, each opened once and checked against the manifest's sha256."""
        opened = {}
        for name, entry in self.manifest["files"].items():
            if name.startswith(f"{GUEST}/"):
                opened[name.removeprefix(f"{GUEST}/")] = _verified(files, self.checkpoint.file(name), entry["sha256"])
        return SavedGuest(files=opened, identity=self.manifest["guest"])

    def disks(self, job_folder: Path, caches: list[Path], *, hold: CacheHold, files: CheckedFiles,
              base: BaseDisk | None, progress: Callable[[str], None]) -> JobDisks:
        """The disks the guest was saved with, in the same order: the job's own (writable, and the inputs'
        image) copied into ``job_folder`` (checked as they are copied), the other read-only images found by
        their sums."""
        found: dict[str, list[Disk]] = {}
        for record in self.manifest["disks"]:
            if record.get("file"):
                disk = self._copied(record, job_folder, files)
            elif record["role"] == "rootfs":
                disk = self._base_disk(record, base)
            else:
                disk = _image_by_sum(record, caches, hold=hold, files=files, progress=progress)
            found.setdefault(disk.role, []).append(disk)
        release = found.get("release", [None])[0]
        return JobDisks(io=found["io"][0], scratch=found["scratch"][0], release=release,
                        release_sha256=release.cache_key if release else None,
                        rootfs=found.get("rootfs", [None])[0], read_only_binds=tuple(found.get("bind", ())),
                        inputs=found.get("inputs", [None])[0])

    def _copied(self, record: dict, job_folder: Path, files: CheckedFiles) -> Disk:
        name = record["file"]
        target = job_folder / Path(name).name
        fd = os.open(self.checkpoint.file(name), os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
        try:
            digest = copy_summed(fd, target)
        finally:
            os.close(fd)
        if digest != self.manifest["files"][name]["block_sha256"]:
            raise CheckpointError(f"{self.checkpoint.folder}: {name} is not what was saved (its sum differs): it was "
                                  "changed or damaged; the checkpoint is refused", code="checkpoint_damaged")
        if record["role"] == "inputs":  # read-only in the guest, as when it was saved
            return Disk("inputs", target, "raw", readonly=True, file=files.open(target, "the inputs' image"))
        return Disk(record["role"], target, "raw", readonly=False)

    def _base_disk(self, record: dict, base: BaseDisk | None) -> Disk:
        if base is None or base.disk.file is None or base.disk.file.sha256() != record["sha256"]:
            have = base.disk.file.sha256() if base and base.disk.file else "none"
            raise CheckpointError(f"the job's base image {self.job.image!r} here is not the one the guest was saved "
                                  f"with (sha256 {record['sha256']}, here {have}): resume it where the site's "
                                  "catalogue has that image", code="checkpoint_mismatch")
        return base.disk


def load(path: str | os.PathLike) -> Resumable:
    """The current checkpoint in ``path`` and its job; raises ``CheckpointError`` saying what is wrong."""
    folder = CheckpointFolder(path)
    checkpoint = folder.current()
    try:
        job = job_from_dict(checkpoint.manifest["job"], source=f"{checkpoint.folder}/manifest.json: /job",
                            resumed=True)
    except (KeyError, VjobsError) as error:
        raise CheckpointError(f"{checkpoint.folder}: its job cannot be read: {error}") from error
    return Resumable(folder, checkpoint, job)


def link(checkpoint: Checkpoint) -> dict[str, Any]:
    """One checkpoint as a run's provenance lists it."""
    manifest = checkpoint.manifest
    return {"checkpoint": checkpoint.name, "folder": str(checkpoint.folder.parent), "made_at": manifest["made_at"],
            "made_on": manifest["made_on"], "driver": manifest["driver"], "run_s": manifest.get("run_s"),
            "bytes": manifest.get("stored_bytes", 0)}


def _verified(files: CheckedFiles, path: Path, sha256: str):
    try:
        return files.verified(path, f"the checkpoint's {path.name}", sha256)
    except VjobsError as error:
        raise CheckpointError(f"{path} is not what was saved: {error}; the checkpoint is refused",
                              code="checkpoint_damaged") from error


def _image_by_sum(record: dict, caches: list[Path], *, hold: CacheHold, files: CheckedFiles,
                  progress: Callable[[str], None]) -> Disk:
    """A read-only image by its sha256: in this host's caches, else built again from its folder."""
    wanted, fmt = record["sha256"], record["format"]
    image = cached_image_with_sum(caches, wanted, hold=hold)
    if image is None and record.get("source") and Path(record["source"]).is_dir():
        built, digest = release_image(Path(record["source"]), caches[0] / RELEASES, fmt, progress, hold=hold)
        image = built if digest == wanted else None
    if image is None:
        raise CheckpointError(f"the {record['role']} image the guest was saved with (sha256 {wanted}, made from "
                              f"{record.get('source')}) is not in this host's cache and that folder does not make it "
                              "again here: resume where the same release is, or copy the image into the cache",
                              code="checkpoint_image_missing")
    return Disk(record["role"], image, "raw", readonly=True, cache_key=wanted,
                file=_verified(files, image, wanted))
