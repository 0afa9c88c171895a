"""Runs a started stand-in VM as a real Xen PV domain, with ``xl`` (libxl's command line) in the dom0 the
stand-in runs in (vjobs.testing.xen_node). The same duties as runner.py's QEMU runner, so calls.py does not
know which it has: ``start``, ``suspend``, ``plug``, ``hard_stop``, ``type_on_console``, ``console_log``.

What Xen itself does here, and the stand-in only asks for:
- the domain is built by libxl from the VM's PV kernel, ramdisk and args (``xl create``); its disks are the
  VDIs' files, attached by libxl's block script through loop devices to blkback, read-only ones read-only;
  the guest sees them as ``xvd*`` through xen-blkfront, and its console is ``hvc0``, which xenconsoled logs;
- a power-off, a reboot or a crash is the domain's own shutdown, which Xen reports (``xl list``'s state);
- ``VM.suspend`` is ``xl save`` (Xen's save image), ``VM.resume`` is ``xl restore`` with the VM's current
  disks; ``VBD.plug`` of a running VM is ``xl block-attach`` (blkback's hot-plug).

Stdlib only: it runs in dom0's python3, beside nothing of vjobs' dependencies but XenAPI."""

from __future__ import annotations

import contextlib
import os
import subprocess
import termios
import threading
import time
from pathlib import Path
from typing import Callable

from vjobs.drivers.contract import Disk

XL_TIMEOUT_S = 300.0  # `xl create` of a guest with three disks: 6.5 s on an idle machine, minutes when busy
POLL_S = 2.0  # how often the watcher looks at the domain between xenstore's @releaseDomain events
CONSOLE_LOGS = Path("/var/log/xen/console")  # xenconsoled --log=guest --log-dir=...
CONSOLE_QUIET_S, CONSOLE_DRAIN_S = 0.3, 5.0  # a stopped guest's log, still this long: xenconsoled is done
SAVE_IMAGE = "xl-save"  # in a suspended guest's folder: what `xl save` wrote


