"""Job files (vjobs/config/job.py): bad input gets a message naming the file, the field and what was expected."""

from __future__ import annotations

import json

import pytest

import vjobs
from vjobs.errors import InvalidJob


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
