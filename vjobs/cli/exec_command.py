"""``vjobs exec``: the subset of ``apptainer exec`` that pilots and batch wrappers use, with a VM underneath.

    vjobs exec [--bind SRC[:DST[:ro|rw]]]... [--pwd DIR] [--env KEY=VALUE]... [--cleanenv]
               [--site FILE] [--driver NAME] [--vcpus N] [--memory-mib M] [--walltime S] [--network]
               [--result FILE] IMAGE COMMAND [ARG...]

It turns the command line into a job (``binds``, ``cwd``, no working-directory folder of its own) and runs it
with ``vjobs.run``. The payload's stdout and stderr become this command's, its exit status this command's
exit status; vjobs' own failures exit with the codes of ``vjobs run`` (200-204) and say why on stderr.
Where this differs from a container (copies, not live mounts; no host environment): docs/exec.md.
"""

from __future__ import annotations

import shutil
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from vjobs import api
from vjobs.guest.binds import folder_size
from vjobs.errors import InvalidJob, VjobsError
from vjobs.host.identity import create_owned_folder, new_owner, remove_owned_folder
from vjobs.result import Result
from vjobs.config.site import SiteConfig

MIB = 1 << 20
OUTPUT_MARGIN_MIB = 64  # room for stdout, stderr and what the payload adds to its read-write binds


@dataclass(frozen=True)
class BindSpec:
    source: Path
    target: str
    mode: str


def parse_binds(values: list[str]) -> list[BindSpec]:
    """``SRC[:DST[:ro|rw]]``, several per option when separated by commas (as apptainer takes them)."""
    binds = []
    for value in values:
        for text in filter(None, value.split(",")):
            parts = text.split(":")
            if len(parts) > 3 or (len(parts) == 3 and parts[2] not in ("ro", "rw")):
                raise InvalidJob(f"--bind {text}: expected SRC[:DST[:ro|rw]]")
            source = Path(parts[0]).expanduser().resolve()
            target = parts[1] if len(parts) > 1 and parts[1] else str(source)
            mode = parts[2] if len(parts) == 3 else "rw"
            if not source.exists():
                raise InvalidJob(f"--bind {text}: {source} does not exist on this host")
            if not source.is_dir():
                raise InvalidJob(f"--bind {text}: {source} is not a folder; a VM gets disks, so only folders can be "
                                 "bound: bind the folder that holds it")
            if not target.startswith("/"):
                raise InvalidJob(f"--bind {text}: the guest path {target!r} must be absolute")
            binds.append(BindSpec(source, target.rstrip("/") or "/", mode))
    return binds


def parse_env(values: list[str]) -> dict[str, str]:
    env = {}
    for value in values:
        key, equals, text = value.partition("=")
        if not equals:
            raise InvalidJob(f"--env {value}: expected KEY=VALUE")
        env[key] = text
    return env


def job_document(args, binds: list[BindSpec]) -> dict:
    """The job ``vjobs exec`` runs: the command in the image, the binds, no inputs or outputs of its own."""
    if not args.command:
        raise InvalidJob("vjobs exec: no COMMAND given after the IMAGE")
    read_write = sum(folder_size(bind.source)[0] for bind in binds if bind.mode == "rw")
    document = {
        "id": f"exec-{uuid.uuid4().hex[:8]}",
        "image": args.image,
        "command": list(args.command),
        "env": parse_env(args.env),
        "workdir": None,
        "cwd": args.pwd or (binds[0].target if binds else "/"),
        "binds": [{"source": str(b.source), "target": b.target, "mode": b.mode} for b in binds],
        # The read-write binds come back whole through the io disk: room for them, twice, and a margin.
        "resources": {"vcpus": args.vcpus, "memory_mib": args.memory_mib,
                      "output_mib": max(OUTPUT_MARGIN_MIB, 2 * read_write // MIB + OUTPUT_MARGIN_MIB),
                      "scratch_mib": args.scratch_mib},
        "walltime_s": args.walltime,
        "network": args.network,
    }
    return document


def run_exec(args, site: SiteConfig | None = None,
             report_failure: Callable[[Result], None] | None = None) -> int:
    """Run, relay the payload's streams, return the exit status ``vjobs exec`` should end with. ``site``:
    a ready site config (the Python API's way in), else the one ``--site`` names. ``report_failure`` says
    what went wrong when vjobs (not the payload) failed; by default on stderr."""
    report_failure = report_failure or _print_failure
    try:
        document = job_document(args, parse_binds(args.bind))
        site = site or api.load_site(args.site)
    except VjobsError as error:
        result = Result(job_id="exec", status=error.status, error={"code": error.code, "message": str(error)})
        if args.result:
            result.write(Path(args.result))
        report_failure(result)
        return result.exit_status()
    owner = new_owner("exec")
    scratch = create_owned_folder(site.work_dir / f"exec-{owner.run_id}", owner)  # so that `vjobs gc` knows it
    try:
        result = api.run(document, site=site, driver=args.driver, outdir=scratch)
        _relay(scratch / "stdout", sys.stdout)
        _relay(scratch / "stderr", sys.stderr)
        if args.result:
            shutil.copyfile(scratch / "result.json", args.result)
    finally:
        remove_owned_folder(scratch)
    if result.status not in ("succeeded", "failed"):
        report_failure(result)
    return result.exit_status()


def _print_failure(result: Result) -> None:
    print(f"vjobs exec: {result.status} [{result.error['code']}]: {result.error['message']}", file=sys.stderr)


def _relay(path: Path, stream) -> None:
    if path.exists():
        stream.flush()
        with open(path, "rb") as handle:
            shutil.copyfileobj(handle, stream.buffer)
        stream.buffer.flush()


def add_arguments(parser) -> None:
    parser.add_argument("--bind", "-B", action="append", default=[], metavar="SRC[:DST[:ro|rw]]",
                        help="a host folder in the guest: ro as a read-only disk, rw (default) copied in and "
                             "what the payload creates or changes copied back; DST defaults to SRC")
    parser.add_argument("--pwd", help="where the command starts in the guest (default: the first bind's DST)")
    parser.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                        help="set in the payload's environment (repeatable)")
    parser.add_argument("--cleanenv", "-e", action="store_true",
                        help="accepted for compatibility: the host's environment never enters the VM")
    parser.add_argument("--driver", help="use this driver (overrides the site's pin and preference)")
    parser.add_argument("--vcpus", type=int, default=1)
    parser.add_argument("--memory-mib", type=int, default=1024)
    parser.add_argument("--scratch-mib", type=int, default=1024,
                        help="room on the scratch disk for what the payload writes outside its binds")
    parser.add_argument("--walltime", type=float, default=86400, help="seconds; then the VM is stopped (exit 203)")
    parser.add_argument("--network", action="store_true", help="ask for a network (if the site allows one)")
    parser.add_argument("--result", help="also write vjobs' result.json here")
    parser.add_argument("image", help="a catalogue name or a built-in image (default, debian12)")
    parser.add_argument("command", nargs="...", help="the command and its arguments")
