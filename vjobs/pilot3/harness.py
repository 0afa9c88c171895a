"""Run the real PanDA Pilot 3 (3.7.0.36, the ``pilot.py`` of its sdist, unmodified) through one job on this
host, against a server stand-in (``vjobs.testing.panda_standin``), for tests.

A ``PilotSite`` is a folder laid out like a tiny grid site::

    launch/    the pilot's current directory = PILOT_HOME: queuedata.json, cric_pandaqueues.json (read from
               here because no --workdir is given), pilotlog.txt, the job's work dir PanDA_Pilot-<id>/
               (the pilot tars it into the log file and removes it at the end of the job)
    storage/   a deterministic "storage element": inputs are read from, outputs and the log tarball moved to,
               <storage>/<scope split at dots>/<md5[0:2]>/<md5[2:4]>/<lfn> (Rucio's layout, as the pilot's
               ``mv`` copytool builds it when queue data ``catchall`` says ``mv_final_destination``)
    trf/       payload scripts; HARVESTER_WORKDIR points here, so the generic user's pilot copies the
               transformation's basename from here instead of downloading the (whitelisted) URL
    ddm.json   the storage-endpoint data, passed with --storagedata-url as a local file
    pilot.cfg  the pilot's own default.cfg with a few test settings (``PILOT_CONFIG``), passed through
               HARVESTER_PILOT_CONFIG: the pilot reads its whole configuration from that file if it exists
    pilot.out  the pilot's stdout and stderr

Why these choices (all from reading 3.7.0.36): the generic user accepts a transformation only if it is a
file already in the job's work dir or a URL under one of two whitelisted bases; the queue and storage data
come from local files only if each source has content (an empty one makes the pilot fall through to CRIC
on the internet, with 15-45 s sleeps between retries); stage-in with ``mv`` symlinks, stage-out moves;
``timefloor: 0`` makes the pilot stop after one job instead of asking for another.

Timing (measured on 2 cores; every delay below is a sleep or a polling loop in the pilot's code, no option,
config or queue-data setting shortens it): a finished job with a trivial payload takes ~34 s:
~1 s start-up, ~10 s before the payload starts (``execute_payloads`` takes the job before stage-in has put
it in ``finished_data_in`` and sleeps 10 x 1 s; a job with no inputs would not wait), ~3.5 s from payload end
to the final ``finished`` update (stage-out, log tarball, monitor polling), then ~19 s until the pilot
exits (zombie collection, the ``run_realtimelog`` thread's ``sleep(10)``, the workflow's ``sleep(5)``). A
failed job waits 115 s more before its final update (``wait_for_aborted_job_stageout`` never sees the job,
which the data thread has already moved on). A ``tobekilled`` job: the pilot exits 48-172 s after start.

Safety: the pilot's end-of-job cleanup kills every process of the user whose parent is PID 1. It always runs
here with PILOT_NOKILL=1 and inside its own PID namespace (``unshare --pid --fork --mount-proc
--kill-child``): when the pilot exits, or the timeout kills ``unshare``, the kernel kills everything left in
the namespace.

As a grid site runs it, the pilot may run as a pool account (``run_pilot(..., account=...)``): root makes the
namespace (``unshare`` needs root) and the pilot becomes the account inside it, with the account's Python and
its login environment, PILOT_NOKILL=1 still set.
"""

from __future__ import annotations

import configparser
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
import uuid
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Protocol

PILOT_VERSION = "3.7.0.36"
# One of the generic user's whitelisted transformation bases (pilot/user/generic/setup.py); never contacted:
# with HARVESTER_WORKDIR set the pilot copies the script from there (and skips curl).
TRF_BASE = "http://pandaserver-doma.cern.ch:25080/trf/user"
QUEUE = "VJOBS_LOCAL"
DDM_ENDPOINT = "VJOBS_LOCAL_DISK"
SCOPE = "vjobs"
# Test settings over the pilot's default.cfg. heartbeat (1800 s): a `tobekilled` reaches the pilot only in the
# reply to an updateJob, so the payload is cancelled at most this long (+~2.5 s) after the server asks.
# update_sleep (120 s): the wait between failed server updates (10 attempts). Neither changes the fixed
# delays of the module docstring.
PILOT_CONFIG = {"Pilot": {"heartbeat": "10", "update_sleep": "5"}}
# The looping-job check in minutes instead of hours, for tests of it: a job whose work directory has no file
# changed for looping_limit_default s (7200; no less than looping_limit_min_default) is killed with error 1150,
# checked every looping_verification_time s (900) once the payload has run that long (pilot/util/loopingjob.py;
# the pilot's `find -mmin` counts whole minutes, so 60 s is the shortest limit).
SHORT_LOOPING = {"looping_limit_default": "60", "looping_limit_min_default": "60",
                 "looping_verification_time": "30"}
