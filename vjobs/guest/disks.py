"""Build a job's block devices on the host, with real tools, as files in the job's folder.

- release, and each read-only bind: squashfs (or erofs) of the host folder, read-only, cached by the
  tree's fingerprint so the next job with the same folder reuses the image, opened once for the job
  (vjobs/images/checked.py): the guest's disk is that open file, whoever renames another over its path.
  The same cache entries (``cached_image``) hold the base images made from folders (vjobs/images/rootfs/folders.py);
- inputs: the job's inputs (its inputs folder, the staged remote inputs merged in) as an uncompressed erofs
  written at the speed of ``cp -a`` (vjobs/guest/erofs.py; ``mke2fs -d`` wrote each block on its own),
  attached read-only: the guest mounts it as the lower layer of an overlay at the working directory, whose
  writable layer is on the scratch disk. A job with no inputs has no such disk;
- scratch: ext4 made by ``mke2fs -d`` (no root, no mount): ``work/`` is the job's working directory (the
  overlay's mount point when there are inputs), ``binds/N/`` a copy of each read-write bind, ``vjobs/``
  receives stdout and stderr;
- io: a raw disk of ``output_mib`` that starts with the job (a tar the agent reads) and that the agent
  overwrites with the results (a tar the host reads without mounting);
- rootfs: the site's base image, passed through as it is (vjobs/images/rootfs/), read-only; the io disk tells
  the agent how to find and mount it.
See vjobs/guest/agent/ for the other side.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shlex
import shutil
import stat
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterable

from vjobs.config.job import Job
from vjobs.drivers.contract import Disk
from vjobs.errors import LimitExceeded, SetupError
from vjobs.events import Events
from vjobs.guest.binds import copy_for_guest, link_or_copy
from vjobs.guest.erofs import write_erofs
from vjobs.guest.protocol import IO_DISK_MAGIC
from vjobs.host import locks
from vjobs.host.cache import CacheHold, seal
from vjobs.host.tools import disk_full_from, run_tool
from vjobs.images.checked import CheckedFiles
from vjobs.images.store import sha256_file

if TYPE_CHECKING:
    from vjobs.images.rootfs.inspect import RootfsInfo

RELEASES = "releases"  # the cache's folder of read-only images: releases, read-only binds, images of folders
HEAD_BYTES = 65536  # the agent recognises a disk by the sha256 of this many leading bytes
MIB = 1 << 20
RELEASE_TOOLS = {
    "squashfs": lambda source, target: ["mksquashfs", str(source), str(target), "-comp", "lz4", "-noappend",
                                        "-no-xattrs", "-all-root", "-no-progress", "-quiet",
                                        "-mkfs-time", "0"],  # reproducible: a checkpoint's release is rebuilt
    "erofs": lambda source, target: ["mkfs.erofs", "-zlz4", "--all-root", "-x", "-1", str(target), str(source)],
}
INPUTS_FORMAT = "erofs"  # what the guest mounts the inputs' image as (vjobs/guest/erofs.py writes it)
UNPRIVILEGED_ID = 65534  # the uid and gid of payload_user = "unprivileged" (agent/payload-ns.sh's setpriv)


@dataclass(frozen=True)
class BaseDisk:
    """The base image as the guest gets it: the disk, and what the agent needs to mount it."""

    disk: Disk
    info: RootfsInfo
    payload_user: str = "root"


@dataclass(frozen=True)
class ReadOnlyDisk:
    """An imaged host folder (the release, a read-only bind) and where the guest mounts it."""

    disk: Disk
    target: str


@dataclass(frozen=True)
class JobDisks:
    io: Disk
    scratch: Disk
    release: Disk | None
    release_sha256: str | None
    rootfs: Disk | None = None
    read_only_binds: tuple[Disk, ...] = ()
    inputs: Disk | None = None  # read-only, but vjobs' own and the job's alone: a checkpoint carries it

    def all(self) -> tuple[Disk, ...]:
        return tuple(disk for disk in (self.io, self.scratch, self.inputs, self.release, *self.read_only_binds,
                                       self.rootfs) if disk)

    def own(self) -> tuple[Disk, ...]:
        """The disks made for this job alone, in its folder (the writable ones, the inputs' image), in the
        order of ``all``: a checkpoint carries them as files, for the job's folder and inputs may be gone
        when it is resumed."""
        return tuple(disk for disk in (self.io, self.scratch, self.inputs) if disk)


def prepare_disks(job: Job, folder: Path, cache_dir: Path, release_format: str, events: Events,
                  base: BaseDisk | None = None, *, hold: CacheHold, files: CheckedFiles, stop_grace_s: float = 10.0,
                  sync_interval_s: int | None = None,
                  staged: Path | None = None) -> JobDisks:
    """``staged``: a folder of remote inputs already fetched (vjobs/staging/), merged into the working directory.
    ``hold``: the job's hold on the cache, which keeps the release and bind images it uses; ``files``: the
    job's open files, among which those images are opened.
    Each disk built is a step of the run's ``events`` (vjobs/events.py), and so is each tool run for it."""
    read_only = []
    release, release_sha256 = None, None

    def imaged(role: str, source: Path) -> Disk:
        image, digest = release_image(source, cache_dir / RELEASES, release_format, events.progress, hold=hold,
                                      events=events)
        return Disk(role, image, "raw", readonly=True, cache_key=digest,
                    file=files.open(image, f"the {release_format} image of {source}"))

    if job.release:
        with events.step("release_image"):
            release = imaged("release", job.release.path)
        release_sha256 = release.cache_key
        read_only.append(ReadOnlyDisk(release, job.release.mount))
    for bind in job.binds:
        if bind.mode == "ro":
            with events.step("release_image", detail=bind.target):
                read_only.append(ReadOnlyDisk(imaged("bind", bind.source), bind.target))
    inputs = None
    if job.inputs or staged:
        with events.step("inputs_disk"):
            owner = UNPRIVILEGED_ID if base and base.payload_user == "unprivileged" else None
            image = build_inputs_image(job, folder, staged, owner=owner)
            inputs = Disk("inputs", image, "raw", readonly=True, file=files.open(image, "the inputs' image"))
    with events.step("scratch_disk"):
        room = inputs.file.size if inputs else 0
        scratch = Disk("scratch", build_scratch(job, folder, room_for_inputs=room, events=events), "raw",
                       readonly=False)
    with events.step("io_disk"):
        io_disk = Disk("io", build_io_disk(job, folder, scratch, read_only, release_format, base, stop_grace_s,
                                            sync_interval_s, inputs),
                       "raw", readonly=False)
    return JobDisks(io_disk, scratch, release, release_sha256, base.disk if base else None,
                    tuple(item.disk for item in read_only if item.disk.role == "bind"), inputs)


def build_disk(argv: list, what: str, folder: Path, events: Events | None = None) -> None:
    """Run a disk-building tool that writes into ``folder``: a failure says what was built, and where."""
    with (events or Events()).step("tool", detail=Path(argv[0]).name):
        run_tool(argv, f"building the {what}", where=folder, code="disk_build_failed", missing_code="tool_missing",
                 install="install squashfs-tools, erofs-utils and e2fsprogs, see the README")


def head_sha256(head: bytes) -> str:
    """How the agent recognises a disk: the sha256 of its first HEAD_BYTES (``head``)."""
    return hashlib.sha256(head[:HEAD_BYTES]).hexdigest()


# --- release -------------------------------------------------------------------------------------------

def tree_fingerprint(root: Path) -> str:
    """A key for the tree's content from names, types, modes, sizes and mtimes: rsync's quick check. Reading
    every byte of a multi-GB release on every job would cost more than building the image.

    One line per entry (relative path, mode, size, mtime in ns, link target), each folder's entries sorted
    by name, folders depth first in that order. Bytes throughout (a name need not be UTF-8), and the stat
    comes with the folder listing (os.scandir): 100,000 entries take about 0.3 s here, a third of what
    os.walk, os.lstat and f-strings took for the same lines (the same digest)."""
    digest = hashlib.sha256()
    stack = [(os.fsencode(root), b"")]
    while stack:
        folder, prefix = stack.pop()
        try:
            with os.scandir(folder) as listing:
                entries = sorted(listing, key=lambda entry: entry.name)
        except OSError:
            continue  # as os.walk: an unreadable folder adds nothing here (the image build will fail on it)
        lines, below = [], []
        for entry in entries:
            info = entry.stat(follow_symlinks=False)
            relative = prefix + entry.name
            link = os.readlink(entry.path) if stat.S_ISLNK(info.st_mode) else b""
            lines.append(b"%s\0%d\0%d\0%d\0%s\n" % (relative, info.st_mode, info.st_size, info.st_mtime_ns, link))
            if stat.S_ISDIR(info.st_mode):
                below.append((entry.path, relative + b"/"))
        digest.update(b"".join(lines))
        stack.extend(reversed(below))  # the first folder on top: depth first, in name order
    return digest.hexdigest()


def release_image(source: Path, cache: Path, fmt: str, progress: Callable[[str], None], *, hold: CacheHold,
                  events: Events | None = None) -> tuple[Path, str]:
    """The cached read-only image of ``source``: built once (under a lock), reused after, held by ``hold``
    (the job's; vjobs/host/cache.py). Returns the image and its sha256. ``events``: where the tool's run is a
    step."""
    key = hashlib.sha256(f"{fmt}\0{tree_fingerprint(source)}".encode()).hexdigest()[:32]

    def build(image: Path, _scratch: Path) -> None:
        build_disk(RELEASE_TOOLS[fmt](source, image), f"{fmt} image of the release {source}", cache, events)

    return cached_image(cache, key, fmt, f"{fmt} release image of {source}", build, progress, hold=hold,
                        source=str(source))


def cached_image(cache: Path, key: str, fmt: str, what: str, build: Callable[[Path, Path], None],
                 progress: Callable[[str], None], *, hold: CacheHold, source: str) -> tuple[Path, str]:
    """The read-only image ``cache/KEY.FMT``, a cache entry (vjobs/host/cache.py) held by ``hold`` (the job's):
    found, or made once under its lock by ``build(image, scratch)``, which writes the file ``image`` and may
    use the empty folder ``scratch``, both in a partial build that `vjobs gc` removes if its builder dies.
    Returns the image and its sha256, recorded beside it (with ``source``) when it was built. ``what`` names
    it in progress lines ("squashfs release image of /srv/release")."""
    cache.mkdir(parents=True, exist_ok=True)
    image, sidecar = cache / f"{key}.{fmt}", cache / f"{key}.json"
    with locks.exclusive(cache / f"{key}.lock"):
        if image.exists() and sidecar.exists() and hold.use(image):
            return image, json.loads(sidecar.read_text())["sha256"]
        progress(f"building the {what}")
        started = time.monotonic()
        partial = cache / f"{key}.{os.getpid()}.partial"
        shutil.rmtree(partial, ignore_errors=True)  # a dead build's, under a PID used again since
        partial.mkdir(mode=0o700)
        try:
            (partial / "scratch").mkdir()
            build(partial / "image", partial / "scratch")
            digest = sha256_file(partial / "image")
            sidecar.write_text(json.dumps({"source": source, "format": fmt, "sha256": digest}))
            seal(sidecar)
            seal(partial / "image")
            os.replace(partial / "image", image)
        finally:
            shutil.rmtree(partial, ignore_errors=True)
        hold.use(image)
    progress(f"{what} built in {time.monotonic() - started:.1f} s ({image.stat().st_size // MIB} MiB)")
    hold.added(image, progress)
    return image, digest


def cached_image_with_sum(cache_dirs: Iterable[Path], sha256: str, *, hold: CacheHold) -> Path | None:
    """An image ``cached_image`` made in the ``RELEASES`` folder of one of ``cache_dirs`` whose sha256 (its
    sidecar's) is ``sha256``, held by ``hold``; None when there is none (a checkpoint's images are found so)."""
    for cache_dir in cache_dirs:
        for sidecar in sorted((cache_dir / RELEASES).glob("*.json")):
            try:
                entry = json.loads(sidecar.read_text())
            except (OSError, ValueError):
                continue
            image = sidecar.with_suffix(f".{entry.get('format')}")
            if entry.get("sha256") == sha256 and image.is_file() and hold.use(image):
                return image
    return None


# --- inputs --------------------------------------------------------------------------------------------

def build_inputs_image(job: Job, folder: Path, staged: Path | None = None, *, owner: int | None = None) -> Path:
    """The job's inputs folder, with the fetched remote inputs (``staged``, vjobs/staging/) merged in, as the
    erofs ``folder/inputs.erofs`` (``write_erofs``: mksquashfs and mkfs.erofs, even uncompressed, took 1.3-2
    times as long as ``cp -a``). ``owner``: the uid and gid of every file in it (the payload's user, who must
    be able to change them; a chown in the guest would copy every input up into the overlay), else the
    host's owners, as on a scratch disk before."""
    source = job.inputs
    if staged:  # the inputs folder is not vjobs' to change: the merge happens in a hard-linked copy of it
        source = folder / "inputs-root"
        if job.inputs:
            shutil.copytree(job.inputs, source, symlinks=True, copy_function=link_or_copy)
        else:
            source.mkdir()
        merge_staged(staged, source)
    image = folder / f"inputs.{INPUTS_FORMAT}"
    try:
        write_erofs(source, image, owner=owner)
    except OSError as exc:
        full = disk_full_from(exc, doing="writing the inputs' image", where=folder)
        if full is not None:
            raise full from exc
        raise SetupError(f"building the inputs' image of job {job.id} from {source} failed: {exc}",
                         code="disk_build_failed") from exc
    if staged:
        shutil.rmtree(source)
    return image


# --- scratch -------------------------------------------------------------------------------------------

def build_scratch(job: Job, folder: Path, *, room_for_inputs: int = 0, events: Events | None = None) -> Path:
    """The scratch ext4: the working directory (empty: the inputs come on their own disk), a copy of each
    read-write bind. ``room_for_inputs``: the bytes of the inputs' image, room kept for the payload's changes
    to them (a changed input is copied up whole onto this disk); the file is sparse, so room costs nothing
    until it is used."""
    staging = folder / "scratch-root"
    (staging / "vjobs").mkdir(parents=True)
    (staging / "work").mkdir()
    for number, bind in read_write_binds(job):
        copy_for_guest(bind.source, staging / "binds" / str(number))
    used, files = _tree_usage(staging)
    used += room_for_inputs
    size_kib = (used + used // 8 + files * 4096 + job.resources.scratch_mib * MIB + 16 * MIB) // 1024
    image = folder / "scratch.ext4"
    # 4 KiB blocks: one block group per 128 MiB instead of per 8 MiB, so a fresh scratch disk is a few
    # non-zero blocks (a sparse xen upload of an empty 80 MiB scratch disk: 4 MiB instead of 14 MiB).
    build_disk(["mke2fs", "-q", "-F", "-t", "ext4", "-b", "4096", "-O", "^has_journal", "-m", "0",
                "-L", "vjobs-scratch", "-E", "root_owner=0:0", "-d", str(staging), str(image), f"{size_kib}k"],
               f"scratch disk of job {job.id} ({size_kib // 1024} MiB)", folder, events)
    shutil.rmtree(staging)
    return image


def merge_staged(staged: Path, work: Path) -> None:
    """The fetched remote inputs into the working directory, beside the inputs folder's copy. Never through a
    link the inputs folder brought (``data -> /etc`` would have the host write /etc/x): a folder on the way
    must be a real folder, and no file may be there already."""
    for folder, dirs, files in os.walk(staged):
        relative = Path(folder).relative_to(staged)
        target = work / relative
        if target.is_symlink() or not target.is_dir():
            if target.exists() or target.is_symlink():
                raise SetupError(f"stage_in puts files under {relative}, which the inputs folder has as a link or "
                                 "a file: rename one of them", code="stage_in_failed")
            target.mkdir()
        for name in files:
            if os.path.lexists(target / name):
                raise SetupError(f"stage_in's {relative / name} is also in the inputs folder: rename one of them",
                                 code="stage_in_failed")
            link_or_copy(Path(folder) / name, target / name)


def read_write_binds(job: Job):
    """(number, bind) of each read-write bind: its folder on the scratch disk is ``binds/NUMBER``."""
    return [(number, bind) for number, bind in enumerate(job.binds) if bind.mode == "rw"]


def _tree_usage(root: Path) -> tuple[int, int]:
    used = files = 0
    for folder, dirs, names in os.walk(root):
        for name in dirs + names:
            used += os.lstat(os.path.join(folder, name)).st_size
            files += 1
    return used, files


# --- io ------------------------------------------------------------------------------------------------

def build_io_disk(job: Job, folder: Path, scratch: Disk, read_only: list[ReadOnlyDisk], release_format: str,
                  base: BaseDisk | None = None, stop_grace_s: float = 10.0,
                  sync_interval_s: int | None = None, inputs: Disk | None = None) -> Path:
    with open(scratch.path, "rb") as scratch_file:  # vjobs' own, made for this job
        scratch_head = head_sha256(scratch_file.read(HEAD_BYTES))
    settings = {"SCRATCH_HEAD": scratch_head,
                # The inputs' image, the lower layer of the working directory's overlay (stage 30); none: no inputs.
                "INPUTS_HEAD": head_sha256(inputs.file.read(0, HEAD_BYTES)) if inputs else "",
                "INPUTS_FSTYPE": INPUTS_FORMAT,
                "NETWORK": "1" if job.network else "",  # the site's allow_network was checked before
                "WORKDIR": job.workdir or "",
                "CWD": job.start_dir,
                # A qcow2's head as the guest sees it, not the file's: inspect.py read it through qemu-img.
                "ROOTFS_HEAD": base.info.guest_head_sha256 if base else "",
                "ROOTFS_FSTYPE": base.info.filesystem if base else "",
                "ROOTFS_PARTITION": str(base.info.partition or "") if base else "",
                "PAYLOAD_USER": base.payload_user if base else "root",
                # The agent ends the payload itself at the wall time, counted from its start (stage 70).
                "WALLTIME_S": f"{job.walltime_s:.3f}",
                "STOP_GRACE_S": f"{stop_grace_s:.3f}",
                # The live channel (vjobs/guest/streams.py): None, no channel served at all; else sync rounds
                # and usage samples every so many seconds while the payload runs (0: none but the last).
                "LIVE_CHANNEL": "" if sync_interval_s is None else "1",
                "SYNC_INTERVAL_S": str(int(sync_interval_s or 0))}
    members = {
        IO_DISK_MAGIC: _io_marker(0),  # the job tar's length goes here once it is known (same width)
        "job/settings": "".join(f"{key}={shlex.quote(value)}\n" for key, value in settings.items()),
        "job/env.sh": "".join(f"export {key}={shlex.quote(value)}\n" for key, value in job.env.items()),
        "job/command.sh": "exec " + " ".join(shlex.quote(arg) for arg in job.command) + "\n",
        "job/outputs": "".join(f"{pattern}\n" for pattern in job.outputs),
        # One line per read-only disk (disk head, file system, guest path) and per read-write bind (its
        # number on the scratch disk, guest path). Guest paths have no spaces (schemas/job.schema.json).
        "job/ro_disks": "".join(f"{head_sha256(item.disk.file.read(0, HEAD_BYTES))} {release_format} "
                                f"{item.target}\n" for item in read_only),
        "job/rw_binds": "".join(f"{number} {bind.target}\n" for number, bind in read_write_binds(job)),
        # Fresh randomness for the guest kernel (vjobs-reseed): guests restored from one template would
        # otherwise share the template's random state.
        "job/entropy": os.urandom(32),
    }
    payload = _tar_bytes({**members, IO_DISK_MAGIC: _io_marker(len(_tar_bytes(members)))})
    size = job.resources.output_mib * MIB
    if len(payload) > size:
        raise LimitExceeded(f"job {job.id}: the job's command and env take {len(payload)} bytes, more than "
                            f"/resources/output_mib ({job.resources.output_mib} MiB); raise output_mib")
    image = folder / "io.raw"
    try:
        with open(image, "wb") as handle:
            handle.write(payload)
            handle.truncate(size)  # sparse: the rest reads as zeros
    except OSError as exc:
        full = disk_full_from(exc, doing="writing the io disk", where=folder)
        if full is None:
            raise
        raise full from exc
    return image


def _io_marker(tar_bytes: int) -> str:
    """The io disk's first member: the job tar's length, so the agent reads just that much (busybox tar
    would otherwise read the whole disk, megabytes through an emulated device, before it stops)."""
    return f"vjobs io disk 2 {tar_bytes:012d}\n"


def _tar_bytes(members: dict[str, str | bytes]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.USTAR_FORMAT) as archive:
        for name, content in members.items():
            data = content.encode() if isinstance(content, str) else content
            info = tarfile.TarInfo(name)
            info.size, info.mode = len(data), 0o644
            archive.addfile(info, io.BytesIO(data))
    return buffer.getvalue()
