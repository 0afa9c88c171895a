"""A third-party driver: plain QEMU on the q35 machine, with a probe that says so. It builds on vjobs'
public pieces (the Driver interface and the qemu_user driver) and lives in a package of its own."""

from dataclasses import replace

from vjobs.drivers.qemu_user import QemuUserDriver


class DemoDriver(QemuUserDriver):
    def __init__(self, settings, host):
        super().__init__({"machine": "q35", **settings}, host)

    def probe(self):
        verdict = super().probe()
        return replace(verdict, reason=f"demo driver (q35): {verdict.reason}")
