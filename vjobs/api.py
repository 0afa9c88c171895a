"""The functions a pilot calls; the CLI is a thin layer over them."""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Any, Callable, Mapping

from vjobs._version import __version__
from vjobs.host.cache import CacheHold
from vjobs.container.lifecycle import VMContainer
from vjobs.drivers.contract import Capabilities, Driver, HostContext
from vjobs.errors import VjobsError, internal_error
from vjobs.host.identity import boot_id
from vjobs.images.catalogue import built_in_image
from vjobs.config.job import Job, job_from_dict, load_job
from vjobs.drivers.registry import probe_all
from vjobs.result import Result, utc_now
from vjobs.config.site import SiteConfig, load_site

JobLike = Job | Mapping[str, Any] | str | os.PathLike
SiteLike = SiteConfig | str | os.PathLike | None


def host_context(site: SiteConfig, progress: Callable[[str], None] = lambda message: None, *,
                 progress_bars: bool = False) -> HostContext:
    @functools.cache
    def default_boot_image():
        return built_in_image(site.cache_dir, progress).boot

    return HostContext(cache_dir=site.cache_dir, work_dir=site.work_dir, boot_id=boot_id(),
                       default_boot_image=default_boot_image, progress=progress, progress_bars=progress_bars)


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
        progress: Callable[[str], None] = lambda message: None, progress_bars: bool = False) -> Result:
    """Run ``job`` in a VM and return its ``Result`` (also written to ``outdir/result.json``). Never raises a
    ``VjobsError``: a job or site that is not fit to run gives a result with status ``setup_error``.
    ``progress_bars``: draw transfer bars for staging on stderr (only when it is a terminal)."""
    try:
        site_config = _site(site)
        the_job = _job(job)
    except Exception as error:  # a VjobsError says what to fix; anything else is a bug, logged beside the result
        job_id = _job_id_guess(job)
        target = Path(outdir) if outdir else default_outdir(job_id)
        failure = error if isinstance(error, VjobsError) else internal_error(error, target)
        return _setup_failure(Result(job_id=job_id), failure, target)
    target = Path(outdir) if outdir else default_outdir(the_job.id)
    context = host_context(site_config, progress, progress_bars=progress_bars)
    container = VMContainer(the_job, site_config, context, target, driver=driver)
    with CacheHold(site_config.cache_max_gib):  # the cached images the job uses stay until it ends
        return container.run()


def _job_id_guess(job: Any) -> str:
    """A name for the output folder of a job that could not be read: the file's stem, if it is a usable one."""
    if isinstance(job, (str, os.PathLike)):
        stem = Path(os.fsdecode(job)).stem.replace("\0", "")
        if 0 < len(stem) <= 64 and all(c.isalnum() or c in "._-" for c in stem):
            return stem
    return "unknown"


def _setup_failure(result: Result, error: VjobsError, outdir: Path) -> Result:
    result.status, result.error = error.status, {"code": error.code, "message": str(error)}
    result.vjobs_version, result.started_at, result.ended_at = __version__, utc_now(), utc_now()
    result.timings["total"] = 0.0
    result.write(outdir / "result.json")
    return result


def probe(site: SiteLike = None, progress: Callable[[str], None] = lambda message: None) -> list[Capabilities]:
    """Every installed driver's verdict on this host."""
    site_config = _site(site)
    return probe_all(site_config, host_context(site_config, progress))
