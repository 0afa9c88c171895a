"""xen: jobs in Xen PV guests on a XenServer / XCP-ng pool, driven through XAPI with the XenAPI SDK."""

from vjobs.drivers.xen.driver import XenDriver

__all__ = ["XenDriver"]
