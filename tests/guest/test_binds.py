"""Merging a read-write bind back into its host folder: only what the payload wrote, never through a link."""

from __future__ import annotations

import os

from vjobs.guest.binds import merge_back, snapshot


def write(path, text, mtime=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    if mtime is not None:
        os.utime(path, (mtime, mtime))


def test_only_what_the_payload_wrote_comes_back(tmp_path):
    host, returned = tmp_path / "host", tmp_path / "returned"
    write(host / "payload.stdout", "", mtime=1_700_000_000)
    write(host / "input.dat", "in", mtime=1_700_000_000)
    copied_in = snapshot(host)
    write(host / "payload.stdout", "the pilot wrote this during the run")  # the host's own writes
    write(returned / "payload.stdout", "", mtime=1_700_000_000)  # the guest's copy, as it went in
    write(returned / "input.dat", "changed in the guest", mtime=1_700_000_100)
    write(returned / "out" / "result.root", "new", mtime=1_700_000_200)
    assert merge_back(returned, host, copied_in) == ["input.dat", "out/result.root"]
    assert (host / "payload.stdout").read_text() == "the pilot wrote this during the run"
    assert (host / "input.dat").read_text() == "changed in the guest"
    assert (host / "out" / "result.root").read_text() == "new"


def test_a_link_in_the_host_folder_is_never_followed(tmp_path):
    host, returned, elsewhere = tmp_path / "host", tmp_path / "returned", tmp_path / "elsewhere"
    elsewhere.mkdir()
    host.mkdir()
    (host / "data").symlink_to(elsewhere)  # the host's own link
    write(host / "target.txt", "real")
    (host / "name").symlink_to(host / "target.txt")
    write(returned / "data" / "planted", "through the link?")
    write(returned / "name", "over the link?")
    assert merge_back(returned, host, snapshot(host)) == []
    assert list(elsewhere.iterdir()) == []
    assert (host / "target.txt").read_text() == "real" and (host / "name").is_symlink()


def test_identical_content_is_not_rewritten(tmp_path):
    host, returned = tmp_path / "host", tmp_path / "returned"
    write(host / "same.txt", "x", mtime=1_700_000_000)
    write(returned / "same.txt", "x", mtime=1_700_000_500)  # touched, not changed
    assert merge_back(returned, host, snapshot(host)) == []
    assert int((host / "same.txt").stat().st_mtime) == 1_700_000_000


def test_links_to_readable_files_come_in_as_files_others_stay_links(tmp_path):
    from vjobs.guest.binds import copy_for_guest

    storage, source, copy = tmp_path / "storage", tmp_path / "work", tmp_path / "copy"
    write(storage / "input.root", "event data")
    secret = tmp_path / "secret"
    write(secret, "root only")
    secret.chmod(0o600)
    source.mkdir()
    (source / "input.root").symlink_to(storage / "input.root")  # as a pilot's mv copytool stages in
    (source / "a-folder").symlink_to(storage)
    (source / "dangling").symlink_to(tmp_path / "nothing")
    (source / "secret").symlink_to(secret)
    if os.geteuid() == 0:
        os.lchown(source / "secret", 65534, 65534)  # a link of a user who may not read what it points at
    copy_for_guest(source, copy)
    assert not (copy / "input.root").is_symlink() and (copy / "input.root").read_text() == "event data"
    assert (copy / "a-folder").is_symlink() and (copy / "dangling").is_symlink()
    if os.geteuid() == 0:
        assert (copy / "secret").is_symlink()
