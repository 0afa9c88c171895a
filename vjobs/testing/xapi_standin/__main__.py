"""vjobs-xapi-standin: run the XAPI stand-in from the command line until Ctrl-C or SIGTERM."""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from pathlib import Path

from vjobs.testing.xapi_standin.calls import RUNNERS
from vjobs.testing.xapi_standin.server import XapiStandin


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="vjobs-xapi-standin", description=__doc__)
    parser.add_argument("--listen", default="127.0.0.1:0", help="HOST:PORT (port 0: any free port)")
    parser.add_argument("--state-dir", type=Path, help="where VDIs and guest files go (default: a temporary "
                                                       "folder, removed at exit)")
    parser.add_argument("--username", default="root")
    parser.add_argument("--password-file", type=Path, help="file holding the password (default: 'secret')")
    parser.add_argument("--sr-name", default="vjobs-sr")
    parser.add_argument("--sr-size-mib", type=int, default=4096)
    parser.add_argument("--host-memory-mib", type=int, default=8192, help="what host.memory_total says")
    parser.add_argument("--runner", choices=RUNNERS, default="qemu",
                        help="qemu: started VMs are QEMU TCG guests; xl: real Xen PV domains, made with xl in "
                             "the dom0 the stand-in runs in (vjobs.testing.xen_node)")
    args = parser.parse_args(argv)
    host, _, port = args.listen.rpartition(":")
    # It runs guests for whoever logs in: on the host, loopback only. In a Xen node's dom0 it listens on the
    # node's one network, QEMU's restricted user-mode network, which reaches only a loopback port of the host.
    if host not in ("127.0.0.1", "localhost", "::1") and args.runner != "xl":
        parser.error("the stand-in listens on loopback only: it runs guests for whoever logs in")
    password = args.password_file.read_text().strip() if args.password_file else "secret"
    standin = XapiStandin(args.state_dir, username=args.username, password=password, sr_name=args.sr_name,
                          sr_size_mib=args.sr_size_mib, host_memory_mib=args.host_memory_mib,
                          runner=args.runner).start(host, int(port or 0))
    done = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: done.set())
    print(f"XAPI stand-in listening on {standin.url} (user {args.username!r}, SR {args.sr_name!r}); "
          "Ctrl-C stops it", flush=True)
    done.wait()
    standin.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
