"""The pytest fixtures vjobs' tests stand on, as a plugin that another package's tests can load too (a driver's
package runs the conformance suite with them, vjobs.testing.conformance)::

    # conftest.py
    pytest_plugins = ["vjobs.testing.fixtures"]

What they give:

- ``cache_dir`` (session): one cache for the session, so that the built-in image (``built_image``) and the
  Debian base (``debian_image``, ``debian_formats``) are built once, held by ``session_cache_hold`` until the
  session ends. VJOBS_TEST_CACHE keeps it across sessions.
- ``cache_hold``: a hold on the cache for one test, as a job has one (vjobs/host/cache.py); ``checked_files``:
  the test's open, checked files (vjobs/images/checked.py); ``built_boot``: the built-in boot image opened there.
- ``make_site(**settings)``: a site config with this test's own work folder and the session's cache.
- ``make_job(command, inputs=..., release=..., **fields)``: writes a job file, returns its path.
- ``fake_image``: a catalogue entry of real files with their real sums, for tests that never boot it.
- ``assert_clean_host``: after the test, no QEMU of the test's jobs runs and no job folder is left.
- ``pool_accounts`` (session): four ordinary accounts (vjobs.testing.accounts), in the groups that grant KVM
  and libvirt, each with vjobs installed by pip into a virtualenv of the system's python3; removed at the end.
- ``system_cache`` (session): the administrator's cache as the accounts see it, the built-in boot image built
  by root, where they can read it; ``VJOBS_SYSTEM_CACHE`` set to it points an account's vjobs at it.
- ``account_cache(account, debian=False)``: a cache in the account's home, its own, with copies of the
  session's built-in image (and the Debian base): an account's jobs boot them and build nothing. The RAM
  keepers the account's template jobs started from it are stopped when the test ends.
- A site for each of vjobs' own drivers, named ``<driver>_site`` as the conformance suite looks them up:
  ``qemu_user_site``; ``kvm_site`` (a real libvirtd at ``VJOBS_TEST_LIBVIRT_URI``, TCG; skipped where none
  answers, a failure when VJOBS_REQUIRE_LIBVIRT is set); ``xen_site`` (the XAPI stand-in,
  ``xapi_standin``, with ``xen_settings``); ``realxen_site``, the xen driver on a real Xen 4.17 hypervisor:
  the session's ``xen_node`` (vjobs.testing.xen_node), booted once for the session and always stopped.

A test run on the kvm driver (a ``driver_site`` parameter named ``kvm``) gets the ``libvirt`` mark, as every
other kvm test has it, so that ``-m "not libvirt"`` leaves it out.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Iterator

import pytest

from vjobs.config.site import SiteConfig, site_from_dict
from vjobs.testing import sites
from vjobs.testing.host_state import held_tokens, vjobs_domains_of, work_leftovers
from vjobs.testing.processes import qemu_processes
from vjobs.testing.sites import libvirt_reachable

# The suite's asserts say what they compared, as a test module's do: pytest rewrites it when it is imported.
pytest.register_assert_rewrite("vjobs.testing.conformance")

MARKERS = {
    "vm": "boots a real virtual machine (slow under TCG; select with -m vm, skip with -m 'not vm')",
    "libvirt": "needs a running libvirtd",
    "realxen": "boots a real Xen 4.17 hypervisor with a Debian dom0 nested under QEMU TCG (vjobs.testing.xen_node)",
}


def pytest_configure(config):
    """The marks these fixtures and the conformance suite use, declared for a package that did not."""
    declared = {line.split(":", 1)[0].strip() for line in config.getini("markers")}
    for name, meaning in MARKERS.items():
        if name not in declared:
            config.addinivalue_line("markers", f"{name}: {meaning}")


@pytest.hookimpl(tryfirst=True)  # before -m deselects by marks
def pytest_collection_modifyitems(items):
    for item in items:
        callspec = getattr(item, "callspec", None)
        if callspec is not None and callspec.params.get("driver_site") == "kvm":
            item.add_marker(pytest.mark.libvirt)


# --- ordinary accounts ---------------------------------------------------------------------------------------

POOL_ACCOUNTS = 4
ACCOUNT_GROUPS = ("kvm", "libvirt")  # what a site grants the accounts that may use KVM and the system libvirtd


@pytest.fixture(scope="session")
def pool_accounts():
    """Four pool accounts with the login ``PATH`` and their own vjobs (needs root); removed when the session
    ends, with their homes and work folders."""
    from vjobs.testing import accounts

    made = accounts.create_accounts(POOL_ACCOUNTS, groups=ACCOUNT_GROUPS)
    try:
        yield accounts.with_venv(made, accounts.account_venv(accounts.checkout()))
    finally:
        accounts.remove_accounts(made)


@pytest.fixture
def account_cache(request, cache_dir, built_image):
    """``account_cache(account, debian=False)``: ``account.home/cache``, the account's own, holding copies of
    the session's built-in image and, with ``debian``, of the Debian base (built first if need be; copied once
    a session). When the test ends, the template RAM keepers that the account's jobs started from it are
    stopped, as the account."""
    from vjobs.testing import accounts

    given: dict[str, tuple[accounts.Account, Path]] = {}

    def give(account: accounts.Account, *, debian: bool = False) -> Path:
        families = ("default", "debian12") if debian else ("default",)
        if debian:
            request.getfixturevalue("debian_image")
        cache = accounts.give_built_images(account, cache_dir, account.home / "cache", families)
        given[account.name] = (account, cache)
        return cache
    yield give
    for account, cache in given.values():
        account.stop_ram_keepers(cache)


# --- images and the session's cache --------------------------------------------------------------------------

@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Iterator[Path]:
    """One cache for the session: the built-in image and release images are built once. Set
    VJOBS_TEST_CACHE to keep it across sessions while developing."""
    from vjobs.drivers.qemu_user.shared_ram import KEEPERS, stop_keepers

    kept = os.environ.get("VJOBS_TEST_CACHE")
    cache = Path(kept) if kept else tmp_path_factory.mktemp("cache")
    yield cache
    stop_keepers(cache / "templates" / KEEPERS)  # the templates' RAM, held for the session's jobs


@pytest.fixture(scope="session")
def session_cache_hold():
    """The session's hold on its cache: the images built once for every test stay until the session ends."""
    from vjobs.host.cache import CacheHold

    with CacheHold() as hold:
        yield hold


