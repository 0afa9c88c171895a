"""One file, one direction: stream it in chunks, compute its adler32 on the way, verify, retry with back-off.

A failed attempt leaves nothing behind: a download goes to ``NAME.part`` and is renamed only once verified;
a failed or corrupt upload is removed from the storage before the next attempt.
"""

from __future__ import annotations

import contextlib
import queue
import random
import threading
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from vjobs.staging.stores import Remote

CHUNK = 8 << 20  # big enough that per-call latency (XRootD, HTTP) is small against the bytes moved


class TransferError(Exception):
    """One attempt failed. ``permanent``: retrying cannot help (not found, refused, too large)."""

    def __init__(self, message: str, *, permanent: bool = False):
        super().__init__(message)
        self.permanent = permanent


@dataclass
class Record:
    """One transfer as result.json lists it (``staged_in`` and ``uploads``)."""

    url: str
    path: str
    size: int
    adler32: str
    verified: bool
    verified_by: str | None
    seconds: float = 0.0
    attempts: int = 1


Progress = Callable[[int], None]  # called with the bytes moved since the last call


def adler32_hex(value: int) -> str:
    return f"{value & 0xFFFFFFFF:08x}"


def file_adler32(path: Path) -> str:
    value = 1
    with open(path, "rb") as handle:
        while chunk := handle.read(CHUNK):
            value = zlib.adler32(chunk, value)
    return adler32_hex(value)


def download(remote: Remote, target: Path, relative: str, expected: str | None, max_bytes: int,
             progress: Progress) -> Record:
    """Fetch ``remote`` into ``target``; verify against ``expected`` (the job's adler32) or the server's."""
    partial = target.with_name(target.name + ".part")
    value, size = 1, 0
    try:
        with remote.fs.open(remote.path, "rb", block_size=CHUNK, cache_type="none") as source, \
                open(partial, "wb") as sink, _read_ahead(source) as chunks:
            for chunk in chunks:
                size += len(chunk)
                if size > max_bytes:
                    raise TransferError(f"{remote.shown} is larger than the site allows ({max_bytes >> 20} MiB, "
                                        "[staging] max_file_gib)", permanent=True)
                value = zlib.adler32(chunk, value)
                sink.write(chunk)
                progress(len(chunk))
        got = adler32_hex(value)
        checked_by = _check_download(remote, got, expected)
        partial.rename(target)
    finally:
        partial.unlink(missing_ok=True)
    return Record(remote.shown, relative, size, got, checked_by is not None, checked_by)


@contextlib.contextmanager
def _read_ahead(source, depth: int = 3) -> Iterator[Iterator[bytes]]:
    """The source's chunks, read by a thread of their own so that the network read, the disk write and the
    checksum overlap (each library lets go of the GIL while it waits or hashes). Leaving the block early (a
    limit, an error) stops the reader; its error, if it had one, is raised here."""
    chunks: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def offer(item) -> bool:
        while not stop.is_set():
            with contextlib.suppress(queue.Full):
                chunks.put(item, timeout=0.2)
                return True
        return False

    def read() -> None:
        try:
            while (chunk := source.read(CHUNK)) and offer(chunk):
                pass
            offer(None)
        except BaseException as error:  # noqa: BLE001 -- handed to the consuming thread, which raises it
            offer(error)

    def consume() -> Iterator[bytes]:
        while (item := chunks.get()) is not None:
            if isinstance(item, BaseException):
                raise item
            yield item

    reader = threading.Thread(target=read, name="vjobs-read-ahead", daemon=True)
    reader.start()
    try:
        yield consume()
    finally:
        stop.set()
        reader.join()


def _check_download(remote: Remote, got: str, expected: str | None) -> str | None:
    if expected:
        if got != expected.lower():
            raise TransferError(f"{remote.shown}: adler32 {got} of the bytes received, the job says {expected.lower()}")
        return "job_adler32"
    server = remote.server_adler32()
    if server is None:
        return None
    if got != server:
        raise TransferError(f"{remote.shown}: adler32 {got} of the bytes received, the server says {server}")
    return "server_adler32"


def upload(source: Path, remote: Remote, relative: str, *, overwrite: bool, readback: bool,
           progress: Progress) -> Record:
    """Put ``source`` at ``remote`` and verify it there (server's adler32, else a read-back)."""
    size, local = source.stat().st_size, file_adler32(source)
    existing = _existing(remote, size, local, overwrite)
    if existing:
        progress(size)
        return Record(remote.shown, relative, size, local, True, "existing")
    try:
        parent = remote.path.rsplit("/", 1)[0]
        if parent and remote.location.kind != "s3":  # S3 has no folders to make
            remote.fs.makedirs(parent, exist_ok=True)
        with open(source, "rb") as reader:
            if remote.put:
                remote.put(reader, size, progress)
            else:
                with remote.fs.open(remote.path, "wb") as sink:
                    while chunk := reader.read(CHUNK):
                        sink.write(chunk)
                        progress(len(chunk))
        checked_by = _verify_upload(remote, size, local, readback)
    except BaseException:
        _remove_quietly(remote)  # never leave half a file, or a corrupt one, under the output's name
        raise
    return Record(remote.shown, relative, size, local, checked_by is not None, checked_by)


