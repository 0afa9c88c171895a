"""A template's RAM, shared by every guest of an account through one sealed memfd (shared_ram.py and its keeper,
ram_keeper.py): loaded only when it is what the template saved, changeable by nobody, and a QEMU that turns
against the host changes nothing that another guest or a later job starts from."""

from __future__ import annotations

import hashlib
import json
import mmap
import os
import shutil
import tempfile
from pathlib import Path

import pytest

import vjobs
from vjobs.drivers.qemu_user import ram_keeper, shared_ram
from vjobs.errors import VMError

HOSTILE = Path(__file__).with_name("hostile_qemu.py")
MIB = 1 << 20


def ram_file(folder: Path, pages: dict[int, bytes], size: int = 4 * MIB) -> tuple[Path, str]:
    """A RAM file of ``size`` with ``pages`` (page number: bytes) written and holes elsewhere, and its sum."""
    path = folder / "ram"
    with open(path, "wb") as out:
        out.truncate(size)
        for number, data in pages.items():
            out.seek(number * ram_keeper.PAGE)
            out.write(data)
    return path, summed(path)


def summed(path_or_fd) -> str:
    """copy_pages' sum of a file or descriptor, copied into a throwaway memfd."""
    fd = os.open(path_or_fd, os.O_RDONLY) if isinstance(path_or_fd, Path) else path_or_fd
    target = os.memfd_create("sum")
    try:
        size = os.fstat(fd).st_size
        os.ftruncate(target, size)
        return ram_keeper.copy_pages(fd, size, target)
    finally:
        os.close(target)
        if isinstance(path_or_fd, Path):
            os.close(fd)


def test_the_sum_keeps_zero_pages_out_and_the_copy_keeps_them_holes(tmp_path):
    path, digest = ram_file(tmp_path, {0: b"a" * 4096, 700: b"b" * 10})
    bigger, _ = ram_file(tmp_path / "..", {0: b"a" * 4096, 700: b"b" * 10}, size=8 * MIB)
    assert summed(path) == digest != summed(bigger)  # the size counts: it is the guest's memory
    changed, _ = ram_file(tmp_path / "..", {0: b"a" * 4096, 701: b"b" * 10})
    assert summed(changed) != digest  # and where each page is
    memfd, size = ram_keeper.sealed_copy(str(path), digest)
    try:
        assert size == 4 * MIB and os.fstat(memfd).st_blocks * 512 <= 2 * 4096 + 4096  # two pages, not 4 MiB
    finally:
        os.close(memfd)


def test_a_ram_file_that_is_not_what_was_saved_is_refused(tmp_path):
    path, digest = ram_file(tmp_path, {3: b"c" * 4096})
    with open(path, "r+b") as out:
        out.seek(3 * 4096 + 17)
        out.write(b"X")
    with pytest.raises(ValueError, match="not the RAM its template saved"):
        ram_keeper.sealed_copy(str(path), digest)
    with pytest.raises(VMError, match="keeper failed: error: .*not the RAM its template saved"):
        shared_ram.memfd(path, digest, 4 * MIB, tmp_path / "keepers", idle_s=30)


def test_every_job_gets_the_same_sealed_memory_which_no_one_can_change(tmp_path):
    path, digest = ram_file(tmp_path, {1: b"d" * 4096})
    keepers = tmp_path / "keepers"
    first = shared_ram.memfd(path, digest, 4 * MIB, keepers, idle_s=30)
    second = shared_ram.memfd(path, digest, 4 * MIB, keepers, idle_s=30)
    try:
        assert os.fstat(first).st_ino == os.fstat(second).st_ino  # one copy for every job: its pages shared
        assert stat_mode(keepers) == 0o700
        for change in (lambda: os.write(first, b"x"), lambda: os.ftruncate(first, 0),
                       lambda: mmap.mmap(first, 4096, mmap.MAP_SHARED, mmap.PROT_WRITE),
                       lambda: os.pwrite(os.open(f"/proc/self/fd/{first}", os.O_RDWR), b"x", 0)):
            with pytest.raises(PermissionError):
                change()
        private = mmap.mmap(first, 4096 * 2, mmap.MAP_PRIVATE, mmap.PROT_READ | mmap.PROT_WRITE)
        private[4096:4100] = b"mine"  # what QEMU does with it: copy-on-write, the guest's own page
        assert private[4096:4100] == b"mine" and summed(second) == digest
        private.close()
    finally:
        os.close(first)
        os.close(second)
        stopped = shared_ram.stop_keepers(keepers)
        assert len(stopped) == 1 and not running(stopped[0])  # gone when gc says so, not a moment later


