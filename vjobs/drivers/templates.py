"""What every driver's pre-booted templates share (qemu_user's: vjobs/drivers/qemu_user/template.py; kvm's:
vjobs/drivers/kvm/template.py; xen's: vjobs/drivers/xen/template.py; docs/templates.md).

A template is the guest image booted once with ``vjobs.template`` on its kernel command line and no disks:
its agent says "template ready" and waits for an io disk. The driver saves it (qemu_user: QEMU's migration
stream and a RAM file; kvm: libvirt's save; xen: XAPI's suspend), and each job's guest continues from that
save with the job's disks hot-plugged; the agent says "up".

Shared here: the recipe a template is made from (its name is the recipe's hash), which jobs may use one, the
command line, how a complete template is recognised, and the failure memo: after a template fails, jobs of
its shape boot cold for FAILURE_MEMORY_S instead of each paying for the same failure, then it is made anew.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from vjobs.drivers.contract import VMSpec
from vjobs.drivers.standins import STAND_INS
from vjobs.errors import VMError
from vjobs.images.store import sha256_file

TEMPLATE_ARGUMENT = "vjobs.template"  # on the template guest's kernel command line: the agent waits for a job
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
        return recipe_key(dataclasses.asdict(self))

    def memo(self, folder: Path) -> FailureMemo:
        """This template's failure memo, among the memos in ``folder``."""
        return FailureMemo(folder, self.family, self.key)


def recipe_key(recipe: Mapping[str, Any]) -> str:
    """A short name for everything a saved guest depends on (``recipe``: JSON-able): two jobs whose recipes
    are equal share a template, any change makes another."""
    return hashlib.sha256(json.dumps(dict(recipe), sort_keys=True).encode()).hexdigest()[:16]


def why_not_template(spec: VMSpec, setting: bool | str, machine_problem: str | None = None) -> str | None:
    """Why this VM cannot start from a template, or None. ``setting``: the site's ``template`` (``"auto"``: for
    the built-in guest image only, whose agent surely waits as a template must); ``machine_problem``: the
    driver's reason, if any, why its machine cannot have one."""
    if not setting:
        return "the site's template setting is false"
    if setting == "auto" and not spec.boot.builtin:
        return "the site's own boot image: templates are made for it only with template = true"
    if machine_problem:
        return machine_problem
    if spec.network:
        return "the job asks for a network, which a template does not have"
    return None


def template_cmdline(spec: VMSpec) -> str:
    return f"{spec.boot.cmdline} {TEMPLATE_ARGUMENT}"


def saved_state(folder: Path, recipe: Recipe, also: tuple[str, ...] = ()) -> Path | None:
    """The state file of the complete template for ``recipe`` in ``folder``, or None. ``also``: the files a
    driver keeps beside the state and the stand-ins (qemu_user's RAM)."""
    try:
        manifest = json.loads((folder / "manifest.json").read_text())
    except (OSError, ValueError):
        return None
    complete = all((folder / name).is_file() for name in (STATE, *STAND_INS, *also))
    return folder / STATE if manifest.get("recipe") == dataclasses.asdict(recipe) and complete else None


def install(output: Path, entry: Path, recipe: Recipe, memo_folder: Path, started: float, **extra) -> dict:
    """A template just saved into the folder ``output`` (its state and stand-ins) made the cache entry
    ``entry``: its manifest written (the recipe, the files' sums, how long it took since ``started``, and the
    driver's ``extra`` records), any older entry of that name replaced whole (one made anew after a failed
    restore), its failure memo (in ``memo_folder``) forgotten. Returns the manifest."""
    manifest = {"recipe": dataclasses.asdict(recipe), "made_s": round(time.monotonic() - started, 3),
                "made_at": time.time(), "state_bytes": (output / STATE).stat().st_size, **extra,
                "sha256": {name: sha256_file(output / name) for name in (STATE, *STAND_INS)}}
    (output / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    if entry.exists():
        shutil.rmtree(entry)
    os.rename(output, entry)
    recipe.memo(memo_folder).forget()
    return manifest


class FailureMemo:
    """A file per guest shape (``folder/FAMILY.failed``) that remembers its template's last failure, so that
    jobs of that shape boot cold for ``memory_s`` (FAILURE_MEMORY_S) instead of failing the same way each.
    ``key``: the template's (a recipe's); a memo of another key is not this template's."""

    def __init__(self, folder: Path, family: str, key: str, memory_s: float | None = None):
        self.path = folder / f"{family}.failed"
        self.key, self.memory_s = key, memory_s

    def remember(self, reason: str, stage: str = "restore") -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        temporary = self.path.with_name(f"{self.path.name}.{os.getpid()}.tmp")
        temporary.write_text(json.dumps({"key": self.key, "stage": stage, "reason": reason, "at": time.time()}) + "\n")
        os.replace(temporary, self.path)

    def forget(self) -> None:
        self.path.unlink(missing_ok=True)

    def raise_if_recent(self) -> str | None:
        """Raises VMError (``template_failed``) within the memory of a failure of this key; after that, says
        which stage failed last (None: none remembered)."""
        try:
            memo = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return None
        if memo.get("key") != self.key:
            return None
        memory_s = FAILURE_MEMORY_S if self.memory_s is None else self.memory_s
        age = time.time() - float(memo.get("at", 0))
        if 0 <= age < memory_s:
            raise VMError(f"the template failed {age:.0f} s ago ({memo.get('reason')}); jobs of this shape boot "
                          f"cold for {memory_s - age:.0f} s more", code="template_failed")
        return memo.get("stage")
