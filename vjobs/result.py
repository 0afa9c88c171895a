"""The result of a job run, as returned by the Python API and written to ``result.json``
(schemas/result.schema.json)."""

from __future__ import annotations

import datetime
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from vjobs._version import __version__
from vjobs.config import schemas
from vjobs.errors import SetupError
from vjobs.guest.protocol import BEFORE_PAYLOAD
from vjobs.host.folders import make_folder, output_folder, write_atomically

RESULT_NAME = "result.json"


@dataclass
class Result:
    job_id: str
    status: str = "setup_error"
    exit_code: int | None = None
    driver: str | None = None
    timings: dict[str, float] = field(default_factory=dict)
    outputs: list[dict[str, Any]] = field(default_factory=list)
    rejected_outputs: list[dict[str, str]] = field(default_factory=list)
    returned_binds: list[dict[str, Any]] = field(default_factory=list)
    staged_in: list[dict[str, Any]] = field(default_factory=list)
    uploads: list[dict[str, Any]] = field(default_factory=list)
    usage: dict[str, Any] = field(default_factory=dict)  # the payload's use of the VM (guest/collect.py)
    sync: dict[str, Any] = field(default_factory=dict)  # what the sync rounds brought back (guest/sync.py)
    stdout: str | None = None
    stderr: str | None = None
    console_log: str | None = None
    error: dict[str, str] | None = None
    provenance: dict[str, Any] = field(default_factory=dict)
    vjobs_version: str = ""
    started_at: str = ""
    ended_at: str = ""

    @property
    def ok(self) -> bool:
        return self.status == "succeeded"

    @property
    def failed_before_payload(self) -> bool:
        """The VM never got as far as the payload: it did not boot, or the guest could not set the job up."""
        return self.status == "vm_error" and (self.error or {}).get("code") in BEFORE_PAYLOAD

    def exit_status(self) -> int:
        """The exit status of ``vjobs run`` and ``vjobs exec``: the payload's own when it ran to the end,
        else vjobs' code for what went wrong (vjobs/errors.py, the README's table)."""
        from vjobs.errors import EXIT_CODES

        if self.status in ("succeeded", "failed"):
            return self.exit_code
        if self.error and self.error["code"] in ("no_usable_driver", "driver_not_found"):
            return EXIT_CODES["no_usable_driver"]
        return EXIT_CODES[self.status]

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    def record(self, error) -> None:
        """What a ``VjobsError`` says about the run: its status and ``{"code", "message"}``."""
        self.status, self.error = error.status, {"code": error.code, "message": str(error)}

    def write(self, path: Path) -> None:
        """Atomically, so a reader never sees half a file; checked against the schema first. Only ``conclude``
        calls it: a result is written once, when the run ends."""
        document = self.to_json()
        problem = schemas.problem("result", document)
        if problem:  # a bug in vjobs, not in the job: say so loudly
            raise AssertionError(f"vjobs produced a result that breaks result.schema.json: {problem}")
        make_folder(path.parent)
        write_atomically(path, json.dumps(document, indent=2) + "\n")

    @classmethod
    def read(cls, path: Path) -> "Result":
        return cls(**json.loads(Path(path).read_text()))


def utc_now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def utc_at(seconds: float) -> str:
    """``time.time()``'s seconds as ``utc_now`` writes a time."""
    return datetime.datetime.fromtimestamp(seconds, datetime.timezone.utc).isoformat(timespec="seconds")


def conclude(result: Result, path: Path | str | None) -> Result:
    """The one writer of ``result.json``: stamps the end of the run and writes ``path`` (the file a caller
    named) atomically; with None, only stamps it. Returns the result."""
    result.vjobs_version = result.vjobs_version or __version__
    result.started_at = result.started_at or utc_now()
    result.ended_at = utc_now()
    if path is not None:
        result.write(Path(path))
    return result


def conclude_in(result: Result, outdir: Path) -> Result:
    """``conclude`` into ``outdir/result.json``, once the output folder is found to be this account's alone
    (vjobs/host/folders.py). When it is not, nothing is written into it and the result says why, unless
    something went wrong before."""
    try:
        folder = output_folder(outdir)
    except SetupError as error:
        if result.error is None:
            result.record(error)
            result.exit_code = None
        return conclude(result, None)
    return conclude(result, folder / RESULT_NAME)


def failed(job_id: str, error, path: Path | str | None) -> Result:
    """The result of a run that ended before it began (a job or site that is not fit to run), written to
    ``path`` when one is given."""
    now = utc_now()
    result = Result(job_id=job_id, timings={"total": 0.0}, vjobs_version=__version__, started_at=now, ended_at=now)
    result.record(error)
    return conclude(result, path) if path else result
