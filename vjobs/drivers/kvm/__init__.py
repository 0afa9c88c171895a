"""kvm: jobs in transient libvirt domains (KVM, or TCG with virt_type = "qemu"), watched through libvirt events."""

from .driver import KvmDriver

__all__ = ["KvmDriver"]
