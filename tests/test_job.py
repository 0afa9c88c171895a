"""Job files and site configs: bad input gets a message naming the file, the field and what was expected."""

from __future__ import annotations

import json

import pytest

import vjobs
from vjobs.errors import InvalidJob, InvalidSite, LimitExceeded
from vjobs.config.site import load_site, site_from_dict


def write(tmp_path, document, name="job.json"):
    path = tmp_path / name
    path.write_text(document if isinstance(document, str) else json.dumps(document))
    return path


def test_relative_paths_resolve_against_the_job_file(tmp_path):
    (tmp_path / "jobs" / "in").mkdir(parents=True)
    job = vjobs.load_job(write(tmp_path / "jobs", {"id": "a", "command": ["true"], "inputs": "in"}))
    assert job.inputs == (tmp_path / "jobs" / "in").resolve()
    assert job.resources.output_mib == 64 and job.image == "default"


@pytest.mark.parametrize("document, expected", [
    ({"command": ["true"]}, "/: 'id' is a required property"),
    ({"id": "a b", "command": ["true"]}, "/id: 'a b' does not match"),
    ({"id": "x" * 65, "command": ["true"]}, "/id:"),
    ({"id": "a", "command": "true"}, "/command: 'true' is not of type 'array'"),
    ({"id": "a", "command": ["true"], "resources": {"vcpus": 0}}, "/resources/vcpus: 0 is less than"),
    ({"id": "a", "command": ["true"], "outputs": ["../x"]}, "/outputs/0"),
    ({"id": "a", "command": ["true"], "outputs": ["/abs"]}, "/outputs/0"),
    ({"id": "a", "command": ["true"], "release": {"path": ".", "mount": "relative"}}, "/release/mount"),
    ({"id": "a", "command": ["true"], "env": {"1BAD": "x"}}, "/env"),
    ({"id": "a", "command": ["true"], "colour": "red"}, "'colour' was unexpected"),
])
def test_schema_violations_name_the_field(tmp_path, document, expected):
    path = write(tmp_path, document)
    with pytest.raises(InvalidJob) as caught:
        vjobs.load_job(path)
    assert str(path) in str(caught.value) and expected in str(caught.value)


def test_not_json_says_where(tmp_path):
    with pytest.raises(InvalidJob, match=r"not valid JSON at line 2 column"):
        vjobs.load_job(write(tmp_path, '{"id": "a",\n "command": [true,]}'))


@pytest.mark.parametrize("field", ["inputs", "release"])
def test_missing_host_folders_are_named(tmp_path, field):
    value = "nowhere" if field == "inputs" else {"path": "nowhere", "mount": "/opt/r"}
    with pytest.raises(InvalidJob) as caught:
        vjobs.load_job(write(tmp_path, {"id": "a", "command": ["true"], field: value}))
    assert f"/{field}" in str(caught.value) and "nowhere does not exist" in str(caught.value)


def test_unreadable_inputs_are_named(tmp_path):
    import os
    if os.getuid() == 0:
        pytest.skip("root reads every folder")
    (tmp_path / "secret").mkdir(mode=0)
    with pytest.raises(InvalidJob, match="not readable"):
        vjobs.load_job(write(tmp_path, {"id": "a", "command": ["true"], "inputs": "secret"}))


def test_limits_name_the_field_and_the_limit(tmp_path):
    site = site_from_dict({"limits": {"memory_mib": 1024, "walltime_s": 60}}, source="site.toml")
    job = vjobs.load_job(write(tmp_path, {"id": "a", "command": ["true"], "resources": {"memory_mib": 2048}}))
    with pytest.raises(LimitExceeded, match=r"/resources/memory_mib = 2048 is above this site's limit of 1024"):
        site.check_limits(job)
    job = vjobs.load_job(write(tmp_path, {"id": "a", "command": ["true"], "walltime_s": 61}))
    with pytest.raises(LimitExceeded, match="/walltime_s"):
        site.check_limits(job)


def test_network_needs_the_sites_permission(tmp_path):
    job = vjobs.load_job(write(tmp_path, {"id": "a", "command": ["true"], "network": True}))
    with pytest.raises(LimitExceeded, match="allow_network"):
        site_from_dict({}).check_limits(job)


def test_site_config_errors(tmp_path):
    with pytest.raises(InvalidSite, match="not valid TOML"):
        load_site(write(tmp_path, "driver = ", "site.toml"))
    with pytest.raises(InvalidSite, match=r"/drivers/qemu_user/accel: 'fast' is not one of"):
        load_site(write(tmp_path, '[drivers.qemu_user]\naccel = "fast"\n', "site.toml"))
    with pytest.raises(InvalidSite, match="cannot read site config"):
        load_site(tmp_path / "absent.toml")


def test_no_site_config_gives_defaults(monkeypatch, tmp_path):
    monkeypatch.delenv("VJOBS_SITE", raising=False)
    monkeypatch.setattr("vjobs.config.site.SYSTEM_SITE_FILE", tmp_path / "none.toml")
    site = load_site()
    assert site.pinned_driver is None and site.preference[-1] == "qemu_user" and site.boot_retries == 1


def test_unknown_image_is_a_setup_error(tmp_path, make_site):
    result = vjobs.run(write(tmp_path, {"id": "a", "command": ["true"], "image": "nope"}), site=make_site(),
                       driver="qemu_user", outdir=tmp_path / "out")
    assert result.status == "setup_error"
    assert result.error["code"] == "image_not_found"
    assert "'nope' is not in this site's catalogue" in result.error["message"]
    assert (tmp_path / "out" / "result.json").exists()


def test_image_checksum_mismatch(tmp_path, make_site, fake_image):
    site = make_site(images={"bad": {**fake_image, "kernel_sha256": "0" * 64}})
    result = vjobs.run(write(tmp_path, {"id": "a", "command": ["true"], "image": "bad"}), site=site,
                       driver="qemu_user", outdir=tmp_path / "out")
    assert result.error["code"] == "image_error" and "the catalogue says 000" in result.error["message"]
