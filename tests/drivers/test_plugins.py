"""Drivers are plugins: a package that is not vjobs adds one by declaring an entry point."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

DEMO = Path(__file__).parent / "demo_driver"


@pytest.fixture(scope="module")
def demo_env(tmp_path_factory):
    """An environment where the demo driver package is installed (into its own folder, by pip)."""
    target = tmp_path_factory.mktemp("demo-site-packages")
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps",
                    "--target", str(target), str(DEMO)], check=True)
    return {**os.environ, "PYTHONPATH": f"{target}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}


def vjobs_cli(env, *args):
    return subprocess.run([sys.executable, "-m", "vjobs", *args], env=env, capture_output=True, text=True)


def test_without_the_package_there_is_no_demo_driver():
    listed = vjobs_cli(os.environ, "drivers").stdout
    assert "qemu_user" in listed and "demo" not in listed.split()


def test_installed_driver_is_listed_with_its_package(demo_env):
    line = next(l for l in vjobs_cli(demo_env, "drivers").stdout.splitlines() if l.startswith("demo\t"))
    assert "vjobs_demo_driver:DemoDriver" in line and "vjobs-demo-driver" in line and "loads" in line


def test_installed_driver_is_probed(demo_env):
    verdicts = json.loads(vjobs_cli(demo_env, "probe", "--json").stdout)
    demo = next(v for v in verdicts if v["driver"] == "demo")
    assert demo["usable"] and demo["reason"].startswith("demo driver (q35)")


@pytest.mark.vm
def test_installed_driver_runs_a_job(demo_env, make_job, cache_dir, built_image, tmp_path):
    site = tmp_path / "site.toml"
    site.write_text(f'driver = "demo"\ncache_dir = "{cache_dir}"\n'
                    f'work_dir = "{tmp_path / "work"}"\n')
    job = make_job(["sh", "-c", "echo from-demo; grep -c '^virtio_pci ' /proc/modules"])
    done = vjobs_cli(demo_env, "run", str(job), "--site", str(site), "--outdir", str(tmp_path / "out"), "--json")
    result = json.loads(done.stdout)
    assert result["driver"] == "demo" and result["status"] == "succeeded", done.stderr
    assert (tmp_path / "out" / "stdout").read_text() == "from-demo\n1\n"
