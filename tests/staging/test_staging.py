"""Staging (vjobs/staging/) against local files: the transfer rules every protocol shares. The same rules
against real XRootD, WebDAV and S3 servers: tests/staging/test_staging_servers.py."""

from __future__ import annotations

import json
import zlib
from pathlib import Path

import pytest

from vjobs import api
from vjobs.config.job import job_from_dict
from vjobs.errors import InvalidJob, StageInFailed, StageOutFailed
from vjobs.staging import StagingSettings, stage_in, stage_out
from vjobs.staging.phases import Wanted

FAST = StagingSettings(retries=2, backoff_s=0.01)


def adler(data: bytes) -> str:
    return f"{zlib.adler32(data) & 0xFFFFFFFF:08x}"


@pytest.fixture
def remote(tmp_path) -> Path:
    folder = tmp_path / "storage"
    folder.mkdir()
    (folder / "events.dat").write_bytes(b"event " * 100_000)
    return folder


def test_stage_in_fetches_and_verifies_the_jobs_adler32(tmp_path, remote):
    data = (remote / "events.dat").read_bytes()
    records = stage_in([Wanted(f"file://{remote}/events.dat", "data/events.dat", adler(data).upper())],
                       tmp_path / "work", FAST)
    assert (tmp_path / "work/data/events.dat").read_bytes() == data
    assert [vars(r) | {"seconds": 0} for r in records] == [
        {"url": f"file://{remote}/events.dat", "path": "data/events.dat", "size": len(data), "adler32": adler(data),
         "verified": True, "verified_by": "job_adler32", "seconds": 0, "attempts": 1}]


def test_a_checksum_mismatch_is_retried_then_fails_and_leaves_no_file(tmp_path, remote):
    notes = []
    with pytest.raises(StageInFailed) as failed:
        stage_in([Wanted(f"file://{remote}/events.dat", "events.dat", "00000001")], tmp_path, FAST, note=notes.append)
    message = str(failed.value)
    assert failed.value.code == "stage_in_failed" and failed.value.exit_code == 200
    assert "events.dat" in message and "the job says 00000001" in message and "after 3 attempts" in message
    assert len(notes) == 2 and all("retrying" in note for note in notes)
    assert list(tmp_path.iterdir()) == [remote]  # neither the file nor a .part


def test_a_missing_file_fails_at_once_without_retries(tmp_path, remote):
    notes = []
    with pytest.raises(StageInFailed, match="not found") as failed:
        stage_in([Wanted(f"file://{remote}/nope", "nope")], tmp_path / "w", FAST, note=notes.append)
    assert notes == [] and "attempts" not in str(failed.value)


def test_a_file_larger_than_the_site_allows_is_refused(tmp_path, remote):
    tiny = StagingSettings(max_file_gib=100_000 / (1 << 30))
    with pytest.raises(StageInFailed, match=r"larger than the site allows .*max_file_gib"):
        stage_in([Wanted(f"file://{remote}/events.dat", "e")], tmp_path / "w", tiny)
    assert not (tmp_path / "w/e").exists() and not (tmp_path / "w/e.part").exists()


def test_stage_out_uploads_each_output_under_the_destination_and_reads_it_back(tmp_path):
    outputs = tmp_path / "outputs"
    (outputs / "out").mkdir(parents=True)
    (outputs / "out/a.txt").write_text("alpha")
    (outputs / "b.bin").write_bytes(bytes(range(256)) * 1000)
    records = stage_out(["out/a.txt", "b.bin"], outputs, f"file://{tmp_path}/dest/run1", FAST)
    assert (tmp_path / "dest/run1/out/a.txt").read_text() == "alpha"
    assert (tmp_path / "dest/run1/b.bin").read_bytes() == (outputs / "b.bin").read_bytes()
    assert [(r.path, r.url, r.verified, r.verified_by) for r in records] == [
        ("out/a.txt", f"file://{tmp_path}/dest/run1/out/a.txt", True, "readback_adler32"),
        ("b.bin", f"file://{tmp_path}/dest/run1/b.bin", True, "readback_adler32")]
    assert records[0].adler32 == adler(b"alpha")


def test_a_rerun_finds_its_own_uploads_and_refuses_to_replace_other_files(tmp_path):
    outputs = tmp_path / "outputs"
    outputs.mkdir()
    (outputs / "a.txt").write_text("alpha")
    destination = f"file://{tmp_path}/dest"
    stage_out(["a.txt"], outputs, destination, FAST)
    again = stage_out(["a.txt"], outputs, destination, FAST)
    assert again[0].verified_by == "existing"
    (outputs / "a.txt").write_text("changed")
    with pytest.raises(StageOutFailed, match="already exists with other content.*stage_out.overwrite") as failed:
        stage_out(["a.txt"], outputs, destination, FAST)
    assert failed.value.exit_code == 206 and failed.value.uploads == []
    assert (tmp_path / "dest/a.txt").read_text() == "alpha"
    replaced = stage_out(["a.txt"], outputs, destination, FAST, overwrite=True)
    assert (tmp_path / "dest/a.txt").read_text() == "changed" and replaced[0].verified


