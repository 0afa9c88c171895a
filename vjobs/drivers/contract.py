"""The driver interface: the one place where the contract between the core and a hypervisor is written down.

A driver is a plugin found through the ``vjobs.drivers`` entry-point group (see ``vjobs.drivers.registry``). It has two
parts, both small:

``Driver`` (one per host and site config)
    ``probe()``              -> ``Capabilities``: can this host run VMs with me, and with what (the hypervisor's
                                name and version included)? Never raises for "no"; says why in ``reason`` and the
                                individual ``checks``; make it with ``Capabilities.from_checks``.
    ``create(spec)``         -> ``VM``: make the VM a ``VMSpec`` describes and attach its disks, so that ``start``
                                has nothing left to do but run it; no guest instruction runs yet. Refuses a disk
                                in a format the driver does not take (``check_disk_formats``). If it raises, it
                                has released whatever it made (``destroyed_on_failure``): the core only ever
                                destroys VMs it was handed.
    ``collect_garbage(is_orphan)`` remove VMs and disks that vjobs created for processes that are gone.

    The driver is made with a ``HostContext``: what the core lends it (``self.host``), among which
    ``cache_hold``, the job's hold on the cache. A driver that keeps files under ``cache_dir`` by content
    for later jobs (qemu_user's templates) makes each a cache entry (vjobs/host/cache.py lists them) and
    calls ``cache_hold.use(entry)`` each time it hands one out (False: it was evicted, build it again) and
    ``cache_hold.added(entry, progress)`` once it has built one; ``store.build_once`` does both. So the
    entry stays while the job runs, and the cache keeps the site's bound. The core releases the hold after
    the job's teardown; the driver never releases it, nor keeps a hold of its own. Likewise
    ``checked_files``: a file such a driver gives the hypervisor (a saved template) is opened and checked
    there (vjobs/images/checked.py), and closed after the job.

``VM`` (one per boot attempt)
    ``start()``               run the guest; returns once the hypervisor runs it.
    ``provenance()``          how it started, for the result (optional; e.g. restored from a template).
    ``agent_started()``       has the guest agent announced itself (``AGENT_UP_MARKER`` on the console)?
    ``guest_channel()``       once started: the ``Channel`` on which the guest agent writes framed records (the
                              payload's stdout and stderr, sync rounds of its files, usage samples;
                              vjobs/guest/streams.py): its ``read()`` returns the next bytes, b"" at its end;
                              its ``write(data)``, where the channel carries both ways, reaches the agent. None
                              when this VM has none (the default). The core reads, parses and bounds it; a
                              driver only hands over the raw byte stream (what carries it for each: below).
    ``wait_until_stopped(deadline)`` block until the guest stops or ``time.monotonic()`` passes ``deadline``;
                              return a ``Stop``. A guest the hypervisor paused because a writable disk could not
                              grow (the host file system is full) is ``Stop.DISK_FULL``, with ``full_disk`` naming
                              that disk's file: the core says so to the user, in its own words.
    ``fetch_disk(disk)``      a local file holding the disk's bytes as the guest left them (for a driver whose
                              disks live elsewhere: download it). The core reads results from it, never mounts it.
    ``save_guest(folder, deadline)`` checkpoints (vjobs/checkpoint/): stop the guest's CPUs and write its memory
                              and device state as files into ``folder`` (empty, the job's user's), giving up
                              (raise) when ``time.monotonic()`` passes ``deadline`` (a batch system's grace
                              period is short), the guest then still stopped; return its
                              ``identity``, a JSON-able dict of what a restore must match (hypervisor family and
                              version, machine type, vCPUs, memory). Once it returns the guest does not run and
                              ``fetch_disk`` gives each writable disk exactly as the saved state expects it. The
                              default raises ``CheckpointError``: this driver cannot save guests.
    ``resume()``              let a guest stopped by ``save_guest`` run on (a periodic checkpoint).
    ``destroy()``             kill the guest and remove what ``create`` made, whether or not it started.
                              Idempotent, must not raise when things are already gone: the core calls it in every
                              outcome, sometimes twice.

What each of vjobs' drivers does where, and so what the result's timings measure (the core times ``create`` as
the phase ``attach``; ``start`` and the wait for the agent as ``boot``). Where the hypervisor's own start-up
falls differs: kvm's QEMU starts in ``attach`` (libvirt creates the domain paused), qemu_user's in ``boot``.

============  =========================================================  ===========================================
driver        ``create`` (attach)                                        ``start`` (boot, with the wait for the agent)
============  =========================================================  ===========================================
qemu_user     passes the disks as descriptors, copies the kernel and      starts QEMU paused with them, connects its
              initramfs into sealed memory files, makes the console and   console and monitor, checks the files
              monitor socket pairs, builds the confined command line.     (``check_unchanged``), lets the guest run
              From a template: finds the template (makes it once, a boot  starts QEMU from the saved guest,
              of its own, when none is saved for the guest's shape) and   hot-plugs the disks, lets it run, waits
              prepares its restore with the job's disks; when it cannot,  for the agent; a failed restore boots
              prepares a cold boot as above                               cold instead
kvm           copies the kernel and initramfs into the VM's folder,       checks the files (``check_unchanged``),
              defines the domain, hands libvirt the read-only disks'     resumes the domain
              descriptors, starts it paused (QEMU starts and opens the
              disks) and makes it transient, opens its console
xen           logs in, copies the kernel and initramfs into the VM's      starts the VM, connects its console
              folder, creates the VM, uploads each job disk to a new VDI
              or finds the shared one (release, base image) already
              uploaded, plugs them in with VBDs, checks the files
============  =========================================================  ===========================================

How each of vjobs' drivers saves a guest and continues one (docs/checkpoints.md):

============  =========================================================  ===========================================
driver        ``save_guest``                                             a restore (``create`` and ``start``)
============  =========================================================  ===========================================
qemu_user     QMP ``stop``, then ``migrate`` into a pipe vjobs copies    a QEMU of the saved versioned machine type,
              into ``state``; the kernel stand-ins (standins.py)         the same devices in the same order, the
                                                                         state through ``-incoming`` from the checked
                                                                         descriptor
kvm           pauses the domain; libvirt writes an external memory       the domain defined (read-only disks by
              snapshot into a file vjobs made (QEMU stays up for         descriptor), ``virDomainRestoreFlags``
              ``resume``); the kernel stand-ins                          (paused) from a private copy of the state,
                                                                         under the saved name and UUID (libvirt
                                                                         allows no other), this run's disks,
                                                                         sockets and owner labels
xen           XAPI's ``VM.suspend``, its suspend VDI downloaded          the disks and suspend image uploaded, the
                                                                         VM created Suspended with them (XAPI
                                                                         1.257), ``VM.resume``
============  =========================================================  ===========================================

To continue a saved guest, the core sets ``VMSpec.restore`` (a ``SavedGuest``: the files ``save_guest``
wrote, opened and checked against the checkpoint's manifest, and its identity) after asking
``Driver.restore_problem(identity)`` whether this host can; ``spec.disks`` are then copies of the disks
the guest was saved with, in the same order. ``create`` prepares the restore, ``start`` runs it: the guest
goes on where it was, its agent already up (``agent_started()`` is True at once), and the core waits for
it as for any guest.

Everything else (job validation, building disks, deadlines, retries, result files, signals) is the core's.
Example of a spec a driver receives::

    VMSpec(name="vjobs-job42-1a2b3c", vcpus=1, memory_mib=512,
           boot=BootImage(kernel=CheckedFile(".../vmlinuz"), initramfs=CheckedFile(".../initramfs.cpio"),
                          cmdline="quiet panic=-1"),
           disks=(Disk("io", Path(".../io.raw"), "raw", readonly=False),
                  Disk("scratch", Path(".../scratch.ext4"), "raw", readonly=False),
                  Disk("inputs", Path(".../inputs.erofs"), "raw", readonly=True, file=CheckedFile(".../inputs.erofs")),
                  Disk("release", Path(".../release-<key>.squashfs"), "raw", readonly=True, cache_key="<key>",
                       file=CheckedFile(".../release-<key>.squashfs"))),
           console=ConsoleLog(Path(".../console.1.log")), network=False, owner=Owner(job_id="job42", pid=1234, ...))

What boots is what vjobs checked (vjobs/images/checked.py): the kernel, the initramfs and every read-only disk
come as a ``CheckedFile``, opened once, whose descriptor ``fd`` the driver gives the hypervisor (QEMU's
``-add-fd``, libvirt's ``FDAssociate``), or reads to copy (a sealed memory file, a private copy in
``spec.workdir`` for a hypervisor that takes paths only, an upload); never its ``path``, which is for messages.
A qcow2 is opened with its backing disabled. The writable disks (io, scratch) are files vjobs made in the
job's folder, which the driver opens by path. Once the hypervisor holds them all and before the guest runs,
the driver calls ``check_unchanged(spec)``: a checked file rewritten since refuses the job.

The guest's live channel (``guest_channel``) carries the same framed records whatever carries it
(vjobs/guest/streams.py); every driver should have one (the conformance suite expects it):

============  ===============================================================================================
driver        what carries the guest's live channel
============  ===============================================================================================
qemu_user     a virtio-serial port (``virtserialport`` named ``vjobs.streams``) on a socket pair, as its console,
              in cold boots and templates alike (the saved guest has the port; the restore connects a new
              socket to it)
kvm           a virtio-serial port (``<channel type="unix">``, target ``virtio`` named ``vjobs.streams``) whose
              QEMU connects to a socket vjobs listens on in the VM's folder while the domain is created, as
              its console's does: the folder is vjobs' user's alone (0700), QEMU runs as libvirt's user
xen           the console: XAPI gives a PV guest one text console and no other channel, so the kernel command
              line says ``vjobs.streams=console``; the agent writes the channel's bytes in base64 inside escape
              sequences (``ESC ]vjobs-streams; ... BEL``, one write each) that the driver takes out of the
              console before its log (``StreamsOnConsole``), and reads the host's lines as typed on the
              console (not over TLS: see ``XenVM.guest_channel``). A carrier that is not base64 or too long
              ends the channel (the results still come at the end); console text stays console text
============  ===============================================================================================

The guest's console goes into ``spec.console`` (a ``ConsoleLog``, vjobs/guest/console.py): ``write(bytes)`` or
``follow(read)`` from the stream the hypervisor offers. It is bounded by the core, so a driver never writes
the guest's console into a host file of its own.

Disks come in this order and should be attached in it; the guest agent does not rely on order or device
names (it recognises each disk by its content), so ``vd*``, ``xvd*`` and ``sd*`` all work. Every disk names
its format; a driver must pass it on and never let the hypervisor guess one. ``readonly`` disks must be
attached read-only at the device level, not just mounted so.
"""

