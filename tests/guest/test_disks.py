"""Block devices built on the host by real tools, inspected with real tools (never mounted)."""

from __future__ import annotations

import os
import subprocess
import tarfile

import pytest

import vjobs
from vjobs.events import Events
from vjobs.guest.disks import build_inputs_image, head_sha256, prepare_disks, release_image
from vjobs.guest.protocol import IO_DISK_MAGIC


def test_release_image_is_cached_by_content(tmp_path, cache_hold):
    release = tmp_path / "release"
    (release / "bin").mkdir(parents=True)
    (release / "bin" / "tool").write_text("v1")
    messages = []
    first, digest = release_image(release, tmp_path / "cache", "squashfs", messages.append, hold=cache_hold)
    second, again = release_image(release, tmp_path / "cache", "squashfs", messages.append, hold=cache_hold)
    assert (first, digest) == (second, again)
    assert sum("building" in m for m in messages) == 1
    listing = subprocess.run(["unsquashfs", "-l", str(first)], capture_output=True, text=True).stdout
    assert "squashfs-root/bin/tool" in listing
    (release / "bin" / "tool").write_text("v2, longer")
    changed, _ = release_image(release, tmp_path / "cache", "squashfs", messages.append, hold=cache_hold)
    assert changed != first


def test_erofs_release(tmp_path, cache_hold):
    (tmp_path / "release").mkdir()
    (tmp_path / "release" / "f").write_text("x")
    image, _ = release_image(tmp_path / "release", tmp_path / "cache", "erofs", lambda m: None, hold=cache_hold)
    assert image.read_bytes()[1024:1028] == bytes.fromhex("e2e1f5e0")  # the erofs superblock magic


def test_job_disks(tmp_path, cache_hold, checked_files):
    (tmp_path / "in" / "sub").mkdir(parents=True)
    (tmp_path / "in" / "sub" / "data").write_text("payload")
    job = vjobs.config.job.job_from_dict({"id": "d", "command": ["echo", "it's"], "env": {"A": "b c"},
                                   "inputs": str(tmp_path / "in"), "outputs": ["*.txt"],
                                   "resources": {"output_mib": 2, "scratch_mib": 8}})
    (tmp_path / "job").mkdir()
    disks = prepare_disks(job, tmp_path / "job", tmp_path / "cache", "squashfs", Events(), hold=cache_hold,
                          files=checked_files)
    assert disks.io.path.stat().st_size == 2 << 20 and not disks.io.readonly
    with tarfile.open(disks.io.path) as job_tar:
        assert job_tar.getnames()[0] == IO_DISK_MAGIC
        assert job_tar.extractfile("job/command.sh").read() == b"exec echo 'it'\"'\"'s'\n"
        assert job_tar.extractfile("job/env.sh").read() == b"export A='b c'\n"
    # The inputs are an image of their own, read-only; the working directory on the scratch disk starts empty.
    assert disks.inputs.readonly and disks.inputs in disks.all() and disks.inputs in disks.own()
    listing = subprocess.run(["dump.erofs", "--path=/sub/data", str(disks.inputs.path)], capture_output=True,
                             text=True).stdout
    assert "Size: 7 " in listing
    work = subprocess.run(["debugfs", "-R", "ls -p /work", str(disks.scratch.path)],
                          capture_output=True, text=True).stdout
    assert [line.split("/")[5] for line in work.split("\n") if line.count("/") > 5] == [".", ".."]
    settings = tarfile.open(disks.io.path).extractfile("job/settings").read().decode()
    assert f"INPUTS_HEAD={head_sha256(disks.inputs.path.read_bytes())}" in settings
    assert disks.release is None
    assert not (tmp_path / "job" / "scratch-root").exists()


