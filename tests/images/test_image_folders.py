"""Base images made from a host folder (vjobs/images/rootfs/folders.py, oci.py): an unpacked root file system or
an OCI image layout, named by its path where an image's name goes. Recognised, refused when hostile or too
large (naming the layer, the member and the limit), cached by content, and booted by ``vjobs exec``, as root
and as an ordinary account."""

from __future__ import annotations

import json
import os
import shutil
import stat
import tarfile
from pathlib import Path

import pytest

import vjobs
from vjobs.cli import exec_command
from vjobs.cli.commands import build_parser
from vjobs.config.exec_request import ExecRequest
from vjobs.config.job import load_job
from vjobs.config.site import SYSTEM_CACHE_ENV
from vjobs.errors import ImageError, LimitExceeded
from vjobs.images.rootfs import oci
from vjobs.images.rootfs.folders import find_image_folder, folder_rootfs
from vjobs.testing.image_folders import (OS_RELEASE, layer, layer_blobs, member, tiny_root, tree_layer, umoci_layout,
                                         write_layout)

T = tarfile
LIMITS = oci.UnpackLimits(64 << 20, 1000, "limits.bind_mib in the test")
needs_umoci = pytest.mark.skipif(shutil.which("umoci") is None, reason="umoci is not installed (scripts/install.sh)")


def unpacked(layout: Path, tag: str | None, tree: Path, limits: oci.UnpackLimits = LIMITS) -> oci.Unpacked:
    tree.mkdir(parents=True)
    return oci.unpack(oci.read_layout(layout, tag, f"image {layout}"), tree, limits)


def pseudo(result: oci.Unpacked) -> dict[str, str]:
    """The pseudo definitions as {path: "MODE UID GID"}."""
    lines = result.pseudo_definitions().decode().splitlines()
    return {line.split('"')[1]: line.rsplit(" m ", 1)[1] for line in lines}


# --- what a path names ----------------------------------------------------------------------------------------

def test_a_path_names_a_tree_or_a_layout_and_picks_a_tag(tmp_path):
    tree = tiny_root(tmp_path / "centos:centos7")  # as /cvmfs/unpacked.cern.ch names its trees
    layout = tmp_path / "layout"
    write_layout(layout, [layer([member("etc/os-release", data=b"ID=x\n")])], tags=("1.0",))
    link = tmp_path / "link"
    link.symlink_to(tree)
    assert find_image_folder(str(tree)) == find_image_folder(str(link))
    assert find_image_folder(str(link)).path == tree and not find_image_folder(str(tree)).layout
    assert find_image_folder(str(layout)).tag is None
    assert find_image_folder(f"{layout}:1.0") == find_image_folder(f"{layout}:1.0")
    assert (found := find_image_folder(f"{layout}:1.0")).layout and found.tag == "1.0"


@pytest.mark.parametrize("name, message", [
    ("missing", "does not exist on this host; a path names a folder holding an unpacked root file system"),
    ("file", "is a file, not a folder holding"),
    ("empty", "is not a folder holding an unpacked root file system (etc/ with bin/ or usr/) or an OCI image layout"),
    ("tree:tag", "is not an OCI image layout (it has no oci-layout file), so there is no tag 'tag'"),
    ("layout:", "ends with ':' and no tag"),
])
def test_a_path_that_names_no_image_folder_says_what_was_looked_for(tmp_path, name, message):
    tiny_root(tmp_path / "tree")
    (tmp_path / "file").write_text("not a folder")
    (tmp_path / "empty").mkdir()
    write_layout(tmp_path / "layout", [layer([member("etc", T.DIRTYPE)])])
    with pytest.raises(ImageError) as refused:
        find_image_folder(str(tmp_path / name))
    assert message in str(refused.value)


def test_vjobs_exec_refuses_a_bad_image_before_a_vm(make_site, tmp_path, capfd, assert_clean_host):
    (tmp_path / "tree").mkdir()
    for image, message in [(str(tmp_path / "nothing"), "does not exist on this host; a path names"),
                           ("tree", "'tree' is not in this site's catalogue"),
                           ("tree", "or a path (with a '/', e.g. ./tree) naming a folder holding")]:
        code = exec_command.run_exec(build_parser().parse_args(["exec", image, "true"]),
                                     site=make_site(driver="qemu_user"))
        _, err = capfd.readouterr()
        assert code == 200 and message in err and "Traceback" not in err