from __future__ import annotations

import abc
import contextlib
import enum
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Collection, Iterable, Iterator, Mapping, TypeVar

from vjobs.errors import CheckpointError, VMError
from vjobs.events import Events
from vjobs.guest.console import ConsoleLog
from vjobs.guest.protocol import AGENT_UP_MARKER
from vjobs.guest.streams import Channel  # a VM's guest_channel(); drivers import it from here
from vjobs.host.cache import CacheHold
from vjobs.host.identity import Owner  # a VMSpec's; drivers import it from here
from vjobs.images.checked import CheckedFile, CheckedFiles


@dataclass(frozen=True)
class Disk:
    role: str  # "io" (job in, results out), "scratch" (working directory), "release", "rootfs" (base image)
    path: Path
    format: str  # "raw" or "qcow2"
    readonly: bool
    cache_key: str | None = None  # same key, same bytes: a driver that copies disks may reuse a copy
    file: CheckedFile | None = None  # a read-only disk's file, opened and checked: what the hypervisor gets


@dataclass(frozen=True)
class BootImage:
    kernel: CheckedFile
    initramfs: CheckedFile
    cmdline: str  # without console=: each driver adds the console its platform has
    builtin: bool = False  # vjobs' own guest image (vjobs/guest/): its agent's every feature is there


