"""python -m vjobs.testing.xen_node --site-out FILE: build the Xen node (once: it is cached) and boot it; when the
XAPI stand-in in its dom0 answers, write FILE, a site config for the xen driver that points at it, print one
line with its URL, and run until SIGTERM or SIGINT, then stop the node."""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from pathlib import Path

from vjobs.config.site import system_cache_dir
from vjobs.host.cache import CacheHold
from vjobs.testing.sites import write_site
from vjobs.testing.xen_node import image
from vjobs.testing.xen_node.node import BOOT_TIMEOUT_S, XenNode


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vjobs.testing.xen_node", description=__doc__)
    parser.add_argument("--site-out", type=Path, required=True, help="the site file to write once it is ready")
    parser.add_argument("--cache-dir", type=Path, default=system_cache_dir(),
                        help="where the node's files are built and kept (default: %(default)s)")
    parser.add_argument("--memory-mib", type=int, default=3072, help="the QEMU VM's memory (dom0 has 512 of it)")
    parser.add_argument("--boot-timeout-s", type=float, default=BOOT_TIMEOUT_S)
    args = parser.parse_args(argv)
    # Until the node is ready a signal ends the build or the boot at once (both clean up as they unwind);
    # then it ends the wait.
    done = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, _exit_now)
    with CacheHold() as hold:
        files = image.build(args.cache_dir, lambda line: print(line, file=sys.stderr, flush=True), hold=hold)
        with XenNode(files, memory_mib=args.memory_mib, boot_timeout_s=args.boot_timeout_s) as node:
            write_site(args.site_out, {"driver": "xen", "drivers": {"xen": node.site_settings()}})
            for sig in (signal.SIGINT, signal.SIGTERM):
                signal.signal(sig, lambda *_: done.set())
            print(f"Xen node ready in {node.boot_seconds} s: XAPI at {node.url}, site file {args.site_out} "
                  f"(QEMU pid {node.pid}); SIGTERM or Ctrl-C stops it", flush=True)
            done.wait()
    return 0


def _exit_now(signum, _frame) -> None:
    raise SystemExit(128 + signum)


if __name__ == "__main__":
    sys.exit(main())