def test_a_job_documents_image_path_is_relative_to_the_job_file(tmp_path):
    job = tmp_path / "jobs" / "job.json"
    job.parent.mkdir()
    job.write_text(json.dumps({"id": "j", "command": ["true"], "image": "../layout:12"}))
    assert load_job(job).image == f"{tmp_path}/jobs/../layout:12"
    job.write_text(json.dumps({"id": "j", "command": ["true"], "image": "/cvmfs/unpacked.cern.ch/x/debian:12"}))
    assert load_job(job).image == "/cvmfs/unpacked.cern.ch/x/debian:12"


# --- unpacking a layout ---------------------------------------------------------------------------------------

def test_layers_apply_in_order_with_whiteouts_links_owners_and_modes(tmp_path):
    base = layer([
        member("bin", T.DIRTYPE), member("bin/busybox", data=b"BB", mode=0o4755),
        member("bin/sh", T.SYMTYPE, linkname="busybox"),
        member("etc/shadow", data=b"secret", mode=0o000, gid=42),  # no folder entry first: made 0755
        member("etc/os-release", data=b"ID=base\n"), member("etc/hard", T.LNKTYPE, linkname="etc/os-release"),
        member("usr/lib", T.DIRTYPE), member("lib", T.SYMTYPE, linkname="/usr/lib"),
        member("escape", T.SYMTYPE, linkname="/"),
        member("var/cache/old/a", data=b"a"), member("var/cache/keep", data=b"k"),
        member("opaque/old", data=b"old"), member("srv", T.DIRTYPE, mode=0o750, uid=1000, gid=1000)])
    top = layer([
        member("etc/.wh.shadow"), member("var/cache/.wh.old"),
        member("opaque", T.DIRTYPE, mode=0o700), member("opaque/.wh..wh..opq"), member("opaque/new", data=b"new"),
        member("lib/libc.so", data=b"via a link"),  # lands in usr/lib, through the link lib -> /usr/lib
        member("escape/etc/motd", data=b"inside"),  # escape -> / is the image's root, never the host's
        member("etc/os-release", data=b"ID=top\n")])  # replaced, not written through: etc/hard keeps the old
    write_layout(tmp_path / "layout", [base, top])
    tree = tmp_path / "tree"
    result = unpacked(tmp_path / "layout", None, tree)

    files = {str(p.relative_to(tree)) for p in tree.rglob("*") if not p.is_dir() or p.is_symlink()}
    assert files == {"bin/busybox", "bin/sh", "etc/os-release", "etc/hard", "etc/motd", "lib", "escape",
                     "usr/lib/libc.so", "var/cache/keep", "opaque/new"}
    assert (tree / "etc/os-release").read_text() == "ID=top\n" and (tree / "etc/hard").read_text() == "ID=base\n"
    assert (tree / "usr/lib/libc.so").read_text() == "via a link" and os.readlink(tree / "lib") == "/usr/lib"
    assert (tree / "etc/motd").read_text() == "inside"
    owners = pseudo(result)
    assert owners["bin/busybox"] == "4755 0 0" and owners["bin/sh"] == "777 0 0"
    assert owners["srv"] == "750 1000 1000" and owners["etc"] == "755 0 0"
    assert "etc/shadow" not in owners and "var/cache/old" not in owners and "opaque/old" not in owners
    assert (tree / "bin/busybox").stat().st_mtime == 1700000000 and (tree / "bin").stat().st_mtime == 1700000000


def test_a_file_no_one_may_read_is_unpacked_and_keeps_its_mode(tmp_path):
    """The files on disk are the unpacker's (0600), whatever the layer says: the mode goes to the image."""
    write_layout(tmp_path / "layout", [layer([member("etc/gshadow", data=b"x", mode=0o000)])])
    result = unpacked(tmp_path / "layout", None, tmp_path / "tree")
    assert stat.S_IMODE((tmp_path / "tree/etc/gshadow").stat().st_mode) == 0o600
    assert pseudo(result)["etc/gshadow"] == "0 0 0"


