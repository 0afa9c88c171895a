"""A real one-node Slurm cluster for the session (vjobs.testing.servers.slurm), in the grid tests' loopback-only
network namespace (``grid_netns``, tests/fixtures_grid.py), so that its batch jobs reach the XRootD server there."""

from __future__ import annotations

import pytest

from fixtures_grid import server_unavailable

from vjobs.testing.servers.slurm import SlurmCluster, why_not_available


@pytest.fixture(scope="session")
def slurm_cluster(request, tmp_path_factory):
    """slurmctld and slurmd with one 2-CPU node (4096 MiB), stopped (and its left jobs cancelled) at the end of
    the session whatever happened. Skipped, with the reason, where Slurm is not installed or we are not root."""
    why_not = why_not_available()
    if why_not:
        server_unavailable(f"no Slurm cluster: {why_not}")
    netns = request.getfixturevalue("grid_netns")
    with SlurmCluster(netns, tmp_path_factory.mktemp("slurm"), cpus=2, memory_mib=4096) as cluster:
        yield cluster
