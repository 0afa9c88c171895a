"""What every driver's pre-booted templates share (docs/templates.md): the template guest's kernel command
line, which guests may start from one (the site's ``template`` setting), the key that names a template by
everything it depends on, and the memo that makes jobs of a shape boot cold for a while after their template
failed instead of paying for the same failure each.

A template guest boots with ``vjobs.template`` on its kernel command line and no disks; its agent loads its
modules, says "template ready" on the console and waits for an io disk. The driver saves it there; a job's
guest continues from that save, gets its disks hot-plugged, and its agent says "up". How a guest is saved and
continued is each driver's own (qemu_user: QEMU's migration stream, xen: XAPI's suspend and resume).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any, Mapping

from vjobs.drivers.contract import VMSpec
from vjobs.errors import VMError

TEMPLATE_ARGUMENT = "vjobs.template"  # on the template guest's kernel command line: the agent waits for a job
FAILURE_MEMORY_S = 3600.0  # after a template fails, jobs of its shape boot cold this long, then it is retried


def template_cmdline(spec: VMSpec) -> str:
    return f"{spec.boot.cmdline} {TEMPLATE_ARGUMENT}"


def not_eligible(spec: VMSpec, setting: bool | str) -> str | None:
    """Why ``spec`` cannot start from a template whatever the driver, or None. ``setting``: the site's
    ``template`` (``"auto"``: for the built-in guest image only, whose agent surely waits as a template must;
    ``false``: never)."""
    if not setting:
        return "the site's template setting is false"
    if setting == "auto" and not spec.boot.builtin:
        return "the site's own boot image: templates are made for it only with template = true"
    if spec.network:
        return "the job asks for a network, which a template does not have"
    return None


def recipe_key(recipe: Mapping[str, Any]) -> str:
    """A short name for everything a saved guest depends on (``recipe``: JSON-able): two jobs whose recipes
    are equal share a template, any change makes another."""
    return hashlib.sha256(json.dumps(dict(recipe), sort_keys=True).encode()).hexdigest()[:16]


class FailureMemo:
    """A file per guest shape (``folder/FAMILY.failed``) that remembers its template's last failure, so that
    jobs of that shape boot cold for ``memory_s`` instead of failing the same way each."""

    def __init__(self, folder: Path, family: str, key: str, memory_s: float = FAILURE_MEMORY_S):
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
        """Raises VMError (``template_failed``) within ``memory_s`` of a failure of this key; after that, says
        which stage failed last (None: none remembered)."""
        try:
            memo = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return None
        if memo.get("key") != self.key:
            return None
        age = time.time() - float(memo.get("at", 0))
        if 0 <= age < self.memory_s:
            raise VMError(f"the template failed {age:.0f} s ago ({memo.get('reason')}); jobs of this shape boot "
                          f"cold for {self.memory_s - age:.0f} s more", code="template_failed")
        return memo.get("stage")
