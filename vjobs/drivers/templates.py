"""What every driver's pre-booted templates share (qemu_user's: vjobs/drivers/qemu_user/template.py; kvm's:
vjobs/drivers/kvm/template.py; docs/templates.md).

A template is the guest image booted once with ``vjobs.template`` on its kernel command line and a virtio-scsi
controller but no disks: its agent says "template ready" and waits for an io disk. The driver saves it, and
each job's guest is restored from it with the job's disks hot-plugged as SCSI disks; the agent says "up".

Shared here: the recipe a template is made from (its name is the recipe's hash), which jobs may use one, the
command line, how a complete template is recognised, and the failure memo: after a template fails, jobs of
its shape boot cold for FAILURE_MEMORY_S instead of each paying for the same failure, then it is made anew.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

from vjobs.drivers.contract import VMSpec
from vjobs.drivers.standins import STAND_INS
from vjobs.errors import VMError

STATE = "state"  # the saved guest, beside its stand-ins (vjobs/drivers/standins.py) and manifest.json
RESTORE_DEADLINE_S = 10.0  # from the restore's start to the agent's "up"; normally a few tenths of a second
FAILURE_MEMORY_S = 3600.0  # after a template fails, jobs of its shape boot cold this long, then it is retried


@dataclass(frozen=True)
class Recipe:
    """Everything a saved guest depends on. Two jobs with the same recipe share a template."""

    qemu: str  # the hypervisor's version and identity (QEMU's binary, or libvirt's and its QEMU's)
    machine: str
    accel: str
    tb_size_mib: int | None
    firmware: str | None
    memory_mib: int
    vcpus: int
    kernel_sha256: str
    initramfs_sha256: str
    cmdline: str
    format: int  # of the driver's saved state and manifest; a change makes every template anew

    @property
    def family(self) -> str:
        """Templates that replace each other when their image or QEMU changes: one per guest shape."""
        return f"{self.machine}_{self.accel}_{self.memory_mib}m_{self.vcpus}cpu"

    @property
    def key(self) -> str:
        return hashlib.sha256(json.dumps(dataclasses.asdict(self), sort_keys=True).encode()).hexdigest()[:16]


def why_not_template(spec: VMSpec, setting: bool | str, machine_problem: str | None = None) -> str | None:
    """Why this VM cannot start from a template, or None. ``setting``: the site's ``template`` (``"auto"``: for
    the built-in guest image only, whose agent surely waits as a template must); ``machine_problem``: the
    driver's reason, if any, why its machine cannot have one."""
    if setting == "auto" and not spec.boot.builtin:
        return "the site's own boot image: templates are made for it only with template = true"
    if machine_problem:
        return machine_problem
    if spec.network:
        return "the job asks for a network, which a template does not have"
    return None


def template_cmdline(spec: VMSpec) -> str:
    return f"{spec.boot.cmdline} vjobs.template"


def saved_state(folder: Path, recipe: Recipe, also: tuple[str, ...] = ()) -> Path | None:
    """The state file of the complete template for ``recipe`` in ``folder``, or None. ``also``: the files a
    driver keeps beside the state and the stand-ins (qemu_user's RAM)."""
    try:
        manifest = json.loads((folder / "manifest.json").read_text())
    except (OSError, ValueError):
        return None
    complete = all((folder / name).is_file() for name in (STATE, *STAND_INS, *also))
    return folder / STATE if manifest.get("recipe") == dataclasses.asdict(recipe) and complete else None


class FailureMemo:
    """The last failure of each template family, in ``folder/FAMILY.failed``: jobs of that shape boot cold for
    FAILURE_MEMORY_S after it instead of paying for the same failure each."""

    def __init__(self, folder: Path):
        self.folder = folder

    def remember(self, recipe: Recipe, reason: str, stage: str = "restore") -> None:
        memo = {"key": recipe.key, "stage": stage, "reason": reason, "at": time.time()}
        self.folder.mkdir(parents=True, exist_ok=True)
        temporary = self.folder / f"{recipe.family}.failed.{os.getpid()}.tmp"
        temporary.write_text(json.dumps(memo) + "\n")
        os.replace(temporary, self.path(recipe))

    def raise_if_recent(self, recipe: Recipe) -> str | None:
        """Raises VMError within FAILURE_MEMORY_S of a failure; after that, says which stage failed last."""
        try:
            memo = json.loads(self.path(recipe).read_text())
        except (OSError, ValueError):
            return None
        if memo.get("key") != recipe.key:
            return None
        age = time.time() - float(memo.get("at", 0))
        if 0 <= age < FAILURE_MEMORY_S:
            raise VMError(f"the template failed {age:.0f} s ago ({memo.get('reason')}); jobs of this shape boot "
                          f"cold for {FAILURE_MEMORY_S - age:.0f} s more", code="template_failed")
        return memo.get("stage")

    def forget(self, recipe: Recipe) -> None:
        self.path(recipe).unlink(missing_ok=True)

    def path(self, recipe: Recipe) -> Path:
        return self.folder / f"{recipe.family}.failed"