def _existing(remote: Remote, size: int, local: str, overwrite: bool) -> bool:
    """True when the same file is already there (a re-run of the job); a different one is an error unless
    the job asked to overwrite."""
    try:
        there = remote.fs.info(remote.path)
    except Exception as error:  # noqa: BLE001 -- libraries say "not found" in their own ways
        if is_missing(error):
            return False
        raise
    if there.get("type") == "directory":
        raise TransferError(f"{remote.shown} is a folder at the destination", permanent=True)
    same = there.get("size") == size and (remote.server_adler32() or read_adler32(remote)) == local
    if same and not overwrite:
        return True
    if not overwrite:
        raise TransferError(f"{remote.shown} already exists with other content; remove it, choose another "
                            "destination, or set stage_out.overwrite", permanent=True)
    return False


def _verify_upload(remote: Remote, size: int, local: str, readback: bool) -> str | None:
    """What the stored file was checked against: the server's adler32, a read-back, or (None) only its size."""
    server = remote.server_adler32()
    if server is not None:
        if server != local:
            raise TransferError(f"{remote.shown}: the server's adler32 is {server}, {local} was sent")
        return "server_adler32"
    if readback:
        there = read_adler32(remote)
        if there != local:
            raise TransferError(f"{remote.shown}: adler32 {there} read back, {local} was sent")
        return "readback_adler32"
    stored = remote.fs.size(remote.path)
    if stored != size:
        raise TransferError(f"{remote.shown}: {stored} bytes stored, {size} sent")
    return None


def read_adler32(remote: Remote) -> str:
    checksum = 1
    with remote.fs.open(remote.path, "rb", block_size=CHUNK, cache_type="none") as stored:
        while chunk := stored.read(CHUNK):
            checksum = zlib.adler32(chunk, checksum)
    return adler32_hex(checksum)


def _remove_quietly(remote: Remote) -> None:
    try:
        remote.fs.rm(remote.path)
    except Exception:  # noqa: BLE001 -- it may never have been created; the first error is the one to report
        pass


# --- retries -------------------------------------------------------------------------------------------

def attempts(action: Callable[[], Record], *, retries: int, backoff_s: float, scrub: Callable[[str], str],
             note: Callable[[str], None]) -> Record:
    """Run ``action`` until it succeeds, it fails permanently, or ``retries`` more attempts failed; back-off
    doubles each time, with jitter so that many jobs retrying one server do not do it in step."""
    started = time.monotonic()
    for attempt in range(1, retries + 2):
        try:
            record = action()
        except Exception as error:  # noqa: BLE001 -- every library's errors end here, classified
            permanent = is_permanent(error)
            if permanent or attempt > retries:
                raise TransferError(scrub(describe(error)), permanent=permanent) from None
            wait = backoff_s * 2 ** (attempt - 1) * random.uniform(0.8, 1.2)
            note(f"attempt {attempt} failed ({scrub(describe(error))}); retrying in {wait:.1f} s")
            time.sleep(wait)
            continue
        record.seconds, record.attempts = round(time.monotonic() - started, 3), attempt
        return record
    raise AssertionError("unreachable")


_PERMANENT_TEXT = ("[3010]", "[3011]", "[3016]", "No such file", "AccessDenied", "NoSuchBucket", "NoSuchKey")
_PERMANENT_STATUS = (401, 403, 404, 405, 409, 410, 413, 507)  # refused, missing, conflicting, full
_PERMANENT_TYPES = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError, FileExistsError)
#: webdav4's names for a refused request (it keeps the HTTP status only on the exception's cause).
_PERMANENT_NAMES = ("ForbiddenOperation", "ResourceNotFound", "ResourceConflict", "InsufficientStorage")


def is_permanent(error: BaseException) -> bool:
    """Missing files and refused permissions do not get better by retrying; broken connections may."""
    if isinstance(error, TransferError):
        return error.permanent
    for link in _chain(error):
        if isinstance(link, _PERMANENT_TYPES) or type(link).__name__ in _PERMANENT_NAMES:
            return True
        if _status(link) in _PERMANENT_STATUS:
            return True
    return any(text in str(error) for text in _PERMANENT_TEXT)


def _chain(error: BaseException):
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        yield error
        error = error.__cause__ or error.__context__


def _status(error: BaseException) -> int | None:
    """An HTTP status carried by the exception (webdav4, httpx) or its response (botocore keeps a dict)."""
    status = getattr(error, "status_code", None) or getattr(getattr(error, "response", None), "status_code", None)
    if status is None and isinstance(getattr(error, "response", None), dict):
        status = error.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    return status if isinstance(status, int) else None


def is_missing(error: BaseException) -> bool:
    """Not found, as fsspec says it, and as the XRootD client does (error 3011, kXR_NotFound)."""
    return any(isinstance(link, FileNotFoundError) or type(link).__name__ == "ResourceNotFound"
               or _status(link) == 404 for link in _chain(error)) or "[3011]" in str(error)


def describe(error: BaseException) -> str:
    text = str(error).strip() or type(error).__name__
    status = next((_status(link) for link in _chain(error) if _status(link)), None)
    if status and str(status) not in text:
        text += f" (HTTP {status})"
    if isinstance(error, FileNotFoundError):
        return f"not found ({text})" if "not found" not in text.lower() else text
    if isinstance(error, PermissionError):
        return f"refused: permission denied ({text})"
    return text
