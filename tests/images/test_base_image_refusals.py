"""A job whose catalogue image has a bad rootfs is refused before any VM starts: a setup error that names
the file and what to do, result.json written, nothing left on the host. (What each refusal detects is
tested in tests/images/test_rootfs_inspect.py; this is the path a user sees.)"""

from __future__ import annotations

import hashlib
import json
import struct
import subprocess
from pathlib import Path

import pytest

import vjobs
from vjobs import cli


def _ext4(tmp_path: Path, dirty: bool) -> Path:
    image = tmp_path / "base.ext4"
    subprocess.run(["mke2fs", "-q", "-F", "-t", "ext4", str(image), "4M"], check=True)
    if dirty:
        data = bytearray(image.read_bytes())
        struct.pack_into("<H", data, 1024 + 0x3A, 0)  # s_state: not cleanly unmounted
        image.write_bytes(bytes(data))
    return image


def _qcow2_with_backing(tmp_path: Path) -> Path:
    _ext4(tmp_path, dirty=False)
    top = tmp_path / "top.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(tmp_path / "base.ext4"), "-F", "raw",
                    str(top)], check=True)
    return top


def _noise(tmp_path: Path) -> Path:
    image = tmp_path / "noise.img"
    image.write_bytes(b"\x7fELF" + bytes(8192))
    return image


BAD_IMAGES = {
    "missing": (lambda tmp: tmp / "nowhere.squashfs", "does not exist"),
    "folder": (lambda tmp: tmp, "not a regular file"),
    "unknown": (_noise, "no file system vjobs recognises"),
    "dirty_ext4": (lambda tmp: _ext4(tmp, dirty=True), "dirty ext4"),
    "qcow2_backing_file": (_qcow2_with_backing, "backing file"),
    "wrong_sha256": (lambda tmp: _ext4(tmp, dirty=False), "the catalogue says"),
}


@pytest.mark.parametrize("kind", sorted(BAD_IMAGES))
def test_a_bad_rootfs_is_a_clear_setup_error(kind, make_job, make_site, tmp_path, assert_clean_host):
    build, expected = BAD_IMAGES[kind]
    image = build(tmp_path)
    digest = hashlib.sha256(image.read_bytes()).hexdigest() if image.is_file() and kind != "wrong_sha256" \
        else "0" * 64
    site = make_site(driver="qemu_user", images={"base": {"rootfs": str(image), "rootfs_sha256": digest}})
    result = vjobs.run(make_job(["true"], image="base"), site=site, outdir=tmp_path / "out")
    assert result.status == "setup_error"
    assert result.error["code"] == "image_error"
    assert expected in result.error["message"] and str(image) in result.error["message"]
    assert json.loads((tmp_path / "out" / "result.json").read_text())["error"]["code"] == "image_error"


def test_the_cli_exits_200_without_a_traceback(make_job, tmp_path, cache_dir, capsys, assert_clean_host):
    site_file = tmp_path / "site.toml"
    site_file.write_text(f'cache_dir = "{cache_dir}"\nwork_dir = "{tmp_path / "work"}"\ndriver = "qemu_user"\n'
                         f'[images.base]\nrootfs = "{tmp_path / "gone.squashfs"}"\nrootfs_sha256 = "{"a" * 64}"\n')
    code = cli.main(["run", str(make_job(["true"], image="base")), "--site", str(site_file),
                     "--outdir", str(tmp_path / "out")])
    captured = capsys.readouterr()
    assert code == 200
    assert "Traceback" not in captured.err + captured.out
    assert "gone.squashfs does not exist" in captured.err


@pytest.mark.parametrize("workdir", ["/", "/proc/x", "/tmp", "/run/work", "relative", "/a/../b", "/opt/release/w"])
def test_a_workdir_that_would_hide_something_is_refused(workdir, make_job):
    job = make_job(["true"], workdir=workdir, release={"x": "y"})
    with pytest.raises(vjobs.errors.InvalidJob, match="workdir"):
        vjobs.validate(job)


def test_an_image_entry_needs_a_rootfs_or_a_kernel(make_site):
    with pytest.raises(vjobs.errors.InvalidSite, match="images"):
        make_site(images={"empty": {"cmdline": "quiet"}})
    with pytest.raises(vjobs.errors.InvalidSite, match="rootfs_sha256"):
        make_site(images={"nosum": {"rootfs": "/srv/x.squashfs"}})
