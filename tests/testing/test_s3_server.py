"""The Swift S3 test server (vjobs.testing.servers.s3) through s3fs, the client vjobs' users have: round trip,
multipart upload, refused credentials, listings."""

from __future__ import annotations

import hashlib
import os

import pytest

pytestmark = pytest.mark.s3


def s3fs_for(server, **overrides):
    import s3fs

    return s3fs.S3FileSystem(**{**server.fsspec_options, **overrides}, skip_instance_cache=True)


def test_upload_download_round_trip(s3_bucket, tmp_path):
    server, bucket = s3_bucket
    fs = s3fs_for(server)
    data = os.urandom(300_000)
    (tmp_path / "up.bin").write_bytes(data)
    fs.put(str(tmp_path / "up.bin"), f"{bucket}/dir/file.bin")
    fs.get(f"{bucket}/dir/file.bin", str(tmp_path / "down.bin"))
    assert (tmp_path / "down.bin").read_bytes() == data
    assert fs.info(f"{bucket}/dir/file.bin")["ETag"].strip('"') == hashlib.md5(data).hexdigest()


def test_multipart_upload_12mib(s3_bucket):
    server, bucket = s3_bucket
    fs = s3fs_for(server)
    data = os.urandom(12 << 20)
    with fs.open(f"{bucket}/big.bin", "wb", block_size=5 << 20) as out:
        for start in range(0, len(data), 1 << 20):  # s3fs sends a part whenever 5 MiB are buffered
            out.write(data[start:start + (1 << 20)])
    info = fs.info(f"{bucket}/big.bin")
    assert info["size"] == len(data)
    assert info["ETag"].strip('"').endswith("-3"), info["ETag"]  # a multipart ETag: MD5 of 3 parts' MD5s
    assert fs.cat(f"{bucket}/big.bin") == data


def test_wrong_secret_is_refused(s3_bucket):
    server, bucket = s3_bucket
    s3fs_for(server).pipe(f"{bucket}/kept", b"kept")
    impostor = s3fs_for(server, secret="not-the-secret")
    with pytest.raises(PermissionError):
        impostor.cat(f"{bucket}/kept")
    with pytest.raises(PermissionError):
        impostor.pipe(f"{bucket}/planted", b"x")
    assert not s3fs_for(server).exists(f"{bucket}/planted")


def test_listings(s3_bucket):
    server, bucket = s3_bucket
    fs = s3fs_for(server)
    assert fs.ls(bucket) == []
    fs.pipe({f"{bucket}/x/1": b"1", f"{bucket}/x/2": b"22", f"{bucket}/y": b""})
    assert bucket in fs.ls("")
    assert bucket in [b["Name"] for b in server.client().list_buckets()["Buckets"]]
    assert sorted(fs.ls(bucket)) == [f"{bucket}/x", f"{bucket}/y"]
    sizes = {path: fs.info(path)["size"] for path in fs.find(bucket)}
    assert sizes == {f"{bucket}/x/1": 1, f"{bucket}/x/2": 2, f"{bucket}/y": 0}


def test_what_the_server_verifies(s3_bucket):
    """Content-MD5 is checked; x-amz-checksum-* is not (Swift 2.30 ignores it: a wrong CRC32 is stored)."""
    from botocore.exceptions import ClientError

    server, bucket = s3_bucket
    client = server.client()
    with pytest.raises(ClientError, match="BadDigest"):
        client.put_object(Bucket=bucket, Key="md5", Body=b"data", ContentMD5="AAAAAAAAAAAAAAAAAAAAAA==")
    put = client.put_object(Bucket=bucket, Key="crc", Body=b"data", ChecksumCRC32="AAAAAA==")
    assert put["ETag"].strip('"') == hashlib.md5(b"data").hexdigest()
    assert not any("checksum" in name for name in put["ResponseMetadata"]["HTTPHeaders"])
