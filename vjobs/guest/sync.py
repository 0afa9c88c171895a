"""A work directory that keeps up: what the payload writes comes back while it runs, not only at its end.

Every ``sync_interval_s`` the guest agent sends a sync round on its live channel (vjobs/guest/streams.py,
kind 3): a tar like the results', whose first member ``vjobs/sync`` lists every regular file the guest has
under the job's outputs (``work/...``) and read-write binds (``binds/N/...``), followed by the files that are
new or changed since its last round. The host reads it with the results' never-trusting reader
(vjobs/guest/collect.py ``extract``: safe names, regular files only, bounded by the io disk's size), then
for each read-write bind and for the outdir's ``outputs/``:

- copies each file in as the final collection does (vjobs/guest/binds.py ``merge_back``: folder by folder
  with ``O_NOFOLLOW``, replaced by a rename, the guest's mtime clamped to the host's clock);
- removes each file the guest no longer has, but only one the host still has as vjobs last saw or wrote it
  (as copied in, or as a round left it): a file the host changed meanwhile stays (``remove_gone``).

The final collection applies the same two rules to the read-write binds returned whole (``finish``), so
deletions come back whether or not a round ever ran. The outdir's ``outputs/`` is then replaced by the
final outputs, as before.
"""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from vjobs.config.job import Job
from vjobs.errors import VMError
from vjobs.guest.binds import Snapshot, merge_back, remove_gone
from vjobs.guest.collect import extract
from vjobs.guest.disks import read_write_binds
from vjobs.host.folders import output_folder
from vjobs.result import utc_at


@dataclass
class Mirror:
    """One host folder kept like its copy in the guest: ``known`` is what vjobs last saw or wrote there."""

    host_folder: Path
    known: Snapshot = field(default_factory=dict)
    changed: set[str] = field(default_factory=set)  # over the whole run: what the host folder got ...
    removed: set[str] = field(default_factory=set)  # ... and lost of what it had before

    def __post_init__(self):
        self.before = set(self.known)

    def apply(self, returned: Path, present: set[str] | frozenset[str]) -> tuple[list[str], list[str]]:
        """Copy in what came back under ``returned``, remove what is not ``present``; (changed, removed)."""
        changed = merge_back(returned, self.host_folder, self.known) if returned.is_dir() else []
        for relative in changed:
            info = (returned / relative).stat()
            self.known[relative] = (info.st_size, int(min(info.st_mtime, time.time())))
        removed = remove_gone(self.host_folder, self.known, present)
        self.changed = (self.changed | set(changed)) - set(removed)
        self.removed = (self.removed | (set(removed) & self.before)) - set(changed)
        return changed, removed


@dataclass
class RoundApplied:
    changed: int = 0  # files copied in
    removed: int = 0  # files removed
    refused: str | None = None  # why the round was not applied


class WorkSync:
    """The host's side of a job's sync: its read-write binds and outputs, as the rounds and the final
    collection bring them back."""

    def __init__(self, job: Job, outdir: Path, bind_snapshots: dict[int, Snapshot]):
        self.binds = {number: (bind, Mirror(bind.source, dict(bind_snapshots.get(number, {}))))
                      for number, bind in read_write_binds(job)}
        self.outputs = Mirror(Path(outdir) / "outputs")
        self.outdir = Path(outdir)
        self.rounds = 0
        self.refused = 0
        self.changed = 0
        self.removed = 0
        self.last_round_at: float | None = None  # time.time() of the last round applied

    def apply_round(self, tar: Path, work: Path, limit_bytes: int) -> RoundApplied:
        """Apply the round spooled in ``tar`` (extracted under ``work``, which must not exist); both are
        removed after. A round the reader refuses (unsafe names, too large, no listing) changes nothing."""
        try:
            try:
                results = extract(tar, work, limit_bytes)
            except VMError as error:
                self.refused += 1
                return RoundApplied(refused=str(error))
            if results.present is None:
                self.refused += 1
                return RoundApplied(refused="the round carried no list of the guest's files")
            applied = RoundApplied()
            for number, (_bind, mirror) in self.binds.items():
                self._count(applied, mirror.apply(work / "binds" / str(number), _under(results.present,
                                                                                    f"binds/{number}/")))
            outputs = _under(results.present, "work/")
            if outputs or self.outputs.known:
                output_folder(self.outdir)
                self.outputs.host_folder.mkdir(mode=0o755, exist_ok=True)
                self._count(applied, self.outputs.apply(work / "outputs", outputs))
            self.rounds += 1
            self.last_round_at = time.time()
            return applied
        finally:
            shutil.rmtree(work, ignore_errors=True)
            tar.unlink(missing_ok=True)

    def finish(self, returned_binds: Path, rejected: list[dict] = ()) -> list[dict]:
        """The final collection's read-write binds, returned whole under ``returned_binds/N``: what each
        bind's host folder got and lost, for the result's ``returned_binds``. ``rejected``: the results'
        entries that did not come back (``binds/N/...``: a hard link, a link, a device): the guest still has
        a file of that name, so the host's is not removed."""
        records = []
        kept = {entry["path"] for entry in rejected}
        for number, (bind, mirror) in self.binds.items():
            folder = returned_binds / str(number)
            present = set(_files_under(folder)) if folder.is_dir() else set(mirror.known)
            present |= _under(frozenset(kept), f"binds/{number}/")
            changed, removed = mirror.apply(folder, present)
            self.changed += len(changed)
            self.removed += len(removed)
            records.append({"source": str(bind.source), "target": bind.target, "changed": sorted(mirror.changed),
                            "removed": sorted(mirror.removed)})
        return records

    def summary(self, interval_s: int) -> dict:
        return {"interval_s": interval_s, "rounds": self.rounds, "refused_rounds": self.refused,
                "files_changed": self.changed, "files_removed": self.removed,
                **({"last_round_at": utc_at(self.last_round_at)} if self.last_round_at else {})}

    def _count(self, applied: RoundApplied, outcome: tuple[list[str], list[str]]) -> None:
        changed, removed = outcome
        applied.changed += len(changed)
        applied.removed += len(removed)
        self.changed += len(changed)
        self.removed += len(removed)


def _under(present: frozenset[str], prefix: str) -> set[str]:
    return {name[len(prefix):] for name in present if name.startswith(prefix) and len(name) > len(prefix)}


def _files_under(folder: Path):
    for path, _dirs, files in os.walk(folder):
        for name in files:
            yield os.path.relpath(os.path.join(path, name), folder)