def test_staged_inputs_are_merged_into_the_inputs_image_owned_as_asked(tmp_path, cache_hold, checked_files):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "local").write_text("here")
    (tmp_path / "staged" / "remote").mkdir(parents=True)
    (tmp_path / "staged" / "remote" / "file").write_text("fetched")
    job = vjobs.config.job.job_from_dict({"id": "s", "command": ["true"], "inputs": str(tmp_path / "in")})
    (tmp_path / "job").mkdir()
    image = build_inputs_image(job, tmp_path / "job", tmp_path / "staged", owner=65534)
    subprocess.run(["fsck.erofs", f"--extract={tmp_path / 'out'}", str(image)], check=True, capture_output=True)
    assert sorted(str(p.relative_to(tmp_path / "out")) for p in (tmp_path / "out").rglob("*")) == [
        "local", "remote", "remote/file"]
    owners = subprocess.run(["dump.erofs", "--path=/remote/file", str(image)], capture_output=True, text=True).stdout
    assert "Uid: 65534   Gid: 65534" in owners
    assert sorted(p.name for p in (tmp_path / "job").iterdir()) == ["inputs.erofs"]  # no merge tree left
    assert not (tmp_path / "in" / "remote").exists()  # the inputs folder itself is not changed


def test_a_job_without_inputs_has_no_inputs_disk(tmp_path, cache_hold, checked_files):
    job = vjobs.config.job.job_from_dict({"id": "n", "command": ["true"]})
    (tmp_path / "job").mkdir()
    disks = prepare_disks(job, tmp_path / "job", tmp_path / "cache", "squashfs", Events(), hold=cache_hold,
                          files=checked_files)
    assert disks.inputs is None and [disk.role for disk in disks.all()] == ["io", "scratch"]
    assert "INPUTS_HEAD=''" in tarfile.open(disks.io.path).extractfile("job/settings").read().decode()


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


def _fingerprint_by_os_walk(root) -> str:
    """The fingerprint as vjobs first defined it (os.walk, lstat, f-strings): cache keys must not change."""
    import hashlib

    digest = hashlib.sha256()
    for folder, dirs, files in os.walk(root):
        dirs.sort()
        for name in sorted(dirs + files):
            path = os.path.join(folder, name)
            info = os.lstat(path)
            link = os.readlink(path) if os.path.islink(path) else ""
            digest.update(f"{os.path.relpath(path, root)}\0{info.st_mode}\0{info.st_size}\0"
                          f"{info.st_mtime_ns}\0{link}\n".encode())
    return digest.hexdigest()


def test_tree_fingerprint_keeps_its_keys_and_sees_every_change(tmp_path):
    from vjobs.guest.disks import tree_fingerprint

    root = tmp_path / "release"
    for folder in ("b", "a/z", "a/b c", "ä", "a-", "a0"):
        (root / folder).mkdir(parents=True)
    for name in ("a/z/x", "a/b c/y", "ä/é", "top", "a-/f", "a0/g", "b/h"):
        (root / name).write_text(name * 3)
    (root / "link-to-dir").symlink_to("a")
    (root / "b" / "dangling").symlink_to("/nowhere")
    os.mkfifo(root / "fifo")
    before = tree_fingerprint(root)
    assert before == _fingerprint_by_os_walk(root)

    def changed(change) -> str:
        change()
        after = tree_fingerprint(root)
        assert after == _fingerprint_by_os_walk(root) and after != before
        return after

    before = changed(lambda: os.utime(root / "a/z/x", ns=(1, 1)))
    before = changed(lambda: (root / "a/b c/y").write_text("other length"))
    before = changed(lambda: os.chmod(root / "top", 0o600))
    before = changed(lambda: ((root / "b/dangling").unlink(), (root / "b/dangling").symlink_to("/elsewhere")))
    before = changed(lambda: (root / "a/z/new").write_text(""))


def test_tree_fingerprint_takes_names_that_are_not_utf8(tmp_path):
    from vjobs.guest.disks import tree_fingerprint

    root = tmp_path / "release"
    root.mkdir()
    (root / os.fsdecode(b"caf\xe9")).write_text("latin-1 name")
    first = tree_fingerprint(root)
    os.rename(root / os.fsdecode(b"caf\xe9"), root / os.fsdecode(b"caf\xe8"))
    assert tree_fingerprint(root) != first
