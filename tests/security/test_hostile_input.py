"""Bad user input gets a typed error naming the field, never a traceback; a bug in vjobs still gives a
result.json (status internal_error, exit 205) with the traceback in a log beside it."""

from __future__ import annotations

import json

import pytest

import vjobs
from vjobs import cli
from vjobs.errors import INTERNAL_ERROR_LOG


@pytest.mark.parametrize("inputs, why", [("a\0b", "holds a NUL byte"), ("a" * 5000, "File name too long")])
def test_an_unusable_host_path_is_a_setup_error_with_a_result(inputs, why, tmp_path, capsys):
    job = tmp_path / "job.json"
    job.write_text(json.dumps({"id": "bad", "command": ["true"], "inputs": inputs}))
    code = cli.main(["run", str(job), "--outdir", str(tmp_path / "out")])
    captured = capsys.readouterr()
    assert code == 200 and "Traceback" not in captured.err + captured.out
    result = json.loads((tmp_path / "out" / "result.json").read_text())
    assert result["status"] == "setup_error" and "/inputs" in result["error"]["message"]
    assert why in result["error"]["message"]
    assert cli.main(["validate", str(job)]) == 1


@pytest.mark.parametrize("key", ["cache_dir", "work_dir"])
def test_a_site_path_no_file_system_could_hold_is_refused(key, make_site):
    with pytest.raises(vjobs.InvalidSite, match=f"{key}: the path holds a NUL byte"):
        make_site(**{key: "/var/\0cache"})
    with pytest.raises(vjobs.InvalidSite, match=f"{key}: the path is longer"):
        make_site(**{key: "/var/" + "x" * 300})


def test_a_bug_in_vjobs_gives_a_result_and_a_log_not_a_traceback(make_job, make_site, tmp_path, capsys,
                                                                 monkeypatch, assert_clean_host):
    def broken(*args, **kwargs):
        raise RuntimeError("a bug in disk preparation")

    monkeypatch.setattr("vjobs.container.lifecycle.prepare_disks", broken)
    site_file = tmp_path / "site.toml"
    site_file.write_text(f'driver = "qemu_user"\nwork_dir = "{tmp_path / "work"}"\n'
                         f'cache_dir = "{make_site().cache_dir}"\n')
    code = cli.main(["run", str(make_job(["true"])), "--site", str(site_file), "--outdir", str(tmp_path / "out")])
    captured = capsys.readouterr()
    assert code == 205 and "Traceback" not in captured.err + captured.out
    result = json.loads((tmp_path / "out" / "result.json").read_text())
    assert result["status"] == "internal_error" and "a bug in disk preparation" in result["error"]["message"]
    log = (tmp_path / "out" / INTERNAL_ERROR_LOG).read_text()
    assert "Traceback" in log and "RuntimeError: a bug in disk preparation" in log


@pytest.mark.parametrize("text", ['"walltime_s": NaN', '"walltime_s": Infinity', '"resources": {"memory_mib": NaN}'])
def test_nan_and_infinity_in_a_job_are_refused_by_pointer(text, tmp_path, capsys):
    """JSON Schema's bounds let NaN through (every comparison with it is false), and Python reads it."""
    job = tmp_path / "job.json"
    job.write_text('{"id": "nan", "command": ["true"], ' + text + '}')
    assert cli.main(["run", str(job), "--outdir", str(tmp_path / "out")]) == 200
    result = json.loads((tmp_path / "out" / "result.json").read_text())
    assert result["error"]["code"] == "invalid_job" and "not a finite number" in result["error"]["message"]
    assert "Traceback" not in capsys.readouterr().err
