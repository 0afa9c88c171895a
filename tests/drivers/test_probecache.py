"""A probe's questions to programs are asked once per program file and host boot (vjobs/drivers/probecache.py). (That
choosing a driver imports no driver it does not have to: tests/drivers/test_registry.py.)"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from vjobs.drivers import probecache
from vjobs.drivers.contract import HostContext
from vjobs.drivers.qemu_user.driver import QemuUserDriver, _user_network_check
from vjobs.host.cache import CacheHold
from vjobs.images.checked import CheckedFiles


def host(tmp_path: Path, boot_id: str = "boot-1") -> HostContext:
    return HostContext(cache_dir=tmp_path / "cache", work_dir=tmp_path / "work", boot_id=boot_id,
                       default_boot_image=lambda: None, cache_hold=CacheHold(),
                       checked_files=CheckedFiles(tmp_path / "cache"))


@pytest.fixture
def new_process(monkeypatch):
    """Call it to forget what this process remembered, as the next vjobs process would."""
    monkeypatch.setattr(probecache, "_remembered", {})
    return lambda: probecache._remembered.clear()


def program(path: Path, text: str) -> Path:
    path.write_text(text)
    path.chmod(0o755)
    return path


class Asker:
    def __init__(self, answer="v1"):
        self.answer, self.asked = answer, []

    def __call__(self, path):
        self.asked.append(path)
        return self.answer


def test_an_answer_is_asked_once_then_remembered_in_memory_and_on_disk(tmp_path, new_process):
    binary = program(tmp_path / "tool", "#!/bin/sh\n")
    ask = Asker()
    assert probecache.remember("tool-version", str(binary), ask, host(tmp_path)) == "v1"
    assert probecache.remember("tool-version", str(binary), ask, host(tmp_path)) == "v1"
    new_process()
    assert probecache.remember("tool-version", str(binary), ask, host(tmp_path)) == "v1"
    assert ask.asked == [str(binary)]
    [stored] = (tmp_path / "cache" / "probes").glob("*.json")
    assert json.loads(stored.read_text())["boot_id"] == "boot-1"  # what `vjobs gc` goes by


def test_a_changed_program_is_asked_again(tmp_path, new_process):
    binary = program(tmp_path / "tool", "#!/bin/sh\n")
    ask = Asker("old")
    assert probecache.remember("tool-version", str(binary), ask, host(tmp_path)) == "old"
    binary.write_text("#!/bin/sh\n# upgraded\n")  # a new size and modification time
    ask.answer = "new"
    assert probecache.remember("tool-version", str(binary), ask, host(tmp_path)) == "new"
    new_process()
    assert probecache.remember("tool-version", str(binary), ask, host(tmp_path)) == "new"
    assert len(ask.asked) == 2


def test_a_replaced_program_of_the_same_size_and_time_is_asked_again(tmp_path, new_process):
    binary = program(tmp_path / "tool", "#!/bin/sh\n# one\n")
    ask = Asker("one")
    probecache.remember("tool-version", str(binary), ask, host(tmp_path))
    stat = binary.stat()
    replacement = program(tmp_path / "tool.new", "#!/bin/sh\n# two\n")
    os.utime(replacement, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    replacement.rename(binary)  # as a package manager installs a file: another inode
    new_process()
    ask.answer = "two"
    assert probecache.remember("tool-version", str(binary), ask, host(tmp_path)) == "two"


def test_a_symlinked_program_is_known_by_its_target(tmp_path, new_process):
    one, two = program(tmp_path / "one", "#!/bin/sh\n"), program(tmp_path / "two", "#!/bin/sh\n#\n")
    link = tmp_path / "tool"
    link.symlink_to(one)
    ask = Asker("one")
    assert probecache.remember("tool-version", str(link), ask, host(tmp_path)) == "one"
    link.unlink()
    link.symlink_to(two)  # update-alternatives, a newer QEMU beside the old one
    ask.answer = "two"
    assert probecache.remember("tool-version", str(link), ask, host(tmp_path)) == "two"
    assert ask.asked == [str(link), str(link)]  # asked through the name it was given


def test_another_host_boot_asks_again(tmp_path, new_process):
    binary = program(tmp_path / "tool", "#!/bin/sh\n")
    ask = Asker()
    probecache.remember("tool-version", str(binary), ask, host(tmp_path, "boot-1"))
    new_process()
    probecache.remember("tool-version", str(binary), ask, host(tmp_path, "boot-2"))
    assert len(ask.asked) == 2


def test_a_failure_is_not_remembered(tmp_path, new_process):
    binary = program(tmp_path / "tool", "#!/bin/sh\n")
    calls = []

    def broken(path):
        calls.append(path)
        raise subprocess.CalledProcessError(1, [path])

    for _ in range(2):
        with pytest.raises(subprocess.CalledProcessError):
            probecache.remember("tool-version", str(binary), broken, host(tmp_path))
    assert len(calls) == 2
    assert not list((tmp_path / "cache").rglob("*.json"))


def test_a_missing_program_is_asked_every_time_by_the_name_given(tmp_path, new_process):
    ask = Asker()
    for _ in range(2):
        probecache.remember("tool-version", str(tmp_path / "absent"), ask, host(tmp_path))
    assert ask.asked == [str(tmp_path / "absent")] * 2


def test_a_damaged_record_is_asked_again_and_rewritten(tmp_path, new_process):
    binary = program(tmp_path / "tool", "#!/bin/sh\n")
    ask = Asker()
    probecache.remember("tool-version", str(binary), ask, host(tmp_path))
    [stored] = (tmp_path / "cache" / "probes").glob("*.json")
    stored.write_text('{"boot_id": "boot-1", "ans')
    new_process()
    assert probecache.remember("tool-version", str(binary), ask, host(tmp_path)) == "v1"
    assert len(ask.asked) == 2 and json.loads(stored.read_text())["answer"] == "v1"


def test_without_a_host_the_answer_is_kept_in_memory_only(tmp_path, new_process):
    binary = program(tmp_path / "tool", "#!/bin/sh\n")
    ask = Asker()
    for _ in range(2):
        probecache.remember("tool-version", str(binary), ask, None)
    new_process()
    probecache.remember("tool-version", str(binary), ask, None)
    assert len(ask.asked) == 2 and not (tmp_path / "cache").exists()


# --- qemu_user: its version and its network backends ------------------------------------------------------

FAKE_QEMU = """#!/bin/sh
echo "$*" >> {log}
case "$1" in
  -version) echo "QEMU emulator version {version} (fake)";;
  -netdev) printf 'Available netdev backend types:\\nsocket\\n{user}';;
