"""Block devices built on the host by real tools, inspected with real tools (never mounted)."""

from __future__ import annotations

import os
import subprocess
import tarfile

import pytest

import vjobs
from vjobs.disks import IO_MARKER, prepare_disks, release_image
from vjobs.errors import SetupError


def test_release_image_is_cached_by_content(tmp_path):
    release = tmp_path / "release"
    (release / "bin").mkdir(parents=True)
    (release / "bin" / "tool").write_text("v1")
    messages = []
    first, digest = release_image(release, tmp_path / "cache", "squashfs", messages.append)
    second, again = release_image(release, tmp_path / "cache", "squashfs", messages.append)
    assert (first, digest) == (second, again)
    assert sum("building" in m for m in messages) == 1
    listing = subprocess.run(["unsquashfs", "-l", str(first)], capture_output=True, text=True).stdout
    assert "squashfs-root/bin/tool" in listing
    (release / "bin" / "tool").write_text("v2, longer")
    changed, _ = release_image(release, tmp_path / "cache", "squashfs", messages.append)
    assert changed != first


def test_erofs_release(tmp_path):
    (tmp_path / "release").mkdir()
    (tmp_path / "release" / "f").write_text("x")
    image, _ = release_image(tmp_path / "release", tmp_path / "cache", "erofs", lambda m: None)
    assert image.read_bytes()[1024:1028] == bytes.fromhex("e2e1f5e0")  # the erofs superblock magic


def test_job_disks(tmp_path):
    (tmp_path / "in" / "sub").mkdir(parents=True)
    (tmp_path / "in" / "sub" / "data").write_text("payload")
    job = vjobs.job.job_from_dict({"id": "d", "command": ["echo", "it's"], "env": {"A": "b c"},
                                   "inputs": str(tmp_path / "in"), "outputs": ["*.txt"],
                                   "resources": {"output_mib": 2, "scratch_mib": 8}})
    (tmp_path / "job").mkdir()
    disks = prepare_disks(job, tmp_path / "job", tmp_path / "cache", "squashfs", lambda m: None)
    assert disks.io.path.stat().st_size == 2 << 20 and not disks.io.readonly
    with tarfile.open(disks.io.path) as job_tar:
        assert job_tar.getnames()[0] == IO_MARKER
        assert job_tar.extractfile("job/command.sh").read() == b"exec echo 'it'\"'\"'s'\n"
        assert job_tar.extractfile("job/env.sh").read() == b"export A='b c'\n"
    listing = subprocess.run(["debugfs", "-R", "ls -p /work/sub", str(disks.scratch.path)],
                             capture_output=True, text=True).stdout
    assert "data" in listing
    assert disks.release is None
    assert not (tmp_path / "job" / "scratch-root").exists()


@pytest.mark.skipif(os.getuid() != 0, reason="mounting a small tmpfs needs root")
def test_disk_full_while_building_the_release(tmp_path, make_site, make_job, fake_image):
    full = tmp_path / "full"
    full.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(full)], check=True)
    try:
        job = make_job(["true"], release={"big": os.urandom(2 << 20).hex()}, image="fake")
        site = make_site(cache_dir=str(full), images={"fake": fake_image})
        result = vjobs.run(job, site=site, driver="qemu_user", outdir=tmp_path / "out")
        assert result.status == "setup_error"
        assert result.error["code"] == "disk_full" and str(full) in result.error["message"]
        assert [p.name for p in (full / "releases").iterdir() if not p.name.endswith(".lock")] == []
    finally:
        subprocess.run(["umount", str(full)], check=True)
