"""Root file system images: recognised from their own bytes (vjobs.images.rootfs.inspect), loaded and cached
(vjobs.images.rootfs.load_rootfs), handed to drivers (disk_for), and shown by ``vjobs image inspect`` and
``vjobs image list``.

Every image here is real and small (a few MiB, mostly sparse), built in tmp_path with the real tools:
mksquashfs, mkfs.erofs, mke2fs, sfdisk, dd and qemu-img. Images that are refused are real images with one
superblock field patched, or real qcow2 files with the feature that makes them unsafe. Each test uses a
cache folder of its own, so an inspection cached by one test never answers for another.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import struct
import subprocess
import tomllib
from pathlib import Path

import pytest

import vjobs.images.rootfs
from vjobs.cli import main
from vjobs.config.site import InspectionLimits, site_from_dict
from vjobs.errors import ImageError
from vjobs.images.checked import CheckedFile, CheckedFiles
from vjobs.images.rootfs import disk_for, load_rootfs
from vjobs.images.rootfs.inspect import HEAD_BYTES, inspect_rootfs

MiB = 1 << 20
SECTOR = 512
GPT_LINUX = "0FC63DAF-8483-4772-8E79-3D69D8477DE4"
GPT_ROOT_X86_64 = "4F68BCE3-E8CD-4DB1-96E7-FBCAF984B709"
MBR_LINUX = "83"
EXT4_SB = 1024  # the ext4 superblock's offset; erofs's is the same
EROFS_SB_INCOMPAT, EROFS_SB_ALGORITHMS = EXT4_SB + 0x50, EXT4_SB + 0x54  # feature_incompat, available_compr_algs


# --- opening images, as a job does (vjobs/images/checked.py) -------------------------------------------

OPENED: list[CheckedFiles] = []


@pytest.fixture(autouse=True)
def _close_what_the_test_opened():
    yield
    while OPENED:
        OPENED.pop().close()


def checked(cache: Path, **limits) -> CheckedFiles:
    """A job's set of open files, with its cache and the site's [inspection] ``limits``."""
    OPENED.append(CheckedFiles(cache, InspectionLimits(**limits)))
    return OPENED[-1]


def inspect(path: Path, label: str = "rootfs", **limits):
    with CheckedFile.open(path, label) as file:
        return inspect_rootfs(file, InspectionLimits(**limits))


# --- building images ----------------------------------------------------------------------------------

def sh(*argv) -> None:
    subprocess.run([str(a) for a in argv], check=True, capture_output=True)


def tree(tmp_path: Path) -> Path:
    """A small, compressible folder to pack."""
    root = tmp_path / "tree"
    if not root.exists():
        (root / "etc").mkdir(parents=True)
        (root / "etc" / "os-release").write_text('ID=test\nNAME="vjobs test"\n')
        (root / "usr" / "bin").mkdir(parents=True)
        (root / "usr" / "bin" / "payload").write_text("hello rootfs\n" * 20000)
    return root


def squashfs(tmp_path: Path, comp: str = "lz4", name: str | None = None) -> Path:
    out = tmp_path / (name or f"root-{comp}.squashfs")
    sh("mksquashfs", tree(tmp_path), out, "-comp", comp, "-noappend", "-quiet")
    return out


def erofs(tmp_path: Path, comp: str | None = None) -> Path:
    out = tmp_path / f"root-{comp or 'plain'}.erofs"
    sh("mkfs.erofs", "--quiet", *([f"-z{comp}"] if comp else []), out, tree(tmp_path))
    return out


def ext4(tmp_path: Path, name: str = "root.ext4") -> Path:
    out = tmp_path / name
    sh("mke2fs", "-q", "-t", "ext4", "-d", tree(tmp_path), out, "8M")
    return out


def disk(path: Path, table: str, contents: list[Path | None], types: list[str] | None = None) -> Path:
    """A raw disk with a ``table`` ("gpt" or "dos") partition table: partition i+1 holds contents[i], a file
    system image dd'ed into it, or nothing (None, a 1 MiB partition). Partitions are 1 MiB aligned."""
    if shutil.which("sfdisk") is None:  # Debian puts it in the fdisk package, not in util-linux
        pytest.skip("sfdisk is not installed (apt-get install fdisk)")
    default = GPT_LINUX if table == "gpt" else MBR_LINUX
    types = types or [default] * len(contents)
    lines, placed, start = [f"label: {table}", "unit: sectors"], [], 2048
    for image, kind in zip(contents, types):
        size = max(MiB, -(-image.stat().st_size // MiB) * MiB) if image else MiB
        lines.append(f"start={start}, size={size // SECTOR}, type={kind}")
        placed.append((image, start))
        start += size // SECTOR
    with open(path, "wb") as handle:
        handle.truncate((start + 2048) * SECTOR)  # room for the backup GPT
    subprocess.run(["sfdisk", "--quiet", "--no-reread", "--no-tell-kernel", str(path)],
                   input="\n".join(lines) + "\n", text=True, check=True, capture_output=True)
    for image, first in placed:
        if image:
            sh("dd", f"if={image}", f"of={path}", f"bs={SECTOR}", f"seek={first}", "conv=notrunc", "status=none")
    return path


def qcow2_of(raw: Path) -> Path:
    out = raw.with_suffix(".qcow2")
    sh("qemu-img", "convert", "-q", "-f", "raw", "-O", "qcow2", raw, out)
    return out


def encrypted_qcow2(path: Path, encryption: str = "luks") -> Path:
    argv = ["qemu-img", "create", "-q", "-f", "qcow2", "--object", "secret,id=sec0,data=abc",
            "-o", f"encrypt.format={encryption},encrypt.key-secret=sec0", str(path), "8M"]
    for _ in range(10):  # LUKS times its key derivation first; on a fast CPU that can measure 0 ms and fail
        done = subprocess.run(argv, capture_output=True, text=True)
        if "Unable to get accurate CPU usage" not in done.stderr:
            break
    assert done.returncode == 0, done.stderr
    return path


def patch(path: Path, offset: int, fmt: str, value: int) -> None:
    with open(path, "r+b") as handle:
        handle.seek(offset)
        handle.write(struct.pack(fmt, value))


def read_field(path: Path, offset: int, fmt: str) -> int:
    with open(path, "rb") as handle:
        handle.seek(offset)
        return struct.unpack(fmt, handle.read(struct.calcsize(fmt)))[0]


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def head_sha256(path: Path) -> str:
    with open(path, "rb") as handle:
        return sha256(handle.read(HEAD_BYTES))


def file_sha256(path: Path) -> str:
    return sha256(path.read_bytes())


def refused(path: Path, *fragments: str) -> str:
    """Inspecting ``path`` raises ImageError naming the file and containing each fragment."""
    with pytest.raises(ImageError) as caught:
        inspect(path, "images.test.rootfs")
    message = str(caught.value)
    assert "images.test.rootfs" in message and str(path) in message, message
    for fragment in fragments:
        assert fragment in message, message
    return message


# --- whole-disk file systems ----------------------------------------------------------------------------

@pytest.mark.parametrize("make, filesystem, comp", [("squashfs", "squashfs", "lz4"), ("squashfs", "squashfs", "zstd"),
                                                     ("erofs", "erofs", None), ("erofs", "erofs", "lz4")])
def test_compressed_read_only_file_systems(tmp_path, make, filesystem, comp):
    image = {"squashfs": squashfs, "erofs": erofs}[make](tmp_path, comp)
    info = inspect(image)
    assert (info.container, info.filesystem, info.partition, info.compression) == ("raw", filesystem, None, comp)
    assert info.virtual_size == image.stat().st_size
    assert info.guest_head_sha256 == head_sha256(image)
    packed = f", {comp}" if comp else ""
    assert info.describe() == f"{filesystem}{packed} on a whole disk, in a raw file"


def test_clean_ext4(tmp_path):
    image = ext4(tmp_path)
    info = inspect(image)
    assert (info.container, info.filesystem, info.partition, info.compression) == ("raw", "ext4", None, None)
    assert info.virtual_size == 8 * MiB
    assert info.guest_head_sha256 == head_sha256(image)


# --- partitioned disks and qcow2 ------------------------------------------------------------------------

def test_gpt_disk_with_ext4_in_partition_2(tmp_path):
    raw = disk(tmp_path / "gpt.raw", "gpt", [None, ext4(tmp_path)])
    info = inspect(raw)
    assert (info.container, info.filesystem, info.partition) == ("raw", "ext4", 2)
    assert info.virtual_size == raw.stat().st_size
    assert info.guest_head_sha256 == head_sha256(raw)
    assert info.describe() == "ext4 on partition 2 of a disk, in a raw file"


def test_gpt_prefers_the_partition_typed_linux_root(tmp_path):
    """Partition 1 holds an ext4 too, but partition 2 is typed root (x86-64): the root one is booted."""
    raw = disk(tmp_path / "gpt.raw", "gpt", [ext4(tmp_path), squashfs(tmp_path)], [GPT_LINUX, GPT_ROOT_X86_64])
    info = inspect(raw)
    assert (info.filesystem, info.partition, info.compression) == ("squashfs", 2, "lz4")


def test_gpt_without_a_root_type_takes_the_first_file_system(tmp_path):
    raw = disk(tmp_path / "gpt.raw", "gpt", [None, ext4(tmp_path), squashfs(tmp_path)])
    info = inspect(raw)
    assert (info.filesystem, info.partition) == ("ext4", 2)


def test_mbr_disk_with_squashfs_in_partition_3(tmp_path):
    raw = disk(tmp_path / "mbr.raw", "dos", [None, None, squashfs(tmp_path, "zstd")])
    assert raw.read_bytes()[SECTOR:SECTOR + 8] != b"EFI PART"
    info = inspect(raw)
    assert (info.container, info.filesystem, info.partition, info.compression) == ("raw", "squashfs", 3, "zstd")
    assert info.guest_head_sha256 == head_sha256(raw)


def test_mbr_disk_with_ext4_in_partition_1(tmp_path):
    raw = disk(tmp_path / "mbr.raw", "dos", [ext4(tmp_path)])
    info = inspect(raw)
    assert (info.filesystem, info.partition) == ("ext4", 1)


def test_qcow2_of_a_gpt_disk(tmp_path):
    raw = disk(tmp_path / "gpt.raw", "gpt", [None, ext4(tmp_path)])
    image = qcow2_of(raw)
    assert image.stat().st_size < raw.stat().st_size  # really a qcow2, not a copy
    info = inspect(image)
    assert (info.container, info.filesystem, info.partition) == ("qcow2", "ext4", 2)
    assert info.virtual_size == raw.stat().st_size
    assert info.guest_head_sha256 == head_sha256(raw)  # what the guest sees, not the qcow2's own bytes
    assert info.guest_head_sha256 != head_sha256(image)


def test_qcow2_of_a_whole_disk_squashfs(tmp_path):
    raw = squashfs(tmp_path, "zstd")
    info = inspect(qcow2_of(raw))
    assert (info.container, info.filesystem, info.partition, info.compression) == \
        ("qcow2", "squashfs", None, "zstd")
    assert info.virtual_size == raw.stat().st_size
    assert info.guest_head_sha256 == head_sha256(raw)


# --- refused: qcow2 features that reach beyond the file, or need a key ----------------------------------

def test_qcow2_with_a_backing_file_is_refused(tmp_path):
    base = ext4(tmp_path, "base.raw")
    top = tmp_path / "top.qcow2"
    sh("qemu-img", "create", "-q", "-f", "qcow2", "-b", base, "-F", "raw", top)
    refused(top, "backing file", "qemu-img convert -f qcow2 -O raw")


def test_qcow2_with_an_external_data_file_is_refused(tmp_path):
    data = tmp_path / "data.raw"
    data.write_bytes(b"")  # made here, so qemu-img create writes nothing anyone cares about
    image = tmp_path / "x.qcow2"
    sh("qemu-img", "create", "-q", "-f", "qcow2", "-o", f"data_file={data},data_file_raw=on", image, "8M")
    refused(image, "external data file", "qemu-img convert -f qcow2 -O raw")


@pytest.mark.parametrize("encryption", ["luks", "aes"])
def test_encrypted_qcow2_is_refused(tmp_path, encryption):
    image = encrypted_qcow2(tmp_path / "enc.qcow2", encryption)
    refused(image, "encrypted qcow2", "convert it once to a self-contained raw file")


def test_a_qcow2_gets_one_budget_for_all_its_qemu_img_calls(tmp_path):
    image = qcow2_of(disk(tmp_path / "gpt.raw", "gpt", [None, ext4(tmp_path)]))
    assert inspect(image).partition == 2  # within the default budget: several calls, each bounded
    with pytest.raises(ImageError, match=r"took more than 0.001 s in all \(the site's \[inspection\] budget_s\)"):
        inspect(image, budget_s=0.001)


def test_qcow2_that_qemu_img_cannot_open_is_refused(tmp_path):
    image = qcow2_of(squashfs(tmp_path))
    patch(image, 4, ">I", 99)  # qcow2 version 99
    refused(image, "qemu-img failed with exit status")


# --- refused: file systems the guest could not mount ----------------------------------------------------

@pytest.mark.parametrize("offset, fmt, change, why", [
    (EXT4_SB + 0x3A, "<H", lambda state: state & ~0x1, "it was not cleanly unmounted"),
    (EXT4_SB + 0x3A, "<H", lambda state: state | 0x2, "it has recorded errors"),
    (EXT4_SB + 0x60, "<I", lambda incompat: incompat | 0x4, "its journal needs recovery"),
], ids=["not-clean", "errors", "needs-recovery"])
def test_dirty_ext4_is_refused(tmp_path, offset, fmt, change, why):
    image = ext4(tmp_path)
    patch(image, offset, fmt, change(read_field(image, offset, fmt)))
    refused(image, "dirty ext4", why, "e2fsck -f")


def test_dirty_ext4_in_a_partition_is_refused(tmp_path):
    image = ext4(tmp_path)
    patch(image, EXT4_SB + 0x3A, "<H", read_field(image, EXT4_SB + 0x3A, "<H") & ~0x1)
    refused(qcow2_of(disk(tmp_path / "gpt.raw", "gpt", [None, image])), "dirty ext4", "e2fsck -f")


def test_squashfs_with_lzma_is_refused(tmp_path):
    image = squashfs(tmp_path, "gzip")
    assert read_field(image, 20, "<H") == 1
    patch(image, 20, "<H", 2)  # the old LZMA, which the guest kernel's squashfs lacks
    refused(image, "compressed with lzma", "mksquashfs -comp lz4")


def test_erofs_with_lzma_is_refused(tmp_path):
    """This mkfs.erofs may lack -zlzma: its lz4 image is marked as using the COMPR_CFGS feature with
    LZMA among its algorithms, as mkfs.erofs -zlzma would."""
    image = erofs(tmp_path, "lz4")
    incompat = read_field(image, EROFS_SB_INCOMPAT, "<I")
    patch(image, EROFS_SB_INCOMPAT, "<I", incompat | 0x2)
    patch(image, EROFS_SB_ALGORITHMS, "<H", 0b11)  # lz4 and lzma
    refused(image, "erofs compressed with lzma", "mkfs.erofs -zlz4")


# --- refused: not an image at all -----------------------------------------------------------------------

def test_missing_file_is_refused(tmp_path):
    refused(tmp_path / "nowhere.squashfs", "does not exist", "fix the path")


def test_directory_is_refused(tmp_path):
    refused(tree(tmp_path), "not a regular file", "give the path of an image file")


@pytest.mark.timeout(10)  # opening a FIFO for reading blocks until a writer comes: never, here
def test_fifo_is_refused_without_blocking(tmp_path):
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    refused(fifo, "not a regular file")


def test_random_bytes_are_refused(tmp_path):
    noise = tmp_path / "noise.img"
    noise.write_bytes(random.Random(7).randbytes(2 * MiB))
    refused(noise, "holds no file system vjobs recognises", "give a squashfs, erofs or ext4 image")


def _header_cut_short(magic_at: int, magic: bytes, size: int) -> bytes:
    data = bytearray(size)
    data[magic_at:magic_at + len(magic)] = magic
    return bytes(data)


@pytest.mark.parametrize("name, data", [
    ("erofs", _header_cut_short(1024, struct.pack("<I", 0xE0F5E1E2), 1050)),
    ("gpt", _header_cut_short(512, b"EFI PART", 1040)),
    ("mbr", _header_cut_short(510, b"\x55\xaa", 1024)),
])
def test_a_header_cut_short_is_refused_with_a_reason(tmp_path, name, data):
    """The magic of a file system or a partition table, and the file ends before the fields after it."""
    image = tmp_path / f"{name}.img"
    image.write_bytes(data)
    with pytest.raises(ImageError) as refusal:
        inspect(image)
    message = str(refusal.value)
    assert str(image) in message and ("truncated" in message or "no file system" in message), message


def test_too_small_file_is_refused(tmp_path):
    small = tmp_path / "small.img"
    small.write_bytes(b"hsqs" + bytes(96))
    refused(small, "100 bytes, too small")


def test_unreadable_file_is_refused(tmp_path):
    if os.geteuid() == 0:
        pytest.skip("root reads every file")
    image = squashfs(tmp_path)
    image.chmod(0)
    refused(image, "not readable", "make it readable")


# --- load_rootfs: checked against the catalogue, inspected once -----------------------------------------

def test_load_rootfs_checks_the_sha256(tmp_path):
    image = squashfs(tmp_path)
    actual, claimed = file_sha256(image), "0" * 64
    with pytest.raises(ImageError) as caught:
        load_rootfs(image, claimed, "images.base.rootfs", checked(tmp_path / "cache"))
    message = str(caught.value)
    assert all(part in message for part in ("images.base.rootfs", str(image), actual, claimed)), message
    assert not (tmp_path / "cache" / "rootfs").exists()  # nothing cached for a file that failed


def test_load_rootfs_refuses_an_unsafe_image_under_the_right_sum(tmp_path):
    image = encrypted_qcow2(tmp_path / "enc.qcow2", "aes")  # aes: no 2 s key derivation
    with pytest.raises(ImageError, match="encrypted qcow2"):
        load_rootfs(image, file_sha256(image), "images.base.rootfs", checked(tmp_path / "cache"))


def test_load_rootfs_caches_the_inspection(tmp_path, monkeypatch):
    image, cache = qcow2_of(disk(tmp_path / "gpt.raw", "gpt", [None, ext4(tmp_path)])), tmp_path / "cache"
    digest = file_sha256(image)
    first = load_rootfs(image, digest, "images.base.rootfs", checked(cache))
    assert (first.path, first.sha256, first.info.partition) == (image, digest, 2)
    assert first.provenance() == {"rootfs_sha256": digest, "rootfs_filesystem": "ext4",
                                  "rootfs_container": "qcow2"}
    assert list((cache / "rootfs").glob(f"{digest}.v*.json"))

    def inspect_again(*args):
        raise AssertionError("inspected again")

    monkeypatch.setattr(vjobs.images.rootfs, "inspect_rootfs", inspect_again)
    again = load_rootfs(image, digest, "images.base.rootfs", checked(cache))
    assert (again.sha256, again.info) == (first.sha256, first.info)


def test_cached_inspection_does_not_pass_a_changed_file(tmp_path):
    image, cache = squashfs(tmp_path), tmp_path / "cache"
    digest = file_sha256(image)
    load_rootfs(image, digest, "images.base.rootfs", checked(cache))
    image.write_bytes(image.read_bytes() + bytes(4096))  # same path, still a squashfs, other bytes
    with pytest.raises(ImageError, match=f"catalogue says {digest}"):
        load_rootfs(image, digest, "images.base.rootfs", checked(cache))


def test_a_file_rewritten_in_place_with_its_mtime_put_back_is_hashed_again(tmp_path):
    """Same inode, same size, the mtime restored with utime: only the change time tells, and it does."""
    image, cache = squashfs(tmp_path), tmp_path / "cache"
    digest = file_sha256(image)
    load_rootfs(image, digest, "images.base.rootfs", checked(cache))
    before = image.stat()
    data = bytearray(image.read_bytes())
    data[-1] ^= 0xFF  # the last byte: still a squashfs by its header, other content
    with open(image, "r+b") as handle:
        handle.write(bytes(data))
    os.utime(image, ns=(before.st_atime_ns, before.st_mtime_ns))
    after = image.stat()
    assert (after.st_ino, after.st_size, after.st_mtime_ns) == (before.st_ino, before.st_size, before.st_mtime_ns)
    with pytest.raises(ImageError, match=f"catalogue says {digest}"):
        load_rootfs(image, digest, "images.base.rootfs", checked(cache))


def test_a_refusal_is_remembered_until_the_file_changes(tmp_path, monkeypatch):
    noise, cache = tmp_path / "noise.img", tmp_path / "cache"
    noise.write_bytes(random.Random(3).randbytes(MiB))
    with pytest.raises(ImageError, match="no file system vjobs recognises"):
        load_rootfs(noise, "0" * 64, "images.base.rootfs", checked(cache))
    inspections = []
    monkeypatch.setattr(vjobs.images.rootfs, "inspect_rootfs", lambda *args: inspections.append(args))
    with pytest.raises(ImageError, match="no file system vjobs recognises.*refused before"):
        load_rootfs(noise, "0" * 64, "images.base.rootfs", checked(cache))
    assert inspections == []  # the second job paid nothing for it
    monkeypatch.undo()
    image = squashfs(tmp_path)
    shutil.copyfile(image, noise)  # the admins replaced it in place: inspected again, and now it passes
    assert load_rootfs(noise, file_sha256(noise), "images.base.rootfs", checked(cache)).info.filesystem == "squashfs"


# --- disk_for: what a driver attaches -------------------------------------------------------------------

def test_disk_for_a_raw_rootfs_is_the_file_itself(tmp_path, cache_hold):
    image, cache = squashfs(tmp_path), tmp_path / "cache"
    rootfs = load_rootfs(image, file_sha256(image), "images.base.rootfs", checked(cache))
    messages = []
    attached = disk_for(rootfs, ("raw", "qcow2"), messages.append, hold=cache_hold, files=checked(cache))
    assert (attached.role, attached.path, attached.format, attached.readonly, attached.cache_key) == \
        ("rootfs", image, "raw", True, rootfs.sha256)
    assert attached.file is rootfs.file  # the descriptor that was checked is the one the driver gets
    assert disk_for(rootfs, ("raw",), messages.append, hold=cache_hold, files=checked(cache)).path == image
    assert messages == []


def test_disk_for_a_qcow2_rootfs_and_a_driver_that_takes_qcow2(tmp_path, cache_hold):
    image, cache = qcow2_of(squashfs(tmp_path)), tmp_path / "cache"
    rootfs = load_rootfs(image, file_sha256(image), "images.base.rootfs", checked(cache))
    messages = []
    attached = disk_for(rootfs, ("raw", "qcow2"), messages.append, hold=cache_hold, files=checked(cache))
    assert (attached.path, attached.format, attached.readonly) == (image, "qcow2", True)
    assert messages == [] and not (cache / "rootfs" / f"{rootfs.sha256}.raw").exists()


def test_disk_for_converts_a_qcow2_rootfs_to_raw_once(tmp_path, cache_hold):
    raw = disk(tmp_path / "gpt.raw", "gpt", [None, ext4(tmp_path)])
    image, cache = qcow2_of(raw), tmp_path / "cache"
    rootfs = load_rootfs(image, file_sha256(image), "images.base.rootfs", checked(cache))
    messages = []
    attached = disk_for(rootfs, ("raw",), messages.append, hold=cache_hold, files=checked(cache))
    assert (attached.format, attached.readonly, attached.cache_key) == ("raw", True, rootfs.sha256)
    assert attached.path.parent == cache / "rootfs" and attached.path != image
    assert attached.path.read_bytes() == raw.read_bytes()
    assert inspect(attached.path, "copy").guest_head_sha256 == rootfs.info.guest_head_sha256
    again = disk_for(rootfs, ("raw",), messages.append, hold=cache_hold, files=checked(cache))
    assert again.path == attached.path
    assert len(messages) == 1 and "converting" in messages[0]
    assert [p.name for p in (cache / "rootfs").iterdir() if p.name.endswith(".partial")] == []


# --- the command line -----------------------------------------------------------------------------------

def write_site(tmp_path: Path, stanzas: str) -> Path:
    site = tmp_path / "site.toml"
    site.write_text(f'cache_dir = "{tmp_path / "cache"}"\n\n{stanzas}')
    return site


def test_image_inspect_prints_a_catalogue_stanza_that_image_list_accepts(tmp_path, capsys):
    image = qcow2_of(disk(tmp_path / "gpt.raw", "gpt", [None, ext4(tmp_path)]))
    assert main(["image", "inspect", str(image), "--name", "base"]) == 0
    stanza = capsys.readouterr().out
    document = tomllib.loads(stanza)  # the description line is a TOML comment
    entry = document["images"]["base"]
    assert entry == {"rootfs": str(image), "rootfs_sha256": file_sha256(image)}
    assert "ext4 on partition 2 of a disk, in a qcow2 file" in stanza

    site = site_from_dict({"cache_dir": str(tmp_path / "cache"), "images": document["images"]})
    assert site.images["base"].rootfs == image

    assert main(["image", "list", "--site", str(write_site(tmp_path, stanza)), "--json"]) == 0
    rows = {row["name"]: row for row in json.loads(capsys.readouterr().out)}
    assert rows["base"]["state"] == "ok" and rows["base"]["kind"] == "rootfs"
    assert rows["base"]["detail"] == "ext4 on partition 2 of a disk, in a qcow2 file"


def test_image_inspect_names_the_stanza_after_the_file(tmp_path, capsys):
    image = squashfs(tmp_path, "zstd", name="my base.v2.squashfs")
    assert main(["image", "inspect", str(image)]) == 0
    assert tomllib.loads(capsys.readouterr().out)["images"]["my-base"]["rootfs"] == str(image)


def test_image_inspect_json(tmp_path, capsys):
    image = erofs(tmp_path, "lz4")
    assert main(["image", "inspect", str(image), "--json"]) == 0
    out = capsys.readouterr().out
    assert json.loads(out) == {
        "path": str(image), "sha256": file_sha256(image), "size": image.stat().st_size,
        "container": "raw", "filesystem": "erofs", "partition": None, "compression": "lz4",
        "virtual_size": image.stat().st_size, "guest_head_sha256": head_sha256(image)}


def test_image_list_shows_a_wrong_sha256_as_broken(tmp_path, capsys):
    good, bad = squashfs(tmp_path), ext4(tmp_path)
    site = write_site(tmp_path, f'[images.good]\nrootfs = "{good}"\nrootfs_sha256 = "{file_sha256(good)}"\n'
                                f'[images.bad]\nrootfs = "{bad}"\nrootfs_sha256 = "{"0" * 64}"\n')
    assert main(["image", "list", "--site", str(site)]) == 1
    lines = {line.split("\t")[0]: line.split("\t") for line in capsys.readouterr().out.splitlines()}
    assert lines["good"][1:3] == ["rootfs", "ok"]
    assert lines["bad"][1:3] == ["rootfs", "broken"]
    assert str(bad) in lines["bad"][3] and f"catalogue says {'0' * 64}" in lines["bad"][3]


def test_image_list_shows_an_unsafe_image_as_broken(tmp_path, capsys):
    base = ext4(tmp_path, "base.raw")
    top = tmp_path / "top.qcow2"
    sh("qemu-img", "create", "-q", "-f", "qcow2", "-b", base, "-F", "raw", top)
    site = write_site(tmp_path, f'[images.layered]\nrootfs = "{top}"\nrootfs_sha256 = "{file_sha256(top)}"\n')
    assert main(["image", "list", "--site", str(site), "--json"]) == 1
    row = next(row for row in json.loads(capsys.readouterr().out) if row["name"] == "layered")
    assert row["state"] == "broken" and "backing file" in row["detail"]


@pytest.mark.parametrize("kind", ["missing", "random-bytes"])
def test_image_inspect_of_a_bad_file_exits_1_with_the_reason(tmp_path, capsys, kind):
    bad = tmp_path / "bad.img"
    if kind == "random-bytes":
        bad.write_bytes(random.Random(11).randbytes(MiB))
    assert main(["image", "inspect", str(bad)]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith("vjobs: ") and str(bad) in captured.err
    assert "Traceback" not in captured.err