# The work directory a job may fill, MiB (queue data maxwdir; the pilot kills a job past it + 10 %, once its
# monitoring runs; 0 would kill every job then). Also what vjobs' plugin gives the payload on its scratch disk.
MAXWDIR_MIB = 4096


class Account(Protocol):
    """A user the pilot runs as instead of the caller (vjobs.testing.accounts.Account is one): ``python`` is
    the Python that runs the pilot, ``command`` gives ``argv`` as that user runs it, with its own login
    environment plus ``extra_env`` and nothing of the caller's."""

    python: str

    def command(self, argv: list[str], extra_env: dict[str, str] | None = None) -> list[str]: ...


@dataclass
class PilotRun:
    """What one pilot run left: its exit code (0 even for failed jobs: read the server's updates), where its
    files are, and how long it took."""

    exit_code: int
    elapsed_s: float
    timed_out: bool
    stopped: bool  # ended by run_pilot's stop_when, not by itself
    launch_dir: Path
    output: Path  # the pilot's stdout+stderr
    pid: int  # of the ``unshare`` process; it has exited when run_pilot returns

    def tail(self, lines: int = 60) -> str:
        """The end of the pilot's output, to attach to a failing assertion. (Its pilotlog.txt holds only
        what came after the job: the pilot restarts its log when it looks for a next job.)"""
        return "\n".join(self.output.read_text(errors="replace").splitlines()[-lines:])


@dataclass
class PilotSite:
    """The folders and queue data of one local pseudo-site (see the module docstring)."""

    root: Path
    queue: str = QUEUE
    queue_overrides: dict = field(default_factory=dict)

    def __post_init__(self):
        self.root = Path(self.root)
        for path in (self.launch, self.storage, self.trf):
            path.mkdir(parents=True, exist_ok=True)
        self.write_queue_data()

    @property
    def launch(self) -> Path:
        return self.root / "launch"

    @property
    def storage(self) -> Path:
        return self.root / "storage"

    @property
    def trf(self) -> Path:
        return self.root / "trf"

    @property
    def ddm_file(self) -> Path:
        return self.root / "ddm.json"

    def write_queue_data(self) -> None:
        queuedata = {**queue_data(self.queue), **self.queue_overrides}
        _write_json(self.launch / "queuedata.json", queuedata)
        _write_json(self.launch / "cric_pandaqueues.json", {self.queue: queuedata})
        _write_json(self.ddm_file, {DDM_ENDPOINT: storage_endpoint(self.storage)})

    def stored(self, lfn: str, scope: str = SCOPE) -> Path:
        """Where a file of this scope and name lives on the site's storage."""
        return self.storage / rucio_path(scope, lfn)

    def put_input(self, lfn: str, data: bytes, scope: str = SCOPE) -> dict:
        """Places an input file on storage; returns its PanDA file fields (size, checksum, guid)."""
        path = self.stored(lfn, scope)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        return {"fsize": str(len(data)), "checksum": f"ad:{zlib.adler32(data):08x}", "GUID": str(uuid.uuid4())}

    def put_script(self, name: str, text: str) -> str:
        """Writes an executable payload script; returns the transformation that makes the pilot run it."""
        path = self.trf / name
        path.write_text(text)
        path.chmod(0o755)
        return f"{TRF_BASE}/{name}"


