#!/usr/bin/env python3
"""The accounts campaign's long run (method and figures: docs/reliability.md, "Accounts sharing a node"); its
engine and flags are in vjobs/testing/accounts_campaign.py, its short run is
tests/reliability/test_accounts_campaign.py. Needs root (it makes the accounts and removes them).

    .venv/bin/python benchmarks/accounts_campaign.py --jobs 1000 --accounts 4 --seed 1 \\
        --source-cache /var/cache/vjobs --json /tmp/accounts-campaign.json
"""

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # run as a script: benchmarks/ is on the path, the repository is not
    sys.path.insert(0, str(REPO))

from vjobs.testing.accounts_campaign import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
