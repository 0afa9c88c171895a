"""What the vjobs pilot plugin's wrapper line runs: the pilot's payload command in a VM.

    python -m vjobs.pilot3.payload --workdir DIR --image NAME [--vcpus N] [--memory-mib M] [--walltime S]
                                   [--scratch-mib M] -- COMMAND-LINE

The work directory is bound read-write at its own path and is the payload's working directory, so the
command the pilot built (with its host paths) runs unchanged; it runs under the image's ``/bin/bash``. The
payload's stdout and stderr are this process's (the pilot's payload.stdout and payload.stderr), its exit
status is this process's. A vjobs failure writes ``payload_error_report.json`` (vjobs.pilot3.errors) and
``vjobs-result.json`` into the work directory and says nothing on stderr, which the pilot scans for
container-runtime messages.

While the payload runs, what it uses in the guest goes into ``vjobs_prmon.txt`` and ``vjobs_prmon.json`` in
the work directory (vjobs.pilot3.monitor), for the pilot's monitors; what it writes there comes back every
``sync_interval_s`` (the site's setting), with the guest's modification times, for the pilot's looping check.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import vjobs
from vjobs.pilot3.errors import write_report
from vjobs.pilot3.monitor import MonitorFiles

RESULT_NAME = "vjobs-result.json"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vjobs.pilot3.payload", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", required=True, type=Path)
    parser.add_argument("--image", required=True)
    parser.add_argument("--vcpus", type=int, default=1)
    parser.add_argument("--memory-mib", type=int, default=2048)
    parser.add_argument("--walltime", type=float, default=86400)
    parser.add_argument("--scratch-mib", type=int, default=vjobs.ExecRequest.scratch_mib,
                        help="room for what the payload writes (the queue's maxwdir)")
    parser.add_argument("--site")
    parser.add_argument("command_line", nargs="...")
    args = parser.parse_args(argv)
    command = args.command_line[1:] if args.command_line[:1] == ["--"] else args.command_line
    workdir = args.workdir.resolve()
    memory_mib = max(args.memory_mib, 256)
    request = vjobs.ExecRequest(args.image, ["/bin/bash", "-c", " ".join(command)], binds=[str(workdir)],
                                pwd=str(workdir), vcpus=args.vcpus, memory_mib=memory_mib,
                                scratch_mib=args.scratch_mib, walltime_s=args.walltime)
    monitor = MonitorFiles(workdir, args.vcpus, memory_mib)
    result = vjobs.execute(request, site=args.site, result_file=workdir / RESULT_NAME,
                           event_hooks={"usage": [monitor.record]})
    monitor.conclude(result.usage)
    if result.status not in ("succeeded", "failed"):
        write_report(result, workdir)  # and nothing on stderr, which the pilot scans for runtime messages
    return result.exit_status()


if __name__ == "__main__":
    sys.exit(main())
