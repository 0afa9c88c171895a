"""The one runner of host tools (vjobs/host/tools.py): a full disk is DiskFull when, and only when, it is ENOSPC."""

from __future__ import annotations

import errno
import os
import shutil

import pytest

from vjobs.errors import DiskFull, ImageError, SetupError
from vjobs.host.tools import NO_SPACE, disk_full_from, run_tool


def sh(script: str) -> list[str]:
    return ["sh", "-c", script]


def test_the_output_comes_back():
    assert run_tool(sh("echo made; echo chatter >&2"), "making it") == "made\n"


@pytest.mark.parametrize("said", ["No space left on device", "mke2fs: No space left on device while populating"])
def test_enospc_in_what_the_tool_says_is_a_full_disk(tmp_path, said):
    with pytest.raises(DiskFull) as full:
        run_tool(sh(f"echo '{said}' >&2; echo later line >&2; exit 1"), "building the scratch disk",
                 where=tmp_path, error=ImageError)
    message = str(full.value)
    assert full.value.code == "disk_full" and str(tmp_path) in message and "building the scratch disk" in message
    assert "free space" in message


@pytest.mark.parametrize("said", ["not enough space in the image", "Could not allocate block in ext2 filesystem",
                                  "no space"])
def test_other_words_about_space_are_the_tools_failure(said):
    with pytest.raises(ImageError) as failed:
        run_tool(sh(f"echo '{said}' >&2; exit 3"), "making the image", error=ImageError, code="image_build",
                 hint="try again")
    assert not isinstance(failed.value, DiskFull) and failed.value.code == "image_build"
    assert str(failed.value) == f"making the image: sh failed with exit status 3: {said}; try again"


def test_a_missing_tool_says_what_installs_it():
    with pytest.raises(SetupError) as missing:
        run_tool(["vjobs-no-such-tool", "x"], "building the release image", missing_code="tool_missing",
                 install="install squashfs-tools")
    assert missing.value.code == "tool_missing"
    assert str(missing.value) == ("building the release image: vjobs-no-such-tool is not installed; "
                                  "install squashfs-tools")


def test_a_tool_past_its_timeout_is_stopped():
    with pytest.raises(ImageError, match="took more than 0.2 s"):
        run_tool(sh("sleep 5"), "reading the qcow2", error=ImageError, timeout=0.2)


def test_each_line_follows_stderr_and_a_full_disk_is_seen_in_it_early():
    lines = []
    script = ("echo 'I: one' >&2; echo 'E: No space left on device' >&2; "
              "for i in 1 2 3 4 5 6; do echo x$i >&2; done; exit 1")  # more lines after it than a message keeps
    with pytest.raises(DiskFull):
        run_tool(sh(script), "installing bookworm", each_line=lines.append)
    assert lines[:2] == ["I: one", "E: No space left on device"] and len(lines) == 8


def test_disk_full_from_knows_enospc_only(tmp_path):
    assert isinstance(disk_full_from(OSError(errno.ENOSPC, "full", str(tmp_path / "f"))), DiskFull)
    assert str(tmp_path / "f") in str(disk_full_from(OSError(errno.ENOSPC, "full", str(tmp_path / "f"))))
    assert disk_full_from(OSError(errno.EACCES, "no")) is None
    assert disk_full_from(ValueError("No space left on device")) is None
    gathered = shutil.Error([("a", str(tmp_path / "b"), f"[Errno {errno.ENOSPC}] No space left on device")])
    assert str(tmp_path / "b") in str(disk_full_from(gathered))
    assert disk_full_from(shutil.Error([("a", "b", "[Errno 13] Permission denied")])) is None


def test_the_wording_of_a_full_disk_is_one():
    assert str(DiskFull.at("/cache", doing="building the x", detail="said")) == (
        "no space left on the host's file system at /cache while building the x (said): free space under "
        "work_dir and cache_dir (or point them elsewhere in the site config) and try again")
    assert os.strerror(errno.ENOSPC) == NO_SPACE  # the text the tools print


def test_a_system_tool_is_found_and_its_helpers_too_whatever_the_path(monkeypatch):
    """An ordinary account's login PATH on Debian has no /usr/sbin, where mke2fs lives."""
    assert os.path.exists("/usr/sbin/mke2fs") or os.path.exists("/sbin/mke2fs")
    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    assert shutil.which("mke2fs") is None
    run_tool(["mke2fs", "-V"], "asking mke2fs its version")  # found: it would raise "not installed"
    said = run_tool(["sh", "-c", "mke2fs -V 2>&1"], "asking mke2fs its version")  # a helper the tool runs
    assert said.startswith("mke2fs ")
    said = run_tool(["sh", "-c", "mke2fs -V 2>&1"], "asking mke2fs its version", env={"PATH": "/usr/bin:/bin"})
    assert said.startswith("mke2fs ")


def test_a_tool_that_is_nowhere_is_said_to_be_missing(monkeypatch):
    with pytest.raises(SetupError, match="no-such-tool-vjobs is not installed; install it"):
        run_tool(["no-such-tool-vjobs"], "running it", install="install it")
