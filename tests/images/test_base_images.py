"""Jobs on a real operating-system base image (the built-in Debian 12) and its other forms (erofs), on qemu_user:
what a job wrecks or leaves running stays in its own VM, an unprivileged payload in a working directory of its
choice, a base the guest cannot mount, the README's example, a base built once. What every driver must do with a
base image (read-only at the device level, the overlay, a qcow2 of a GPT disk) is in vjobs.testing.conformance.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

import vjobs

pytestmark = pytest.mark.vm


def sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def test_deleting_usr_breaks_only_this_job(make_job, make_site, debian_image, tmp_path, assert_clean_host):
    site = make_site(driver="qemu_user")
    first = vjobs.run(make_job(["sh", "-c", "rm -rf /usr; exit 3"], image="debian12", id="wreck"), site=site,
                      outdir=tmp_path / "a")
    assert first.status == "failed" and first.exit_code == 3, first.error
    second = vjobs.run(make_job(["python3", "-c", "print('intact')"], image="debian12", id="next"), site=site,
                       outdir=tmp_path / "b")
    assert second.status == "succeeded", second.error
    assert (tmp_path / "b" / "stdout").read_text() == "intact\n"


def test_a_daemon_left_behind_ends_with_the_payload(make_job, make_site, debian_image, tmp_path,
                                                    assert_clean_host):
    script = "setsid sleep 1000 < /dev/null > /dev/null 2>&1 & (sleep 900 &) ; echo started"
    result = vjobs.run(make_job(["sh", "-c", script], image="debian12", walltime_s=120),
                       site=make_site(driver="qemu_user"), outdir=tmp_path / "out")
    assert result.status == "succeeded", result.error
    assert result.timings["run"] < 60  # the VM powered off once the payload ended, long before any sleep
    assert (tmp_path / "out" / "stdout").read_text() == "started\n"


def test_workdir_and_an_unprivileged_payload(make_job, make_site, debian_image, tmp_path, assert_clean_host):
    script = ('echo "uid=$(id -u) cwd=$(pwd)"; touch made-here && echo workdir-writable; '
              'echo y >> in && rm gone && echo "inputs-writable $(cat in) $(stat -c %u .)"; '
              'for d in /dev/vd?; do cat $d > /dev/null 2>&1 && echo "read $d"; done; '
              'touch /etc/x 2>/dev/null && echo wrote-etc; exit 0')
    job = make_job(["sh", "-c", script], image="debian12", workdir="/srv/job", inputs={"in": "x\n", "gone": "z"},
                   outputs=["made-here", "in"])
    result = vjobs.run(job, site=make_site(driver="qemu_user", payload_user="unprivileged"), outdir=tmp_path / "o")
    assert result.status == "succeeded", result.error
    assert (tmp_path / "o" / "stdout").read_text() == ("uid=65534 cwd=/srv/job\nworkdir-writable\n"
                                                       "inputs-writable x\ny 65534\n")
    assert sorted(o["path"] for o in result.outputs) == ["in", "made-here"]


def test_a_base_the_guest_cannot_mount_is_a_clear_vm_error(make_job, make_site, built_image, corrupt_base,
                                                          tmp_path, assert_clean_host):
    image, digest = corrupt_base
    site = make_site(driver="qemu_user", images={"broken": {"rootfs": str(image), "rootfs_sha256": digest}})
    result = vjobs.run(make_job(["true"], image="broken"), site=site, outdir=tmp_path / "out")
    assert result.status == "vm_error"
    assert result.error["code"] == "rootfs_mount_failed"
    assert "could not mount the base image" in result.error["message"]
    assert sha256(image) == digest


def catalogue_site(make_site, image: Path, **settings):
    digest = hashlib.sha256(image.read_bytes()).hexdigest()
    return make_site(images={"base": {"rootfs": str(image), "rootfs_sha256": digest}}, **settings), digest


def test_an_erofs_base(make_job, make_site, debian_formats, tmp_path, assert_clean_host):
    site, digest = catalogue_site(make_site, debian_formats["erofs"], driver="qemu_user")
    result = vjobs.run(make_job(["python3", "-c", "import sys; print(sys.version_info[0])"], image="base"),
                       site=site, outdir=tmp_path / "out")
    assert result.status == "succeeded", result.error
    assert (tmp_path / "out" / "stdout").read_text() == "3\n"
    assert result.provenance["rootfs_filesystem"] == "erofs"


def test_the_readme_example_runs(tmp_path, make_site, debian_image, repo, assert_clean_host):
    """The README's first command's job: a Python analysis from the release, on the built-in Debian base."""
    example = repo / "examples" / "analysis" / "job.json"
    result = vjobs.run(example, site=make_site(driver="qemu_user"), outdir=tmp_path / "out")
    assert result.status == "succeeded", result.error
    summary = json.loads((tmp_path / "out" / "outputs" / "out" / "summary.json").read_text())
    assert summary["os"] == "Debian GNU/Linux 12 (bookworm)"
    assert summary["kinds"]["muon"] == {"events": 3, "mean_energy_gev": 41.7, "max_energy_gev": 45.0}


def test_a_built_base_is_reused_not_rebuilt(cache_dir, debian_image, monkeypatch, cache_hold):
    from vjobs.images.rootfs import debian

    monkeypatch.setattr(debian, "_mmdebstrap", lambda *args: pytest.fail("rebuilt an up-to-date image"))
    assert debian.build(cache_dir, hold=cache_hold) == debian_image
