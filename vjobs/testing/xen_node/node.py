"""A running Xen node: QEMU TCG booting Xen 4.17 with the Debian PV dom0 of image.py, in which the XAPI
stand-in runs with ``--runner xl`` (real PV domains, made with xl) and listens on a loopback port of the host.

    with XenNode(files) as node:
        write_site(path, {"driver": "xen", "drivers": {"xen": node.site_settings()}})

What dom0 sees of the host, read-only, through 9p: ``/tmp`` and ``/var/tmp`` at the same paths (the xen driver
hands XAPI its guests' kernel and initramfs as paths in vjobs' work folder, and the stand-in reads them in
dom0: the node models a site whose dom0 sees vjobs' work folders where vjobs does), and ``/opt/vjobs-code``, a
copy of this vjobs and of the XenAPI module made per boot, with the boot's password. Its only network is
QEMU's restricted user-mode one: dom0 reaches nothing, and the host reaches the stand-in through one
forwarded loopback port. Its SR is a fresh sparse ext4 disk per boot, so nothing outlives the node but the
cached image, which QEMU opens with ``snapshot=on`` and never writes.
"""

from __future__ import annotations

import contextlib
import secrets
import shutil
import socket
import subprocess
import tempfile
import time
import xmlrpc.client
from pathlib import Path

import XenAPI

import vjobs
from vjobs.host.tools import run_tool
from vjobs.testing.servers.processes import die_with_parent, end_processes
from vjobs.testing.sites import XAPI_USERNAME, write_password, xen_settings
from vjobs.testing.xen_node.image import NodeFiles

# bootscrub=0: Xen would otherwise write every page of the VM's memory while idle, which under TCG costs CPU
# and makes QEMU's RSS the whole -m (the SR's guests get fresh pages from the host anyway).
XEN_ARGS = "dom0_mem=512M,max:512M dom0_max_vcpus=2 console=com1 com1=115200,8n1 noreboot bootscrub=0"
DOM0_KERNEL_ARGS = "console=hvc0 earlyprintk=xen"
STANDIN_PORT = 8080  # in dom0 (dom0-init.sh)
DOM0_ADDRESS = "10.0.2.15"  # QEMU user-mode networking's first guest address
SR_SIZE_GIB = 16  # sparse: only what the guests' VDIs write takes room (the stand-in is told 14000 MiB)
# The shares, by their 9p tags (dom0-init.sh mounts them): the host's folders dom0 sees at the same paths.
SAME_PATH_SHARES = {"tmp": "/tmp", "vartmp": "/var/tmp"}
BOOT_TIMEOUT_S = 600.0  # CI machines are slow, and TCG shares their cores with other tests' guests
POLL_S = 2.0
LOG_LINES = 40  # of the serial console, in a failure's message


class NodeFailed(RuntimeError):
    """The node did not come up (QEMU exited, or the deadline passed); says the console's last lines."""


