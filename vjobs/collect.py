"""Read the results a guest wrote onto its io disk: a tar stream on a raw device, read on the host without
mounting anything, and never trusted.

What comes back is filtered member by member:
- a name that is absolute, climbs with ``..``, or lies outside ``vjobs/``, ``work/`` and ``binds/N/``: the agent never
  writes one, so the guest is misbehaving: ``VMError(code="unsafe_output")`` and nothing is kept;
- links, device nodes, FIFOs: the payload may have made them, so they are skipped and listed in
  ``rejected`` (only regular files and folders come back);
- sizes: the whole stream is bounded by the io disk's size (``output_mib``) and the member count by
  ``MAX_MEMBERS``; files are written by us, with ``O_EXCL | O_NOFOLLOW``, into a fresh folder.
"""

from __future__ import annotations

import hashlib
import os
import posixpath
import shutil
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

from .disks import IO_MARKER
from .errors import VMError

MAX_MEMBERS = 100_000
MAX_STATUS_BYTES = 64 * 1024
CHUNK = 1 << 20


@dataclass(frozen=True)
class OutputFile:
    path: str
    size: int
    sha256: str


@dataclass
class GuestResults:
    status: dict[str, str] = field(default_factory=dict)
    stdout: Path | None = None
    stderr: Path | None = None
    outputs: list[OutputFile] = field(default_factory=list)
    rejected: list[dict[str, str]] = field(default_factory=list)
    bind_files: list[OutputFile] = field(default_factory=list)  # paths "N/relative" under destination/binds

    @property
    def exit_code(self) -> int | None:
        value = self.status.get("exit_code")
        return int(value) if value is not None and value.isdigit() and int(value) < 256 else None


def read_results(raw_disk: Path, destination: Path, limit_bytes: int) -> GuestResults:
    """Extract the results on ``raw_disk`` into ``destination`` (which must not exist yet): ``stdout``,
    ``stderr``, ``outputs/`` and ``binds/N/`` (the read-write binds)."""
    destination.mkdir(parents=True)
    (destination / "outputs").mkdir()
    (destination / "binds").mkdir()
    results = GuestResults()
    budget = _Budget(limit_bytes)
    try:
        with open(raw_disk, "rb") as disk, tarfile.open(fileobj=disk, mode="r|") as archive:
            for count, member in enumerate(archive):
                if count >= MAX_MEMBERS:
                    raise VMError(f"the guest's results hold more than {MAX_MEMBERS} entries", code="unsafe_output")
                _take(archive, member, destination, results, budget)
    except tarfile.TarError as exc:
        shutil.rmtree(destination, ignore_errors=True)
        raise VMError(f"the guest wrote no readable results ({exc}); see the console log",
                      code="no_results") from exc
    except VMError:
        shutil.rmtree(destination, ignore_errors=True)
        raise
    if not results.status:
        shutil.rmtree(destination, ignore_errors=True)
        raise VMError("the guest powered off without writing results; see the console log", code="no_results")
    return results


class _Budget:
    def __init__(self, limit: int):
        self.left = limit
        self.limit = limit

    def spend(self, size: int) -> None:
        self.left -= size
        if self.left < 0:
            raise VMError(f"the guest's results exceed the io disk's {self.limit} bytes", code="output_too_large")


def _take(archive: tarfile.TarFile, member: tarfile.TarInfo, destination: Path, results: GuestResults,
          budget: _Budget) -> None:
    name = _safe_name(member.name)
    if name == IO_MARKER:
        raise VMError("the guest powered off before writing results (the io disk still holds the job); "
                      "see the console log", code="no_results")
    top, _, rest = name.partition("/")
    if top == "vjobs":
        _take_agent_file(archive, member, rest, destination, results, budget)
    elif top == "work" and rest:
        _take_output(archive, member, rest, destination / "outputs", results.outputs, results.rejected, budget)
    elif top == "binds" and rest.partition("/")[0].isdigit():
        rejected: list[dict] = []
        _take_output(archive, member, rest, destination / "binds", results.bind_files, rejected, budget)
        results.rejected += [{**entry, "path": f"binds/{entry['path']}"} for entry in rejected]
    elif name not in ("work", "binds"):
        raise VMError(f"the guest's results hold an unexpected entry {member.name!r}", code="unsafe_output")


def _safe_name(name: str) -> str:
    normal = posixpath.normpath(name)
    if name.startswith("/") or normal.startswith("..") or "\0" in name or normal in ("", "."):
        raise VMError(f"the guest's results hold an unsafe path {name!r}: refused them all", code="unsafe_output")
    return normal


def _take_agent_file(archive, member, rest, destination, results, budget) -> None:
    if rest == "status" and member.isreg() and member.size <= MAX_STATUS_BYTES:
        text = archive.extractfile(member).read().decode(errors="replace")
        results.status = dict(line.split("=", 1) for line in text.splitlines() if "=" in line)
    elif rest in ("stdout", "stderr") and member.isreg():
        path = destination / rest
        if path.exists():  # the agent writes each once: a second one is a guest making things up
            raise VMError(f"the guest's results hold vjobs/{rest} twice", code="unsafe_output")
        _write_file(archive, member, path, budget)
        setattr(results, rest, path)


def _take_output(archive, member, relative, outputs: Path, taken: list[OutputFile], rejected: list[dict],
                 budget) -> None:
    if member.isdir():
        try:
            (outputs / relative).mkdir(parents=True, exist_ok=True)
        except (FileExistsError, NotADirectoryError):
            rejected.append({"path": relative, "reason": "clashes with an entry that came earlier"})
        return
    if not member.isreg():
        kind = "symbolic link" if member.issym() else "hard link" if member.islnk() else "device or FIFO"
        rejected.append({"path": relative, "reason": f"{kind}: only regular files and folders come back"})
        return
    target = outputs / relative
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        size, digest = _write_file(archive, member, target, budget)
    except (FileExistsError, NotADirectoryError):
        rejected.append({"path": relative, "reason": "clashes with an entry that came earlier"})
        return
    taken.append(OutputFile(relative, size, digest))


def _write_file(archive, member, target: Path, budget: _Budget) -> tuple[int, str]:
    budget.spend(member.size)
    source = archive.extractfile(member)
    digest, size = hashlib.sha256(), 0
    descriptor = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
    with os.fdopen(descriptor, "wb") as handle:
        while chunk := source.read(CHUNK):
            handle.write(chunk)
            digest.update(chunk)
            size += len(chunk)
    os.utime(target, (member.mtime, member.mtime))  # as the guest left it: binds.merge_back compares it
    return size, digest.hexdigest()
