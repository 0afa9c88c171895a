"""The server fixtures are real: data goes in with one client and comes out with another, checksums agree, and
the failure switches (relay drops, kills, read-only, corruption) do what they say."""

from __future__ import annotations

import os
import subprocess
import zlib

import httpx
import pytest

from vjobs.testing.servers.netns import Relay


def in_netns(xrootd, *argv: str) -> subprocess.CompletedProcess:
    """An XRootD command-line client run next to the server, bounded: a client of a starting daemon can hang."""
    command = ["timeout", "30", *xrootd.server.netns.command(list(argv))]
    return subprocess.run(command, capture_output=True, text=True, check=True)


@pytest.fixture
def uploaded(xrootd, tmp_path, request):
    """A file of random bytes copied onto the XRootD server with xrdcp: (name, content)."""
    name, content = f"{request.node.name}.bin", os.urandom(3 << 20)
    (tmp_path / name).write_bytes(content)
    in_netns(xrootd, "xrdcp", "--silent", "--force", str(tmp_path / name), xrootd.server.url_in_netns(name))
    return name, content


@pytest.mark.xrootd
def test_xrdcp_upload_reads_back_through_the_relay(xrootd, uploaded):
    from XRootD import client

    name, content = uploaded
    with client.File() as remote:
        status, _ = remote.open(xrootd.url(name), timeout=10)
        assert status.ok, status.message
        status, read = remote.read(0, len(content), timeout=10)
    assert status.ok and read == content
    assert (xrootd.data / name).read_bytes() == content


@pytest.mark.xrootd
def test_fsspec_reads_through_the_relay(xrootd, uploaded):
    import fsspec

    name, content = uploaded
    with fsspec.open(xrootd.url(name), "rb") as remote:
        assert remote.read() == content


@pytest.mark.xrootd
def test_server_adler32_equals_zlib(xrootd, uploaded):
    name, content = uploaded
    answer = in_netns(xrootd, "xrdadler32", xrootd.server.url_in_netns(name)).stdout
    assert answer.split()[0] == f"{zlib.adler32(content):08x}"


@pytest.mark.xrootd
def test_drop_all_cuts_a_running_read(xrootd, tmp_path):
    """A download in flight (XrdHttp, on the same server, through a relay of its own) ends with an error. The file
    is bigger than every socket buffer between the two ends together, so the cut lands mid-body."""
    size = 64 << 20
    (xrootd.data / "big.bin").write_bytes(os.urandom(size))
    received = 0
    with Relay(xrootd.server.netns, xrootd.server.http_port) as relay:
        with pytest.raises(httpx.TransportError):
            with httpx.stream("GET", f"http://127.0.0.1:{relay.port}/big.bin", timeout=10) as response:
                assert response.status_code == 200
                for chunk in response.iter_bytes():
                    if received == 0:
                        relay.drop_all()
                    received += len(chunk)
    (xrootd.data / "big.bin").unlink()
    assert 0 < received < size


@pytest.mark.xrootd
def test_xrootd_client_reconnects_after_a_drop(xrootd, uploaded):
    """XrdCl recovers on its own from a connection dropped between two reads: it reconnects (the relay sees a
    second connection) and the read succeeds. A drop meant to fail a root:// transfer must land inside a read."""
    from XRootD import client

    name, content = uploaded
    with client.File() as remote:
        assert remote.open(xrootd.url(name), timeout=10)[0].ok
        before = xrootd.relay.accepted
        assert remote.read(0, 1 << 20, timeout=10)[1] == content[: 1 << 20]
        xrootd.relay.drop_all()
        status, rest = remote.read(1 << 20, len(content), timeout=10)
    assert status.ok and rest == content[1 << 20:]
    assert xrootd.relay.accepted > before


@pytest.mark.xrootd
def test_restart_keeps_the_data(xrootd, uploaded):
    from XRootD import client

    name, content = uploaded
    old_pid = xrootd.server.pid
    xrootd.server.restart()
    assert xrootd.server.pid != old_pid
    with client.File() as remote:
        assert remote.open(xrootd.url(name), timeout=10)[0].ok
        assert remote.read(0, len(content), timeout=10)[1] == content


@pytest.mark.webdav
def test_webdav_put_get_round_trip(webdav):
    content = os.urandom(1 << 20)
    assert httpx.put(webdav.url("a.bin"), content=content).status_code == 201
    assert httpx.get(webdav.url("a.bin")).content == content
    assert (webdav.root / "a.bin").read_bytes() == content


@pytest.mark.webdav
def test_webdav_put_into_a_missing_collection_needs_mkcol(webdav):
    assert httpx.put(webdav.url("sub/a.txt"), content=b"x").status_code == 409
    assert httpx.request("MKCOL", webdav.url("sub")).status_code == 201
    assert httpx.put(webdav.url("sub/a.txt"), content=b"x").status_code == 201


@pytest.mark.webdav
def test_read_only_webdav_refuses_writes(make_webdav):
    server = make_webdav(read_only=True)
    (server.root / "there.txt").write_bytes(b"kept")
    assert httpx.put(server.url("new.txt"), content=b"x").status_code == 403
    assert httpx.request("MKCOL", server.url("sub")).status_code == 403
    assert httpx.delete(server.url("there.txt")).status_code == 403
    assert httpx.get(server.url("there.txt")).content == b"kept"
    assert sorted(p.name for p in server.root.iterdir()) == ["there.txt"]


@pytest.mark.webdav
def test_corrupting_webdav_stores_other_bytes(make_webdav):
    server = make_webdav(corrupt_uploads=True)
    content = os.urandom(1 << 16)
    assert httpx.put(server.url("a.bin"), content=content).status_code == 201
    stored = (server.root / "a.bin").read_bytes()
    assert len(stored) == len(content)
    assert [i for i in range(len(content)) if stored[i] != content[i]] == [len(content) // 2]


@pytest.mark.webdav
def test_killed_webdav_comes_back_on_the_same_port(webdav):
    assert httpx.put(webdav.url("a.txt"), content=b"before").status_code == 201
    url = webdav.url("a.txt")
    webdav.kill()
    with pytest.raises(httpx.ConnectError):
        httpx.get(url, timeout=2)
    webdav.restart()
    assert webdav.url("a.txt") == url
    assert httpx.get(url).content == b"before"
