"""Choosing a driver (vjobs/drivers/registry.py) imports no driver it does not have to, and drivers that other
packages install come after vjobs' own in the default order. Each case runs in a new Python process, so that
what it imported is all its own."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

CHOOSE = """
import json, sys
from vjobs.drivers.registry import candidate_names, choose_driver
from vjobs.api import host_context
from vjobs.config.site import site_from_dict
site = site_from_dict(json.loads(sys.argv[1]), source="test")
first = [name for name, _ in zip(candidate_names(site), range(3))]
def drivers_imported():  # the drivers' own packages, not the core's contract and registry beside them
    return sorted(m for m in sys.modules if m.startswith(("vjobs.drivers.qemu_user", "vjobs.drivers.kvm",
                                                          "vjobs.drivers.xen")))
imported_after_names = drivers_imported()
driver, verdict = choose_driver(site, host_context(site)) if site.pinned_driver else (None, None)
print(json.dumps({"first": first, "after_names": imported_after_names, "chosen": driver and driver.name,
                  "imported": drivers_imported() + sorted(m for m in sys.modules if m in ("libvirt", "XenAPI"))}))
"""


def choose_in_a_new_process(tmp_path: Path, **settings) -> dict:
    document = {"cache_dir": str(tmp_path / "cache"), "work_dir": str(tmp_path / "work"), **settings}
    done = subprocess.run([sys.executable, "-c", CHOOSE, json.dumps(document)], capture_output=True, text=True,
                          check=True)
    return json.loads(done.stdout)


def test_a_pinned_driver_is_the_only_one_imported(tmp_path):
    seen = choose_in_a_new_process(tmp_path, driver="qemu_user")
    assert seen["chosen"] == "qemu_user"
    assert [m for m in seen["imported"] if not m.startswith("vjobs.drivers.qemu_user")] == []


def test_the_default_preference_imports_no_driver_to_name_the_candidates(tmp_path):
    seen = choose_in_a_new_process(tmp_path)
    assert seen["first"] == ["xen", "kvm", "qemu_user"] and seen["after_names"] == []


def test_other_installed_drivers_come_after_the_default_ones(tmp_path):
    dist = tmp_path / "site-packages" / "vjobs_other_driver-1.0.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: vjobs-other-driver\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[vjobs.drivers]\nother = vjobs_other_driver:OtherDriver\n")
    script = ("from vjobs.drivers.registry import candidate_names; from vjobs.config.site import SiteConfig; "
              "print(' '.join(candidate_names(SiteConfig())))")
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "site-packages")}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True, env=env)
    assert done.stdout.split() == ["xen", "kvm", "qemu_user", "other"]
