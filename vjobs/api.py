"""The functions a pilot calls; the CLI is a thin layer over them."""

from __future__ import annotations

import contextlib
import functools
import os
import sys
import threading
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterator, Mapping

from vjobs.checkpoint.folder import CheckpointFolder
from vjobs.checkpoint.resume import load as load_checkpoint
from vjobs.config.exec_request import ExecRequest, job_document
from vjobs.config.job import Job, job_from_dict, load_job
from vjobs.config.site import SiteConfig, load_site
from vjobs.container.lifecycle import VMContainer
from vjobs.drivers.contract import Capabilities, Driver, HostContext
from vjobs.drivers.registry import probe_all
from vjobs.errors import VjobsError, internal_error
from vjobs.events import EventHooks, Events
from vjobs.host.cache import CacheHold
from vjobs.host.identity import boot_id, create_owned_folder, new_owner, remove_owned_folder
from vjobs.host.roles import caches
from vjobs.host.tools import not_permitted_from
from vjobs.images.catalogue import built_in_image
from vjobs.images.checked import CheckedFiles
from vjobs.result import Result, conclude_in, failed

JobLike = Job | Mapping[str, Any] | str | os.PathLike
SiteLike = SiteConfig | str | os.PathLike | None


def host_context(site: SiteConfig, progress: Callable[[str], None] | None = None, *,
                 progress_bars: bool = False, events: Events | None = None,
                 cache_hold: CacheHold | None = None, checked_files: CheckedFiles | None = None) -> HostContext:
    """What the core lends the drivers. Progress lines go out as ``progress`` events, to ``progress`` too.
    ``cache_hold``: the hold on the cache that keeps what the drivers and the built-in image use (default: a
    new one with the site's bound); ``checked_files``: where the files VMs get are opened and checked (default:
    a new set, its sums remembered in this process's own cache); their owner releases and closes them. The
    cache the drivers write is this process's own, the administrator's is theirs to read (vjobs/host/roles.py).
    Raises ``SetupError`` when this process has no cache it may write."""
    events = events or Events()
    cache_hold = cache_hold or CacheHold(site.cache_max_gib)
    if progress is not None:
        events.subscribe("progress", lambda event: progress(event.subject))
    found_in = caches(site)
    checked_files = checked_files or CheckedFiles(found_in.own, site.inspection)

    @functools.cache
    def default_boot_image():
        return built_in_image(found_in, events.progress, hold=cache_hold, files=checked_files).boot

    return HostContext(cache_dir=found_in.own, work_dir=site.work_dir, boot_id=boot_id(),
                       default_boot_image=default_boot_image, cache_hold=cache_hold, checked_files=checked_files,
                       progress=events.progress, progress_bars=progress_bars, events=events,
                       shared_cache_dir=found_in.administrators)


def _site(site: SiteLike) -> SiteConfig:
    return site if isinstance(site, SiteConfig) else load_site(site)


def _job(job: JobLike) -> Job:
    if isinstance(job, Job):
        return job
    if isinstance(job, Mapping):
        return job_from_dict(job)
    return load_job(job)


def validate(job: JobLike) -> Job:
    """The validated job; raises ``InvalidJob`` naming the field (as a JSON pointer) when it is not."""
    return _job(job)


def default_outdir(job_id: str) -> Path:
    return Path.cwd() / "vjobs-out" / job_id


def run(job: JobLike, *, site: SiteLike = None, driver: "str | Driver | None" = None, outdir: str | os.PathLike | None = None,
        progress: Callable[[str], None] | None = None, progress_bars: bool = False,
        event_hooks: EventHooks | None = None, checkpoint: str | os.PathLike | None = None) -> Result:
    """Run ``job`` in a VM and return its ``Result`` (also written to ``outdir/result.json``). Never raises a
    ``VjobsError``: a job or site that is not fit to run gives a result with status ``setup_error``.
    ``progress``: called with each progress line; ``progress_bars``: draw transfer bars for staging on stderr
    (only when it is a terminal); ``event_hooks``: the run's public events, ``{"phase_started": [hook], ...}``
    (vjobs/events.py). An unknown event name raises ``ValueError`` at once: a programming error.
    ``checkpoint``: a folder to keep the job's checkpoints in (docs/checkpoints.md): on SIGTERM or the site's
    ``checkpoint_signal`` the VM is saved there and the result says ``checkpointed``; ``resume`` continues it."""
    return _run(lambda: (_job(job), None), job, site=site, driver=driver, outdir=outdir, progress=progress,
                progress_bars=progress_bars, event_hooks=event_hooks, checkpoint=checkpoint)


def resume(checkpoint: str | os.PathLike, *, site: SiteLike = None, driver: "str | Driver | None" = None,
           outdir: str | os.PathLike | None = None, progress: Callable[[str], None] | None = None,
           progress_bars: bool = False, event_hooks: EventHooks | None = None) -> Result:
    """Continue the job saved in the checkpoint folder ``checkpoint`` where it was, here or on another node, and
    return its ``Result`` as ``run`` does (its further checkpoints go into the same folder). A checkpoint that
    is incomplete, changed, or made for a driver or machine this host cannot run gives a result with status
    ``setup_error`` and code ``checkpoint_error`` or ``checkpoint_mismatch``, and starts no VM."""
    def load():
        resumable = load_checkpoint(checkpoint)
        return resumable.job, resumable

    return _run(load, Path(checkpoint).name, site=site, driver=driver, outdir=outdir, progress=progress,
                progress_bars=progress_bars, event_hooks=event_hooks, checkpoint=checkpoint)


