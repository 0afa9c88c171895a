#!/usr/bin/env bash
# Runs the whole test suite, VM-booting tests included, with the services the tests need started before
# and stopped after (libvirtd and virtlogd; the XAPI stand-in, XRootD, WebDAV, Swift and Slurm are started
# by the tests themselves, and a test whose server cannot start fails here rather than skips).
#   scripts/test.sh [pytest arguments]        e.g. scripts/test.sh -m "not vm" for the fast tests only
set -euo pipefail
cd "$(dirname "$0")/.."
.ci/libvirt.sh up
trap '.ci/libvirt.sh down' EXIT
VJOBS_REQUIRE_LIBVIRT=1 VJOBS_REQUIRE_PILOT3=1 VJOBS_REQUIRE_SERVERS=1 .venv/bin/python -m pytest -ra "$@"