@pytest.fixture
def cache_hold():
    """A hold on the cache for this test, as a job has one: what the test uses stays until the test ends."""
    from vjobs.host.cache import CacheHold

    with CacheHold() as hold:
        yield hold


@pytest.fixture
def checked_files(cache_dir):
    """The test's open, checked files (vjobs/images/checked.py), as a job has them: closed when the test ends."""
    from vjobs.images.checked import CheckedFiles

    with CheckedFiles(cache_dir) as files:
        yield files


@pytest.fixture
def built_boot(built_image, checked_files):
    """The built-in boot image as a VM gets it (a ``BootImage`` of checked files), for a spec of a test's own."""
    from vjobs.images.boot import open_default_image

    return open_default_image(built_image, checked_files)


@pytest.fixture(scope="session")
def built_image(cache_dir, session_cache_hold):
    from vjobs.images.boot import build_default_image

    return build_default_image(cache_dir, hold=session_cache_hold)


@pytest.fixture(scope="session")
def system_cache(cache_dir, built_image):
    """A system cache as the administrator leaves one, in a folder every account can reach: the built-in boot
    image, root's. An account's vjobs reads it in place of /var/cache/vjobs with ``VJOBS_SYSTEM_CACHE`` set to
    it; removed when the session ends."""
    folder = Path(tempfile.mkdtemp(prefix="vjobs-test-system-cache-", dir="/var/tmp"))
    os.chmod(folder, 0o755)
    try:
        yield sites.system_cache(cache_dir, folder / "cache")
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="session")
def debian_image(cache_dir, built_image, session_cache_hold):
    """The built-in Debian 12 base (mmdebstrap, ~20 s), built once per session."""
    from vjobs.images.rootfs import debian

    return debian.build(cache_dir, hold=session_cache_hold)


@pytest.fixture(scope="session")
def debian_formats(debian_image, tmp_path_factory) -> dict[str, Path]:
    """The Debian base in other forms a site may have: an erofs (LZ4), and a qcow2 of a GPT disk whose
    second partition holds an ext4 (the first is a small unformatted one, so the partition must be found).
    Its tools are found where Debian keeps them (mke2fs, sfdisk in /usr/sbin) for an ordinary account too."""
    from vjobs.host.tools import tool_path

    def run(argv: list[str], **options) -> None:
        subprocess.run(argv, check=True, env={**os.environ, "PATH": tool_path()}, **options)

    folder = tmp_path_factory.mktemp("formats")
    tree = folder / "tree"
    options, excluded = ["-q", "-no-progress", "-d", str(tree)], []
    if os.geteuid() != 0:  # an ordinary account cannot make device nodes: /dev stays empty (the guest binds its own)
        options, excluded = [*options, "-excludes"], ["dev/*"]
    run(["unsquashfs", *options, debian_image.rootfs, *excluded])
    erofs = folder / "debian12.erofs"
    run(["mkfs.erofs", "--quiet", "-zlz4", str(erofs), str(tree)], capture_output=True)
    ext4 = folder / "root.ext4"
    run(["mke2fs", "-q", "-t", "ext4", "-d", str(tree), str(ext4), "400M"])
    disk = folder / "disk.raw"
    with open(disk, "wb") as handle:
        handle.truncate((1 + 8 + 400 + 1) << 20)
    run(["sfdisk", "-q", str(disk)], text=True,
        input="label: gpt\nstart=2048, size=16384\nstart=18432, size=819200, type=L\n")
    run(["dd", f"if={ext4}", f"of={disk}", "bs=1M", "seek=9", "conv=notrunc,sparse", "status=none"])
    qcow2 = folder / "debian12-gpt-ext4.qcow2"
    run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(disk), str(qcow2)])
    return {"erofs": erofs, "qcow2": qcow2}


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


