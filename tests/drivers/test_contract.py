"""The driver contract's own helpers (vjobs/drivers/contract.py): the one way a verdict is made from checks,
the format check every ``create`` starts with, and the release of what a failed ``create`` made."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

from vjobs.drivers.contract import (VM, Capabilities, Check, Disk, check_disk_formats, destroyed_on_failure,
                                    first_failure)
from vjobs.errors import VMError

PASSED = Check("binary", True, "found")
NO_NETWORK = Check("network", False, "none")
BROKEN = Check("kvm", False, "hangs")


def test_a_verdict_is_usable_when_every_deciding_check_passed():
    verdict = Capabilities.from_checks("d", [PASSED, NO_NETWORK], "all good", advisory=("network",), network=False)
    assert verdict.usable and verdict.reason == "all good" and verdict.checks == (PASSED, NO_NETWORK)
    assert verdict.network is False


def test_an_unusable_verdict_gives_the_first_deciding_failure_in_its_words_or_the_drivers():
    checks = [PASSED, NO_NETWORK, BROKEN]
    assert first_failure(checks, ("network",)) is BROKEN
    plain = Capabilities.from_checks("d", checks, "unused", advisory=("network",))
    assert not plain.usable and plain.reason == "hangs"
    worded = Capabilities.from_checks("d", checks, "unused", explain=lambda failed: f"{failed.name}: fix it")
    assert not worded.usable and worded.reason == "network: fix it"


class _Recorded(VM):
    destroyed = 0

    def start(self): ...
    def wait_until_stopped(self, deadline): ...
    def fetch_disk(self, disk): ...

    def destroy(self):
        self.destroyed += 1
        raise RuntimeError("destroy failed too")


def test_a_create_that_fails_releases_what_it_made_and_raises_its_own_error():
    vm = _Recorded(spec=None)
    with pytest.raises(VMError, match="attach failed"):
        with destroyed_on_failure(vm):
            raise VMError("attach failed")
    assert vm.destroyed == 1


def test_a_disk_in_a_format_the_driver_does_not_take_is_refused():
    spec = SimpleNamespace(disks=(Disk("rootfs", Path("/cache/base.qcow2"), "qcow2", readonly=True),))
    check_disk_formats(spec, ("raw", "qcow2"), "qemu_user")
    with pytest.raises(VMError) as refused:
        check_disk_formats(spec, ("raw",), "xen")
    assert refused.value.code == "disk_format_unsupported" and "xen" in str(refused.value)
