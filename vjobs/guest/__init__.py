"""The guest protocol: its guest half (``agent/``, the init and stage scripts of the built-in boot image) and
its host half (``disks`` builds what the guest reads, ``binds`` the folders it shares, ``console`` the log it
writes, ``collect`` reads back what it wrote, without mounting it)."""
