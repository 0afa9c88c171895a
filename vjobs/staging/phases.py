"""The two staging phases of a job, each many files at once (``[staging] parallel``).

A stage-in failure fails the job before anything boots (``StageInFailed``, a set-up error): which file,
from where, why. A stage-out failure keeps every output in the output folder and names each file that did
not reach the destination (``StageOutFailed``); what did arrive is listed in result.json all the same.
"""

from __future__ import annotations

import contextlib
import sys
import threading
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from pathlib import Path
from typing import Callable, Iterator, Sequence

from vjobs.errors import StageInFailed, StageOutFailed
from vjobs.staging.locations import BadLocation, Wanted, check
from vjobs.staging.settings import StagingSettings
from vjobs.staging.stores import Stores
from vjobs.staging.transfer import Record, TransferError, attempts, download, upload


def stage_in(wanted: Sequence[Wanted], folder: Path, settings: StagingSettings, *,
             note: Callable[[str], None] = lambda message: None, bars: bool = False) -> list[Record]:
    """Fetch every input into ``folder`` (the working directory as the guest will see it)."""
    stores = Stores(settings)

    def fetch(item: Wanted, bar) -> Record:
        target = folder / item.path
        target.parent.mkdir(parents=True, exist_ok=True)
        remote = stores.remote(check(item.url))
        return attempts(lambda: download(remote, target, item.path, item.adler32, settings.max_file_bytes, bar),
                        retries=settings.retries, backoff_s=settings.backoff_s, scrub=_scrubber(remote.secrets),
                        note=lambda message: note(f"stage-in {item.path}: {message}"))

    records, failures = _each(wanted, fetch, settings.parallel, bars, stop_at_first=True,
                              name=lambda item: item.path)
    if failures:
        item, error = failures[0]
        raise StageInFailed(f"stage-in of {item.path} from {_shown(item.url)} failed: {error}"
                            + _retried(error, settings) + "; nothing was booted")
    return records


def stage_out(outputs: Sequence[str], folder: Path, destination: str, settings: StagingSettings, *,
              overwrite: bool = False, note: Callable[[str], None] = lambda message: None,
              bars: bool = False) -> list[Record]:
    """Upload each of ``outputs`` (paths relative to ``folder``) to ``destination``/path. Returns the uploads;
    raises ``StageOutFailed`` (with ``.uploads``, those that made it) when any did not."""
    stores = Stores(settings)
    base = check(destination)

    def put(relative: str, bar) -> Record:
        remote = stores.remote(base.child(relative))
        return attempts(lambda: upload(folder / relative, remote, relative, overwrite=overwrite,
                                       readback=settings.readback, progress=bar),
                        retries=settings.retries, backoff_s=settings.backoff_s, scrub=_scrubber(remote.secrets),
                        note=lambda message: note(f"stage-out {relative}: {message}"))

    records, failures = _each(outputs, put, settings.parallel, bars, stop_at_first=False, name=lambda path: path)
    if failures:
        listed = "; ".join(f"{path} to {base.child(path).shown}: {error}{_retried(error, settings)}"
                           for path, error in failures)
        error = StageOutFailed(f"{len(failures)} of {len(outputs)} outputs could not be staged out ({listed}); "
                               f"every output is kept in {folder}")
        error.uploads = records
        raise error
    return records


def _each(items, action, parallel: int, bars: bool, *, stop_at_first: bool, name):
    """Run ``action(item, progress)`` for every item on ``parallel`` threads; (records in item order,
    [(item, error)]). With ``stop_at_first`` the items not yet started are dropped after a failure."""
    records: dict[int, Record] = {}
    failures = []
    with ThreadPoolExecutor(max_workers=parallel, thread_name_prefix="vjobs-staging") as pool, \
            _Bars(bars) as progress:
        def run(item):
            with progress.bar(name(item)) as moved:
                return action(item, moved)

        futures = {pool.submit(run, item): (index, item) for index, item in enumerate(items)}
        pending = set(futures)
        while pending:
            done, pending = wait(pending, return_when=FIRST_EXCEPTION)
            for future in done:
                index, item = futures[future]
                try:
                    records[index] = future.result()
                except (TransferError, BadLocation, OSError) as error:
                    failures.append((item, error))
            if failures and stop_at_first:
                for future in pending:
                    future.cancel()
                wait(pending)
                pending = set()
    return [records[index] for index in sorted(records)], failures


def _retried(error: Exception, settings: StagingSettings) -> str:
    permanent = isinstance(error, TransferError) and error.permanent
    return "" if permanent or settings.retries == 0 else f" (after {settings.retries + 1} attempts)"


def _shown(url: str) -> str:
    try:
        return check(url).shown
    except BadLocation:
        return "an unusable URL"


def _scrubber(secrets: tuple[str, ...]) -> Callable[[str], str]:
    def scrub(text: str) -> str:
        for secret in secrets:
            text = text.replace(secret, "***")
        return text
    return scrub


class _Bars:
    """On a terminal, a tqdm bar (on stderr) for each file being moved, one line per worker; nothing otherwise."""

    def __init__(self, enabled: bool):
        self.enabled = enabled and sys.stderr.isatty()
        self.lines_in_use: set[int] = set()
        self.lock = threading.Lock()

    @contextlib.contextmanager
    def bar(self, name: str) -> Iterator[Callable[[int], None]]:
        if not self.enabled:
            yield lambda moved: None
            return
        from tqdm import tqdm

        with self.lock:
            line = min(set(range(len(self.lines_in_use) + 1)) - self.lines_in_use)
            self.lines_in_use.add(line)
        bar = tqdm(desc=name[-40:], unit="B", unit_scale=True, unit_divisor=1024, file=sys.stderr,
                   position=line, leave=False, mininterval=0.5)
        try:
            yield bar.update
        finally:
            bar.close()
            with self.lock:
                self.lines_in_use.discard(line)

    def __enter__(self) -> "_Bars":
        return self

    def __exit__(self, *exc) -> None:
        pass
