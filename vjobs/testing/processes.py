"""The host's process table as tests and benchmarks read it (/proc): who runs, who started whom, and which
QEMU belongs to a job."""

from __future__ import annotations

import collections
import os
import time
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Proc:
    pid: int
    ppid: int
    state: str  # as /proc/PID/stat says: R, S, D, Z (a zombie), ...
    comm: str
    argv: tuple[str, ...]
    uid: int

    @property
    def is_qemu(self) -> bool:
        """A ``qemu-system-*`` process, by its name or its command line (whatever wrapper started it)."""
        return self.comm.startswith("qemu-system") or (
            bool(self.argv) and os.path.basename(self.argv[0]).startswith("qemu-system"))

    def describe(self) -> str:
        try:
            import pwd
            user = pwd.getpwuid(self.uid).pw_name
        except (KeyError, ImportError):
            user = str(self.uid)
        return f"pid {self.pid} ({user}): {' '.join(self.argv)[:200]}"


def process_table() -> dict[int, Proc]:
    """Every process now, by PID (one that ends while it is read is left out)."""
    table = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat", "rb") as handle:
                raw = handle.read().decode(errors="replace")
            with open(f"/proc/{entry.name}/cmdline", "rb") as handle:
                argv = tuple(part.decode(errors="replace") for part in handle.read().split(b"\0") if part)
            uid = os.stat(f"/proc/{entry.name}").st_uid
        except OSError:
            continue
        close = raw.rindex(")")  # the name may hold spaces and brackets: it ends at the last ")"
        state, ppid = raw[close + 2:].split()[:2]
        table[int(entry.name)] = Proc(int(entry.name), int(ppid), state, raw[raw.index("(") + 1:close], argv, uid)
    return table


def descendants(root: int, table: dict[int, Proc]) -> set[int]:
    """The PIDs of ``root``'s children, their children, and so on (not ``root``)."""
    children = collections.defaultdict(list)
    for proc in table.values():
        children[proc.ppid].append(proc.pid)
    found, todo = set(), [root]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def qemu_processes(marker: str) -> list[str]:
    """QEMU processes that name ``marker`` in their command line or hold a file under it open: vjobs' own
    QEMU gets every file as a descriptor (vjobs/drivers/qemu_user/qemu.py), so its command line names none."""
    found = []
    for proc in process_table().values():
        if not proc.is_qemu:
            continue
        cmdline = " ".join(proc.argv)
        try:
            fds = Path(f"/proc/{proc.pid}/fd").iterdir()
            if marker in cmdline or any(os.readlink(fd).startswith(marker) for fd in fds):
                found.append(f"{proc.pid} {cmdline}")
        except OSError:
            continue  # it ended while we looked
    return found


def job_qemu(root: int) -> int | None:
    """The QEMU that runs a job among ``root`` (a ``vjobs run``) and its descendants, but not one that boots
    a template guest to save it (``vjobs.template`` on its kernel command line and no ``-incoming``: it makes
    a template and runs no job; a job's QEMU restored from a template has both)."""
    table = process_table()
    for pid in sorted({root} | descendants(root, table)):
        proc = table.get(pid)
        if proc and proc.is_qemu and ("-incoming" in proc.argv or not any("vjobs.template" in a for a in proc.argv)):
            return pid
    return None


def qemu_named_for(job_id: str, deadline_s: float = 30) -> Path:
    """The /proc folder of the QEMU that runs job ``job_id`` (its ``-name`` is ``vjobs-JOB-...``, under qemu_user
    and libvirt alike; a kvm template slot's ``vjobs-tpl-...``, its kernel in the job's folder), waited for up to
    ``deadline_s``; not one that makes a template for it first."""
    give_up = time.monotonic() + deadline_s
    while time.monotonic() < give_up:
        for proc in Path("/proc").iterdir():
            try:
                if not proc.name.isdigit() or not (proc / "comm").read_text().startswith("qemu-system"):
                    continue
                argv = (proc / "cmdline").read_bytes().split(b"\0")
                names = [argv[i + 1].removeprefix(b"guest=").split(b",")[0]  # libvirt: guest=NAME,debug-...
                         for i, arg in enumerate(argv[:-1]) if arg == b"-name"]
                if any(name.startswith(f"vjobs-{job_id}-".encode()) and not name.endswith(b"-template")
                       for name in names):
                    return proc
                # a kvm template slot's domain has the slot's name; its kernel is a copy in the job's folder
                kernels = [argv[i + 1] for i, arg in enumerate(argv[:-1]) if arg == b"-kernel"]
                if any(name.startswith(b"vjobs-tpl-") for name in names) and \
                        any(f"/{job_id}-".encode() in kernel for kernel in kernels):
                    return proc
            except OSError:
                continue
        time.sleep(0.05)
    raise AssertionError(f"no QEMU for job {job_id} appeared within {deadline_s} s")
