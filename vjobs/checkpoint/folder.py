"""A checkpoint folder (``vjobs run --checkpoint DIR``): where a job's saved VM lies, one complete checkpoint at a time.

    DIR/                      0700, this account's (as an output folder: vjobs/host/folders.py)
      current.json            {"checkpoint": "cp-000003", "manifest_sha256": "..."}: the one to resume
      cp-000003/              the current checkpoint
        manifest.json         what it is (``Manifest``), with the sum of every other file in it
        guest/...             what the driver's ``save_guest`` wrote (qemu_user and kvm: state,
                              restore-kernel, restore-initrd; xen: suspend-image, suspended-vm.json)
        disks/io.raw          the job's own disks as the saved guest expects them: its writable ones,
        disks/scratch.raw     and its inputs' image (read-only) when it has inputs
        disks/inputs.raw
      partial-PID-N/          a checkpoint being written (``vjobs gc`` removes one whose writer is gone)

A checkpoint is written whole into a ``partial-`` folder, renamed to ``cp-N``, and only then named in
``current.json`` (replaced atomically); the checkpoint before it is removed after that. A crash at any
moment leaves ``current.json`` naming a complete checkpoint, or none yet. ``current()`` refuses a checkpoint
that is not what its manifest and ``current.json`` say: a file missing, added, grown or summed otherwise.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from vjobs.errors import CheckpointError
from vjobs.host.folders import output_folder, write_atomically
from vjobs.host.identity import pid_alive
from vjobs.images.store import sha256_file

POINTER = "current.json"
MANIFEST = "manifest.json"
FORMAT = 2  # of the manifest and the folder; a resume refuses another (2: the inputs image is a disk of its own)
CHECKPOINT_NAME = re.compile(r"cp-(\d{6})")
PARTIAL_NAME = re.compile(r"partial-(\d+)-\d+")


REGISTER = "checkpoint-folders"  # in work_dir: a file per checkpoint folder the account used, naming it


@dataclass(frozen=True)
class Checkpoint:
    """A complete checkpoint: its folder and its manifest (a dict, as ``manifest.json`` holds it)."""

    folder: Path
    manifest: dict[str, Any]

    @property
    def name(self) -> str:
        return self.folder.name

    def file(self, name: str) -> Path:
        """One of its files by its name in the manifest's ``files``; never a path outside the folder."""
        if name not in self.manifest["files"]:
            raise CheckpointError(f"the checkpoint {self.folder} has no file {name!r}")
        return self.folder / name


