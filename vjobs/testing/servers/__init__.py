"""Real servers for tests and benchmarks, each started in a private folder and stopped by its PID.

- ``netns``: ``LoopbackNetns``, a throwaway network namespace holding only ``lo``, and ``Relay``, which
  forwards 127.0.0.1 connections from the caller's namespace into it.
- ``xrootd``: ``XRootDServer``, the real ``xrootd`` daemon, run inside a ``LoopbackNetns`` (it cannot bind to
  loopback only).
- ``webdav``: ``WebDAVServer``, wsgidav on cheroot in a subprocess on 127.0.0.1, optionally read-only or
  corrupting uploads.
- ``s3``: ``SwiftS3Server``, OpenStack Swift (proxy with s3api, account, container, object) and memcached on
  127.0.0.1.
- ``slurm``: ``SlurmCluster``, a real slurmctld and slurmd inside a ``LoopbackNetns``.
"""