def test_a_failed_stage_out_names_each_file_and_keeps_what_arrived(tmp_path):
    outputs = tmp_path / "outputs"
    outputs.mkdir()
    (outputs / "good.txt").write_text("fine")
    (outputs / "bad.txt").write_text("will not fit")
    (tmp_path / "dest").mkdir()
    (tmp_path / "dest/bad.txt").mkdir()  # a folder where the file should go
    with pytest.raises(StageOutFailed) as failed:
        stage_out(["good.txt", "bad.txt"], outputs, f"file://{tmp_path}/dest", FAST)
    message = str(failed.value)
    assert message.startswith("1 of 2 outputs could not be staged out (bad.txt to file://")
    assert "is a folder at the destination" in message and f"every output is kept in {outputs}" in message
    assert [r.path for r in failed.value.uploads] == ["good.txt"]
    assert (outputs / "bad.txt").exists()


@pytest.mark.parametrize("url, why", [
    ("root://user:secret@host//f", "carries credentials"),
    ("https://host/f#part", "fragment"),
    ("file://otherhost/f", "a path on this host"),
    ("https://host/a/../b", "'..'"),
    ("root://host:99999//f", "not a URL"),
    ("https://host/f?X-Amz-Signature=abc", "query"),
])
def test_a_job_with_an_unusable_url_is_refused_naming_the_field(url, why):
    with pytest.raises(InvalidJob, match=why) as refused:
        job_from_dict({"id": "j", "command": ["true"], "stage_in": [{"url": url, "path": "f"}]})
    assert "/stage_in/0/url" in str(refused.value) and "secret" not in str(refused.value)


def test_stage_in_paths_must_not_collide(tmp_path):
    document = {"id": "j", "command": ["true"], "stage_in": [{"url": "root://h//a", "path": "d/a"},
                                                              {"url": "root://h//b", "path": "d"}]}
    with pytest.raises(InvalidJob, match=r"/stage_in/1/path 'd' collides with /stage_in/0/path 'd/a'"):
        job_from_dict(document)
    (tmp_path / "inputs").mkdir()
    (tmp_path / "inputs/x").write_text("local")
    with pytest.raises(InvalidJob, match=r"'x' is also in the inputs folder"):
        job_from_dict({"id": "j", "command": ["true"], "inputs": str(tmp_path / "inputs"),
                       "stage_in": [{"url": "root://h//x", "path": "x"}]})


def test_a_failed_stage_in_is_a_setup_error_with_a_result_and_a_clean_host(tmp_path, make_site, remote):
    job = {"id": "sin", "command": ["true"], "stage_in": [{"url": f"file://{remote}/missing", "path": "m"}]}
    site = make_site(driver="qemu_user", staging={"retries": 0})
    result = api.run(job, site=site, outdir=tmp_path / "out")
    assert result.status == "setup_error" and result.error["code"] == "stage_in_failed"
    assert "m from file://" in result.error["message"]
    assert json.loads((tmp_path / "out/result.json").read_text())["error"]["code"] == "stage_in_failed"
    assert "boot" not in result.timings and "stage_in" in result.timings
    assert [p.name for p in (tmp_path / "work").iterdir() if not p.name.startswith("admission")] == []


def test_a_link_in_the_inputs_folder_never_leads_a_staged_file_out_of_the_working_directory(tmp_path, make_site,
                                                                                            remote):
    """inputs/data -> a host folder, and a stage_in path under data/: the file must not land in that folder."""
    outside = tmp_path / "outside"
    outside.mkdir()
    (tmp_path / "inputs").mkdir()
    (tmp_path / "inputs/data").symlink_to(outside)
    job = {"id": "link", "command": ["true"], "inputs": str(tmp_path / "inputs"),
           "stage_in": [{"url": f"file://{remote}/events.dat", "path": "data/events.dat"}]}
    result = api.run(job, site=make_site(driver="qemu_user"), outdir=tmp_path / "out")
    assert result.status == "setup_error" and result.error["code"] == "stage_in_failed"
    assert "data" in result.error["message"] and "link" in result.error["message"]
    assert list(outside.iterdir()) == []


@pytest.mark.vm
@pytest.mark.parametrize("json_output", [False, True])
def test_progress_bars_on_a_terminal_and_none_with_json(tmp_path, make_site, built_image, json_output):
    """`vjobs run` draws a bar per file on a terminal's stderr; `--json` keeps stderr free of them."""
    import os
    import pty
    import subprocess
    import sys

    (tmp_path / "storage").mkdir()
    (tmp_path / "storage/big.dat").write_bytes(os.urandom(64 << 20))
    job = tmp_path / "job.json"
    job.write_text(json.dumps({"id": "bars", "command": ["true"], "walltime_s": 60,
                               "stage_in": [{"url": f"file://{tmp_path}/storage/big.dat", "path": "big.dat"}]}))
    site = tmp_path / "site.toml"
    site.write_text(f'driver = "qemu_user"\ncache_dir = "{make_site().cache_dir}"\nwork_dir = "{tmp_path}/work"\n')
    terminal, stderr = pty.openpty()
    import fcntl
    import struct
    import termios
    fcntl.ioctl(stderr, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))  # a new pty is 0 columns wide
    argv = [sys.executable, "-m", "vjobs", "run", str(job), "--site", str(site), "--outdir", str(tmp_path / "out")]
    done = subprocess.run(argv + ["--json"] * json_output, stdout=subprocess.PIPE, stderr=stderr, timeout=120)
    os.close(stderr)
    drawn = b""
    while True:
        try:
            chunk = os.read(terminal, 65536)
        except OSError:  # the pty's other side is closed: all was read
            break
        if not chunk:
            break
        drawn += chunk
    os.close(terminal)
    assert done.returncode == 0
    if json_output:
        assert json.loads(done.stdout)["staged_in"][0]["path"] == "big.dat" and b"big.dat" not in drawn
    else:
        assert b"big.dat" in drawn and b"B/s" in drawn