def running(pid: int) -> bool:
    """Whether ``pid`` runs still (an ended child this test has not reaped is a zombie: it runs no more)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_a_keeper_of_a_template_made_anew_is_replaced(tmp_path):
    keepers = tmp_path / "keepers"
    path, old = ram_file(tmp_path, {1: b"e" * 4096})
    os.close(shared_ram.memfd(path, old, 4 * MIB, keepers, idle_s=30))
    replacement = tmp_path / "new"
    replacement.mkdir()
    new_path, new = ram_file(replacement, {1: b"f" * 4096})
    os.replace(new_path, path)  # the template made anew: its RAM renamed over the old one
    fd = shared_ram.memfd(path, new, 4 * MIB, keepers, idle_s=30)
    try:
        assert summed(fd) == new
    finally:
        os.close(fd)
        shared_ram.stop_keepers(keepers)


def stat_mode(path: Path) -> int:
    return path.stat().st_mode & 0o777


@pytest.mark.vm
@pytest.mark.skipif(os.geteuid() != 0, reason="QEMU runs as a user of its own only when vjobs is root")
def test_a_qemu_that_writes_to_everything_it_holds_changes_no_template(make_site, make_job, cache_dir, tmp_path,
                                                                       assert_clean_host):
    """The template's own files and the RAM every guest maps stay what was saved, whatever a QEMU started to
    restore it does with every descriptor it has: it runs as vjobs-qemu, in its own namespaces."""
    folder = Path(tempfile.mkdtemp(prefix="vjobs-hostile-qemu-", dir="/run"))  # not hidden by QEMU's own /tmp
    try:
        os.chmod(folder, 0o755)
        binary = folder / "qemu-system-x86_64"
        shutil.copy(HOSTILE, binary)
        os.chmod(binary, 0o755)
        site = make_site(driver="qemu_user", drivers={"qemu_user": {"template": True, "binary": str(binary)}})
        result = vjobs.run(make_job(["echo", "ran"]), site=site, outdir=tmp_path / "out")
    finally:
        shutil.rmtree(folder)
    start = result.provenance["start"]  # its restore failed, and the cold boot found the job's own disks wrecked:
    assert start["mode"] == "cold", start  # writing them is what QEMU is for, and they are this job's alone
    report = json.loads(start["fallback"].splitlines()[-1])
    assert {"io.raw", "scratch.ext4"} <= set(report["changed"])  # it did write what it could
    assert report["ram"] and report["files"] >= 4 and report["tried"] >= 7 * report["files"], report
    template = cache_dir / "templates" / start["fallback"].split()[1]
    assert not [change for change in report["changed"]
                if "vjobs-template-ram" in change or change.startswith(("kernel", "initramfs", "state"))], report
    manifest = json.loads((template / "manifest.json").read_text())
    for name, digest in manifest["sha256"].items():
        assert hashlib.sha256((template / name).read_bytes()).hexdigest() == digest, name
    assert summed(template / "ram") == manifest["ram"]["sum"]
    fd = shared_ram.memfd(template / "ram", manifest["ram"]["sum"], manifest["ram"]["bytes"],
                          cache_dir / "templates" / shared_ram.KEEPERS)
    try:
        assert summed(fd) == manifest["ram"]["sum"]  # the memory every later guest of this template maps
    finally:
        os.close(fd)
