"""kvm: jobs in transient libvirt domains (KVM, or TCG with virt_type = "qemu"), watched through libvirt events."""

from vjobs.drivers.kvm.driver import KvmDriver

__all__ = ["KvmDriver"]
