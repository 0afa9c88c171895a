"""Pre-booted templates (vjobs/drivers/qemu_user/template.py): made once, restored per job, keyed by content,
and never the job's problem: any failure is a cold boot that says why."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import time

import pytest

import vjobs
from vjobs.drivers import templates as shared_templates
from vjobs.drivers.qemu_user import template
from vjobs.images.boot import AGENT

ENTROPY_AND_CLOCK = ["sh", "-c", "head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \\n'; echo; date +%s"]


@pytest.fixture
def template_site(make_site):
    def make(**settings):
        settings.setdefault("drivers", {"qemu_user": {"template": True}})
        return make_site(driver="qemu_user", **settings)
    return make


def templates(cache_dir):
    return sorted(path.name for path in (cache_dir / "templates").glob("*-*") if path.is_dir())


@pytest.mark.vm
def test_jobs_start_from_one_template_with_their_own_randomness_and_the_hosts_clock(
        template_site, make_job, cache_dir, tmp_path, assert_clean_host):
    site = template_site()
    outputs = []
    for number in range(3):
        out = tmp_path / f"out{number}"
        time.sleep(3 * number)  # a guest that kept the template's clock would be seconds behind
        before = time.time()
        result = vjobs.run(make_job(ENTROPY_AND_CLOCK, release={"data.txt": "x\n"}), site=site, outdir=out)
        assert result.status == "succeeded", (result.error, (out / "console.log").read_text())
        assert result.provenance["start"]["mode"] == "template", result.provenance["start"]
        random_hex, guest_clock = (out / "stdout").read_text().split()
        assert before - 1.5 <= int(guest_clock) <= time.time() + 1, "the guest's clock is not the host's"
        assert "could not reseed" not in (out / "console.log").read_text()
        outputs.append(random_hex)
    assert len(set(outputs)) == 3, f"restored guests read the same random bytes: {outputs}"
    made = templates(cache_dir)
    assert [name for name in made if name.startswith("q35_tcg_512m_1cpu-")], made


@pytest.mark.vm
def test_a_template_is_made_per_guest_shape(template_site, make_job, cache_dir, tmp_path, assert_clean_host):
    result = vjobs.run(make_job(["true"], resources={"memory_mib": 384}), site=template_site(),
                       outdir=tmp_path / "out")
    assert result.status == "succeeded" and result.provenance["start"]["mode"] == "template"
    assert result.provenance["start"]["template"].startswith("q35_tcg_384m_1cpu-")


@pytest.mark.vm
def test_a_template_saves_no_leftovers_of_the_boot_in_free_memory(template_site, make_job, cache_dir, tmp_path,
                                                                   assert_clean_host):
    """The agent zeroes free memory before the save (agent/lib.sh's zero_free_memory): the RAM file keeps zero
    pages as holes. Without it, this 256 MiB guest's saved RAM held ~100 MB (the boot's leftovers); with it
    ~70 MB, the kernel, the agent and their memory. The state beside it holds the devices alone."""
    result = vjobs.run(make_job(["true"], resources={"memory_mib": 256}), site=template_site(),
                       outdir=tmp_path / "out")
    assert result.status == "succeeded" and result.provenance["start"]["mode"] == "template"
    folder = cache_dir / "templates" / result.provenance["start"]["template"]
    ram = (folder / "ram").stat()
    assert ram.st_size == 256 << 20 and ram.st_blocks * 512 < 85_000_000, ram.st_blocks * 512
    assert (folder / "state").stat().st_size < 1 << 20


@pytest.mark.vm
def test_a_large_guests_template_is_made_without_running_it_out_of_memory(template_site, make_job, tmp_path,
                                                                          assert_clean_host):
    """Zeroing free memory must leave the kernel its reserves: a fill that ran a 2 GiB guest out of memory
    either panicked it (no template for that shape, ever) or left the OOM killer's report in every job's
    kernel log."""
    job = make_job(["sh", "-c", "dmesg | grep -ci 'out of memory' || true"], resources={"memory_mib": 2048})
    result = vjobs.run(job, site=template_site(), outdir=tmp_path / "out")
    assert result.status == "succeeded" and result.provenance["start"]["mode"] == "template", result.provenance
    assert (tmp_path / "out" / "stdout").read_text().strip() == "0"


@pytest.mark.vm
def test_a_template_that_cannot_be_restored_is_a_cold_boot_then_made_anew(
        template_site, make_job, cache_dir, tmp_path, assert_clean_host, monkeypatch):
    site = template_site()
    own = {"resources": {"memory_mib": 320}}  # a guest shape of its own: the other tests' templates stay whole
    first = vjobs.run(make_job(["true"], **own), site=site, outdir=tmp_path / "first")
    assert first.provenance["start"]["mode"] == "template"
    state = cache_dir / "templates" / first.provenance["start"]["template"] / "state"
    state.write_bytes(b"QEVM but not a saved guest")  # a corrupt template: QEMU refuses to load it
    manifest = json.loads((state.parent / "manifest.json").read_text())
    manifest["sha256"]["state"] = hashlib.sha256(state.read_bytes()).hexdigest()  # its sum passes: QEMU sees it
    (state.parent / "manifest.json").write_text(json.dumps(manifest))

    broken = vjobs.run(make_job(["echo", "ran"], **own), site=site, outdir=tmp_path / "broken")
    assert broken.status == "succeeded" and (tmp_path / "broken" / "stdout").read_text() == "ran\n"
    assert broken.provenance["start"]["mode"] == "cold"
    assert "restoring" in broken.provenance["start"]["fallback"]

    remembered = vjobs.run(make_job(["true"], **own), site=site, outdir=tmp_path / "remembered")
    assert remembered.provenance["start"]["mode"] == "cold"
    assert "failed" in remembered.provenance["start"]["fallback"] and "boot cold" in \
        remembered.provenance["start"]["fallback"]

    monkeypatch.setattr(shared_templates, "FAILURE_MEMORY_S", 0.0)  # the memory has run out: made anew, then used
    again = vjobs.run(make_job(["true"], **own), site=site, outdir=tmp_path / "again")
    assert again.status == "succeeded" and again.provenance["start"]["mode"] == "template"
    assert state.read_bytes()[:4] == b"QEVM" and state.stat().st_size > 1 << 16  # made anew: whole again
    assert (state.parent / "ram").stat().st_size == 320 << 20

    with open(state, "r+b") as saved:  # rewritten in place, its sum not: the saved guest is not restored
        saved.seek(1 << 20)
        saved.write(b"not what was saved")
    damaged = vjobs.run(make_job(["true"], **own), site=site, outdir=tmp_path / "damaged")
    assert damaged.status == "succeeded" and damaged.provenance["start"]["mode"] == "cold"
    assert "is damaged" in damaged.provenance["start"]["fallback"]


@pytest.mark.vm
def test_a_job_with_a_network_boots_cold_and_says_why(template_site, make_job, tmp_path, assert_clean_host):
    site = template_site(allow_network=True)
    result = vjobs.run(make_job(["true"], network=True), site=site, outdir=tmp_path / "out")
    assert result.status == "succeeded"
    assert result.provenance["start"] == {"mode": "cold", "why": "the job asks for a network, which a template "
                                                                 "does not have"}


def test_the_recipe_changes_with_what_the_saved_guest_depends_on(built_image, built_boot, checked_files, tmp_path):
    from vjobs.drivers.contract import BootImage, VMSpec
    from vjobs.drivers.qemu_user import qemu
    from vjobs.guest.console import ConsoleLog

    boot = built_boot
    spec = VMSpec(name="t", vcpus=1, memory_mib=512, boot=boot, disks=(), console=ConsoleLog(tmp_path / "c"),
                  network=False, owner=None, workdir=tmp_path)
    machine = qemu.QemuMachine()
    base = template.recipe_for(spec, machine, "QEMU 7.2")
    assert base.kernel_sha256 == built_image.kernel_sha256  # by content, not by path
    other_initramfs = tmp_path / "initramfs"
    shutil.copyfile(built_image.initramfs, other_initramfs)
    with open(other_initramfs, "ab") as handle:
        handle.write(b"\0" * 512)
    variants = [
        template.recipe_for(spec, machine, "QEMU 8.0"),
        template.recipe_for(spec.__class__(**{**spec.__dict__, "memory_mib": 1024}), machine, "QEMU 7.2"),
        template.recipe_for(spec.__class__(**{**spec.__dict__, "boot": BootImage(
            boot.kernel, checked_files.open(other_initramfs, "initramfs"), boot.cmdline)}),
                            machine, "QEMU 7.2"),
        template.recipe_for(spec, qemu.QemuMachine("pc"), "QEMU 7.2"),
    ]
    keys = {base.key, *(variant.key for variant in variants)}
    assert len(keys) == 1 + len(variants)
    assert template.recipe_for(spec, machine, "QEMU 7.2").key == base.key


def test_vjobs_reseed_is_what_its_source_assembles_to(tmp_path):
    """The committed binary and its source must not drift; needs binutils (as, ld) where it runs."""
    if not (shutil.which("as") and shutil.which("ld")):
        pytest.skip("binutils (as, ld) not installed")
    source, binary = AGENT / "bin" / "vjobs-reseed.S", AGENT / "bin" / "vjobs-reseed"
    subprocess.run(["as", "-o", tmp_path / "r.o", source], check=True)
    subprocess.run(["ld", "--build-id=none", "-static", "-s", "-N", "-o", tmp_path / "r", tmp_path / "r.o"],
                   check=True, capture_output=True)
    assert (tmp_path / "r").read_bytes() == binary.read_bytes()



@pytest.mark.vm
def test_by_default_templates_serve_the_built_in_image_but_not_a_sites_own(make_site, make_job, built_image,
                                                                           tmp_path, assert_clean_host):
    """A site's own kernel and initramfs may carry an agent that never waits as a template's must."""
    own = {"kernel": str(built_image.kernel), "kernel_sha256": built_image.kernel_sha256,
           "initramfs": str(built_image.initramfs), "initramfs_sha256": built_image.initramfs_sha256}
    site = make_site(driver="qemu_user", images={"own": own})
    built_in = vjobs.run(make_job(["true"]), site=site, outdir=tmp_path / "built-in")
    assert built_in.status == "succeeded" and built_in.provenance["start"]["mode"] == "template"
    sites_own = vjobs.run(make_job(["true"], image="own"), site=site, outdir=tmp_path / "own")
    assert sites_own.status == "succeeded" and sites_own.provenance["start"]["mode"] == "cold"
    assert "template = true" in sites_own.provenance["start"]["why"]


def test_a_sites_bad_setting_is_its_own_error_and_does_not_spoil_the_template(template_site, make_job, cache_dir,
                                                                            tmp_path, assert_clean_host):
    """A run_as user that does not exist fails the restore before QEMU runs: that is the site's error, as a
    cold boot reports it, and the template stays usable for every other site on the host."""
    failures_before = set((cache_dir / "templates").glob("*.failed"))  # other tests' shapes may have some
    bad = template_site(drivers={"qemu_user": {"template": True, "run_as": "no-such-user-here"}})
    result = vjobs.run(make_job(["true"]), site=bad, outdir=tmp_path / "bad")
    assert result.status == "vm_error" and "no such user" in result.error["message"]
    assert set((cache_dir / "templates").glob("*.failed")) == failures_before
    good = vjobs.run(make_job(["true"]), site=template_site(), outdir=tmp_path / "good")
    assert good.status == "succeeded" and good.provenance["start"]["mode"] == "template"
