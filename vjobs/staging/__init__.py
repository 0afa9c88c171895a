"""Staging: every byte a job reads from or writes to storage moves on the host, never in the guest.

    stage_in   before the VM boots: each remote input (root://, http(s)://, dav(s)://, s3://, file://) is
               fetched into the job's working directory and its adler32 verified (the job's, or the server's)
    stage_out  after the outputs came back: each is uploaded to the destination plus its relative path and
               verified (the server's adler32 when it offers one, else a read-back)

    locations.py  a URL: which storage it names, how it is shown (never with credentials)
    stores.py     one fsspec file system per storage, with the site's credentials and timeouts
    transfer.py   one file, one attempt: stream, checksum, verify; retried with back-off
    phases.py     the two phases: many files in parallel, progress bars, records for result.json
"""

from vjobs.staging.settings import StagingSettings

__all__ = ["stage_in", "stage_out", "StagingSettings"]


def __getattr__(name: str):
    """``stage_in`` and ``stage_out`` load the transfer machinery (threads, fsspec) when first asked for:
    most jobs stage nothing, and ``vjobs run`` should not pay for the import."""
    if name in ("stage_in", "stage_out"):
        from vjobs.staging import phases
        return getattr(phases, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
