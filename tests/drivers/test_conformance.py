"""The driver conformance suite (vjobs.testing.conformance) for every driver installed here: vjobs' own
qemu_user, kvm and xen, whose sites come from the vjobs.testing.fixtures plugin (tests/conftest.py loads it),
and any other package's driver installed beside them, which fails here until a ``NAME_site`` fixture gives
it a site."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from vjobs.testing.conformance import DriverConformance


class TestConformance(DriverConformance):
    pass


def test_an_installed_driver_without_a_site_fixture_fails_saying_what_to_write(tmp_path, repo):
    """A package installs a driver named "other" (an entry point, nothing more) and gives it no site: the suite's
    tests fail for it (one is run here), naming the fixture to write, before anything is built or booted."""
    dist = tmp_path / "site-packages" / "vjobs_other_driver-1.0.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: vjobs-other-driver\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[vjobs.drivers]\nother = vjobs_other_driver:OtherDriver\n")
    path = os.pathsep.join(filter(None, [str(tmp_path / "site-packages"), os.environ.get("PYTHONPATH")]))
    test = f"{Path(__file__)}::TestConformance::test_exit_status_outputs_in_subfolders_and_env[other]"
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", test], cwd=repo,
                          capture_output=True, text=True, timeout=240, env={**os.environ, "PYTHONPATH": path})
    assert done.returncode == 1 and "1 error" in done.stdout.splitlines()[-1], done.stdout[-3000:]
    assert "the driver 'other' is installed" in done.stdout and "no fixture 'other_site'" in done.stdout
    assert "During handling" not in done.stdout  # the message alone, not a lookup error's traceback
