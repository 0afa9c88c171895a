"""The driver conformance suite (vjobs.testing.conformance) for every driver installed here: vjobs' own
qemu_user, kvm and xen, whose sites come from the vjobs.testing.fixtures plugin (tests/conftest.py loads it),
and any other package's driver installed beside them, which fails here until a ``NAME_site`` fixture gives
it a site."""

from vjobs.testing.conformance import DriverConformance


class TestConformance(DriverConformance):
    pass
