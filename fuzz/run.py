#!/usr/bin/env python3
"""The fuzz campaign: every surface a user or a guest controls, 10,000 generated cases each by default.

    .venv/bin/python fuzz/run.py [--cases 10000] [SURFACE ...]     surfaces: job site cli results status

Prints the cases run and the time per surface; a crash (anything but a VjobsError) stops that surface with
hypothesis's shrunk example and a non-zero exit. The counts go into docs/security.md; each crash found
becomes a regression test. The definitions are in vjobs/testing/fuzz.py.
"""

from __future__ import annotations

import argparse
import sys
import time

from vjobs.testing.fuzz import SURFACES, run_surface


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", type=int, default=10_000)
    parser.add_argument("surfaces", nargs="*", default=list(SURFACES))
    args = parser.parse_args()
    failed = 0
    for name in args.surfaces:
        started = time.monotonic()
        try:
            ran = run_surface(name, args.cases)
        except Exception as crash:  # hypothesis re-raises the shrunk failing case
            failed += 1
            print(f"{name:8s} CRASH after shrinking: {type(crash).__name__}: {crash}", flush=True)
            continue
        print(f"{name:8s} {ran:6d} cases, 0 crashes, {time.monotonic() - started:6.1f} s", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
