"""The host as a test sees it from outside vjobs: the QEMU processes of a job, what a work folder still holds,
the libvirt domains a vjobs process started. The tests' fixtures (``vjobs.testing.fixtures``) check with these
that a test left nothing behind; tests and benchmarks call them directly too."""

from __future__ import annotations

import os
import time
from pathlib import Path

#: The libvirtd the kvm tests talk to (scripts/test.sh starts one with .ci/libvirt.sh).
LIBVIRT_URI = os.environ.get("VJOBS_TEST_LIBVIRT_URI", "qemu:///system")


def qemu_processes(marker: str) -> list[str]:
    """QEMU processes that name ``marker`` in their command line or hold a file under it open: vjobs' own
    QEMU gets every file as a descriptor (vjobs/drivers/qemu_user/qemu.py), so its command line names none.
    One line per process: its PID and command line."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            if not proc.name.isdigit() or not (proc / "comm").read_text().startswith("qemu-system"):
                continue
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            if marker in cmdline or any(os.readlink(fd).startswith(marker) for fd in (proc / "fd").iterdir()):
                found.append(f"{proc.name} {cmdline}")
        except OSError:
            continue  # it ended while we looked
    return found


def job_qemu(job_id: str, deadline_s: float = 30) -> Path:
    """The /proc folder of the QEMU that runs job ``job_id`` (its ``-name`` is ``vjobs-JOB-...``, under qemu_user
    and libvirt alike), waited for up to ``deadline_s``; not one that makes a template for it first."""
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
            except OSError:
                continue
        time.sleep(0.05)
    raise AssertionError(f"no QEMU for job {job_id} appeared within {deadline_s} s")


def work_leftovers(work: Path) -> list[str]:
    """What a work folder holds besides the admission folder (which stays) and its shares of live jobs."""
    if not work.exists():
        return []
    folders = [work / "admission", *work.glob("admission.*")]  # the host's, and batch allocations'
    shares = [f"{folder.name}/{p.name}" for folder in folders for p in folder.glob("*.json")]
    return sorted([p.name for p in work.iterdir() if p not in folders] + shares)


def libvirt_reachable(uri: str = LIBVIRT_URI) -> str | None:
    """None when libvirtd answers at ``uri``, else why not."""
    import libvirt

    libvirt.registerErrorHandler(lambda _context, _error: None, None)
    try:
        libvirt.open(uri).close()
    except libvirt.libvirtError as exc:
        return f"libvirtd at {uri}: {exc.get_error_message()}"
    return None


def vjobs_domains_of(pid: int, uri: str = LIBVIRT_URI) -> list[str]:
    """Names of the libvirt domains that vjobs started from process ``pid``."""
    import libvirt

    from vjobs.drivers.kvm.driver import owner_labels

    conn = libvirt.open(uri)
    try:
        return [dom.name() for dom in conn.listAllDomains() if owner_labels(dom).get("vjobs.pid") == str(pid)]
    finally:
        conn.close()
