"""Every word the host and the guest agent (vjobs/guest/agent/) agree on, in one place: the lines the agent
prints on its console that the host waits for, the io disk's magic, and the error codes the agent reports in
its status file, with what each means to a user.

The agent prints ``vjobs-agent: <words>`` on /dev/console (lib.sh ``say``); the host sees the console through
the driver (vjobs/guest/console.py) and waits for these markers. tests/guest/test_protocol.py holds this
module and the agent's scripts to each other.
"""

from __future__ import annotations

#: The agent runs (after the boot, or after a template's restore): the boot is over.
AGENT_UP_MARKER = b"vjobs-agent: up"
#: ... and it starts the payload now (the core times the start-up by it).
PAYLOAD_MARKER = b"vjobs-agent: running the payload"
#: A deep probe's guest booted and works (vjobs/drivers/bootcheck.py).
PROBE_MARKER = b"vjobs-agent: probe ok"
#: A template's guest is booted and waits for its job: now it can be saved (vjobs/drivers/qemu_user/template.py).
TEMPLATE_READY_MARKER = b"vjobs-agent: template ready"

#: The io disk begins with a tar whose first member has this name (vjobs/guest/disks.py writes it, the agent
#: finds the disk by it, vjobs/guest/collect.py checks it on the way back).
IO_DISK_MAGIC = "VJOBS-IO-DISK"

#: The output, stdout and stderr would not fit on the io disk: only the streams' tails came back.
OUTPUT_TOO_LARGE = "output_too_large"

#: What the agent's set-up error codes (``deliver CODE`` in its stages) mean, said to the user.
AGENT_ERRORS = {
    "rootfs_disk_missing": "the guest did not find the base image's disk",
    "rootfs_mount_failed": "the guest could not mount the base image read-only: the file system is damaged or "
                           "of a kind the guest kernel cannot read; check it with `vjobs image inspect` and "
                           "rebuild it",
    "overlay_failed": "the guest could not put its overlay over the base image",
    "rootfs_unusable": "the base image cannot run payloads",
    "payload_setup_failed": "the guest could not set up the payload's namespaces and mounts",
    "readonly_disk_missing": "the guest did not find the disk of the release or a read-only bind",
    "readonly_mount_failed": "the guest could not mount the image of the release or a read-only bind",
    "inputs_failed": "the guest could not put the job's inputs under its working directory",
}

#: The error codes of a VM that never got as far as the payload: the host's boot failures and every set-up
#: failure the agent reports (a pilot reports these as the container runtime's failure, not the payload's).
BEFORE_PAYLOAD = frozenset({"boot_timeout", "boot_failed", "hypervisor_failed", *AGENT_ERRORS})
