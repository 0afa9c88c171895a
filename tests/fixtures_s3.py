"""Fixtures that start a real OpenStack Swift with its S3 API (s3api + tempauth + memcached) on 127.0.0.1.
conftest.py takes them with ``from fixtures_s3 import *``. The servers are stopped by their PIDs at the end of the
session, whether the tests passed or not."""

from __future__ import annotations

import itertools

import pytest

from fixtures_grid import server_unavailable

from vjobs.testing.servers.s3 import SwiftS3Server, why_not_available

__all__ = ["s3_server", "s3_bucket"]

_bucket_numbers = itertools.count(1)


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """The session's Swift S3 server (about 1.5-5 s to start). Skips where Swift or memcached is missing."""
    why_not = why_not_available()
    if why_not:
        server_unavailable(f"OpenStack Swift with s3api cannot run here ({why_not}): apt-get install swift swift-proxy "
                    "swift-account swift-container swift-object memcached")
    with SwiftS3Server(tmp_path_factory.mktemp("swift-s3")) as server:
        yield server


@pytest.fixture
def s3_bucket(s3_server) -> tuple[SwiftS3Server, str]:
    """(server, name of a fresh empty bucket of this test's own)."""
    return s3_server, s3_server.bucket(f"test-bucket-{next(_bucket_numbers)}")
