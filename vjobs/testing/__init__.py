"""What vjobs' tests and benchmarks stand on, shipped so that another package's tests can stand on it too. Not
used by vjobs itself.

- ``fixtures``: the pytest plugin of sites, jobs, images and a clean host (``pytest_plugins = [...]``).
- ``conformance``: what every driver must do, run against every installed driver.
- ``fake_driver``: a driver that boots nothing, configured by callables, for the container's tests.
- ``host_state``: what a test sees on the host from outside vjobs (job folders, libvirt domains).
- ``sites``: site files, the xen and kvm set-ups, a seeded cache, the example job; ``figures``: a median and
  its range as the benchmarks print them; ``processes``: the process table, a job's QEMU.
- ``admission_holders``: vjobs processes in miniature that hold a share of the host's budget, as root or
  as a test account (the admission tests).
- ``kill_campaign`` (with ``event_pipe``): the kill -9 campaign, on vjobs' public events.
- Stand-ins for parts that cannot exist on a development machine: ``xapi_standin`` (a XAPI pool),
  ``panda_standin`` (a PanDA server); real servers started on loopback: ``servers``; ``fuzz``: the campaign.
"""