@pytest.mark.parametrize("members, message", [
    ([member("../outside", data=b"x")], "'../outside': a name that climbs out of the image"),
    ([member("etc/../../outside", data=b"x")], "climbs out of the image"),
    ([member("/etc/passwd", data=b"x")], "'/etc/passwd': an absolute name"),
    ([member("etc/passwd", T.LNKTYPE, linkname="../../../etc/passwd")], "a hard link to '../../../etc/passwd', "
                                                                        "outside the image"),
    ([member("etc/passwd", T.LNKTYPE, linkname="/etc/passwd")], "a hard link to '/etc/passwd', outside the image"),
    ([member("etc/passwd", T.LNKTYPE, linkname="etc/nothing")], "which no layer before it made"),
    ([member("usr/host", T.SYMTYPE, linkname="../../etc")], "a symbolic link to '../../etc', which points "
                                                            "outside the image"),
    ([member("dev/sda", T.BLKTYPE, devmajor=8)], "'dev/sda': a device node"),
    ([member("dev/null", T.CHRTYPE, devmajor=1)], "'dev/null': a device node"),
    ([member("run/pipe", T.FIFOTYPE)], "'run/pipe': a FIFO"),
    ([member("etc/file", data=b"x"), member("etc/file/inner", data=b"y")], "etc/file, which is not a folder"),
    ([member("bad\nname", data=b"x")], "a control character"),
])
def test_a_hostile_layer_is_refused_naming_the_layer_and_the_member(tmp_path, members, message):
    write_layout(tmp_path / "layout", [layer([member("etc", T.DIRTYPE)]), layer(members)])
    with pytest.raises(ImageError) as refused:
        unpacked(tmp_path / "layout", None, tmp_path / "sandbox" / "tree")
    assert message in str(refused.value)
    assert f"image {tmp_path / 'layout'}: layer 2 of 2 (sha256:" in str(refused.value)
    assert sorted(p.name for p in (tmp_path / "sandbox").iterdir()) == ["tree"]  # nothing written beside it


@pytest.mark.parametrize("limits, members, message", [
    (oci.UnpackLimits(1 << 20, 1000, "limits.bind_mib in site.toml"), [member("big", data=bytes(2 << 20))],
     "takes the image's files past the 1 MiB an image made from a folder may hold (limits.bind_mib in site.toml)"),
    (oci.UnpackLimits(64 << 20, 3, "limits.bind_mib in site.toml"), [member(f"f{n}", data=b"x") for n in range(5)],
     "more than 3 members"),
    (oci.UnpackLimits(1 << 10, 1000, "limits.bind_mib in site.toml"), [member("big", data=os.urandom(4096))],
     "its layers take 0 MiB compressed, more than the 0 MiB"),
])
def test_an_image_too_large_is_refused_naming_the_limit(tmp_path, limits, members, message):
    write_layout(tmp_path / "layout", [layer(members)])
    with pytest.raises(LimitExceeded) as refused:
        unpacked(tmp_path / "layout", None, tmp_path / "tree", limits)
    assert message in str(refused.value)


def test_a_tar_header_too_large_to_read_is_refused_before_it_is_read(tmp_path):
    header = tarfile.TarInfo("././@PaxHeader")
    header.type, header.size = tarfile.XHDTYPE, 1 << 30  # tarfile would read 1 GiB into memory at once
    write_layout(tmp_path / "layout", [header.tobuf(tarfile.USTAR_FORMAT) + bytes(1024)])
    with pytest.raises(ImageError, match="a tar header of 1073741824 bytes at offset 512, more than the 8 MiB"):
        unpacked(tmp_path / "layout", None, tmp_path / "tree")


def test_a_damaged_or_changed_blob_is_refused(tmp_path):
    write_layout(tmp_path / "layout", [layer([member("etc/os-release", data=b"ID=x\n")])], compress=False)
    blob, = layer_blobs(tmp_path / "layout")
    data = bytearray(blob.read_bytes())
    data[data.index(b"ID=x")] = ord("J")  # still a readable tar, of the same size, but not the layer named
    blob.write_bytes(data)
    with pytest.raises(ImageError, match="is not the blob its descriptor names"):
        unpacked(tmp_path / "layout", None, tmp_path / "tree")
    blob.unlink()
    blob.symlink_to("/etc/passwd")
    with pytest.raises(ImageError, match="is a symbolic link, which vjobs does not follow"):
        unpacked(tmp_path / "layout", None, tmp_path / "tree2")


