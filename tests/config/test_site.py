"""Site configs (vjobs/config/site.py): bad settings get a message naming the file and the field, no file gives
the defaults, and a job beyond the site's limits is refused naming the field and the limit."""

from __future__ import annotations

import pytest

import vjobs
from vjobs.config.site import InspectionLimits, load_site, site_from_dict
from vjobs.errors import InvalidSite, LimitExceeded


def test_limits_name_the_field_and_the_limit(make_job):
    site = site_from_dict({"limits": {"memory_mib": 1024, "walltime_s": 60}}, source="site.toml")
    job = vjobs.load_job(make_job(["true"], id="a", resources={"memory_mib": 2048}))
    with pytest.raises(LimitExceeded, match=r"/resources/memory_mib = 2048 is above this site's limit of 1024"):
        site.check_limits(job)
    job = vjobs.load_job(make_job(["true"], id="a", walltime_s=61))
    with pytest.raises(LimitExceeded, match="/walltime_s"):
        site.check_limits(job)


def test_network_needs_the_sites_permission(make_job):
    job = vjobs.load_job(make_job(["true"], id="a", network=True))
    with pytest.raises(LimitExceeded, match="allow_network"):
        site_from_dict({}).check_limits(job)


def test_site_config_errors(tmp_path):
    site = tmp_path / "site.toml"
    site.write_text("driver = ")
    with pytest.raises(InvalidSite, match="not valid TOML"):
        load_site(site)
    site.write_text('[drivers.qemu_user]\naccel = "fast"\n')
    with pytest.raises(InvalidSite, match=r"/drivers/qemu_user/accel: 'fast' is not one of"):
        load_site(site)
    with pytest.raises(InvalidSite, match="cannot read site config"):
        load_site(tmp_path / "absent.toml")


def test_no_site_config_gives_defaults(monkeypatch, tmp_path):
    monkeypatch.delenv("VJOBS_SITE", raising=False)
    monkeypatch.setattr("vjobs.config.site.SYSTEM_SITE_FILE", tmp_path / "none.toml")
    site = load_site()
    assert site.pinned_driver is None and site.preference[-1] == "qemu_user" and site.boot_retries == 1


def test_inspection_limits_have_defaults_and_are_checked():
    """``[inspection]``: what checking one image file may cost (vjobs/images/checked.py, docs/base-images.md)."""
    assert site_from_dict({}).inspection == InspectionLimits(budget_s=120.0, memory_mib=2048, max_file_gib=64.0)
    site = site_from_dict({"inspection": {"budget_s": 30, "max_file_gib": 0.5}})
    assert (site.inspection.budget_s, site.inspection.memory_mib, site.inspection.max_file_bytes) == (30, 2048, 1 << 29)
    with pytest.raises(InvalidSite, match="/inspection/budget_s"):
        site_from_dict({"inspection": {"budget_s": 0}})
    with pytest.raises(InvalidSite, match="/inspection"):
        site_from_dict({"inspection": {"max_file_size": 1}})
