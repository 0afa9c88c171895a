"""Roles on a node (vjobs/host/roles.py): root builds the built-in images into the system cache, an account's jobs
use them read-only and build what is theirs into a cache of their own; no entry another account could have
written is used. The account cases run real ordinary accounts (``pool_accounts``) with their own vjobs."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from vjobs.config.site import SYSTEM_CACHE_ENV, site_from_dict
from vjobs.drivers.qemu_user.shared_ram import KEEPERS
from vjobs.errors import SetupError
from vjobs.host.cache import CacheHold, seal, trusted
from vjobs.host.roles import caches
from vjobs.testing.sites import vjobs_command

as_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root: other owners, and ordinary accounts")
NOBODY = 65534


# --- the rule: whose entries are used ----------------------------------------------------------------------

def _entry(cache: Path, name: str = "releases/0123.squashfs") -> Path:
    entry = cache / name
    entry.parent.mkdir(parents=True, exist_ok=True)
    entry.write_bytes(b"image")
    for path in (cache, entry.parent, entry):
        os.chmod(path, 0o755 if path.is_dir() else 0o644)
    return entry


def test_an_entry_is_used_only_when_nobody_else_could_have_written_it(tmp_path):
    entry = _entry(tmp_path / "cache")
    assert trusted(entry)
    os.chmod(entry, 0o664)  # writable by its group
    assert not trusted(entry)
    os.chmod(entry, 0o644)
    os.chmod(entry.parent, 0o777)  # anyone may replace it
    assert not trusted(entry)
    os.chmod(entry.parent, 0o755)
    link = entry.parent / "link.squashfs"
    link.symlink_to(entry)
    assert not trusted(link)
    with CacheHold() as hold:
        assert hold.use(entry) and not hold.use(link)


def test_a_folder_entry_is_judged_with_what_it_holds(tmp_path):
    folder = tmp_path / "cache" / "images" / "default-0123456789abcdef"
    folder.mkdir(parents=True)
    (folder / "vmlinuz").write_bytes(b"kernel")
    os.chmod(folder / "vmlinuz", 0o666)
    assert not trusted(folder)
    seal(folder)  # what vjobs does to every entry it builds, whatever its umask
    assert trusted(folder) and (folder / "vmlinuz").stat().st_mode & 0o777 == 0o644


@as_root
def test_root_never_uses_an_accounts_entry_nor_writes_into_its_cache(tmp_path):
    entry = _entry(tmp_path / "cache")
    os.chown(entry, NOBODY, NOBODY)
    with CacheHold() as hold:
        assert not trusted(entry) and not hold.use(entry)
    os.chown(tmp_path / "cache", NOBODY, NOBODY)
    with pytest.raises(SetupError, match=f"folder of uid {NOBODY}: root writes only into folders it owns") as refused:
        caches(site_from_dict({"cache_dir": str(tmp_path / "cache")}))
    assert refused.value.code == "cache_not_ours"


def test_root_or_an_owner_builds_in_its_cache_dir(tmp_path):
    found_in = caches(site_from_dict({"cache_dir": str(tmp_path / "new" / "cache")}))
    assert found_in.own == found_in.images == tmp_path / "new" / "cache" and found_in.builds_images
    assert found_in.administrators is None and (found_in.own / "releases").is_dir()


# --- ordinary accounts -------------------------------------------------------------------------------------

@pytest.fixture
def empty_system_cache():
    """A system cache in which root built nothing yet."""
    folder = Path(tempfile.mkdtemp(prefix="vjobs-test-empty-cache-", dir="/var/tmp"))
    os.chmod(folder, 0o755)
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


def snapshot(folder: Path) -> dict[str, tuple]:
    """Every file and folder under ``folder`` as the kernel sees it: what changed, or appeared, shows."""
    found = {}
    for path in (folder, *folder.rglob("*")):
        info = path.lstat()
        found[str(path.relative_to(folder))] = (info.st_mode, info.st_uid, info.st_size, info.st_mtime_ns,
                                                info.st_ctime_ns)
    return found


def run_hello(account, repo: Path, outdir: str, env: dict[str, str], *extra: str):
    return account.run([account.vjobs, "run", str(repo / "examples/hello/job.json"), "--outdir", outdir, "--json",
                        *extra], env=env, timeout=300)


@as_root
@pytest.mark.vm
def test_an_account_runs_hello_on_root_built_images_and_writes_nothing_into_them(pool_accounts, system_cache, repo):
    """No site config: the built-in image is root's, read-only; the release image is the account's own."""
    account = pool_accounts[0]
    before = snapshot(system_cache)
    shutil.rmtree(account.home / ".cache", ignore_errors=True)
    done = run_hello(account, repo, "out", {SYSTEM_CACHE_ENV: str(system_cache)}, "--driver", "qemu_user")
    result = json.loads(done.stdout)
    assert result["status"] == "succeeded", (result["error"], done.stderr)
    assert snapshot(system_cache) == before  # no lock file, record, template or time of use written there
    own = account.home / ".cache" / "vjobs"
    assert own.stat().st_uid == account.uid and own.stat().st_mode & 0o777 == 0o700
    assert list((own / "releases").glob("*.squashfs"))  # what it built is its own, and only it can read it
    assert not list((own / "images").iterdir())  # it built no image of its own


@as_root
@pytest.mark.vm
def test_an_account_restores_the_template_root_made_and_makes_none(pool_accounts, system_cache, repo, tmp_path):
    """Templates hold guest memory: one root made is shared with the accounts, read-only."""
    hello = str(repo / "examples/hello/job.json")
    env = {**os.environ, SYSTEM_CACHE_ENV: str(system_cache)}
    env.pop("VJOBS_SITE", None)
    made = subprocess.run([*vjobs_command(), "run", hello, "--driver", "qemu_user", "--outdir", str(tmp_path / "root"),
                           "--json"], env=env, capture_output=True, text=True, timeout=300)
    by_root = json.loads(made.stdout)
    assert by_root["status"] == "succeeded", (by_root["error"], made.stderr)
    account = pool_accounts[3]
    before = snapshot(system_cache)
    done = run_hello(account, repo, "out-template", {SYSTEM_CACHE_ENV: str(system_cache)}, "--driver", "qemu_user")
    result = json.loads(done.stdout)
    assert result["status"] == "succeeded", (result["error"], done.stderr)
    assert result["provenance"]["start"] == {"mode": "template", "template": by_root["provenance"]["start"]["template"]}
    assert (system_cache / "templates" / result["provenance"]["start"]["template"]).stat().st_uid == 0
    own = account.home / ".cache" / "vjobs" / "templates"
    assert [path.name for path in own.iterdir()] == [KEEPERS]  # no template; only its own keeper of root's RAM
    assert snapshot(system_cache) == before


@as_root
def test_an_account_asking_for_an_image_nobody_built_is_told_who_builds_it(pool_accounts, empty_system_cache, repo):
    account = pool_accounts[1]
    env = {SYSTEM_CACHE_ENV: str(empty_system_cache)}
    done = run_hello(account, repo, "out", env)
    assert done.returncode == 200, done.stderr
    error = json.loads(done.stdout)["error"]
    assert error["code"] == "image_not_found"
    assert "the administrator builds it once, as root: vjobs image build default" in error["message"]
    assert str(empty_system_cache) in error["message"]
    build = account.run([account.vjobs, "image", "build", "debian12"], env=env)
    assert build.returncode == 1 and "as root: vjobs image build debian12" in build.stderr
    listing = account.run([account.vjobs, "image", "list"], env=env)
    assert listing.returncode == 0 and "not built" in listing.stdout and "the administrator" in listing.stdout
    assert list(empty_system_cache.iterdir()) == []


@as_root
@pytest.mark.vm
def test_a_root_owned_site_cache_is_read_only_to_an_account_and_no_internal_error(pool_accounts, system_cache,
                                                                                   empty_system_cache, repo):
    """The issue's layout: `cache_dir = "/var/cache/vjobs"` made by root, in a site config every account reads.
    It failed with internal_error (PermissionError on releases/KEY.lock); now the account takes root's images
    from it and builds its release image in its own cache."""
    account = pool_accounts[2]
    for cache, status in ((system_cache, "succeeded"), (empty_system_cache, "setup_error")):
        site = account.home / f"site-{status}.toml"
        site.write_text(f'cache_dir = "{cache}"\n')
        before = snapshot(cache)
        done = run_hello(account, repo, f"out-{status}", {}, "--site", str(site), "--driver", "qemu_user")
        result = json.loads(done.stdout)
        assert result["status"] == status, (result["error"], done.stderr)
        assert status == "succeeded" or result["error"]["code"] == "image_not_found"
        assert snapshot(cache) == before


@as_root
def test_a_folder_an_account_may_not_write_is_a_setup_error_that_names_it(pool_accounts, system_cache,
                                                                          empty_system_cache, repo):
    account = pool_accounts[2]
    site = account.home / "site-root-work.toml"
    site.write_text(f'work_dir = "{empty_system_cache}"\n')  # root's, 0755
    done = run_hello(account, repo, "out-root-work", {SYSTEM_CACHE_ENV: str(system_cache)}, "--site", str(site),
                     "--driver", "qemu_user")
    error = json.loads(done.stdout)["error"]
    # vjobs/host/folders.py refuses a work_dir that is not the account's own before anything is tried there
    assert error["code"] == "work_dir_unusable" and str(empty_system_cache) in error["message"]
    assert list(empty_system_cache.iterdir()) == []


@as_root
def test_an_account_trusts_nothing_in_another_accounts_cache(pool_accounts, repo, empty_system_cache):
    owner, other = pool_accounts[:2]
    os.chown(empty_system_cache, owner.uid, owner.gid)  # a folder of the owner's that every account can read
    theirs = empty_system_cache / "theirs"
    owner.run(["mkdir", "-p", "-m", "0755", str(theirs / "images")], check=True)
    site = other.home / "site-theirs.toml"
    site.write_text(f'cache_dir = "{theirs}"\n')
    done = run_hello(other, repo, "out-theirs", {}, "--site", str(site))
    error = json.loads(done.stdout)["error"]
    assert error["code"] == "image_not_found" and f"belongs to uid {owner.uid}" in error["message"]
