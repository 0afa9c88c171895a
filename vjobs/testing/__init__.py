"""What tests and benchmarks share, and stand-ins for parts that cannot exist on a development machine. Not
used by vjobs itself.

- ``sites``: site files, the xen and kvm set-ups, a seeded cache, the example job; ``figures``: a median and
  its range as the benchmarks print them; ``processes``: the process table, a job's QEMU.
- ``kill_campaign`` (with ``event_pipe``): the kill -9 campaign, on vjobs' public events.
- Stand-ins and servers: ``xapi_standin``, ``panda_standin``, ``servers``; ``fuzz``.
"""