esac
"""


def fake_qemu(tmp_path: Path, version: str = "9.9.1", user: bool = True) -> Path:
    return program(tmp_path / "qemu-system-x86_64",
                   FAKE_QEMU.format(log=tmp_path / "calls", version=version, user="user\\n" if user else ""))


def calls(tmp_path: Path) -> list[str]:
    return (tmp_path / "calls").read_text().splitlines() if (tmp_path / "calls").exists() else []


def test_qemu_is_asked_its_version_once_per_binary(tmp_path, new_process):
    binary = fake_qemu(tmp_path)
    driver = QemuUserDriver({"binary": str(binary)}, host(tmp_path))
    assert driver.qemu_version() == "QEMU 9.9.1"
    new_process()
    assert QemuUserDriver({"binary": str(binary)}, host(tmp_path)).qemu_version() == "QEMU 9.9.1"
    assert calls(tmp_path) == ["-version"]
    fake_qemu(tmp_path, version="10.0.0")  # upgraded in place
    assert driver.qemu_version() == "QEMU 10.0.0"


def test_qemu_network_backends_are_asked_once_and_again_when_qemu_changes(tmp_path, new_process):
    binary = fake_qemu(tmp_path)
    assert _user_network_check(str(binary), host(tmp_path)).ok
    new_process()
    assert _user_network_check(str(binary), host(tmp_path)).ok
    assert calls(tmp_path) == ["-netdev help"]
    fake_qemu(tmp_path, user=False)  # rebuilt without slirp
    assert not _user_network_check(str(binary), host(tmp_path)).ok


def test_qemu_probe_twice_asks_qemu_once(tmp_path, new_process):
    binary = fake_qemu(tmp_path)
    from vjobs.drivers.registry import safe_probe

    for _ in range(2):
        new_process()
        driver = QemuUserDriver({"binary": str(binary)}, host(tmp_path))
        driver.name = "qemu_user"
        verdict = safe_probe(driver)
        assert verdict.usable and verdict.hypervisor == "QEMU 9.9.1" and verdict.network
    assert sorted(calls(tmp_path)) == ["-netdev help", "-version"]
    # both answers are in the probed host's cache, where the next process finds them
    assert len(list((tmp_path / "cache" / "probes").glob("answer-qemu-*.json"))) == 2
