"""Site configs (vjobs/config/site.py): bad settings get a message naming the file and the field, no file gives
the defaults, and a job beyond the site's limits is refused naming the field and the limit."""

from __future__ import annotations

import pytest

import vjobs
from vjobs.config.site import load_site, site_from_dict
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
