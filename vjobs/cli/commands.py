"""The ``vjobs`` command. Exit status of ``vjobs run``: the payload's own when it ran to the end, else

    200  setup_error   invalid job or site config, a limit exceeded, an image or disk that cannot be built
    201  no driver     no installed driver can run VMs here (or the pinned one cannot): run without a VM
    202  vm_error      the VM failed to boot, crashed, or returned no or unsafe results
    203  timeout       the payload ran past walltime_s; the VM was killed
    204  cancelled     SIGTERM, SIGHUP or Ctrl-C reached vjobs; the VM was killed
    205  internal      a bug in vjobs: result.json says so, the traceback is in a log beside it
    206  stage-out     the outputs came back but could not all be uploaded; they stay in the output folder
    207  checkpointed  (--checkpoint DIR) the VM was saved in DIR on SIGTERM or the checkpoint signal: resume it
      2  usage         the command line itself is wrong

Other commands exit 0 on success and 1 when what they report is a failure (an invalid job, no usable driver).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Callable

from vjobs import api
from vjobs._version import __version__
from vjobs.cli import exec_command as runtime
from vjobs.drivers.registry import installed_drivers
from vjobs.errors import InternalError, VjobsError, internal_error
from vjobs.host.cache import CacheHold
from vjobs.host.tools import not_permitted_from


def _progress(quiet: bool) -> Callable[[str], None]:
    if quiet or not sys.stderr.isatty():
        return lambda message: None
    return lambda message: print(f"vjobs: {message}", file=sys.stderr, flush=True)


def cmd_run(args) -> int:
    result = api.run(args.job, site=args.site, driver=args.driver, outdir=args.outdir,
                     progress=_progress(args.json), progress_bars=not args.json and sys.stderr.isatty(),
                     checkpoint=args.checkpoint)
    return _report(result, args)


def cmd_resume(args) -> int:
    result = api.resume(args.dir, site=args.site, driver=args.driver, outdir=args.outdir,
                        progress=_progress(args.json), progress_bars=not args.json and sys.stderr.isatty())
    return _report(result, args)


def _report(result, args) -> int:
    if args.json:
        print(json.dumps(result.to_json(), indent=2))
    else:
        _print_summary(result, args)
    return result.exit_status()


def _print_summary(result, args) -> None:
    where = Path(args.outdir) if args.outdir else api.default_outdir(result.job_id)
    line = f"job {result.job_id}: {result.status}"
    if result.exit_code is not None:
        line += f" (exit {result.exit_code})"
    if result.driver:
        line += f" on {result.driver}"
    line += f" in {result.timings.get('total', 0):.1f} s"
    print(line)
    if result.error:
        print(f"  error [{result.error['code']}]: {result.error['message']}", file=sys.stderr)
    for output in result.outputs:
        print(f"  output {output['path']} ({output['size']} bytes)")
    for upload in result.uploads:
        verified = f"verified by {upload['verified_by']}" if upload["verified"] else "NOT verified"
        print(f"  uploaded {upload['path']} to {upload['url']} ({upload['size']} bytes, adler32 {upload['adler32']}, "
              f"{verified})")
    for rejected in result.rejected_outputs:
        print(f"  not returned: {rejected['path']}: {rejected['reason']}")
    if not result.error or result.error["code"] != "outdir_unusable":  # then nothing was written there
        print(f"  result: {where / 'result.json'}")


def cmd_exec(args) -> int:
    return runtime.run_exec(args)


def cmd_validate(args) -> int:
    job = api.validate(args.job)
    print(f"{args.job}: valid job {job.id!r}")
    return 0


def cmd_probe(args) -> int:
    verdicts = api.probe(args.site, progress=_progress(args.json))
    if args.json:
        print(json.dumps([v.to_json() for v in verdicts], indent=2))
    else:
        for verdict in verdicts:
            mark = "usable" if verdict.usable else "not usable"
            print(f"{verdict.driver}: {mark}: {verdict.reason}")
            if verdict.acceleration_reason and verdict.acceleration_reason != verdict.reason:
                print(f"  acceleration: {verdict.acceleration or 'none'}: {verdict.acceleration_reason}")
            for check in verdict.checks:
                print(f"  [{'ok' if check.ok else 'no'}] {check.name}: {check.detail}")
    return 0 if any(v.usable for v in verdicts) else 1


def cmd_drivers(args) -> int:
    for driver in installed_drivers():
        state = "loads" if driver.load_error is None else f"broken: {driver.load_error}"
        print(f"{driver.name}\t{driver.target}\t{driver.distribution or '?'}\t{state}")
    return 0


def cmd_image_build(args) -> int:
    site = api.load_site(args.site)
    progress = _progress(args.json)
    with CacheHold(site.cache_max_gib) as hold:  # a build evicts down to the site's bound
        return _image_build(args, site, progress, hold)


def _image_build(args, site, progress, hold: CacheHold) -> int:
    from vjobs.host.roles import caches
    from vjobs.images.boot import build_default_image
    from vjobs.images.catalogue import refuse_to_build
    from vjobs.images.rootfs import debian

    found_in = caches(site)
    refuse_to_build(args.name, found_in)  # an account whose built-in images are the administrator's
    if args.name == "default":
        manifest = build_default_image(found_in.own, progress, hold=hold, force=args.force)
        summary = f"default image: kernel {manifest.kernel} ({manifest.kernel_version}), initramfs {manifest.initramfs}"
        document = manifest.to_json()
    else:
        base = debian.build(found_in.own, progress, hold=hold, force=args.force)
        build_default_image(found_in.own, progress, hold=hold)  # its boot image
        summary = (f"{base.name} image: {base.rootfs} ({base.size >> 20} MiB, {len(base.packages)} packages, "
                   f"python3 {base.python_version()}), sha256 {base.rootfs_sha256}")
        document = vars(base)
    print(json.dumps(document, indent=2) if args.json else summary)
    return 0


def cmd_image_inspect(args) -> int:
    from vjobs.images.checked import CheckedFile
    from vjobs.images.rootfs.inspect import inspect_rootfs

    path = Path(args.file).resolve()
    limits = api.load_site(args.site).inspection  # the site's [inspection]
    with CheckedFile.open(path, str(path)) as file:  # inspected and hashed as a job does: through one descriptor
        info = inspect_rootfs(file, limits)
        progress = _progress(args.json)
        progress(f"hashing {path} ({file.size >> 20} MiB)")
        digest, size = file.sha256(), file.size
    if args.json:
        print(json.dumps({"path": str(path), "sha256": digest, "size": size, **info.to_json()}, indent=2))
        return 0
    print(f"# {path}: {info.describe()}; {size} bytes on the host, {info.virtual_size} bytes for the guest")
    print(f"[images.{_image_name(args.name or path.name.split('.')[0])}]")
    print(f"rootfs = {json.dumps(str(path))}")  # a JSON string is a valid TOML basic string
    print(f'rootfs_sha256 = "{digest}"')
    return 0


def _image_name(text: str) -> str:
    """A catalogue name (a bare TOML key, as schemas/site.schema.json allows): ASCII letters, digits, ._-"""
    return "".join(c if c.isascii() and (c.isalnum() or c in "._-") else "-" for c in text)[:64] or "image"


def cmd_image_list(args) -> int:
    from vjobs.images.catalogue import catalogue_states

    rows = catalogue_states(api.load_site(args.site))
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        for row in rows:
            print(f"{row['name']}\t{row['kind']}\t{row['state']}\t{row['detail']}")
    return 0 if all(row["state"] in ("ok", "not built") for row in rows) else 1


def cmd_pilot3_install(args) -> int:
    from vjobs.pilot3.plugin import install_plugin

    target = install_plugin(Path(args.pilot_dir), args.name)
    print(f"installed the pilot user {args.name!r} in {target}; start the pilot with --pilot-user {args.name} "
          "(and PILOT_NOKILL=1 in its own PID namespace when testing: docs/pilot3.md)")
    return 0


def cmd_gc(args) -> int:
    from vjobs.host.gc import collect_garbage  # as the other commands' own modules: `vjobs run` does not load them

    site = api.load_site(args.site)
    lines = collect_garbage(site, api.host_context(site))
    for line in [json.dumps(lines, indent=2)] if args.json else lines:
        print(line)
    return 0


def cmd_ps(args) -> int:
    jobs = api.running(args.site)
    if args.json:
        print(json.dumps(jobs, indent=2))
        return 0
    columns = ("JOB", "ACCOUNT", "DRIVER", "VCPUS", "MEMORY", "PHASE", "ELAPSED", "CPU", "MEM NOW/PEAK", "WORKDIR")
    rows = [columns] + [_ps_row(job) for job in jobs]
    widths = [max(len(row[column]) for row in rows) for column in range(len(columns))]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())
    return 0


def _ps_row(job: dict) -> tuple[str, ...]:
    usage = job.get("usage") or {}
    cpu = usage.get("cpu_user_s", 0) + usage.get("cpu_system_s", 0) if "cpu_user_s" in usage else None
    memory = (f"{usage.get('memory_current_mib', 0):.0f}/{usage.get('memory_peak_mib', 0):.0f} MiB"
              if "memory_peak_mib" in usage else "-")
    return (str(job["job_id"]), str(job["account"]), str(job.get("driver") or "-"), str(job["vcpus"]),
            f"{job['memory_mib']} MiB", job["phase"], _duration(job["elapsed_s"]),
            "-" if cpu is None else _duration(cpu), memory,
            f"{usage['workdir_mib']:.0f} MiB" if "workdir_mib" in usage else "-")


def _duration(seconds: float) -> str:
    minutes, second = divmod(int(seconds), 60)
    hours, minute = divmod(minutes, 60)
    return f"{hours}:{minute:02d}:{second:02d}"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vjobs", description="Run grid batch jobs inside virtual machines.",
                                     epilog=__doc__.split("\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"vjobs {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    def command(name, handler, help_text):
        sub = commands.add_parser(name, help=help_text, description=help_text)
        sub.set_defaults(handler=handler)
        return sub

    run = command("run", cmd_run, "run a job in a VM; exits with the payload's exit status")
    run.add_argument("job", help="job file (JSON, schemas/job.schema.json)")
    run.add_argument("--driver", help="use this driver (overrides the site's pin and preference)")
    run.add_argument("--outdir", help="where result.json, stdout, stderr, console.log and outputs/ go "
                                      "(default ./vjobs-out/JOB_ID)")
    run.add_argument("--json", action="store_true", help="print result.json; no progress messages")
    run.add_argument("--checkpoint", metavar="DIR", help="keep the job's checkpoints in DIR: on SIGTERM (or the "
                                                         "site's checkpoint_signal) save the VM there and exit 207; "
                                                         "`vjobs resume DIR` continues it")
    resume = command("resume", cmd_resume, "continue a job saved in a checkpoint folder (vjobs run --checkpoint), "
                                           "on this node or another; exits as `vjobs run`")
    resume.add_argument("dir", help="the checkpoint folder")
    resume.add_argument("--driver", help="the driver (must be the one that saved the job)")
    resume.add_argument("--outdir", help="where result.json and the outputs go (default ./vjobs-out/JOB_ID)")
    resume.add_argument("--json", action="store_true", help="print result.json; no progress messages")
    run_exec = command("exec", cmd_exec, "run a command in a VM as `apptainer exec` would in a container: "
                                         "binds, working directory, environment; exits with its status")
    runtime.add_arguments(run_exec)
    validate = command("validate", cmd_validate, "check a job file against the schema and the host")
    validate.add_argument("job")
    probe = command("probe", cmd_probe, "say for every installed driver whether it can run VMs here, and why")
    probe.add_argument("--json", action="store_true")
    command("drivers", cmd_drivers, "list installed drivers (entry points in vjobs.drivers)")
    image = command("image", None, "build, inspect and list guest images")
    image_commands = image.add_subparsers(dest="image_command", required=True)
    build = image_commands.add_parser("build", help="build a built-in image: default (busybox) or debian12 "
                                                    "(Debian 12 with Python 3); a no-op when up to date")
    build.set_defaults(handler=cmd_image_build)
    build.add_argument("name", nargs="?", default="default", choices=["default", "debian12"])
    build.add_argument("--force", action="store_true", help="rebuild even when up to date")
    build.add_argument("--json", action="store_true")
    inspect = image_commands.add_parser("inspect", help="check a root file system image as vjobs would and "
                                                        "print its catalogue stanza")
    inspect.set_defaults(handler=cmd_image_inspect)
    inspect.add_argument("file")
    inspect.add_argument("--name", help="the catalogue name to print (default: from the file name)")
    inspect.add_argument("--json", action="store_true")
    listing = image_commands.add_parser("list", help="the site's catalogue and the built-in images, each "
                                                     "with its state")
    listing.set_defaults(handler=cmd_image_list)
    listing.add_argument("--json", action="store_true")
    pilot3 = command("pilot3", None, "PanDA Pilot 3 integration")
    pilot3_commands = pilot3.add_subparsers(dest="pilot3_command", required=True)
    install = pilot3_commands.add_parser("install", help="add the vjobs user plugin to a Pilot 3 tree: the pilot "
                                                         "then runs payloads in vjobs VMs (--pilot-user vjobs)")
    install.set_defaults(handler=cmd_pilot3_install)
    install.add_argument("pilot_dir", help="the folder that holds pilot.py and pilot/")
    install.add_argument("--name", default="vjobs", help="the pilot user's name (default vjobs)")
    gc = command("gc", cmd_gc, "remove VMs and files left by vjobs processes that are gone (job folders and "
                               "their sockets, partial builds, temporary and lock files), and evict the least "
                               "recently used cached images down to the site's cache_max_gib")
    gc.add_argument("--json", action="store_true", help="print what was removed as a JSON list")
    ps = command("ps", cmd_ps, "list the jobs running on this node (root: every account's; others: their own) "
                               "with their VM, phase, elapsed time and the payload's latest usage")
    ps.add_argument("--json", action="store_true", help="print them as a JSON list")
    for sub in (run, resume, run_exec, validate, probe, build, inspect, listing, commands.choices["drivers"],
                commands.choices["gc"], ps):
        sub.add_argument("--site", help="site config (TOML); default $VJOBS_SITE or /etc/vjobs/site.toml")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except VjobsError as error:
        print(f"vjobs: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except PermissionError as refused:  # a folder of root's or another account's: a setup to fix, not a bug
        print(f"vjobs: {not_permitted_from(refused)}", file=sys.stderr)
        return 1
    except Exception as bug:  # a bug in vjobs: one line here, the traceback in a log
        # A folder of its own with a name nobody can guess: a fixed one in /tmp could be another account's.
        print(f"vjobs: {internal_error(bug, tempfile.mkdtemp(prefix=f'vjobs-error-{os.getpid()}-'))}",
              file=sys.stderr)
        return InternalError.exit_code
