"""The stand-in's object store and the XAPI calls it implements, with XAPI's result and error conventions.

Follows XAPI's published data model (classes session, host, SR, VDI, VBD, VM, console; references
``OpaqueRef:<uuid>``; int64 fields as strings; ``event.from`` with an opaque token). What is a guess or a
simplification, not XAPI's behaviour:
- one host, one SR (type "ext", a folder of sparse raw files); no pool, no tasks, no async calls;
- ``VM.start`` boots the PV kernel as a QEMU TCG guest (see runner.py), so the guest sees virtio ``vd*``
  disks and a serial console where Xen would give it ``xvd*`` and ``hvc0``;
- a missing PV kernel fails ``VM.start`` with ``BOOTLOADER_FAILED`` (XAPI's exact code for a direct-boot
  PV kernel it cannot read may differ);
- when a VM halts, ``other_config`` gets ``last_shutdown_reason``: ``halted`` (the guest powered off),
  ``crashed`` (reset or panic), ``hard_shutdown``; XAPI records the reason there too, but its exact
  values were not checked against a real host;
- ``VDI.destroy`` also removes the VBDs that point to the VDI (they must be unplugged);
- ``VM.suspend`` / ``VM.resume`` follow XAPI's power states and errors (VM_BAD_POWER_STATE, and
  VM_INCOMPATIBLE_WITH_THIS_HOST from the ``last_boot_CPU_flags`` check), but the suspend image in the
  suspend VDI is a tar of qemu_user's saved guest (QEMU's migration stream), not a Xen save image; a resume
  whose QEMU cannot load it is VM_INCOMPATIBLE_WITH_THIS_HOST too; ``start_paused`` is not honoured;
- ``VM.create`` of a Suspended VM and ``VBD.create`` of its attached disks as XAPI 1.257.0 has them; a VBD
  cannot be created for a Running VM (no hot-plug here).
"""

from __future__ import annotations

import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

MIB = 1 << 20
NULL_REF = "OpaqueRef:NULL"
API_VERSION = ("2", "21")


class XapiFailure(Exception):
    """A call's failure: XAPI's ErrorDescription, a code followed by string parameters."""

    def __init__(self, code: str, *params: Any):
        super().__init__(code, *params)
        self.details = [code, *(str(p) for p in params)]


class CannotResume(RuntimeError):
    """This host cannot continue the suspended guest (qemu_user's ``restore_problem``, in runner.py)."""


@dataclass
class Faults:
    """Failure injection for tests: each fault fires once and clears itself."""

    cut_upload_after_bytes: int | None = None  # the next import_raw_vdi drops the connection after N bytes
    cut_upload_of: str = ""  # ... the next one into a VDI whose name_label contains this
    fail_next_start: str | None = None  # the next VM.start fails with this XAPI error code


@dataclass
class Stats:
    """What the stand-in received, for tests and benchmarks."""

    bytes_imported: dict[str, int] = field(default_factory=dict)  # VDI name_label -> bytes PUT into it
    calls: dict[str, int] = field(default_factory=dict)  # XAPI method -> number of calls

    @property
    def total_imported(self) -> int:
        return sum(self.bytes_imported.values())


def new_ref() -> str:
    return f"OpaqueRef:{uuid.uuid4()}"


class Store:
    """All objects, by class and reference, and the event log. One lock guards both; ``changed`` wakes
    ``event.from`` callers."""

    CLASSES = ("session", "host", "SR", "VDI", "VBD", "VM", "console")

    def __init__(self):
        self.lock = threading.RLock()
        self.changed = threading.Condition(self.lock)
        self.objects: dict[str, dict[str, dict]] = {name: {} for name in self.CLASSES}
        self.events: list[dict] = []
        self.next_event = 1

    def add(self, cls: str, record: dict, ref: str | None = None) -> str:
        with self.lock:
            ref = ref or new_ref()
            record.setdefault("uuid", str(uuid.uuid4()))
            self.objects[cls][ref] = record
            self._event(cls, "add", ref, record)
            return ref

    def get(self, cls: str, ref: str) -> dict:
        with self.lock:
            record = self.objects[cls].get(ref)
            if record is None:
                raise XapiFailure("HANDLE_INVALID", cls, ref)
            return record

    def modify(self, cls: str, ref: str, **fields) -> dict:
        with self.lock:
            record = self.get(cls, ref)
            record.update(fields)
            self._event(cls, "mod", ref, record)
            return record

    def remove(self, cls: str, ref: str) -> None:
        with self.lock:
            record = self.objects[cls].pop(ref, None)
            if record is not None:
                self._event(cls, "del", ref, record)

    def _event(self, cls: str, operation: str, ref: str, record: dict) -> None:
        self.events.append({"id": str(self.next_event), "timestamp": f"{time.time():.6f}",
                            "class": cls.lower(), "operation": operation, "ref": ref,
                            "snapshot": dict(record)})
        self.next_event += 1
        self.changed.notify_all()

    def events_from(self, classes: list[str], token: str, timeout: float) -> dict:
        """``event.from``: every event after ``token`` in ``classes``, waiting up to ``timeout`` for one.
        An empty token returns every current object of those classes, as XAPI does."""
        wanted = {name.lower() for name in classes}
        everything = "*" in wanted
        with self.lock:
            if token == "":
                events = [{"id": "0", "timestamp": f"{time.time():.6f}", "class": cls.lower(), "operation": "add",
                           "ref": ref, "snapshot": dict(record)}
                          for cls, objects in self.objects.items() if everything or cls.lower() in wanted
                          for ref, record in objects.items()]
                return {"events": events, "valid_ref_counts": {}, "token": self._token(self.next_event - 1)}
            after = int(token) if token.isdigit() else 0
            deadline = time.monotonic() + timeout
            while True:
                events = [event for event in self.events[after:]
                          if everything or event["class"] in wanted]
                remaining = deadline - time.monotonic()
                if events or remaining <= 0:
                    return {"events": events, "valid_ref_counts": {}, "token": self._token(len(self.events))}
                self.changed.wait(remaining)

    @staticmethod
    def _token(number: int) -> str:
        return f"{number:020d}"


def record_for_wire(record: dict) -> dict:
    """XML-RPC has 32-bit integers only: XAPI sends its int64 fields as strings."""
    return {key: str(value) if isinstance(value, int) and not isinstance(value, bool) else value
            for key, value in record.items()}