@dataclass(frozen=True)
class SavedGuest:
    """A guest saved by ``VM.save_guest``, as a restore gets it: each file it wrote, by its name in the
    folder, opened once and checked against the checkpoint's manifest (give the hypervisor these
    descriptors), and the identity it returned."""

    files: Mapping[str, CheckedFile]
    identity: Mapping[str, Any]


@dataclass(frozen=True)
class VMSpec:
    name: str
    vcpus: int
    memory_mib: int
    boot: BootImage
    disks: tuple[Disk, ...]
    console: ConsoleLog  # where the driver puts what the guest writes on its console (vjobs/guest/console.py)
    network: bool
    owner: Owner
    workdir: Path  # a host folder for this VM's own files; the core removes it after destroy()
    restore: SavedGuest | None = None  # continue this saved guest instead of booting ``boot`` (checkpoints)

    def checked_files(self) -> tuple[CheckedFile, ...]:
        return (self.boot.kernel, self.boot.initramfs, *(disk.file for disk in self.disks if disk.file))


class Stop(enum.Enum):
    POWEROFF = "poweroff"  # the guest shut itself down
    CRASH = "crash"  # the guest reset, panicked or the hypervisor process died
    DEADLINE = "deadline"  # still running when the deadline passed
    DISK_FULL = "disk_full"  # paused by the hypervisor: a writable disk could not grow (``VM.full_disk``)


