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
from vjobs.api import execute, host_context, probe, run, validate
from vjobs.config.exec_request import ExecRequest
from vjobs.config.job import Job, load_job
from vjobs.config.site import SiteConfig, load_site
from vjobs.drivers.contract import VM, Capabilities, Driver
from vjobs.errors import (Cancelled, DriverError, DriverNotFound, ImageError, InvalidJob, InvalidSite, LimitExceeded,
                          NoUsableDriver, SetupError, VjobsError, VMError, WalltimeExceeded)
from vjobs.events import Event
from vjobs.result import Result

__all__ = ["run", "execute", "probe", "validate", "host_context", "load_job", "load_site", "__version__",
           "Job", "SiteConfig", "ExecRequest", "Result", "Event", "Capabilities", "Driver", "VM",
           "VjobsError", "SetupError", "InvalidJob", "InvalidSite", "LimitExceeded", "ImageError", "DriverError",
           "DriverNotFound", "NoUsableDriver", "VMError", "WalltimeExceeded", "Cancelled"]
