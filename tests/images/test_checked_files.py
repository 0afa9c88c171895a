"""What is checked is what boots (vjobs/images/checked.py, vjobs/images/rootfs/qemu_img.py): a file is opened once
and read only through that descriptor, so another file put at its path changes nothing for it; a change of the
file itself (a write, or a rename or unlink of it, which move its ctime as a write does) is seen; a qcow2's
backing file is never opened, to inspect it or to convert it; qemu-img never runs as root; a file over the
site's size bound is refused before it is read. (The same seen from a guest, through each driver:
tests/security/test_what_boots.py.)"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import time
from pathlib import Path

import pytest

from vjobs.config.site import InspectionLimits
from vjobs.errors import ImageError
from vjobs.host.tools import unprivileged_user
from vjobs.images.checked import CheckedFile, CheckedFiles
from vjobs.images.rootfs import disk_for, load_rootfs, qemu_img

MARKER = b"BACKING FILE BYTES "
MiB = 1 << 20


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def squashfs(tmp_path: Path, text: str, name: str = "root.squashfs") -> Path:
    tree = tmp_path / f"tree-{name}"
    (tree / "etc").mkdir(parents=True)
    (tree / "etc" / "marker").write_text(text)
    image = tmp_path / name
    subprocess.run(["mksquashfs", str(tree), str(image), "-noappend", "-quiet"], check=True)
    return image


def qcow2_with_backing(tmp_path: Path, backing: Path) -> Path:
    """A 1 MiB qcow2 that writes nothing of its own and names ``backing`` (which need not exist)."""
    top = tmp_path / "top.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-u", "-b", str(backing), "-F", "raw", str(top), "1M"],
                   check=True)
    return top


@pytest.fixture
def backing(tmp_path) -> Path:
    """A backing file full of a marker, readable by root alone: any byte of it in an answer was read from it."""
    path = tmp_path / "backing.raw"
    path.write_bytes((MARKER * (MiB // len(MARKER) + 1))[:MiB])
    path.chmod(0o600)
    return path


# --- one descriptor ----------------------------------------------------------------------------------------

def swap_folders(current: Path, new: Path) -> None:
    """A site's release of new images: the folder the catalogue names replaced by another, whose files are
    others (the files themselves untouched)."""
    os.rename(current, current.with_name("old"))
    os.rename(new, current)


def test_another_file_at_the_path_changes_nothing_for_the_open_file(tmp_path):
    (tmp_path / "current").mkdir()
    (tmp_path / "new").mkdir()
    path = squashfs(tmp_path / "current", "checked")
    squashfs(tmp_path / "new", "swapped")
    digest = sha256(path)
    with CheckedFile.open(path, "images.base.rootfs") as opened:
        opened.verify(digest, tmp_path / "checksums.json")
        swap_folders(tmp_path / "current", tmp_path / "new")
        assert sha256(path) != digest  # the path names the other file now
        assert hashlib.sha256(opened.read(0, opened.size)).hexdigest() == digest
        opened.check_unchanged()  # the file that was checked did not change


def test_a_file_renamed_over_after_its_check_is_refused(tmp_path):
    """Unlinked by the rename, the checked file's ctime moves as a write's would: it reads as it was checked,
    but vjobs cannot tell an unlink from a rewrite, and refuses it."""
    path, other = squashfs(tmp_path, "checked"), squashfs(tmp_path, "swapped", "other.squashfs")
    with CheckedFile.open(path, "images.base.rootfs") as opened:
        opened.verify(sha256(path), tmp_path / "checksums.json")
        os.rename(other, path)
        with pytest.raises(ImageError, match="was changed after vjobs checked it"):
            opened.check_unchanged()


def test_a_file_rewritten_in_place_after_its_check_is_refused(tmp_path):
    image = squashfs(tmp_path, "checked")
    with CheckedFile.open(image, "images.base.rootfs") as opened:
        opened.verify(sha256(image), tmp_path / "checksums.json")
        before = os.stat(image)
        with open(image, "r+b") as handle:
            handle.seek(before.st_size - 1)
            handle.write(b"\x01")
        os.utime(image, ns=(before.st_atime_ns, before.st_mtime_ns))  # its mtime put back: the ctime still moved
        with pytest.raises(ImageError, match="was changed after vjobs checked it and before the VM started"):
            opened.check_unchanged()


def test_its_sum_is_read_through_the_descriptor_and_remembered_by_stamp(tmp_path):
    image = squashfs(tmp_path, "checked")
    with CheckedFiles(tmp_path / "cache") as files:
        opened = files.verified(image, "images.base.rootfs", sha256(image))
        assert opened.verified and opened.sha256() == sha256(image)
    remembered = json.loads((tmp_path / "cache" / "checksums.json").read_text())
    assert remembered == {str(image): {opened.stamp: sha256(image)}}
    assert opened.fd == -1  # closed with the set


@pytest.mark.parametrize("kind", ["symlink", "fifo", "folder"])
def test_only_a_regular_file_is_opened_never_through_a_link(tmp_path, kind):
    path = tmp_path / "image"
    if kind == "symlink":
        path.symlink_to(squashfs(tmp_path, "x"))
    elif kind == "fifo":
        os.mkfifo(path)
    else:
        path.mkdir()
    expected = {"symlink": "symbolic link, which vjobs does not follow", "fifo": "not a regular file",
                "folder": "not a regular file"}[kind]
    with pytest.raises(ImageError, match=expected):
        CheckedFile.open(path, "images.base.rootfs")


# --- qemu-img: the backing file is never opened --------------------------------------------------------------

def test_inspecting_a_qcow2_that_names_a_backing_file_never_reads_it(tmp_path, backing):
    """What the inspection reads of a qcow2 (qemu-img dd) shows the qcow2's own clusters, which are none: zeros,
    not the backing file's marker; and a backing file that is not there is no error."""
    with CheckedFile.open(qcow2_with_backing(tmp_path, backing), "images.base.rootfs") as image:
        assert qemu_img.read_sectors(image, 0, 64, qemu_img.Budget(InspectionLimits())) == bytes(64 * 512)
    with CheckedFile.open(qcow2_with_backing(tmp_path, tmp_path / "gone.raw"), "images.base.rootfs") as image:
        assert qemu_img.info(image, qemu_img.Budget(InspectionLimits()))["backing-filename"].endswith("gone.raw")
        assert qemu_img.read_sectors(image, 0, 8, qemu_img.Budget(InspectionLimits())) == bytes(8 * 512)


