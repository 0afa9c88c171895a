"""Jobs on a real operating-system base image (the built-in Debian 12), on every driver: Python from the
base runs with the job's inputs and release; the base is never written, whatever root in the guest tries;
what a job changes stays in its overlay and vanishes with it.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
from pathlib import Path

import pytest

import vjobs

pytestmark = pytest.mark.vm

SUMMARY = '''\
import json, os, platform, sys
counts = {}
for line in open(sys.argv[1]):
    kind = line.split()[0]
    counts[kind] = counts.get(kind, 0) + 1
os.makedirs("out", exist_ok=True)
json.dump({"python": platform.python_version(), "cwd": os.getcwd(), "counts": counts,
           "env": {k: os.environ[k] for k in sorted(os.environ) if k not in ("PWD", "OLDPWD", "SHLVL", "_")}},
          open("out/summary.json", "w"), sort_keys=True)
'''


def sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def run_on(job_path, driver_site, outdir):
    name, site = driver_site
    result = vjobs.run(job_path, site=site, outdir=outdir)
    assert result.driver == name
    return result


def test_python_from_the_base_reads_inputs_and_release_and_writes_outputs(make_job, driver_site, debian_image,
                                                                           tmp_path, assert_clean_host):
    job = make_job(["python3", "/opt/release/summary.py", "events.txt"], image="debian12",
                   inputs={"events.txt": "muon 1\njet 2\nmuon 3\n"}, release={"summary.py": SUMMARY},
                   env={"ANALYSIS": "z"}, outputs=["out"])
    result = run_on(job, driver_site, tmp_path / "out")
    assert result.status == "succeeded", (result.error, (tmp_path / "out" / "stderr").read_text())
    summary = json.loads((tmp_path / "out" / "outputs" / "out" / "summary.json").read_text())
    assert summary["python"].startswith("3.11")
    assert summary["cwd"] == "/work"
    assert summary["counts"] == {"muon": 2, "jet": 1}
    assert set(summary["env"]) == {"ANALYSIS", "HOME", "LANG", "PATH", "USER"}  # clean: the job's env on defaults
    assert summary["env"]["HOME"] == "/root" and summary["env"]["LANG"] == "C.UTF-8"
    assert result.provenance["rootfs_sha256"] == debian_image.rootfs_sha256
    assert result.provenance["rootfs_filesystem"] == "squashfs"
    assert sha256(debian_image.rootfs) == debian_image.rootfs_sha256


# Root in the guest tries every way to write the base; each line says what happened.
ATTACK = r'''
for sys in /sys/block/*; do
    dev=/dev/${sys##*/}
    [ "$(cat $sys/ro)" = 1 ] || continue
    blockdev --setrw $dev 2>/dev/null
    echo "ro-device $dev ro=$(cat $sys/ro)"
    dd if=/dev/zero of=$dev bs=4096 count=1 conv=notrunc,fsync 2>/dev/null && echo "dd-wrote $dev"
    mkdir -p /mnt/try
    if mount -o rw $dev /mnt/try 2>/dev/null; then
        touch /mnt/try/planted 2>/dev/null && echo "rw-mount-wrote $dev"
        mount -o remount,rw /mnt/try 2>/dev/null && touch /mnt/try/planted2 2>/dev/null && echo "remount-wrote $dev"
        umount /mnt/try
    fi
done
echo overwritten > /usr/bin/python3 && echo "overlay-write-ok"
mv /opt /opt-renamed && test -d /opt-renamed && echo "rename-base-dir-ok"
touch /etc/left-by-first-job
rm -rf /usr/share/python3 /etc/passwd && echo "delete-ok"
'''


def test_root_cannot_write_the_base_and_changes_stay_in_the_overlay(make_job, driver_site, debian_image,
                                                                     tmp_path, assert_clean_host, request):
    before = sha256(debian_image.rootfs)
    first = run_on(make_job(["sh", "-c", ATTACK], image="debian12", id="attack"), driver_site, tmp_path / "a")
    assert first.status == "succeeded", first.error
    lines = (tmp_path / "a" / "stdout").read_text().splitlines()
    read_only = [line for line in lines if line.startswith("ro-device")]
    assert len(read_only) == 1 and read_only[0].endswith("ro=1"), lines  # the base's disk, still read-only
    assert not [line for line in lines if "wrote" in line], lines
    assert {"overlay-write-ok", "rename-base-dir-ok", "delete-ok"} <= set(lines)
    assert sha256(debian_image.rootfs) == before

    check = ("test ! -e /etc/left-by-first-job && test -d /opt && test -s /etc/passwd && "
             "python3 -c 'import json; print(json.dumps(\"clean\"))'")
    second = run_on(make_job(["sh", "-c", check], image="debian12", id="after"), driver_site, tmp_path / "b")
    assert second.status == "succeeded", (second.error, (tmp_path / "b" / "stderr").read_text())
    assert (tmp_path / "b" / "stdout").read_text() == '"clean"\n'
    assert sha256(debian_image.rootfs) == before
    if driver_site[0] == "xen":  # uploaded once per image per pool, found again by its content
        vdis = request.getfixturevalue("xapi_standin").store.objects["VDI"].values()
        shared = [vdi for vdi in vdis if vdi["other_config"].get("vjobs.content_key") == debian_image.rootfs_sha256]
        assert len(shared) == 1 and shared[0]["read_only"]


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
              'for d in /dev/vd?; do cat $d > /dev/null 2>&1 && echo "read $d"; done; '
              'touch /etc/x 2>/dev/null && echo wrote-etc; exit 0')
    job = make_job(["sh", "-c", script], image="debian12", workdir="/srv/job", inputs={"in": "x"},
                   outputs=["made-here"])
    result = vjobs.run(job, site=make_site(driver="qemu_user", payload_user="unprivileged"), outdir=tmp_path / "o")
    assert result.status == "succeeded", result.error
    assert (tmp_path / "o" / "stdout").read_text() == "uid=65534 cwd=/srv/job\nworkdir-writable\n"
    assert [o["path"] for o in result.outputs] == ["made-here"]


def corrupt_squashfs(tmp_path: Path) -> tuple[Path, str]:
    """A squashfs whose superblock is fine (the host accepts it) and whose tables are garbage."""
    tree = tmp_path / "tree"
    (tree / "bin").mkdir(parents=True)
    (tree / "bin" / "sh").write_text("#!/bin/false\n")
    image = tmp_path / "broken.squashfs"
    subprocess.run(["mksquashfs", str(tree), str(image), "-comp", "lz4", "-noappend", "-quiet"], check=True)
    data = bytearray(image.read_bytes())
    data[96:] = bytes(len(data) - 96)  # keep the 96-byte superblock, zero the rest
    image.write_bytes(bytes(data))
    return image, hashlib.sha256(bytes(data)).hexdigest()


def test_a_base_the_guest_cannot_mount_is_a_clear_vm_error(make_job, make_site, built_image, tmp_path,
                                                          assert_clean_host):
    image, digest = corrupt_squashfs(tmp_path)
    site = make_site(driver="qemu_user", images={"broken": {"rootfs": str(image), "rootfs_sha256": digest}})
    result = vjobs.run(make_job(["true"], image="broken"), site=site, outdir=tmp_path / "out")
    assert result.status == "vm_error"
    assert result.error["code"] == "rootfs_mount_failed"
    assert "could not mount the base image" in result.error["message"]
    assert sha256(image) == digest


@pytest.fixture(scope="session")
def debian_formats(debian_image, tmp_path_factory):
    """The Debian base in other forms a site may have: an erofs (LZ4), and a qcow2 of a GPT disk whose
    second partition holds an ext4 (the first is a small unformatted one, so the partition must be found)."""
    folder = tmp_path_factory.mktemp("formats")
    tree = folder / "tree"
    subprocess.run(["unsquashfs", "-q", "-no-progress", "-d", str(tree), debian_image.rootfs], check=True)
    erofs = folder / "debian12.erofs"
    subprocess.run(["mkfs.erofs", "--quiet", "-zlz4", str(erofs), str(tree)], check=True, capture_output=True)
    ext4 = folder / "root.ext4"
    subprocess.run(["mke2fs", "-q", "-t", "ext4", "-d", str(tree), str(ext4), "400M"], check=True)
    disk = folder / "disk.raw"
    with open(disk, "wb") as handle:
        handle.truncate((1 + 8 + 400 + 1) << 20)
    subprocess.run(["sfdisk", "-q", str(disk)], check=True, text=True,
                   input="label: gpt\nstart=2048, size=16384\nstart=18432, size=819200, type=L\n")
    subprocess.run(["dd", f"if={ext4}", f"of={disk}", "bs=1M", "seek=9", "conv=notrunc,sparse", "status=none"],
                   check=True)
    qcow2 = folder / "debian12-gpt-ext4.qcow2"
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(disk), str(qcow2)], check=True)
    return {"erofs": erofs, "qcow2": qcow2}


def catalogue_site(make_site, image: Path, **settings):
    digest = hashlib.sha256(image.read_bytes()).hexdigest()
    return make_site(images={"base": {"rootfs": str(image), "rootfs_sha256": digest}}, **settings), digest


def test_a_qcow2_gpt_ext4_base_on_every_driver(make_job, driver_site, debian_formats, make_site, tmp_path,
                                              request, assert_clean_host):
    name, pinned = driver_site
    image = debian_formats["qcow2"]
    site, digest = catalogue_site(make_site, image, driver=name, drivers=dict(pinned.drivers))
    job = make_job(["sh", "-c", "python3 -c 'print(1 + 1)' && grep ' / ' /proc/mounts | cut -d' ' -f3"],
                   image="base")
    result = vjobs.run(job, site=site, outdir=tmp_path / "out")
    assert result.status == "succeeded", (result.error, (tmp_path / "out" / "stderr").read_text())
    assert (tmp_path / "out" / "stdout").read_text() == "2\noverlay\n"
    assert result.provenance["rootfs_filesystem"] == "ext4"
    assert result.provenance["rootfs_container"] == "qcow2"
    assert sha256(image) == digest


def test_an_erofs_base(make_job, make_site, debian_formats, tmp_path, assert_clean_host):
    site, digest = catalogue_site(make_site, debian_formats["erofs"], driver="qemu_user")
    result = vjobs.run(make_job(["python3", "-c", "import sys; print(sys.version_info[0])"], image="base"),
                       site=site, outdir=tmp_path / "out")
    assert result.status == "succeeded", result.error
    assert (tmp_path / "out" / "stdout").read_text() == "3\n"
    assert result.provenance["rootfs_filesystem"] == "erofs"


def test_the_readme_example_runs(tmp_path, make_site, debian_image, assert_clean_host):
    """The README's first command's job: a Python analysis from the release, on the built-in Debian base."""
    example = Path(__file__).resolve().parent.parent / "examples" / "analysis" / "job.json"
    result = vjobs.run(example, site=make_site(driver="qemu_user"), outdir=tmp_path / "out")
    assert result.status == "succeeded", result.error
    summary = json.loads((tmp_path / "out" / "outputs" / "out" / "summary.json").read_text())
    assert summary["os"] == "Debian GNU/Linux 12 (bookworm)"
    assert summary["kinds"]["muon"] == {"events": 3, "mean_energy_gev": 41.7, "max_energy_gev": 45.0}


def test_a_built_base_is_reused_not_rebuilt(cache_dir, debian_image, monkeypatch):
    from vjobs.images.rootfs import debian

    monkeypatch.setattr(debian, "_mmdebstrap", lambda *args: pytest.fail("rebuilt an up-to-date image"))
    assert debian.build(cache_dir) == debian_image
