"""The accounts campaign's short run (issue 18, "Under load"): four ordinary accounts run jobs at once against
one host budget of 2 vCPUs, with payload failures, wall times, SIGTERM, SIGKILL and hostile guests mixed in;
nothing is lost, nothing is left after `vjobs gc`, and never more VMs run than the budget. The long run (1,000
jobs) and its figures: benchmarks/accounts_campaign.py, docs/reliability.md."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

from vjobs.testing.accounts_campaign import Campaign, plan_jobs, summary_line

pytestmark = [pytest.mark.vm, pytest.mark.timeout(900),
              pytest.mark.skipif(os.geteuid() != 0, reason="the campaign makes accounts: root only")]

JOBS = int(os.environ.get("VJOBS_ACCOUNTS_CAMPAIGN_JOBS", "32"))
SEED = int(os.environ.get("VJOBS_ACCOUNTS_CAMPAIGN_SEED", "3"))


@pytest.fixture
def campaign_root():
    """A folder the accounts can reach (pytest's tmp_path is root's alone), removed after the test."""
    root = Path(tempfile.mkdtemp(prefix="vjobs-accounts-campaign-", dir="/var/tmp"))
    root.chmod(0o755)
    yield root
    shutil.rmtree(root, ignore_errors=True)


def test_four_accounts_share_one_budget_and_lose_nothing(pool_accounts, cache_dir, built_image, campaign_root):
    root = campaign_root
    plans = plan_jobs(JOBS, len(pool_accounts), SEED)
    assert {plan.kind for plan in plans} >= {"succeeds", "fails", "walltime", "sigterm", "sigkill"}
    report = Campaign(pool_accounts, root, cache_dir, budget_vcpus=2, budget_memory_mib=2048, workers=2).run(plans)
    print(summary_line(report))
    assert report["lost"] == [], report["lost"]
    assert {kind: items for kind, items in report["left"].items() if items} == {}
    assert report["gc_failures"] == []
    assert report["samples_over_budget"] == 0 and report["most_vcpus_at_once"] <= 2, summary_line(report)
    assert report["most_vms_at_once"] == 2, f"the budget was never full: {summary_line(report)}"