def queue_data(queue: str) -> dict:
    """PanDA queue (schedconfig) data for a local queue: ACTIVE, one job per pilot (timefloor 0), copytool mv
    for stage-in and stage-out, outputs moved to their final place (catchall mv_final_destination), no
    containers, no direct access, a work directory of MAXWDIR_MIB."""
    return {
        "nickname": queue, "panda_resource": queue, "atlas_site": queue, "site": queue,
        "state": "ACTIVE", "status": "online", "type": "production",
        "timefloor": 0, "corecount": 1, "maxrss": 0, "maxtime": 0, "maxwdir": MAXWDIR_MIB, "maxinputsize": -1,
        "copytools": {"mv": {"setup": ""}},
        "acopytools": {"pr": ["mv"], "pw": ["mv"], "pl": ["mv"]},
        "astorages": {}, "aprotocols": {},
        "catchall": "mv_final_destination",
        "container_type": "", "container_options": "",
        "direct_access_lan": False, "direct_access_wan": False, "allow_lan": True, "allow_wan": False,
        "is_cvmfs": False, "use_pcache": False, "params": {},
    }


def storage_endpoint(storage: Path) -> dict:
    """One deterministic DISK endpoint. Not used for the mv transfers (they use --output-dir and
    --input-destination-dir) but the data must not be empty, or the pilot goes to CRIC for it."""
    return {"name": DDM_ENDPOINT, "type": "DISK", "state": "ACTIVE", "site": QUEUE, "is_deterministic": True,
            "rprotocols": {}, "arprotocols": {}, "resource": {"endpoint": f"file://{storage}"}}


def rucio_path(scope: str, lfn: str) -> str:
    """<scope parts>/<md5[0:2]>/<md5[2:4]>/<lfn>, as the pilot's generic copytool definitions build it."""
    digest = hashlib.md5(f"{scope}:{lfn}".encode()).hexdigest()
    return "/".join([*filter(None, scope.split(".")), digest[0:2], digest[2:4], lfn])


def make_job(site: PilotSite, panda_id: int, script: str, *, args: str = "", inputs: dict[str, bytes] | None = None,
             outputs: tuple[str, ...] = (), scope: str = SCOPE, log: bool = True, core_count: int = 1,
             min_ram_mb: int = 2000, max_walltime_s: int = 3600, container_name: str = "", **fields) -> dict:
    """A PanDA job dict (as getJob returns it) whose payload is ``./<script> <args>`` run in the job's work
    dir, with its inputs placed on the site's storage and its script in trf/. ``log`` adds a log tarball
    (<id>.log.tgz) to the outputs, as PanDA jobs have. ``fields`` add or override any PanDA field (e.g.
    ``cmtConfig``, ``maxDiskCount``); values are strings, as the server sends them."""
    job = {
        "PandaID": panda_id, "taskID": 1, "jobsetID": 1, "attemptNr": 1, "jobName": f"vjobs-test-{panda_id}",
        "prodSourceLabel": "managed", "processingType": "vjobs-test",
        "transformation": site.put_script(f"payload-{panda_id}.sh", script), "jobPars": args,
        "swRelease": "", "homepackage": "", "cmtConfig": "", "container_name": container_name,
        "coreCount": core_count, "minRamCount": min_ram_mb, "maxWalltime": max_walltime_s,
        "maxDiskCount": 0, "maxCpuCount": 0,
        **_input_fields(site, inputs or {}, scope),
        **_output_fields(list(outputs), f"{panda_id}.log.tgz" if log else "", scope),
        **fields,
    }
    return {key: str(value) for key, value in job.items()}


def _input_fields(site: PilotSite, inputs: dict[str, bytes], scope: str) -> dict:
    """PanDA's comma-separated per-input-file fields; the files are placed on storage."""
    files = [site.put_input(lfn, data, scope) for lfn, data in inputs.items()]
    each = lambda value: ",".join(value for _ in files)  # noqa: E731
    return {
        "inFiles": ",".join(inputs), "fsize": ",".join(f["fsize"] for f in files),
        "checksum": ",".join(f["checksum"] for f in files), "GUID": ",".join(f["GUID"] for f in files),
        "scopeIn": each(scope), "realDatasetsIn": each(f"{scope}.in"), "ddmEndPointIn": each(DDM_ENDPOINT),
        "prodDBlockToken": each("local"),
    }


