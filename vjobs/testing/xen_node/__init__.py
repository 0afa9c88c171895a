"""A Xen test node: Xen 4.17 and a Debian PV dom0 nested under QEMU TCG, with the XAPI stand-in running in dom0
on real Xen (``--runner xl``), reached from the host through a forwarded loopback port.

- ``image``: the node's files, built from Debian packages and cached by content (``build``, ``NodeFiles``);
- ``node``: one boot of it (``XenNode``), as a context manager;
- ``python -m vjobs.testing.xen_node --site-out FILE``: boots one and writes a xen site for it (``__main__``).
"""