def _run(load: Callable[[], tuple[Job, Any]], named: Any, *, site: SiteLike, driver, outdir, progress, progress_bars,
         event_hooks, checkpoint) -> Result:
    """``run`` and ``resume``: the job (and the checkpoint it continues) from ``load``, a container for it."""
    events = Events(event_hooks)
    the_job = None
    try:
        site_config = _site(site)
        the_job, resuming = load()
        hold = CacheHold(site_config.cache_max_gib)  # the job's: the container releases it after its teardown
        context = host_context(site_config, progress, progress_bars=progress_bars, events=events, cache_hold=hold)
    except Exception as error:  # a VjobsError says what to fix; anything else is a bug, logged beside the result
        job_id = the_job.id if the_job else _job_id_guess(named)
        target = Path(outdir) if outdir else default_outdir(job_id)
        failure = error if isinstance(error, VjobsError) else not_permitted_from(error) or internal_error(error, target)
        return conclude_in(failed(job_id, failure, None), target)
    target = Path(outdir) if outdir else default_outdir(the_job.id)
    events.job_id = the_job.id
    return VMContainer(the_job, site_config, context, target, driver=driver, resume=resuming,
                       checkpoint=CheckpointFolder(checkpoint) if checkpoint is not None else None).run()


def _job_id_guess(job: Any) -> str:
    """A name for the output folder of a job that could not be read: the file's stem, if it is a usable one."""
    if isinstance(job, (str, os.PathLike)):
        stem = Path(os.fsdecode(job)).stem.replace("\0", "")
        if 0 < len(stem) <= 64 and all(c.isalnum() or c in "._-" for c in stem):
            return stem
    return "unknown"


def probe(site: SiteLike = None, progress: Callable[[str], None] = lambda message: None) -> list[Capabilities]:
    """Every installed driver's verdict on this host."""
    site_config = _site(site)
    with CacheHold(site_config.cache_max_gib) as hold:  # the built-in image a deep probe boots, while it does
        host = host_context(site_config, progress, cache_hold=hold)
        with host.checked_files:  # and its files, open
            return probe_all(site_config, host)


def running(site: SiteLike = None) -> list[dict]:
    """The jobs running on this node, as ``vjobs ps`` lists them: the caller's own, every account's for root
    (vjobs/host/running.py). Each a dict: job_id, account, uid, pid, driver, vcpus, memory_mib, phase,
    started_at, elapsed_s, outdir, usage (the latest sample from the guest, vjobs/events.py) and sync."""
    from vjobs.host.running import running_jobs

    return running_jobs(_site(site))


def execute(request: ExecRequest, *, site: SiteLike = None, driver: "str | Driver | None" = None,
            result_file: str | os.PathLike | None = None, stdout: BinaryIO | None = None,
            stderr: BinaryIO | None = None, event_hooks: EventHooks | None = None) -> Result:
    """Run a command in an image as ``vjobs exec`` does (vjobs/config/exec_request.py) and relay the payload's
    stdout and stderr to ``stdout`` and ``stderr`` (binary streams; default: this process's), as they come
    where the driver carries live streams (``VM.live_streams``), else at the end. Its exit status
    is ``result.exit_status()``. ``result_file``: also write the result there. Never raises a ``VjobsError``."""
    try:
        site_config = _site(site)
        document = job_document(request)
    except VjobsError as error:
        return failed("exec", error, result_file)
    owner = new_owner("exec")
    scratch = create_owned_folder(site_config.work_dir / f"exec-{owner.run_id}", owner)  # `vjobs gc` knows it
    try:
        relays = [_Relay(scratch / "stdout", stdout or sys.stdout.buffer),
                  _Relay(scratch / "stderr", stderr or sys.stderr.buffer)]
        with _relayed_while_running(relays):
            result = run(document, site=site_config, driver=driver, outdir=scratch, event_hooks=event_hooks)
        if result_file:
            result.write(Path(result_file))  # as result.json: atomically, never through a link
    finally:
        remove_owned_folder(scratch)
    return result


RELAY_INTERVAL_S = 0.25


class _Relay:
    """Copies what is added to one of the payload's files in the run's outdir to ``stream``: while it runs, the
    live copy (vjobs/guest/streams.py), which is always a prefix of the final one; at the end, the rest of that
    final copy, from where the live one stopped."""

    def __init__(self, path: Path, stream: BinaryIO):
        self.path, self.stream, self.offset = path, stream, 0

    def copy_new(self) -> None:
        try:
            with open(self.path, "rb") as handle:
                handle.seek(self.offset)
                chunk = handle.read(1 << 20)
                if not chunk:
                    return
                sys.stdout.flush(), sys.stderr.flush()  # what Python printed before comes first
                while chunk:
                    self.stream.write(chunk)
                    self.offset += len(chunk)
                    chunk = handle.read(1 << 20)
        except FileNotFoundError:  # not written yet, or being replaced by the final copy
            return
        self.stream.flush()


@contextlib.contextmanager
def _relayed_while_running(relays: list[_Relay]) -> Iterator[None]:
    done = threading.Event()

    def follow() -> None:
        while not done.wait(RELAY_INTERVAL_S):
            for relay in relays:
                relay.copy_new()

    thread = threading.Thread(target=follow, name="exec-relay", daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()
        for relay in relays:
            relay.copy_new()