class CheckpointFolder:
    def __init__(self, path: str | os.PathLike):
        self.path = Path(os.path.abspath(path))

    def make(self) -> CheckpointFolder:
        """The folder, made 0700 if missing; an existing one must be this account's alone."""
        output_folder(self.path)
        os.chmod(self.path, 0o700)  # the guest's memory goes in here: nobody else reads it
        return self

    def register(self, work_dir: Path) -> None:
        """Name this folder in ``work_dir``, so that ``vjobs gc`` counts its checkpoint and clears its
        abandoned partial ones (``garbage``)."""
        register = work_dir / REGISTER
        register.mkdir(mode=0o700, exist_ok=True)
        key = hashlib.sha256(os.fsencode(self.path)).hexdigest()[:16]
        write_atomically(register / key, str(self.path) + "\n")

    # --- writing ---------------------------------------------------------------------------------------

    def begin(self) -> Path:
        """A new, empty partial folder to write a checkpoint into."""
        number = 0
        while True:
            partial = self.path / f"partial-{os.getpid()}-{number}"
            try:
                partial.mkdir(mode=0o700)
                return partial
            except FileExistsError:
                number += 1

    def commit(self, partial: Path, manifest: dict[str, Any]) -> Checkpoint:
        """Sum what ``partial`` holds into ``manifest["files"]`` (the writable disks' block sums are given
        there already), write the manifest, and make it the current checkpoint; the previous one goes."""
        for name in _files_in(partial):
            if name not in manifest["files"]:
                manifest["files"][name] = {"sha256": sha256_file(partial / name)}
            manifest["files"][name]["size"] = (partial / name).stat().st_size
            _sync(partial / name, os.O_RDONLY)  # on disk before the checkpoint is named: a node may crash
        manifest["stored_bytes"] = sum((partial / name).stat().st_blocks * 512 for name in manifest["files"])
        manifest["name"] = name = self._next_name()
        text = json.dumps(manifest, indent=2, sort_keys=True) + "\n"
        (partial / MANIFEST).write_text(text)
        folder = self.path / name
        _sync(partial / MANIFEST, os.O_RDONLY)
        os.rename(partial, folder)
        _sync(self.path, os.O_RDONLY | os.O_DIRECTORY)
        write_atomically(self.path / POINTER, json.dumps(
            {"checkpoint": name, "manifest_sha256": hashlib.sha256(text.encode()).hexdigest()}) + "\n")
        _sync(self.path, os.O_RDONLY | os.O_DIRECTORY)
        for older in self.checkpoints():
            if older.name != name:
                shutil.rmtree(older, ignore_errors=True)
        return Checkpoint(folder, manifest)

    def clear(self) -> None:
        """Once the job's results are in: its checkpoints are spent (resuming one would run its end again)."""
        (self.path / POINTER).unlink(missing_ok=True)
        for folder in self.checkpoints():
            shutil.rmtree(folder, ignore_errors=True)

    def abandon(self, partial: Path) -> None:
        shutil.rmtree(partial, ignore_errors=True)

    def _next_name(self) -> str:
        numbers = [int(CHECKPOINT_NAME.fullmatch(folder.name).group(1)) for folder in self.checkpoints()]
        return f"cp-{max(numbers, default=0) + 1:06d}"

    # --- reading ---------------------------------------------------------------------------------------

    def exists(self) -> bool:
        return (self.path / POINTER).is_file()

    def current(self) -> Checkpoint:
        """The current checkpoint, its manifest checked against ``current.json`` and its files against the
        manifest's names and sizes (their sums are checked as each is opened or copied: vjobs/checkpoint/resume.py).
        Raises ``CheckpointError`` saying what is wrong."""
        where = f"the checkpoint folder {self.path}"
        try:
            pointer = json.loads((self.path / POINTER).read_text())
            name = pointer["checkpoint"]
        except FileNotFoundError:
            raise CheckpointError(f"{where} holds no complete checkpoint ({POINTER} is missing): the job was not "
                                  "checkpointed, or its first checkpoint did not finish") from None
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise CheckpointError(f"{where}: {POINTER} is unreadable ({exc}); the folder is damaged") from exc
        if not isinstance(name, str) or not CHECKPOINT_NAME.fullmatch(name):
            raise CheckpointError(f"{where}: {POINTER} names {name!r}, not a checkpoint")
        folder = self.path / name
        try:
            text = (folder / MANIFEST).read_bytes()
        except OSError as exc:
            raise CheckpointError(f"{where}: the current checkpoint {name} has no readable manifest "
                                  f"({exc.strerror}); it is incomplete") from exc
        if hashlib.sha256(text).hexdigest() != pointer.get("manifest_sha256"):
            raise CheckpointError(f"{where}: the manifest of {name} is not the one written with it (its sha256 "
                                  "differs): it was changed; the checkpoint is refused")
        manifest = json.loads(text)
        if manifest.get("format") != FORMAT:
            raise CheckpointError(f"{where}: {name} is of checkpoint format {manifest.get('format')}, this vjobs "
                                  f"reads format {FORMAT}: resume it with the vjobs that made it")
        _check_files(folder, manifest["files"], f"{where}: {name}")
        return Checkpoint(folder, manifest)

    def checkpoints(self) -> list[Path]:
        return sorted(folder for folder in self._entries() if CHECKPOINT_NAME.fullmatch(folder.name))

    def partials(self) -> list[Path]:
        return [folder for folder in self._entries() if PARTIAL_NAME.fullmatch(folder.name)]

    def abandoned_partials(self) -> list[Path]:
        """Partial checkpoints whose writer is gone (a vjobs killed mid-save)."""
        return [folder for folder in self.partials()
                if not pid_alive(int(PARTIAL_NAME.fullmatch(folder.name).group(1)))]

    def size_bytes(self) -> int:
        return sum(entry.stat().st_blocks * 512 for folder in self.checkpoints() + self.partials()
                   for entry in folder.rglob("*") if entry.is_file() and not entry.is_symlink())

    def _entries(self) -> Iterator[Path]:
        try:
            yield from (entry for entry in self.path.iterdir() if entry.is_dir() and not entry.is_symlink())
        except FileNotFoundError:
            return


def _files_in(folder: Path) -> list[str]:
    names = []
    for entry in sorted(folder.rglob("*")):
        if entry.is_symlink() or not (entry.is_file() or entry.is_dir()):
            raise CheckpointError(f"{entry} in a checkpoint is neither a file nor a folder")
        if entry.is_file():
            names.append(str(entry.relative_to(folder)))
    return names


def _check_files(folder: Path, files: dict[str, dict], where: str) -> None:
    present = set(_files_in(folder)) - {MANIFEST}
    missing, extra = sorted(set(files) - present), sorted(present - set(files))
    if missing:
        raise CheckpointError(f"{where} is incomplete: {', '.join(missing)} missing; the checkpoint is refused")
    if extra:
        raise CheckpointError(f"{where} holds files its manifest does not name ({', '.join(extra)}): it was "
                              "changed; the checkpoint is refused")
    for name, entry in files.items():
        size = (folder / name).stat().st_size
        if size != entry.get("size"):
            raise CheckpointError(f"{where}: {name} is {size} bytes, its manifest says {entry.get('size')}: it is "
                                  "truncated or was changed; the checkpoint is refused")


def _sync(path: Path, mode: int) -> None:
    """A file's bytes, or a folder's renames, on disk: they survive a crash of the node, not only of vjobs."""
    fd = os.open(path, mode | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def garbage(work_dir: Path) -> list[str]:
    """For ``vjobs gc``: in each checkpoint folder named in ``work_dir``, remove the partial checkpoints whose
    writer is gone, and count what is kept (a checkpoint stays until it is resumed to its end or removed by
    its owner); forget a folder that is gone."""
    lines = []
    register = work_dir / REGISTER
    for entry in sorted(register.glob("*")) if register.is_dir() else ():
        folder = CheckpointFolder(entry.read_text().strip())
        for partial in folder.abandoned_partials():
            shutil.rmtree(partial, ignore_errors=True)
            lines.append(f"removed the partial checkpoint {partial} (its vjobs is gone)")
        if not folder.checkpoints() and not folder.partials():
            entry.unlink(missing_ok=True)
            continue
        current = folder.checkpoints()[-1].name if folder.checkpoints() else "none complete"
        lines.append(f"kept the checkpoint folder {folder.path}: {current}, {folder.size_bytes() >> 20} MiB "
                     "(`vjobs resume` continues it; remove it when it is not wanted)")
    return lines