def test_layouts_vjobs_cannot_boot_are_refused_at_once(tmp_path):
    write_layout(tmp_path / "arm", [layer([member("etc", T.DIRTYPE)])], architecture="arm64")
    with pytest.raises(ImageError, match="the image is for linux/arm64; this host's guests run linux/amd64"):
        oci.read_layout(tmp_path / "arm", None, "image arm")
    write_layout(tmp_path / "zstd", [b"(\xb5/\xfd"], layer_type="application/vnd.oci.image.layer.v1.tar+zstd")
    with pytest.raises(ImageError, match="is zstd-compressed.*skopeo copy --dest-compress-format gzip"):
        oci.read_layout(tmp_path / "zstd", None, "image zstd")
    write_layout(tmp_path / "two", [layer([member("a", data=b"1")])], tags=("one",))
    write_layout(tmp_path / "two", [layer([member("b", data=b"2")])], tags=("two",))
    with pytest.raises(ImageError, match=r"holds 2 images; name one as .*/two:TAG \(tags: one, two\)"):
        oci.read_layout(tmp_path / "two", None, "image two")
    with pytest.raises(ImageError, match=r"has no image tagged 'three' \(tags: one, two\)"):
        oci.read_layout(tmp_path / "two", "three", "image two")
    manifest = json.loads((tmp_path / "two/index.json").read_text())["manifests"][0]["digest"]
    (tmp_path / "two/blobs/sha256" / manifest[7:]).write_text('{"layers": []}')
    with pytest.raises(ImageError, match="is not the blob its descriptor names"):  # the manifest is checked too
        oci.read_layout(tmp_path / "two", "one", "image two")


@needs_umoci
def test_a_layout_umoci_made_unpacks_with_its_whiteouts(tmp_path):
    root = tiny_root(tmp_path / "root")
    (root / "etc" / "gone").write_text("removed by the next layer")
    umoci_layout(root, tmp_path / "layout", "one", removed=("/etc/gone",))
    result = unpacked(tmp_path / "layout", "one", tmp_path / "tree")
    assert (tmp_path / "tree/etc/os-release").read_text() == OS_RELEASE
    assert not (tmp_path / "tree/etc/gone").exists() and os.readlink(tmp_path / "tree/bin/sh") == "busybox"
    assert pseudo(result)["bin/busybox"].startswith("755 ")


# --- imaged once, by content -----------------------------------------------------------------------------------

def test_a_tree_and_a_layout_are_imaged_once_then_found_by_content(tmp_path, make_site, cache_dir, cache_hold,
                                                                   checked_files):
    site = make_site()
    tree = tiny_root(tmp_path / "tree")
    write_layout(tmp_path / "layout", [tree_layer(tree)], tags=("v1",))
    for image in (str(tree), f"{tmp_path / 'layout'}:v1"):
        lines: list[str] = []
        first, origin = folder_rootfs(image, site, cache_dir, lines.append, hold=cache_hold, files=checked_files)
        assert any(line.startswith("building the squashfs") for line in lines), lines
        assert first.path.parent == cache_dir / "releases" and first.info.filesystem == "squashfs"
        assert first.path.stat().st_mode & 0o022 == 0
        lines.clear()
        again, _ = folder_rootfs(image, site, cache_dir, lines.append, hold=cache_hold, files=checked_files)
        assert again.path == first.path and again.sha256 == first.sha256 and lines == []
    assert origin["oci_manifest_digest"].startswith("sha256:")
    for blob in layer_blobs(tmp_path / "layout"):  # found by the manifest's digest: the layers are not read again
        blob.unlink()
    assert folder_rootfs(f"{tmp_path / 'layout'}:v1", site, cache_dir, print, hold=cache_hold,
                         files=checked_files)[0].path == first.path


def test_a_tree_larger_than_a_bind_may_be_is_refused_naming_the_limit(tmp_path, make_site, cache_dir, cache_hold,
                                                                     checked_files):
    tree = tiny_root(tmp_path / "tree")
    (tree / "big").write_bytes(bytes(3 << 20))
    with pytest.raises(LimitExceeded) as refused:
        folder_rootfs(str(tree), make_site(limits={"bind_mib": 2}), cache_dir, print, hold=cache_hold,
                      files=checked_files)
    assert "holds more than 2 MiB" in str(refused.value) and "limits.bind_mib in test site" in str(refused.value)


