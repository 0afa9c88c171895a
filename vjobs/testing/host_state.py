"""The host as a test sees it from outside vjobs: what a work folder still holds, the libvirt domains a vjobs
process started (its QEMU processes: vjobs.testing.processes). The tests' fixtures (vjobs.testing.fixtures)
check with these that a test left nothing behind."""

from __future__ import annotations

from pathlib import Path

from vjobs.testing.sites import LIBVIRT_URI


def work_leftovers(work: Path) -> list[str]:
    """What a work folder holds besides the admission folder (which stays) and its shares of live jobs."""
    if not work.exists():
        return []
    folders = [work / "admission", *work.glob("admission.*")]  # the host's, and batch allocations'
    shares = [f"{folder.name}/{p.name}" for folder in folders for p in folder.glob("*.json")]
    return sorted([p.name for p in work.iterdir() if p not in folders] + shares)


def vjobs_domains_of(pid: int, uri: str = LIBVIRT_URI) -> list[str]:
    """Names of the libvirt domains that vjobs started from process ``pid``."""
    import libvirt

    from vjobs.drivers.kvm.driver import owner_labels

    conn = libvirt.open(uri)
    try:
        return [dom.name() for dom in conn.listAllDomains() if owner_labels(dom).get("vjobs.pid") == str(pid)]
    finally:
        conn.close()
