"""The host as a test sees it from outside vjobs: what a work folder still holds, the libvirt domains a vjobs
process started (its QEMU processes: vjobs.testing.processes). The tests' fixtures (vjobs.testing.fixtures)
check with these that a test left nothing behind."""

from __future__ import annotations

from pathlib import Path

from vjobs.checkpoint.folder import REGISTER
from vjobs.testing.sites import LIBVIRT_URI


def work_leftovers(work: Path) -> list[str]:
    """What a work folder holds besides its admission folders (an account's own budget, batch allocations';
    they stay) and the names of its checkpoint folders (for ``vjobs gc``), and the tokens in them that some
    process still holds."""
    if not work.exists():
        return []
    folders = [work / "admission", *work.glob("admission.*"), work / REGISTER]
    shares = [f"{folder.name}/{name} (held)" for folder in folders for name in held_tokens(folder)]
    return sorted([p.name for p in work.iterdir() if p not in folders] + shares)


def held_tokens(folder: Path) -> list[str]:
    """The tokens of a budget folder (vjobs/host/admission.py) that some process holds: those whose lock this
    process cannot take. Nothing when there is no folder."""
    import fcntl

    held = []
    for path in sorted(folder.glob("*.*")) if folder.is_dir() else ():
        if path.name.split(".")[0] not in ("vcpu", "mem"):
            continue
        with open(path, "rb") as token:
            try:
                fcntl.flock(token, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                held.append(path.name)
    return held


def vjobs_domains_of(pid: int, uri: str = LIBVIRT_URI) -> list[str]:
    """Names of the libvirt domains that vjobs started from process ``pid``."""
    import libvirt

    from vjobs.drivers.kvm.driver import owner_labels

    conn = libvirt.open(uri)
    try:
        return [dom.name() for dom in conn.listAllDomains() if owner_labels(dom).get("vjobs.pid") == str(pid)]
    finally:
        conn.close()