def test_converting_a_qcow2_that_names_a_backing_file_never_reads_it(tmp_path, backing):
    """The raw copy a driver that takes raw only gets (``disk_for``) is made the same way: a qcow2 rewritten
    after its check to name a backing file still gives nothing of that file."""
    with CheckedFile.open(qcow2_with_backing(tmp_path, backing), "images.base.rootfs") as image:
        qemu_img.convert_to_raw(image, tmp_path / "copy.raw", MiB, InspectionLimits())
    copy = tmp_path / "copy.raw"
    assert copy.read_bytes() == bytes(MiB)
    assert (copy.stat().st_uid, copy.stat().st_mode & 0o777) == (os.geteuid(), 0o444)


@pytest.mark.skipif(os.geteuid() != 0, reason="qemu-img drops privileges only when vjobs is root")
def test_qemu_img_never_runs_as_root(tmp_path):
    """A qcow2 only root may read cannot be converted, nor inspected: qemu-img reopens /dev/fd/N as the
    unprivileged user, and says so."""
    image = tmp_path / "private.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(image), "1M"], check=True)
    image.chmod(0o600)
    with CheckedFile.open(image, "images.base.rootfs") as opened:
        with pytest.raises(ImageError) as refused:
            qemu_img.convert_to_raw(opened, tmp_path / "copy.raw", MiB, InspectionLimits())
    assert "Permission denied" in str(refused.value)
    assert f"qemu-img reads it as the user {unprivileged_user().pw_name}, not as root" in str(refused.value)
    assert not (tmp_path / "copy.raw").exists()


def test_the_raw_copy_for_a_driver_is_made_from_the_checked_file(tmp_path, cache_hold):
    """Another qcow2 at the base's path after its check: the raw copy is of the file that was checked."""
    (tmp_path / "current").mkdir()
    (tmp_path / "new").mkdir()
    raw = squashfs(tmp_path, "checked")
    image = tmp_path / "current" / "base.qcow2"
    subprocess.run(["qemu-img", "convert", "-q", "-f", "raw", "-O", "qcow2", str(raw), str(image)], check=True)
    os.rename(qcow2_with_backing(tmp_path, raw), tmp_path / "new" / "base.qcow2")
    with CheckedFiles(tmp_path / "cache") as files:
        rootfs = load_rootfs(image, sha256(image), "images.base.rootfs", files)
        swap_folders(tmp_path / "current", tmp_path / "new")
        attached = disk_for(rootfs, ("raw",), lambda message: None, hold=cache_hold, files=files)
        assert attached.file.read(0, raw.stat().st_size) == raw.read_bytes()


# --- the size bound -----------------------------------------------------------------------------------------

def test_a_file_over_the_size_bound_is_refused_at_once_and_the_refusal_remembered(tmp_path):
    huge = tmp_path / "huge.squashfs"
    with open(huge, "wb") as handle:
        handle.write(b"hsqs")
        handle.truncate(3 << 30)  # sparse: 3 GiB that would take a while to hash
    started = time.monotonic()
    with CheckedFiles(tmp_path / "cache", InspectionLimits(max_file_gib=2)) as files:
        with pytest.raises(ImageError) as refused:
            load_rootfs(huge, "0" * 64, "images.base.rootfs", files)
        message = str(refused.value)
        assert "3.0 GiB, more than the 2 GiB" in message and "[inspection] max_file_gib" in message
        with pytest.raises(ImageError, match=r"\[inspection\] max_file_gib.*refused before"):
            load_rootfs(huge, "0" * 64, "images.base.rootfs", files)
    assert time.monotonic() - started < 5  # nothing was hashed
    assert str(huge) in json.loads((tmp_path / "cache" / "rootfs" / "refused.json").read_text())