# --- booted --------------------------------------------------------------------------------------------------

@pytest.mark.vm
def test_vjobs_exec_runs_in_an_unpacked_tree(tmp_path, make_site, capfd, assert_clean_host, built_image):
    tree = tiny_root(tmp_path / "tree")
    result = vjobs.execute(ExecRequest(str(tree), ["cat", "/etc/os-release"]), site=make_site(driver="qemu_user"))
    out, err = capfd.readouterr()
    assert result.status == "succeeded" and result.exit_code == 0, (result.error, err)
    assert out == OS_RELEASE
    assert result.provenance["image"] == str(tree) and result.provenance["rootfs_filesystem"] == "squashfs"


@pytest.mark.vm
def test_vjobs_exec_runs_in_an_oci_layout_with_and_without_a_tag(tmp_path, make_site, capfd, assert_clean_host,
                                                                 built_image):
    """Two images in one layout (a tag picks one), and a layout of one image (no tag needed)."""
    tree = tiny_root(tmp_path / "tree")
    base = tree_layer(tree)
    write_layout(tmp_path / "layout", [base], tags=("one",))
    write_layout(tmp_path / "layout", [base, layer([member("etc/os-release", data=b"ID=two\n"),
                                                    member("etc/secret", data=b"s", mode=0o640, gid=42)])],
                 tags=("two",))
    site = make_site(driver="qemu_user")
    code = exec_command.run_exec(build_parser().parse_args(
        ["exec", f"{tmp_path / 'layout'}:two", "sh", "-c", "cat /etc/os-release; stat -c '%a %u %g' /etc/secret"]),
        site=site)
    out, err = capfd.readouterr()
    assert code == 0, err
    assert out == "ID=two\n640 0 42\n"
    shutil.rmtree(tmp_path / "layout")
    write_layout(tmp_path / "layout", [base], tags=("only",))
    code = exec_command.run_exec(build_parser().parse_args(["exec", str(tmp_path / "layout"), "cat",
                                                            "/etc/os-release"]), site=site)
    out, err = capfd.readouterr()
    assert code == 0 and out == OS_RELEASE, err


@pytest.mark.vm
@pytest.mark.skipif(os.geteuid() != 0, reason="needs root: ordinary accounts")
def test_an_ordinary_account_execs_a_layout_into_a_cache_of_its_own(pool_accounts, system_cache):
    account = pool_accounts[0]
    folder = account.home / "image-folders"
    shutil.rmtree(folder, ignore_errors=True)
    shutil.rmtree(account.home / ".cache", ignore_errors=True)
    folder.mkdir()
    tree = tiny_root(folder / "tree")
    write_layout(folder / "layout", [tree_layer(tree), layer([member("etc/shadow", data=b"s", mode=0o000)])],
                 tags=("v1",))
    account.own(folder)
    env = {SYSTEM_CACHE_ENV: str(system_cache)}
    for image in ("./image-folders/tree", "./image-folders/layout:v1"):
        done = account.run([account.vjobs, "exec", "--driver", "qemu_user", image, "sh", "-c",
                            "cat /etc/os-release; stat -c %a /etc/shadow 2>/dev/null || echo none"], env=env)
        assert done.returncode == 0, done.stderr
        assert done.stdout == OS_RELEASE + ("0\n" if "layout" in image else "none\n")
    own = account.home / ".cache" / "vjobs" / "releases"
    images = list(own.glob("*.squashfs"))
    assert len(images) == 2 and all(image.stat().st_uid == account.uid for image in images)
    (tree / "etc" / "shadow").write_text("root's")  # root's, 0600: mksquashfs would put it in empty
    os.chmod(tree / "etc" / "shadow", 0o600)
    done = account.run([account.vjobs, "exec", "--driver", "qemu_user", "./image-folders/tree", "true"], env=env)
    assert done.returncode == 200
    assert f"{tree}/etc/shadow is not readable by uid {account.uid}; the image would hold it empty" in done.stderr