class XlRunner:
    """A Xen PV domain for one start (or resume) of a stand-in VM; ``on_halted(reason)`` is called from the
    watcher's thread when the domain is gone: ``halted`` (it powered off or rebooted), ``crashed``, or
    ``hard_shutdown`` (not after ``suspend``). ``restore_from``: a folder ``suspend`` wrote."""

    _generations = 0  # domain names are unique on the host, also across resumes of one VM
    _names_lock = threading.Lock()

    def __init__(self, name: str, vcpus: int, memory_mib: int, kernel: Path, ramdisk: Path, args: str,
                 disks: list[Disk], workdir: Path, on_halted: Callable[[str], None], restore_from: Path | None = None):
        workdir.mkdir(parents=True, exist_ok=True)
        with XlRunner._names_lock:
            XlRunner._generations += 1
            self.domain = f"vjobs-{workdir.name}-{XlRunner._generations}"
        self.workdir, self.on_halted, self.restore_from = workdir, on_halted, restore_from
        self.config = workdir / f"{self.domain}.cfg"
        self.disks = list(disks)
        self.config.write_text(_config(self.domain, vcpus, memory_mib, kernel, ramdisk, args, self.disks))
        self.ending = threading.Lock()  # a hard stop, a suspend and the watcher's report: one of them ends it
        self.ended = False
        self.watcher: threading.Thread | None = None

    @property
    def console_log(self) -> Path:
        return CONSOLE_LOGS / f"guest-{self.domain}.log"

    @staticmethod
    def host_facts() -> dict[str, str]:
        """What ``host.software_version`` says of this host: Xen's own version (``xl info``)."""
        info = dict(line.split(":", 1) for line in _xl("info").splitlines() if ":" in line)
        info = {key.strip(): value.strip() for key, value in info.items()}
        version = f"{info.get('xen_major', '?')}.{info.get('xen_minor', '?')}{info.get('xen_extra', '')}"
        return {"xen": version, "product_brand": "XAPI stand-in on a real Xen (vjobs.testing.xen_node)"}

    @staticmethod
    def domains() -> list[str]:
        """The names of the domains Xen runs, dom0's aside (``xl list``)."""
        return [line.split()[0] for line in _xl("list").splitlines()[1:] if line.split()[1:2] != ["0"]]

    def start(self) -> None:
        """Build the domain (or restore it) and return once it runs; raises with libxl's message if not."""
        if self.restore_from is not None:
            _xl("restore", "-e", str(self.config), str(self.restore_from / SAVE_IMAGE))
        else:
            _xl("create", "-e", str(self.config))  # -e: the stand-in's watcher, not xl, handles its shutdown
        self.watcher = threading.Thread(target=self._watch, name=self.domain, daemon=True)
        self.watcher.start()

    def type_on_console(self, data: bytes) -> None:
        """Input for the guest's hvc0, through the pty xenconsoled keeps for it (as ``xl console`` does)."""
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            tty = _xenstore_read(f"/local/domain/{self._domid()}/console/tty")
            fd = os.open(tty, os.O_RDWR | os.O_NOCTTY | os.O_CLOEXEC)
            try:
                mode = termios.tcgetattr(fd)
                mode[1] &= ~termios.OPOST  # the bytes as they are, no \r added to a \n
                mode[3] &= ~(termios.ECHO | termios.ICANON)
                termios.tcsetattr(fd, termios.TCSANOW, mode)
                os.write(fd, data)
            finally:
                os.close(fd)

    def suspend(self, folder: Path) -> None:
        """``xl save`` the domain into ``folder`` (Xen's save image; the domain is gone after it). When the
        save fails the domain runs on (xl resumes it) and the failure is raised."""
        with self.ending:
            if self.ended:
                raise RuntimeError("the domain is gone")
            _xl("save", self.domain, str(folder / SAVE_IMAGE))
            self.ended = True

    def plug(self, disk: Disk) -> None:
        """Hot-plug ``disk`` into the running domain (blkback, as its next ``xvd*``); raises libxl's message."""
        _xl("block-attach", self.domain, _disk(disk))
        self.disks.append(disk)

    def hard_stop(self) -> None:
        """Destroy the domain and wait until the watcher has reported it."""
        with self.ending:
            if not self.ended:
                with contextlib.suppress(RuntimeError):
                    _xl("destroy", self.domain)
                self.ended = True
                self.on_halted("hard_shutdown")
        if self.watcher is not None and self.watcher is not threading.current_thread():
            self.watcher.join(30)

    def _watch(self) -> None:
        """Wait for the domain's shutdown (xenstore's @releaseDomain fires on any domain's shutdown or death;
        a poll covers a missed one), then destroy what is left of it and report why it ended."""
        events = subprocess.Popen(["xenstore-watch", "@releaseDomain"], stdout=subprocess.PIPE,
                                  stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
        fired = threading.Event()
        threading.Thread(target=_each_line, args=(events.stdout, fired), daemon=True).start()
        try:
            while True:
                fired.wait(POLL_S)
                fired.clear()
                with self.ending:
                    if self.ended:
                        return
                    state = self._state()
                    if state is None or state in ("s", "c"):
                        self._console_drained()
                        with contextlib.suppress(RuntimeError):
                            _xl("destroy", self.domain)
                        self.ended = True
                        self.on_halted("crashed" if state == "c" else "halted")
                        return
        finally:
            events.kill()
            events.wait()

    def _console_drained(self) -> None:
        """Wait until xenconsoled has logged the last of the stopped guest's console (its log no longer
        grows): the driver reads the guest's last records from it once the VM is Halted."""
        deadline, last, still_since = time.monotonic() + CONSOLE_DRAIN_S, -1, time.monotonic()
        while time.monotonic() < deadline:
            size = self.console_log.stat().st_size if self.console_log.exists() else 0
            if size != last:
                last, still_since = size, time.monotonic()
            elif time.monotonic() - still_since >= CONSOLE_QUIET_S:
                return
            time.sleep(0.05)

    def _state(self) -> str | None:
        """The domain's state as ``xl list`` shows it: ``r`` running, ``b`` blocked, ``p`` paused, ``s`` shut
        down, ``c`` crashed, ``d`` dying; None when there is no such domain."""
        try:
            lines = _xl("list", self.domain).splitlines()
        except RuntimeError:
            return None
        flags = lines[-1].split()[-2]  # Name ID Mem VCPUs State Time(s)
        for letter in "csdpbr":
            if letter in flags:
                return letter
        return "r"

    def _domid(self) -> int:
        return int(_xl("domid", self.domain).strip())


def _config(domain: str, vcpus: int, memory_mib: int, kernel: Path, ramdisk: Path, args: str,
            disks: list[Disk]) -> str:
    """An xl domain configuration of a PV guest. Every shutdown is left for the watcher (``preserve``), which
    tells a crash from a power-off by the state Xen reports."""
    quoted = ", ".join(_quote(_disk(disk)) for disk in disks)
    return "\n".join([f'name = {_quote(domain)}', 'type = "pv"', f"vcpus = {vcpus}", f"memory = {memory_mib}",
                      f"kernel = {_quote(str(kernel))}", f"ramdisk = {_quote(str(ramdisk))}",
                      f"extra = {_quote(args)}", f"disk = [{quoted}]", "vif = []",
                      'on_poweroff = "preserve"', 'on_reboot = "preserve"', 'on_crash = "preserve"', ""])


def _disk(disk: Disk) -> str:
    """libxl's disk specification: raw file, the guest's device name, read-only where XAPI said RO."""
    return f"format=raw,vdev={disk.role},access={'ro' if disk.readonly else 'rw'},target={disk.path}"


def _quote(text: str) -> str:
    if '"' in text or "\\" in text or "\n" in text:
        raise ValueError(f"cannot put {text!r} into an xl configuration")
    return f'"{text}"'


def _xl(*arguments: str) -> str:
    """Run ``xl`` and return what it printed; RuntimeError with its message when it fails."""
    try:
        done = subprocess.run(["xl", *arguments], capture_output=True, text=True, timeout=XL_TIMEOUT_S,
                              stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired as error:
        raise RuntimeError(f"xl {arguments[0]} did not finish within {XL_TIMEOUT_S:g} s") from error
    if done.returncode:
        raise RuntimeError(f"xl {' '.join(arguments[:2])}: {(done.stderr or done.stdout).strip()[-800:]}")
    return done.stdout


def _xenstore_read(key: str) -> str:
    return subprocess.run(["xenstore-read", key], capture_output=True, text=True, check=True,
                          timeout=30).stdout.strip()


def _each_line(stream, fired: threading.Event) -> None:
    for _line in stream:
        fired.set()
    fired.set()