@dataclass(frozen=True)
class Check:
    """One step of a probe: what was checked, whether it passed, and what was seen."""

    name: str
    ok: bool
    detail: str


@dataclass(frozen=True)
class Capabilities:
    """What a probe found. Typed, so that ``vjobs probe --json`` has the same fields for every driver."""

    driver: str
    usable: bool
    reason: str  # one line: why usable or not
    acceleration: str | None = None  # "kvm", "tcg", "xen-pv", ...
    acceleration_reason: str = ""
    hypervisor: str | None = None  # name and version, e.g. "QEMU 7.2.19"; also the result's provenance.hypervisor
    read_only_disks: bool = True
    disk_formats: tuple[str, ...] = ("raw",)
    network: bool = False
    max_vcpus: int | None = None
    max_memory_mib: int | None = None
    checks: tuple[Check, ...] = ()

    @classmethod
    def from_checks(cls, driver: str, checks: Iterable[Check], summary: str, *, advisory: Collection[str] = (),
                    explain: Callable[[Check], str] | None = None, **facts: Any) -> Capabilities:
        """A probe's verdict, made from its checks the one way every driver makes it: usable when every check
        passed but the ``advisory`` ones (named: they inform and never decide, e.g. a network only some jobs
        ask for); ``reason`` is then ``summary``, else the first deciding check that failed, as
        ``explain(check)`` words it (default: the check's own detail). ``facts``: the other fields."""
        checks = tuple(checks)
        failed = first_failure(checks, advisory)
        if failed is None:
            reason = summary
        else:
            reason = explain(failed) if explain else failed.detail
        return cls(driver, failed is None, reason, checks=checks, **facts)

    def to_json(self) -> dict[str, Any]:
        data = {k: getattr(self, k) for k in self.__dataclass_fields__}
        data["disk_formats"] = list(self.disk_formats)
        data["checks"] = [vars(c) for c in self.checks]
        return data


def first_failure(checks: Iterable[Check], advisory: Collection[str] = ()) -> Check | None:
    """The check that decides a probe's "no": the first failed one not named ``advisory``; None for "yes"."""
    return next((check for check in checks if not check.ok and check.name not in advisory), None)


@dataclass
class HostContext:
    """What the core lends every driver: where files go, which host boot this is, the built-in guest.
    ``cache_dir`` is this process's own cache, the one it writes; ``shared_cache_dir``, when there is one, the
    administrator's, which it only reads (vjobs/host/roles.py): an account's driver may take what root made
    there (qemu_user's templates) and never writes there."""

    cache_dir: Path
    work_dir: Path
    boot_id: str
    default_boot_image: Callable[[], BootImage]  # builds the built-in image on first use (make-style)
    cache_hold: CacheHold  # the job's hold on cache_dir's entries (vjobs/host/cache.py), released after it
    checked_files: CheckedFiles  # the job's open, checked files (vjobs/images/checked.py), closed after it
    progress: Callable[[str], None] = field(default=lambda message: None)  # a line for a person (the events')
    events: Events = field(default_factory=Events)  # the run's public events (vjobs/events.py): drivers may
                                                    # report their steps (e.g. xen's uploads) through them
    progress_bars: bool = False  # a terminal watches: staging may draw transfer bars on stderr
    shared_cache_dir: Path | None = None  # the administrator's cache, read-only to this process


