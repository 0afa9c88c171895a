"""vjobs: run a grid batch job inside a virtual machine, with all I/O on the host.

The Python API a pilot calls::

    import vjobs
    result = vjobs.run("job.json", outdir="out/")      # or a dict, or a vjobs.Job
    if result.status == "succeeded": ...
    for verdict in vjobs.probe(): print(verdict.driver, verdict.usable, verdict.reason)
    result = vjobs.execute(vjobs.ExecRequest("debian12", ["python3", "a.py"], binds=["/data:/srv"]))

Observers (a progress display, a benchmark) subscribe to the run's events: ``vjobs.run(..., event_hooks=...)``
(vjobs/events.py).

Everything vjobs reports on purpose is a ``vjobs.VjobsError`` (see vjobs/errors.py); ``run`` itself does
not raise those: it returns a ``Result`` whose ``status`` and ``error`` say what happened.
"""

from vjobs._version import __version__

# The public names, loaded when first used: ``import vjobs.cli`` must not import all of vjobs before the
# command line has taken the signals over (vjobs/container/signals.py).
_PUBLIC = {
    "vjobs.api": ("execute", "host_context", "probe", "resume", "run", "running", "validate"),
    "vjobs.config.exec_request": ("ExecRequest",),
    "vjobs.config.job": ("Job", "load_job"),
    "vjobs.config.site": ("SiteConfig", "load_site"),
    "vjobs.drivers.contract": ("VM", "Capabilities", "Driver"),
    "vjobs.errors": ("Cancelled", "DriverError", "DriverNotFound", "ImageError", "InvalidJob", "InvalidSite",
                     "LimitExceeded", "NoUsableDriver", "SetupError", "VjobsError", "VMError", "WalltimeExceeded"),
    "vjobs.events": ("Event",),
    "vjobs.result": ("Result",),
}
_HOME = {name: module for module, names in _PUBLIC.items() for name in names}


def __getattr__(name: str):
    if name not in _HOME:
        raise AttributeError(f"module 'vjobs' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(_HOME[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_HOME])


__all__ = ["run", "resume", "execute", "probe", "running", "validate", "host_context", "load_job", "load_site", "__version__",
           "Job", "SiteConfig", "ExecRequest", "Result", "Event", "Capabilities", "Driver", "VM",
           "VjobsError", "SetupError", "InvalidJob", "InvalidSite", "LimitExceeded", "ImageError", "DriverError",
           "DriverNotFound", "NoUsableDriver", "VMError", "WalltimeExceeded", "Cancelled"]
