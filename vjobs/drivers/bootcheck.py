"""The deep probe: boot the built-in guest for real, with a short deadline, and remember the verdict for
this host boot.

Why: on some hosts /dev/kvm opens, KVM_CREATE_VM works and libvirt advertises KVM, yet every Linux guest
hangs at boot (so on the machines vjobs is developed on: the guest kernel spins at 100 % of a host CPU that
shows no vmx; the README's probe section shows the verdict). Only a real boot tells. Drivers that offer hardware acceleration call
``boot_check`` with a function that creates a VM the way they would for a job.
"""

from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path
from typing import Callable

from vjobs.drivers.contract import VM, Check, HostContext, Stop, VMSpec, deadline_in
from vjobs.guest.console import ConsoleLog
from vjobs.guest.protocol import PROBE_MARKER
from vjobs.host.identity import create_owned_folder, new_owner, remove_owned_folder


def boot_check(host: HostContext, key: str, create_vm: Callable[[VMSpec], VM], deadline_s: float) -> Check:
    """``key`` names what is checked (e.g. ``kvm-qemu:///system-kvm``); the verdict is cached per host boot."""
    cache = host.cache_dir / "probes" / (key.replace("/", "_").replace(":", "_") + ".json")
    cached = _read(cache)
    if cached and cached.get("boot_id") == host.boot_id:
        return Check(f"boot {key}", cached["ok"], cached["detail"] + " (cached for this host boot)")
    with host.events.step("deep_probe", detail=key):
        ok, detail = _boot_once(host, key, create_vm, deadline_s)
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_text(json.dumps({"boot_id": host.boot_id, "ok": ok, "detail": detail}))
    return Check(f"boot {key}", ok, detail)


def _boot_once(host: HostContext, key: str, create_vm: Callable[[VMSpec], VM], deadline_s: float) \
        -> tuple[bool, str]:
    host.progress(f"deep probe: booting the built-in guest ({key}), deadline {deadline_s:.0f} s")
    boot = host.default_boot_image()
    owner = new_owner("probe")
    folder = create_owned_folder(host.work_dir / f"probe-{owner.run_id}", owner)  # so that `vjobs gc` knows it
    spec = VMSpec(name=f"vjobs-probe-{owner.run_id}", vcpus=1, memory_mib=256,
                  boot=replace(boot, cmdline=boot.cmdline + " vjobs.probe"), disks=(),
                  console=ConsoleLog(folder / "console.log", markers=(PROBE_MARKER,)), network=False, owner=owner,
                  workdir=folder)
    started = time.monotonic()
    vm = None
    try:
        vm = create_vm(spec)
        vm.start()
        stop = vm.wait_until_stopped(deadline_in(deadline_s))
        seconds = time.monotonic() - started
        if stop is Stop.POWEROFF and spec.console.saw(PROBE_MARKER):
            return True, f"a guest booted and powered off in {seconds:.1f} s"
        if stop is Stop.DEADLINE:
            return False, (f"a guest did not finish booting within {deadline_s:.0f} s "
                           f"({spec.console.total} bytes of console output): guests hang here")
        return False, f"the guest stopped ({stop.value}) without reporting in after {seconds:.1f} s"
    except Exception as exc:  # whatever went wrong, it is the verdict, not a crash of the probe
        return False, f"could not boot a guest: {type(exc).__name__}: {exc}"
    finally:
        if vm is not None:
            vm.destroy()
        spec.console.close()
        remove_owned_folder(folder)


def _read(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None
