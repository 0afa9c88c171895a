"""Shared fixtures. Guest images are built once per session; every test gets its own work folder and checks
that nothing is left behind (no QEMU, no job folder)."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from pathlib import Path

import pytest

from vjobs.pilot3.harness import fetch_sdist, why_not_runnable
from vjobs.config.site import SiteConfig, site_from_dict
from vjobs.testing import sites
from vjobs.testing.processes import qemu_processes  # noqa: F401 (tests import it from here)
from vjobs.testing.sites import LIBVIRT_URI, libvirt_reachable

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    """One cache for the session: the built-in image and release images are built once. Set
    VJOBS_TEST_CACHE to keep it across sessions while developing."""
    kept = os.environ.get("VJOBS_TEST_CACHE")
    return Path(kept) if kept else tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="session")
def built_image(cache_dir):
    from vjobs.images.boot import build_default_image

    return build_default_image(cache_dir)


@pytest.fixture
def make_site(tmp_path, cache_dir):
    """A site config (as the TOML would give it) with this test's work folder and the session's cache."""
    def make(**settings) -> SiteConfig:
        document = {"cache_dir": str(cache_dir), "work_dir": str(tmp_path / "work"), **settings}
        return site_from_dict(document, source="test site")
    return make


@pytest.fixture
def make_job(tmp_path):
    """Writes a job file (and returns its path); ``inputs``/``release`` dicts of name -> text become folders."""
    def make(command, *, inputs=None, release=None, mount="/opt/release", **fields) -> Path:
        document = {"id": fields.pop("id", "t1"), "command": command, **fields}
        if inputs is not None:
            document["inputs"] = str(_tree(tmp_path / "inputs", inputs))
        if release is not None:
            document["release"] = {"path": str(_tree(tmp_path / "release", release)), "mount": mount}
        path = tmp_path / "job.json"
        path.write_text(json.dumps(document))
        return path
    return make


def _tree(root: Path, files: dict) -> Path:
    root.mkdir(exist_ok=True)
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        if isinstance(text, bytes):
            (root / name).write_bytes(text)
        else:
            (root / name).write_text(text)
    return root


@pytest.fixture
def fake_image(tmp_path):
    """A catalogue entry with real files and their real sums, for tests that never boot it."""
    files = {}
    for name in ("kernel", "initramfs"):
        path = tmp_path / "img" / name
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(name.encode() * 100)
        files[name] = str(path)
        files[f"{name}_sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
    return files


def work_leftovers(work: Path) -> list[str]:
    """What a work folder holds besides the admission folder (which stays) and its shares of live jobs."""
    if not work.exists():
        return []
    folders = [work / "admission", *work.glob("admission.*")]  # the host's, and batch allocations'
    shares = [f"{folder.name}/{p.name}" for folder in folders for p in folder.glob("*.json")]
    return sorted([p.name for p in work.iterdir() if p not in folders] + shares)


@pytest.fixture
def assert_clean_host(tmp_path):
    """After the test: no QEMU of this test's jobs runs and the work folder holds no job folder (the
    admission folder stays, with no job's share in it)."""
    yield
    leftovers = work_leftovers(tmp_path / "work")
    assert leftovers == [], f"job folders or admission shares left behind: {leftovers}"
    assert qemu_processes(str(tmp_path)) == []


def vjobs_domains_of(pid: int, uri: str = LIBVIRT_URI) -> list[str]:
    """Names of the libvirt domains that vjobs started from process ``pid``."""
    import libvirt

    from vjobs.drivers.kvm.driver import owner_labels

    conn = libvirt.open(uri)
    try:
        return [dom.name() for dom in conn.listAllDomains() if owner_labels(dom).get("vjobs.pid") == str(pid)]
    finally:
        conn.close()


@pytest.fixture
def libvirt_site(make_site):
    """A site pinned to the kvm driver with TCG (KVM cannot boot guests here), against a real libvirtd.
    scripts/test.sh starts libvirtd and sets VJOBS_REQUIRE_LIBVIRT, so in CI an absent libvirtd fails."""
    why_not = libvirt_reachable()
    if why_not:
        if os.environ.get("VJOBS_REQUIRE_LIBVIRT"):
            pytest.fail(f"{why_not} (scripts/test.sh should have started it)")
        pytest.skip(f"{why_not}: start it with .ci/libvirt.sh up")
    yield make_site(driver="kvm", drivers={"kvm": sites.libvirt_settings()})
    assert vjobs_domains_of(os.getpid()) == [], "libvirt domains left behind"


@pytest.fixture
def xapi_standin(tmp_path):
    """A XAPI stand-in of this test's own (real XML-RPC on loopback; started VMs are QEMU TCG guests).
    After the test: no VM, VBD or job VDI is left in it (a release VDI is kept on purpose)."""
    from vjobs.testing.xapi_standin import XapiStandin

    with XapiStandin(tmp_path / "xapi", password="pool-secret") as standin:
        yield standin
        left = {cls: len(standin.store.objects[cls]) for cls in ("VM", "VBD")}
        job_vdis = [r["name_label"] for r in standin.store.objects["VDI"].values()
                    if "vjobs.content_key" not in r["other_config"]]
        assert left == {"VM": 0, "VBD": 0} and job_vdis == [], f"left in the pool: {left}, {job_vdis}"


@pytest.fixture
def xen_settings(xapi_standin, tmp_path):
    return sites.xen_settings(xapi_standin.url, sites.write_password(tmp_path / "xapi-password", "pool-secret"))


@pytest.fixture
def xen_site(make_site, xen_settings):
    """A site pinned to the xen driver, pointed at the XAPI stand-in (not in dom0: require_dom0 = false)."""
    return make_site(driver="xen", drivers={"xen": xen_settings})


@pytest.fixture(params=["qemu_user", pytest.param("kvm", marks=pytest.mark.libvirt), "xen"])
def driver_site(request, make_site, built_image):
    """(driver name, site config) for each driver set-up under test: the conformance suites run on every
    driver, as Nova runs one test class against every virt driver."""
    name = request.param
    setups = {"qemu_user": lambda: make_site(driver="qemu_user"),
              "kvm": lambda: request.getfixturevalue("libvirt_site"),
              "xen": lambda: request.getfixturevalue("xen_site")}
    return name, setups[name]()


@pytest.fixture(scope="session")
def debian_image(cache_dir, built_image):
    """The built-in Debian 12 base (mmdebstrap, ~20 s), built once per session."""
    from vjobs.images.rootfs import debian

    return debian.build(cache_dir)


# --- PanDA Pilot 3 -----------------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def pilot3_sdist(cache_dir) -> Path:
    """The unpacked panda-pilot sdist: VJOBS_PILOT3_SDIST names one, else it is downloaded once into the
    session cache. Skips when it cannot be had or run safely here; scripts/test.sh makes that a failure."""
    required = os.environ.get("VJOBS_REQUIRE_PILOT3")
    try:
        given = os.environ.get("VJOBS_PILOT3_SDIST")
        folder = Path(given) if given else fetch_sdist(cache_dir / "pilot3")
    except RuntimeError as exc:
        (pytest.fail if required else pytest.skip)(str(exc))
    why_not = why_not_runnable(folder)
    if why_not:
        (pytest.fail if required else pytest.skip)(f"PanDA Pilot 3 cannot run here: {why_not}")
    return folder


# Real servers, started once per session and always stopped: XRootD and WebDAV, S3 (Swift), Slurm.
from fixtures_grid import *  # noqa: E402,F401,F403
from fixtures_s3 import *  # noqa: E402,F401,F403
from fixtures_slurm import *  # noqa: E402,F401,F403
