"""A checkpoint folder keeps one complete checkpoint, and refuses one that is not what was written."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from vjobs.checkpoint.folder import FORMAT, CheckpointFolder, garbage
from vjobs.checkpoint.sparse import BLOCK, block_sha256, copy_summed
from vjobs.config.job import job_document, job_from_dict, load_job
from vjobs.errors import CheckpointError


def _commit(folder: CheckpointFolder, state: bytes = b"guest state") -> str:
    partial = folder.begin()
    (partial / "guest").mkdir()
    (partial / "guest" / "state").write_bytes(state)
    return folder.commit(partial, {"format": FORMAT, "files": {}, "job": {}}).name


@pytest.fixture
def folder(tmp_path) -> CheckpointFolder:
    return CheckpointFolder(tmp_path / "ckpt").make()


def test_the_newest_complete_checkpoint_is_current_and_the_one_before_goes(folder):
    assert _commit(folder, b"one") == "cp-000001"
    assert _commit(folder, b"two") == "cp-000002"
    current = folder.current()
    assert current.name == "cp-000002" and (current.folder / "guest" / "state").read_bytes() == b"two"
    assert [path.name for path in folder.checkpoints()] == ["cp-000002"]
    assert oct(folder.path.stat().st_mode & 0o777) == "0o700"


def test_a_save_that_never_finished_leaves_the_checkpoint_before_current(folder):
    _commit(folder, b"one")
    partial = folder.begin()
    (partial / "state").write_bytes(b"half")
    assert folder.current().name == "cp-000001"


def test_gc_removes_a_partial_checkpoint_whose_writer_is_gone_and_counts_the_rest(folder, tmp_path):
    _commit(folder)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True).stdout.strip()
    (folder.path / f"partial-{dead}-0").mkdir()
    work = tmp_path / "work"
    work.mkdir()
    folder.register(work)
    lines = garbage(work)
    assert any("removed the partial checkpoint" in line for line in lines)
    assert any(f"kept the checkpoint folder {folder.path}: cp-000001" in line for line in lines)
    assert folder.partials() == []


@pytest.mark.parametrize("damage, says", [
    (lambda cp: (cp / "guest" / "state").unlink(), "incomplete: guest/state missing"),
    (lambda cp: (cp / "guest" / "extra").write_bytes(b"x"), "does not name (guest/extra)"),
    (lambda cp: (cp / "guest" / "state").write_bytes(b"guest stat"), "truncated or was changed"),
    (lambda cp: (cp / "manifest.json").write_text((cp / "manifest.json").read_text().replace('"job"', '"jo b"')),
     "not the one written with it"),
])
def test_a_damaged_checkpoint_is_refused_saying_what_is_wrong(folder, damage, says):
    _commit(folder)
    damage(folder.path / "cp-000001")
    with pytest.raises(CheckpointError, match=says.replace("(", r"\(").replace(")", r"\)")):
        folder.current()


def test_a_folder_without_a_complete_checkpoint_says_so(folder):
    with pytest.raises(CheckpointError, match="holds no complete checkpoint"):
        folder.current()
    (folder.path / "current.json").write_text(json.dumps({"checkpoint": "../elsewhere"}))
    with pytest.raises(CheckpointError, match="not a checkpoint"):
        folder.current()


def test_a_sparse_disk_is_copied_with_its_holes_and_summed_however_its_zeros_are_kept(tmp_path):
    disk = tmp_path / "disk"
    with open(disk, "wb") as file:
        file.truncate(64 * BLOCK)
        file.seek(3 * BLOCK + 17)
        file.write(b"data" * 1000)
        file.seek(40 * BLOCK)
        file.write(bytes(2 * BLOCK))  # zeros written as data: the same sum as a hole
        file.seek(63 * BLOCK)
        file.write(b"end")
    source = os.open(disk, os.O_RDONLY)
    digest = copy_summed(source, tmp_path / "copy")
    os.close(source)
    assert (tmp_path / "copy").read_bytes() == disk.read_bytes()
    assert (tmp_path / "copy").stat().st_blocks < disk.stat().st_blocks  # the written zeros became a hole
    copy = os.open(tmp_path / "copy", os.O_RDONLY)
    assert block_sha256(copy) == digest
    os.close(copy)
    with open(tmp_path / "copy", "r+b") as file:
        file.seek(50 * BLOCK)
        file.write(b"\1")
    copy = os.open(tmp_path / "copy", os.O_RDONLY)
    assert block_sha256(copy) != digest
    os.close(copy)


def test_a_job_reads_back_from_the_document_a_checkpoint_keeps(repo):
    job = load_job(repo / "examples" / "analysis" / "job.json")
    assert job_from_dict(json.loads(json.dumps(job_document(job))), resumed=True) == job