class VM(abc.ABC):
    def __init__(self, spec: VMSpec):
        self.spec = spec
        self.full_disk: Path | None = None  # with ``Stop.DISK_FULL``: the file of the disk that could not grow

    @abc.abstractmethod
    def start(self) -> None: ...

    @abc.abstractmethod
    def wait_until_stopped(self, deadline: float) -> Stop: ...

    @abc.abstractmethod
    def fetch_disk(self, disk: Disk) -> Path: ...

    @abc.abstractmethod
    def destroy(self) -> None: ...

    def provenance(self) -> dict[str, Any]:
        """What the result should record about how this VM started (``start``: cold, or from a template and
        which); the core merges it into the result's provenance after the boot."""
        return {}

    def agent_started(self) -> bool:
        """Has the guest agent announced itself? Answers at once, never blocks. Default: its marker came
        through the console, where the core waits for it (``ConsoleLog.wait_for``), so the boot ends the moment
        it does; a driver that overrides this is asked again at least every half second while the guest boots."""
        return self.spec.console.saw(AGENT_UP_MARKER)

    def guest_channel(self) -> Channel | None:
        """Once started: the raw channel of the agent's framed records (vjobs/guest/streams.py); None: this
        VM has none, and the payload's output and files come back only with the results."""
        return None

    def save_guest(self, folder: Path, deadline: float) -> dict[str, Any]:
        """Stop the guest and write its memory and device state into ``folder`` by ``deadline``; return its
        identity (what a restore must match). See the module's description."""
        raise CheckpointError(f"the {type(self).__name__} of this driver cannot save a running guest: run the job "
                              "without --checkpoint, or pin a driver that can (qemu_user, kvm, xen)",
                              code="checkpoint_unsupported")

    def resume(self) -> None:
        """Let the guest that ``save_guest`` stopped run on."""
        raise CheckpointError("this driver cannot resume a saved guest", code="checkpoint_unsupported")


class Driver(abc.ABC):
    """Base class of every driver; ``settings`` is the site config's ``[drivers.NAME]`` table."""

    name: str = ""  # the entry-point name; set by vjobs.drivers.registry when it loads the driver

    def __init__(self, settings: Mapping[str, Any], host: HostContext):
        self.settings = dict(settings)
        self.host = host

    @abc.abstractmethod
    def probe(self) -> Capabilities: ...

    @abc.abstractmethod
    def create(self, spec: VMSpec) -> VM: ...

    def restore_problem(self, identity: Mapping[str, Any]) -> str | None:
        """Why a guest saved with ``identity`` (``VM.save_guest``'s) cannot continue on this host, naming what
        differs ("saved with machine pc-q35-7.2, which QEMU 6.2 here does not have"); None when it can.
        Default: this driver restores no saved guest."""
        return f"the {self.name} driver cannot restore a saved guest"

    def collect_garbage(self, is_orphan: Callable[[Mapping[str, str]], bool]) -> list[str]:
        """Remove what this driver made outside the core's work folders for owners that ``is_orphan``
        says are gone; return a line for each thing removed. Drivers that make nothing outside them keep this."""
        return []


def deadline_in(seconds: float) -> float:
    return time.monotonic() + seconds


def check_disk_formats(spec: VMSpec, formats: Collection[str], driver: str) -> None:
    """For ``create``, before it makes anything: a disk in a format the driver cannot attach is refused, never
    handed to a hypervisor to guess at. The core builds disks in the formats the probe named, so this only
    trips on a bug."""
    for disk in spec.disks:
        if disk.format not in formats:
            raise VMError(f"the {disk.role} disk {disk.path} is {disk.format}, which the {driver} driver cannot "
                          f"attach (it takes {', '.join(formats)})", code="disk_format_unsupported")


def check_unchanged(spec: VMSpec) -> None:
    """For a driver, once the hypervisor holds every file of ``spec`` (opened, or copied) and before the guest
    runs: refuses the job (ImageError) when a file whose sum vjobs verified was rewritten since."""
    for file in spec.checked_files():
        file.check_unchanged()


VM_T = TypeVar("VM_T", bound=VM)


@contextlib.contextmanager
def destroyed_on_failure(vm: VM_T) -> Iterator[VM_T]:
    """For ``create``: when attaching raises, what it made so far is released (the core only destroys VMs it
    was handed), and the error that stopped it is the one raised."""
    try:
        yield vm
    except BaseException:
        with contextlib.suppress(Exception):
            vm.destroy()
        raise
