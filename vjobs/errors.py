"""The exceptions vjobs raises, and the result status and exit code each one stands for.

Catch ``VjobsError`` for everything vjobs reports on purpose; anything else is a bug in vjobs.

    VjobsError
    ├── SetupError            status "setup_error": the job, the site config or the host is not fit to run it
    │   ├── InvalidJob        a job file that is not JSON or breaks schemas/job.schema.json
    │   ├── InvalidSite       a site config that is not TOML or breaks schemas/site.schema.json
    │   ├── LimitExceeded     the job asks for more than the site allows
    │   ├── AdmissionRefused  the host's budget ([host]) has no room for the job's VM: "exceeds_host_budget"
    │   │                     (it never fits: refused at once) or "admission_timeout" (none within admission_wait_s)
    │   ├── ImageError        an image that cannot be used: not in the catalogue ("image_not_found"), a missing
    │   │                     file, a checksum mismatch, a failed build ("image_error")
    │   ├── DiskFull          work_dir or cache_dir filled up while the job was prepared or ran
    │   └── StageInFailed     a remote input could not be fetched or failed its checksum (vjobs/staging/)
    ├── DriverError           status "vm_error": the chosen driver cannot run VMs here
    │   ├── DriverNotFound    no installed driver of that name
    │   └── NoUsableDriver    every candidate's probe said no (a pilot runs the job without a VM)
    ├── VMError               status "vm_error": the VM did not boot, crashed, or returned no or unsafe results
    │   └── BootTimeout       the guest agent did not report in before the boot deadline
    ├── WalltimeExceeded      status "timeout": the payload ran past walltime_s; the VM was killed
    ├── StageOutFailed        status "stage_out_failed": the payload's outputs came back but at least one could
    │                         not be uploaded or verified; they are kept in the output folder
    ├── Cancelled             status "cancelled": SIGTERM or Ctrl-C reached vjobs; the VM was killed
    ├── Checkpointed          status "checkpointed": a job run with --checkpoint was stopped (SIGTERM, the
    │                         site's checkpoint signal) after its VM's state was saved; ``vjobs resume DIR``
    │                         continues it (vjobs/checkpoint/)
    ├── CheckpointError       status "setup_error": a checkpoint that cannot be taken (too large, a driver
    │                         that cannot save) or resumed (incomplete, tampered, another driver or QEMU)
    └── InternalError         status "internal_error": a bug in vjobs; the traceback is in a log beside
                              result.json, never on the terminal

Each class names the result ``status`` it leads to and the ``exit_code`` that ``vjobs run`` exits with, so
that a pilot can tell a vjobs failure from the payload's own exit status without parsing text.
"""

from __future__ import annotations


class VjobsError(Exception):
    """Base class: ``code`` is a stable machine-readable tag, ``str(err)`` says what happened and what to do."""

    status = "setup_error"
    exit_code = 200
    code = "error"

    def __init__(self, message: str, *, code: str | None = None):
        super().__init__(message)
        if code:
            self.code = code

    @property
    def message(self) -> str:
        return str(self)


class SetupError(VjobsError):
    status, exit_code, code = "setup_error", 200, "setup_error"


class InvalidJob(SetupError):
    code = "invalid_job"


class InvalidSite(SetupError):
    code = "invalid_site"


class LimitExceeded(SetupError):
    code = "limit_exceeded"


class AdmissionRefused(SetupError):
    """Exit 200 like every set-up failure; a pilot that wants to retry elsewhere later reads ``code``:
    "admission_timeout" is the host being busy, "exceeds_host_budget" the job never fitting here."""

    code = "admission_refused"


class ImageError(SetupError):
    code = "image_error"


class DiskFull(SetupError):
    """A host file system vjobs writes to (work_dir, cache_dir) filled up while the job was prepared or ran.
    ``DiskFull.at`` words it, for every place that finds a full disk (vjobs/host/tools.py finds most)."""
    code = "disk_full"

    @classmethod
    def at(cls, where: object = None, *, doing: str = "", detail: str = "") -> "DiskFull":
        """``where``: the file or folder being written; ``doing``: what vjobs was doing ("building the
        scratch disk of job 1"); ``detail``: what the tool said."""
        place = f" at {where}" if where else ""
        during = f" while {doing}" if doing else ""
        said = f" ({detail})" if detail else ""
        return cls(f"no space left on the host's file system{place}{during}{said}: free space under work_dir and "
                   "cache_dir (or point them elsewhere in the site config) and try again")


class StageInFailed(SetupError):
    """A remote input (``stage_in``) could not be fetched, or its adler32 did not match, after the retries."""
    code = "stage_in_failed"


class DriverError(VjobsError):
    status, exit_code, code = "vm_error", 201, "driver_error"


class DriverNotFound(DriverError):
    code = "driver_not_found"


class NoUsableDriver(DriverError):
    code = "no_usable_driver"


class VMError(VjobsError):
    status, exit_code, code = "vm_error", 202, "vm_error"


class BootTimeout(VMError):
    code = "boot_timeout"


class WalltimeExceeded(VjobsError):
    status, exit_code, code = "timeout", 203, "walltime_exceeded"


class Checkpointed(VjobsError):
    """Not a failure: the job stopped with its VM saved in its checkpoint folder, to be resumed."""
    status, exit_code, code = "checkpointed", 207, "checkpointed"


class CheckpointError(SetupError):
    code = "checkpoint_error"


class StageOutFailed(VjobsError):
    """The job ran and its outputs came back, but uploading them (``stage_out``) failed: the outputs stay in the
    output folder, so a pilot can retry the upload without running the job again."""
    status, exit_code, code = "stage_out_failed", 206, "stage_out_failed"


class Cancelled(VjobsError):
    status, exit_code, code = "cancelled", 204, "cancelled"


class InternalError(VjobsError):
    status, exit_code, code = "internal_error", 205, "internal_error"


INTERNAL_ERROR_LOG = "vjobs-internal-error.log"


def internal_error(bug: BaseException, outdir) -> InternalError:
    """An unexpected exception as an ``InternalError`` whose message points at the traceback, written to
    ``outdir/vjobs-internal-error.log`` (a report for the vjobs developers, not for the terminal): as every
    file vjobs writes for the account, never through a link and never writable by others (vjobs/host/folders.py)."""
    import os
    import traceback
    from pathlib import Path

    log = Path(outdir) / INTERNAL_ERROR_LOG
    try:
        log.parent.mkdir(0o700, parents=True, exist_ok=True)
        fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        with os.fdopen(fd, "w") as handle:
            handle.write("".join(traceback.format_exception(bug)))
        where = f"the traceback is in {log}"
    except OSError:
        where = "the traceback could not be saved"
    return InternalError(f"vjobs failed unexpectedly ({type(bug).__name__}: {str(bug)[:300]}); {where}: "
                         "please report it to the vjobs developers")


#: Exit codes of ``vjobs run`` other than the payload's own; documented in the README.
EXIT_CODES = {
    "setup_error": SetupError.exit_code,
    "no_usable_driver": DriverError.exit_code,
    "vm_error": VMError.exit_code,
    "timeout": WalltimeExceeded.exit_code,
    "cancelled": Cancelled.exit_code,
    "internal_error": InternalError.exit_code,
    "stage_out_failed": StageOutFailed.exit_code,
    "checkpointed": Checkpointed.exit_code,
}