def _output_fields(outputs: list[str], log_file: str, scope: str) -> dict:
    """PanDA's per-output-file fields. The log file is one of outFiles but takes its scope from scopeLog."""
    every = [*outputs, log_file] if log_file else outputs
    return {
        "outFiles": ",".join(every), "scopeOut": ",".join(scope for _ in outputs),
        "realDatasets": ",".join(f"{scope}.out" for _ in every),
        "destinationDblock": ",".join(f"{scope}.out" for _ in every),
        "ddmEndPointOut": ",".join(DDM_ENDPOINT for _ in every),
        "logFile": log_file, "logGUID": str(uuid.uuid4()) if log_file else "", "scopeLog": scope,
    }


def pilot_command(site: PilotSite, pilot_dir: Path, server_url: str, *, user: str = "generic",
                  options: tuple[str, ...] = (), account: Account | None = None,
                  account_env: dict[str, str] | None = None) -> list[str]:
    """The pilot's command line, inside its own PID namespace. ``server_url`` is http://host:port. With
    ``account``, the pilot runs as that account inside the namespace, in its login environment with
    ``account_env`` added (``pilot_settings``: PILOT_NOKILL=1 is one)."""
    scheme_host, port = server_url.rsplit(":", 1)
    pilot = [
        sys.executable if account is None else account.python, str(Path(pilot_dir) / "pilot.py"),
        "-q", site.queue, "--pilot-user", user, "-w", "generic", "-d",
        "--url", scheme_host, "-p", port,
        "--output-dir", str(site.storage), "--input-destination-dir", str(site.storage),
        "--storagedata-url", str(site.ddm_file),
        "--use-rucio-traces", "false", "-t",  # no traces to Rucio, no proxy check
        *options,
    ]
    if account is not None:
        if (account_env or {}).get("PILOT_NOKILL") != "1":
            raise ValueError("the pilot runs as an account only with PILOT_NOKILL=1 (see the module docstring)")
        pilot = account.command(pilot, account_env)
    return ["unshare", "--pid", "--fork", "--mount-proc", "--kill-child", "--", *pilot]


def write_pilot_config(site: PilotSite, pilot_dir: Path, overrides: dict) -> Path:
    """The pilot's default.cfg with ``overrides`` ({section: {key: value}}), as a file of the site."""
    parser = configparser.ConfigParser(interpolation=None)
    parser.read(Path(pilot_dir) / "pilot" / "util" / "default.cfg")
    for section, values in overrides.items():
        for key, value in values.items():
            parser[section][key] = str(value)
    path = site.root / "pilot.cfg"
    with open(path, "w") as sink:
        parser.write(sink)
    return path


def pilot_settings(site: PilotSite, config: Path, extra: dict | None = None) -> dict:
    """The variables the pilot is run with, over the environment it inherits: ``extra``, then ours."""
    env = {"HARVESTER_WORKDIR": str(site.trf), "HARVESTER_PILOT_CONFIG": str(config), **(extra or {})}
    env["PILOT_NOKILL"] = "1"  # not negotiable: see the module docstring
    env["PYTHONDONTWRITEBYTECODE"] = "1"  # no __pycache__ in the sdist: its files stay as published
    return env


def pilot_environment(site: PilotSite, config: Path, extra: dict | None = None) -> dict:
    """The caller's environment without its pilot, PanDA and grid settings, and ``pilot_settings``."""
    env = {key: value for key, value in os.environ.items()
           if not key.startswith(("PILOT_", "PANDA", "HARVESTER_", "X509_"))}
    return {**env, **pilot_settings(site, config, extra)}