class XenNode:
    """One boot of the node made of ``files`` (image.build). A context manager: ``start`` on entry (returns
    once the stand-in in dom0 accepts a login), ``stop`` on exit. QEMU dies with the thread that started it."""

    def __init__(self, files: NodeFiles, *, memory_mib: int = 3072, boot_timeout_s: float = BOOT_TIMEOUT_S,
                 run_parent: Path | None = None):
        self.files, self.memory_mib, self.boot_timeout_s = files, memory_mib, boot_timeout_s
        self.run_parent = run_parent
        self.run_dir: Path | None = None
        self.process: subprocess.Popen | None = None
        self.port = 0
        self.boot_seconds = 0.0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def password_file(self) -> Path:
        return self.run_dir / "xapi-password"

    @property
    def console_log(self) -> Path:
        return self.run_dir / "console.log"

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    def site_settings(self) -> dict:
        """The site's ``[drivers.xen]`` table for this node (``require_dom0 = false``: vjobs runs on the host)."""
        return xen_settings(self.url, self.password_file)

    def start(self) -> XenNode:
        started = time.monotonic()
        self.run_dir = Path(tempfile.mkdtemp(prefix="vjobs-xen-node-", dir=self.run_parent))
        try:
            password = secrets.token_urlsafe(24)
            write_password(self.password_file, password)
            code = self._code_share(password)
            sr_disk = self._sr_disk()
            self.port = _free_loopback_port()
            self.console_log.touch()
            with open(self.run_dir / "qemu.log", "wb") as qemu_log:
                self.process = subprocess.Popen(self._qemu_command(code, sr_disk), stdin=subprocess.DEVNULL,
                                                stdout=qemu_log, stderr=subprocess.STDOUT, cwd=self.run_dir,
                                                preexec_fn=die_with_parent)
            self._wait_ready(password, started + self.boot_timeout_s)
        except BaseException:
            self.stop()
            raise
        self.boot_seconds = round(time.monotonic() - started, 1)
        return self

    def stop(self) -> None:
        """End QEMU by its PID (SIGTERM, SIGKILL after a few seconds: dom0 is asked nothing, its state is
        thrown away) and remove the run folder. Safe to call twice."""
        if self.process is not None:
            end_processes([self.process], grace_s=5)
            self.process = None
        if self.run_dir is not None:
            shutil.rmtree(self.run_dir, ignore_errors=True)
            self.run_dir = None

    def __enter__(self) -> XenNode:
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()

    def console_tail(self, lines: int = LOG_LINES) -> str:
        with contextlib.suppress(OSError):
            said = [line for line in self.console_log.read_text(errors="replace").splitlines() if line.strip()]
            return "\n".join(said[-lines:])  # the serial console ends its lines with \r\r\n: no blank ones
        return ""

    # --- the boot's files --------------------------------------------------------------------------------

    def _code_share(self, password: str) -> Path:
        """What dom0 runs: this vjobs and the XenAPI module (the stand-in's one import from outside the
        standard library and vjobs), without bytecode (dom0's Python is its own), and the password."""
        code = self.run_dir / "code"
        ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
        shutil.copytree(Path(vjobs.__file__).parent, code / "vjobs", ignore=ignore)
        shutil.copytree(Path(XenAPI.__file__).parent, code / "XenAPI", ignore=ignore)
        write_password(code / "xapi-password", password)
        return code

    def _sr_disk(self) -> Path:
        disk = self.run_dir / "sr.img"
        with open(disk, "wb") as handle:
            handle.truncate(SR_SIZE_GIB << 30)
        run_tool(["mke2fs", "-q", "-t", "ext4", "-L", "xapi-sr", "-F", disk], "making the Xen node's SR disk",
                 where=self.run_dir)
        return disk

    def _qemu_command(self, code: Path, sr_disk: Path) -> list[str]:
        files = self.files
        shares = {**SAME_PATH_SHARES, "code": str(code)}
        return [
            "qemu-system-x86_64", "-accel", "tcg,tb-size=256", "-cpu", "qemu64",  # -cpu max: SMAP crashes dom0
            "-m", str(self.memory_mib), "-smp", "2", "-no-reboot", "-nographic", "-monitor", "none",
            "-serial", f"file:{self.console_log}",
            "-kernel", files.hypervisor, "-append", XEN_ARGS,
            "-initrd", f"{files.kernel} {DOM0_KERNEL_ARGS},{files.initramfs}",  # multiboot modules
            "-drive", f"file={files.root},if=virtio,format=raw,snapshot=on",
            "-drive", f"file={sr_disk},if=virtio,format=raw",
            *(option for tag, path in shares.items()
              for option in ("-virtfs", f"local,path={path},mount_tag={tag},security_model=none,readonly=on,"
                                        "multidevs=remap")),
            "-netdev", f"user,id=n0,restrict=on,hostfwd=tcp:127.0.0.1:{self.port}-{DOM0_ADDRESS}:{STANDIN_PORT}",
            "-device", "virtio-net-pci,netdev=n0",
        ]

    # --- readiness -----------------------------------------------------------------------------------------

    def _wait_ready(self, password: str, deadline: float) -> None:
        """Until the stand-in in dom0 answers a login with Success; NodeFailed when QEMU exits first or the
        deadline passes."""
        proxy = xmlrpc.client.ServerProxy(self.url, transport=_ShortTransport(), allow_none=True)
        while True:
            if self.process.poll() is not None:
                raise NodeFailed(f"the Xen node's QEMU exited with status {self.process.returncode} before the "
                                 f"XAPI stand-in in dom0 answered; {self._said()}")
            with contextlib.suppress(OSError, xmlrpc.client.Error, ValueError):
                answer = proxy.session.login_with_password(XAPI_USERNAME, password, "1.0", "vjobs")
                if answer.get("Status") == "Success":
                    with contextlib.suppress(OSError, xmlrpc.client.Error):
                        proxy.session.logout(answer["Value"])
                    return
            if time.monotonic() > deadline:
                raise NodeFailed(f"the Xen node was not ready within {self.boot_timeout_s:g} s; {self._said()}")
            time.sleep(POLL_S)

    def _said(self) -> str:
        qemu = (self.run_dir / "qemu.log").read_text(errors="replace").strip()[-2000:]
        return f"QEMU said: {qemu or 'nothing'}\nits serial console's last lines:\n{self.console_tail()}"


class _ShortTransport(xmlrpc.client.Transport):
    """A readiness probe must not hang: QEMU accepts the forwarded connection before dom0 listens."""

    def make_connection(self, host):
        connection = super().make_connection(host)
        connection.timeout = 10
        return connection


def _free_loopback_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]
