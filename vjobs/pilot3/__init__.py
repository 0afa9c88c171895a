"""PanDA Pilot 3 runs its payloads in vjobs VMs: a pilot user plugin that vjobs ships.

Pilot 3 runs each payload through ``pilot.user.<user>.container.wrapper(command, job=job)``, which returns one
shell line, and asks ``pilot.user.<user>.diagnose.interpret(job)`` what became of it. ``vjobs pilot3 install
PILOT_DIR`` adds a user ``vjobs`` to a pilot tree: a copy of the pilot's own ``generic`` user with files of
ours over it (``user_plugin/``): its wrapper line runs ``python -m vjobs.pilot3.payload``, which runs the
payload in a VM with ``vjobs exec`` semantics (the job's work directory bound read-write at the same path, so
the pilot's own command and paths work unchanged in the guest), and its ``interpret`` turns the
``payload_error_report.json`` that a vjobs failure leaves in the work directory into a pilot error code. Its
``cpu`` and ``utilities`` give the pilot's monitors the guest's CPU time, vCPUs and memory, which the runner
writes into the work directory as prmon would (``monitor``). The pilot is then started with ``--pilot-user
vjobs``. Stage-in and stage-out stay the pilot's, on the host.

- ``payload``: the runner the wrapper line starts; job resources from the PanDA job (``coreCount``,
  ``minRamCount``, ``maxWalltime``, ``container_name``) and its queue (``maxwdir``), the wall time (the job's,
  or the time the pilot has left) enforced by vjobs itself.
- ``errors``: vjobs' result statuses and codes -> the pilot's error codes (docs/pilot3.md has the table).
- ``monitor``: the guest's figures, from vjobs' ``usage`` events, as prmon's files in the work directory.
- ``plugin``: the installer.
"""