def run_pilot(site: PilotSite, pilot_dir: Path, server_url: str, *, user: str = "generic",
              env: dict | None = None, options: tuple[str, ...] = (), config: dict | None = None,
              timeout_s: float = 600, stop_when: Callable[[], bool] | None = None,
              account: Account | None = None) -> PilotRun:
    """Runs the pilot once (it takes one job from the server and ends) and waits for it, at most timeout_s.
    ``user`` is --pilot-user, ``env`` adds to its environment, ``options`` to its command line, ``config``
    replaces PILOT_CONFIG as the settings over its default.cfg. ``stop_when`` (polled twice a second) ends
    the pilot's namespace early once it returns True, e.g. once the server has the job's final state: after
    a failed or cancelled job the pilot idles for minutes before it exits (see the module docstring).
    ``account``: the pilot runs as that account, in its own PID namespace still (the site's folders and the
    pilot tree must be the account's to use)."""
    config_file = write_pilot_config(site, pilot_dir, PILOT_CONFIG if config is None else config)
    command = pilot_command(site, pilot_dir, server_url, user=user, options=options, account=account,
                            account_env=pilot_settings(site, config_file, env))
    output = site.root / "pilot.out"
    started = time.monotonic()
    with open(output, "wb") as sink:
        process = subprocess.Popen(command, cwd=site.launch, env=pilot_environment(site, config_file, env),
                                   stdout=sink, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                   start_new_session=True)
        ending = _wait(process, started + timeout_s, stop_when)
    return PilotRun(exit_code=process.returncode, elapsed_s=time.monotonic() - started,
                    timed_out=ending == "timeout", stopped=ending == "stopped", launch_dir=site.launch,
                    output=output, pid=process.pid)


def _wait(process: subprocess.Popen, deadline: float, stop_when: Callable[[], bool] | None) -> str:
    """Waits for the pilot: "exited" by itself, or "timeout"/"stopped" after ending its namespace."""
    while time.monotonic() < deadline:
        try:
            process.wait(timeout=0.5)
            return "exited"
        except subprocess.TimeoutExpired:
            if stop_when is not None and stop_when():
                break
    ending = "timeout" if time.monotonic() >= deadline else "stopped"
    _end_namespace(process)
    return ending


def _end_namespace(process: subprocess.Popen) -> None:
    """SIGKILLs the pilot, PID 1 of its namespace: the kernel kills every other process there and the pilot
    is gone only once they are, then ``unshare`` exits, so when this returns the namespace is empty. If that
    fails, SIGKILL to ``unshare`` itself makes its --kill-child do the same (without the wait)."""
    for child in _children(process.pid):
        os.kill(child, signal.SIGKILL)
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.kill(process.pid, signal.SIGKILL)
        process.wait()


def _children(pid: int) -> list[int]:
    try:
        return [int(word) for word in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def fetch_sdist(cache: Path) -> Path:
    """The unpacked panda-pilot sdist (the published wheel has no pilot.py), downloaded once into ``cache``
    with pip. Raises RuntimeError when pip cannot get it."""
    folder = Path(cache) / f"panda-pilot-{PILOT_VERSION}"
    if (folder / "pilot.py").is_file():
        return folder
    Path(cache).mkdir(parents=True, exist_ok=True)
    download = subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "--dest", str(cache),
         f"panda-pilot=={PILOT_VERSION}"], capture_output=True, text=True, timeout=600)
    if download.returncode != 0:
        raise RuntimeError(f"cannot download panda-pilot {PILOT_VERSION}: {download.stderr.strip()[-500:]}")
    with tarfile.open(Path(cache) / f"panda-pilot-{PILOT_VERSION}.tar.gz") as archive:
        archive.extractall(cache, filter="data")
    return folder


def why_not_runnable(pilot_dir: Path) -> str | None:
    """Why the pilot cannot be run here safely, or None: it needs the sdist's pilot.py, curl (its HTTP
    client) and its own PID namespace (``unshare --pid`` needs root)."""
    if not (Path(pilot_dir) / "pilot.py").is_file():
        return f"no pilot.py in {pilot_dir}"
    for tool in ("curl", "unshare"):
        if not shutil.which(tool):
            return f"{tool} is missing"
    probe = subprocess.run(["unshare", "--pid", "--fork", "--mount-proc", "--kill-child", "true"],
                           capture_output=True, text=True, timeout=30)
    if probe.returncode != 0:
        return f"cannot make a PID namespace: {probe.stderr.strip()}"
    return None


def leftover_processes(site: PilotSite) -> list[int]:
    """PIDs of processes on this host still working in the site's folder (there should be none)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cwd = os.readlink(entry / "cwd")
        except OSError:
            continue
        if cwd == str(site.root) or cwd.startswith(f"{site.root}/"):
            found.append(int(entry.name))
    return found


def _write_json(path: Path, document: dict) -> None:
    path.write_text(json.dumps(document, indent=1))
