"""vjobs' failures as PanDA Pilot 3 error codes (pilot/common/errorcodes.py), so that a pilot reports a VM
that did not boot as a pilot failure, not as a payload that printed something.

The mapping, by vjobs result status and error code (docs/pilot3.md):
    setup_error, image not in the catalogue   1360 IMAGENOTFOUND
    setup_error, anything else                1110 SETUPFAILURE
    no usable driver (exit 201)               1344 RESOURCEUNAVAILABLE (no virtualisation here)
    vm_error: did not boot                    1306 SINGULARITYGENERALFAILURE (the container runtime failed)
    vm_error: guest crashed, other            1305 PAYLOADEXECUTIONFAILURE
    timeout (the job's maxWalltime)           1213 REACHEDMAXTIME
    cancelled (SIGTERM from the pilot)        1201 SIGTERM
"""

from __future__ import annotations

import json
from pathlib import Path

from vjobs import Result

IMAGENOTFOUND, SETUPFAILURE, RESOURCEUNAVAILABLE = 1360, 1110, 1344
CONTAINERFAILURE, PAYLOADEXECUTIONFAILURE, REACHEDMAXTIME, SIGTERM = 1306, 1305, 1213, 1201
REPORT_NAME = "payload_error_report.json"


def pilot_error_code(result: Result) -> int | None:
    """The pilot's error code for a vjobs result, None when the payload ran to its end (its own exit
    status is then the pilot's to judge)."""
    if result.status in ("succeeded", "failed"):
        return None
    code = (result.error or {}).get("code", "")
    if code in ("no_usable_driver", "driver_not_found"):
        return RESOURCEUNAVAILABLE
    if result.status == "setup_error":
        return IMAGENOTFOUND if code == "image_not_found" else SETUPFAILURE
    if result.status == "timeout":
        return REACHEDMAXTIME
    if result.status == "cancelled":
        return SIGTERM
    return CONTAINERFAILURE if result.failed_before_payload else PAYLOADEXECUTIONFAILURE


def write_report(result: Result, workdir: Path) -> Path | None:
    """``payload_error_report.json`` in the pilot's work directory for a vjobs failure; None otherwise."""
    code = pilot_error_code(result)
    if code is None:
        return None
    report = Path(workdir) / REPORT_NAME
    diagnostics = f"vjobs {result.status} [{result.error['code']}]: {result.error['message']}"
    # "cause": the VM's failure is why the job failed, and comes before the pilot's generic 1305 for a
    # non-zero exit; a cancellation is the pilot's own doing, and its reason (e.g. 1144, killed by the
    # server) stays first.
    cause = result.status != "cancelled"
    report.write_text(json.dumps({"error_code": code, "error_diag": diagnostics[:4000], "cause": cause}))
    return report
