"""Checkpoints: a running job's VM saved on the host, to be continued later, here or on another node.

``vjobs run JOB --checkpoint DIR`` keeps the job's current checkpoint in ``DIR`` (folder.py). On SIGTERM, or
on the site's ``checkpoint_signal`` (a batch system's warning, e.g. Slurm's ``--signal``), the container
saves the VM (``take.py``): its driver writes the guest's memory and device state (``VM.save_guest``,
vjobs/drivers/contract.py), the core copies the job's own disks (its writable ones, its inputs' image) while it is stopped, and the job ends with
status ``checkpointed`` (exit 207) and no VM left. With ``checkpoint_interval_s`` it also saves every that many
seconds and lets the guest go on, so a node that dies loses at most that much.

``vjobs resume DIR`` (resume.py) continues the current checkpoint: on this node or another with the same
driver and a hypervisor that can load the saved machine, with any ``work_dir`` and an empty cache. The
checkpoint carries what only it has (the guest's state, its writable disks and inputs' image, the job) and names by sha256
what the node can find or make again (the release and read-only bind images, the base image). Everything is
checked against the manifest before a VM starts.
"""
