"""A XAPI stand-in for tests and benchmarks: a real XML-RPC server on loopback that implements the subset of
XAPI (XenServer / XCP-ng's management API) that vjobs' xen driver uses, and runs every started VM as a real
QEMU TCG guest with the disks it was given, so that a job truly runs.

It is not a Xen emulator and not a XAPI implementation: one host, one SR of raw files, no pools, no tasks.
Where it had to guess XAPI's behaviour, model.py says so. The xen driver does not know it talks to it.

    python -m vjobs.testing.xapi_standin --listen 127.0.0.1:8080      (or: vjobs-xapi-standin ...)
"""

from vjobs.testing.xapi_standin.server import XapiStandin

__all__ = ["XapiStandin"]
