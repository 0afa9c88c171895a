"""``vjobs exec``: the subset of ``apptainer exec`` that pilots and batch wrappers use, with a VM underneath.

    vjobs exec [--bind SRC[:DST[:ro|rw]]]... [--pwd DIR] [--env KEY=VALUE]... [--cleanenv]
               [--site FILE] [--driver NAME] [--vcpus N] [--memory-mib M] [--walltime S] [--network]
               [--sync-interval S] [--result FILE] IMAGE COMMAND [ARG...]

The options become an ``ExecRequest`` (vjobs/config/exec_request.py) that ``vjobs.execute`` runs. The
payload's stdout and stderr become this command's, printed as they come (within a second or two, where the
driver carries live streams), its exit status this command's exit status; vjobs' own
failures exit with the codes of ``vjobs run`` (200-206) and say why on stderr.
"""

from __future__ import annotations

import sys

from vjobs import api
from vjobs.config.exec_request import ExecRequest, parse_env
from vjobs.config.site import SiteConfig
from vjobs.errors import VjobsError
from vjobs.result import Result, failed


def run_exec(args, site: SiteConfig | None = None) -> int:
    """Run, relay the payload's streams, return the exit status ``vjobs exec`` should end with. ``site``: a
    ready site config, else the one ``--site`` names."""
    try:
        request = ExecRequest(args.image, args.command, binds=args.bind, pwd=args.pwd, env=parse_env(args.env),
                              vcpus=args.vcpus, memory_mib=args.memory_mib, scratch_mib=args.scratch_mib,
                              walltime_s=args.walltime, network=args.network, sync_interval_s=args.sync_interval)
    except VjobsError as error:
        result = failed("exec", error, args.result)
    else:
        result = api.execute(request, site=site or args.site, driver=args.driver, result_file=args.result)
    if result.status not in ("succeeded", "failed"):
        _print_failure(result)
    return result.exit_status()


def _print_failure(result: Result) -> None:
    print(f"vjobs exec: {result.status} [{result.error['code']}]: {result.error['message']}", file=sys.stderr)


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
    parser.add_argument("--sync-interval", type=int, metavar="S",
                        help="bring what the payload writes in its rw binds back every S seconds while it runs, "
                             "deletions too; 0: only at the end (default: the site's sync_interval_s, 60)")
    parser.add_argument("--result", help="also write vjobs' result.json here")
    parser.add_argument("image", help="a catalogue name, a built-in image (default, debian12), or a path (with a "
                                      "'/') to a folder holding an unpacked root file system or an OCI image "
                                      "layout (PATH:TAG picks a tag)")
    parser.add_argument("command", nargs="...", help="the command and its arguments")
