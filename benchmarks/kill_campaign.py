#!/usr/bin/env python3
"""The kill -9 campaign's long run (method and figures: docs/reliability.md); its engine and flags are in
vjobs/testing/kill_campaign.py, its short run is tests/reliability/test_kill_campaign.py.

    .venv/bin/python benchmarks/kill_campaign.py --kills 300 --drivers qemu_user,kvm,xen --seed 1 \\
        --json /tmp/kill-campaign.json
"""

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # run as a script: benchmarks/ is on the path, the repository is not
    sys.path.insert(0, str(REPO))

from vjobs.testing.kill_campaign import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