# --- jobs and sites ------------------------------------------------------------------------------------------

@pytest.fixture
def make_site(tmp_path, cache_dir):
    """A site config (as the TOML would give it) with this test's work folder, its own host budget folder
    (``host-budget``: not the node's, which other tests and accounts use) and the session's cache."""
    def make(**settings) -> SiteConfig:
        host = {"budget_dir": str(tmp_path / "host-budget"), **settings.pop("host", {})}
        document = {"cache_dir": str(cache_dir), "work_dir": str(tmp_path / "work"), "host": host, **settings}
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
def assert_clean_host(tmp_path):
    """After the test: no QEMU of this test's jobs runs, the work folder holds no job folder (admission
    folders stay) and no token of a budget folder (make_site's or an allocation's) is held."""
    yield
    leftovers = work_leftovers(tmp_path / "work") + held_tokens(tmp_path / "host-budget")
    assert leftovers == [], f"job folders or admission shares left behind: {leftovers}"
    assert qemu_processes(str(tmp_path)) == []


# --- a site for each of vjobs' own drivers ---------------------------------------------------------------------

@pytest.fixture
def qemu_user_site(make_site) -> SiteConfig:
    """A site pinned to the qemu_user driver (QEMU run by vjobs itself)."""
    return make_site(driver="qemu_user")


@pytest.fixture
def kvm_site(make_site):
    """A site pinned to the kvm driver with TCG (KVM cannot boot guests on the machines these tests run on),
    against a real libvirtd. scripts/test.sh starts libvirtd and sets VJOBS_REQUIRE_LIBVIRT, so in CI an absent
    libvirtd fails. After the test: no libvirt domain of this process is left."""
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
    After the test: no VM, VBD or job VDI is left in it (a release VDI and a template VDI are kept on purpose)."""
    from vjobs.testing.xapi_standin import XapiStandin

    with XapiStandin(tmp_path / "xapi", password="pool-secret") as standin:
        yield standin
        left = {cls: len(standin.store.objects[cls]) for cls in ("VM", "VBD")}
        job_vdis = [r["name_label"] for r in standin.store.objects["VDI"].values()
                    if not {"vjobs.content_key", "vjobs.template"} & set(r["other_config"])]
        assert left == {"VM": 0, "VBD": 0} and job_vdis == [], f"left in the pool: {left}, {job_vdis}"


@pytest.fixture
def xen_settings(xapi_standin, tmp_path) -> dict:
    """The site's ``[drivers.xen]`` table for the stand-in (with a password file, as a site keeps it)."""
    return sites.xen_settings(xapi_standin.url, sites.write_password(tmp_path / "xapi-password", "pool-secret"))


@pytest.fixture
def xen_site(make_site, xen_settings) -> SiteConfig:
    """A site pinned to the xen driver, pointed at the XAPI stand-in (not in dom0: require_dom0 = false)."""
    return make_site(driver="xen", drivers={"xen": xen_settings})


@pytest.fixture(scope="session")
def xen_node(cache_dir, session_cache_hold):
    """One Xen node for the session (vjobs.testing.xen_node): built into the session's cache if need be, booted,
    and stopped when the session ends. A node that cannot be built or booted fails the tests that use it."""
    from vjobs.testing.xen_node import image
    from vjobs.testing.xen_node.node import XenNode

    try:
        node = XenNode(image.build(cache_dir, hold=session_cache_hold)).start()
    except Exception as exc:
        pytest.fail(f"the Xen node did not come up: {exc}")
    try:
        yield node
    finally:
        node.stop()


@pytest.fixture
def xen_pool(xen_node):
    """The session's Xen node as tests look at it (vjobs.testing.sites.XapiPool): XAPI's records, Xen's domains."""
    return sites.XapiPool(xen_node.url, xen_node.password_file)


@pytest.fixture
def realxen_site(make_site, xen_pool) -> SiteConfig:
    """A site pinned to the xen driver, pointed at the session's Xen node: the stand-in's XenAPI in a real dom0,
    its VMs real Xen PV domains. After the test: no VM, VBD or job VDI is left in its XAPI, and Xen runs no
    domain but dom0."""
    # A save under nested TCG (xl save, then the disks exported over QEMU's user-mode network) takes tens of
    # seconds, more than the 25 s a batch system's KillWait leaves on a real worker node.
    yield make_site(driver="xen", drivers={"xen": xen_pool.settings()}, checkpoint_grace_s=180.0)
    records = xen_pool.query()
    job_vdis = [r["name_label"] for r in records["VDI"].values()
                if not {"vjobs.content_key", "vjobs.template"} & set(r["other_config"])]
    left = {"VMs": len(records["VM"]), "VBDs": len(records["VBD"]), "job VDIs": job_vdis,
            "Xen domains": xen_pool.domains()}
    assert left == {"VMs": 0, "VBDs": 0, "job VDIs": [], "Xen domains": []}, f"left on the Xen node: {left}"
