"""The real XRootD daemon (Debian's ``xrootd-server``), run inside a ``LoopbackNetns`` because it always listens
on every address. No authentication; adler32 checksums on; optionally HTTP/WebDAV on a second port."""

from __future__ import annotations

import grp
import os
import pwd
import shutil
import stat
import subprocess
import tempfile
import time
from pathlib import Path

from vjobs.testing.servers.netns import LoopbackNetns
from vjobs.testing.servers.processes import end_processes

XROOTD_USER = "xrootd"
NAME = "vjobs"  # xrootd -n NAME keeps its log, pid and admin files under <folder>/NAME/
START_TIMEOUT_S = 10


class XRootDServer:
    """``xrootd`` serving ``root`` on ``port`` (and XrdHttp on ``http_port``) inside ``netns``. xrootd refuses
    to run as root, so it runs as the ``xrootd`` user: ``root`` and everything in it is handed to that user at
    start, and every folder above ``root`` must let it through (pytest's ``tmp_path`` does not: its base is
    0700; use ``tempfile.mkdtemp()``). Its config, log and pid file live in a private folder that ``close()``
    removes. It runs in the foreground as this process's child rather than with ``-b``: a daemonised xrootd is
    reparented to PID 1, which on these machines never reaps it, so every start left two zombies behind."""

    def __init__(self, netns: LoopbackNetns, root: Path, *, port: int = 1094, http_port: int | None = 8094):
        self.netns = netns
        self.data = Path(root).resolve()
        self.port, self.http_port = port, http_port
        self._process: subprocess.Popen | None = None
        self._private: Path | None = None

    @property
    def log(self) -> Path:
        return self._folder("log") / NAME / "xrootd.log"

    def url_in_netns(self, path: str) -> str:
        """The URL of ``path`` (relative to the data root) for clients inside the namespace."""
        return f"root://127.0.0.1:{self.port}//{str(path).lstrip('/')}"

    def start(self) -> XRootDServer:
        if self._process is not None:
            raise RuntimeError(f"xrootd already runs (pid {self.pid})")
        for port in self._ports():
            if self._answers(port):  # xrootd binds with SO_REUSEPORT: a second one would share it silently
                raise RuntimeError(f"port {port} is already taken in network namespace {self.netns.name}")
        uid, gid = xrootd_user()
        _check_reachable(self.data, uid, gid)
        _chown_tree(self.data, uid, gid)
        if self._private is None:
            self._private = self._make_private_folder(uid, gid)
        with open(self._folder("stderr"), "ab") as stderr:
            self._process = subprocess.Popen(self.netns.command(self._argv()), stdin=subprocess.DEVNULL,
                                             stdout=stderr, stderr=stderr)
        try:
            for port in self._ports():
                self._wait_for_port(port)
        except BaseException:
            self.stop()
            raise
        return self

    @property
    def pid(self) -> int | None:
        """xrootd's own PID (nsenter execs it): the one its pid file holds."""
        return self._process.pid if self._process else None

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def stop(self) -> None:
        """Ends the daemon by its PID (SIGTERM, then SIGKILL after 10 s) and reaps it."""
        if self._process is not None:
            end_processes([self._process])
            self._process = None

    def restart(self) -> None:
        """Stop and start again: same port, same data."""
        self.stop()
        self.start()

    def close(self) -> None:
        self.stop()
        if self._private is not None:
            shutil.rmtree(self._private, ignore_errors=True)
            self._private = None

    def __enter__(self) -> XRootDServer:
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.close()

    def _folder(self, name: str) -> Path:
        if self._private is None:
            raise RuntimeError("the XRootD server was never started")
        return self._private / name

    def _make_private_folder(self, uid: int, gid: int) -> Path:
        private = Path(tempfile.mkdtemp(prefix="vjobs-xrootd-"))
        _check_reachable(private, uid, gid)
        for name in ("admin", "run", "log"):
            (private / name).mkdir()
        (private / "xrootd.cfg").write_text(self._config(private))
        _chown_tree(private, uid, gid)
        return private

    def _config(self, private: Path) -> str:
        lines = ["all.export /", f"oss.localroot {self.data}", f"xrd.port {self.port}",
                 f"all.adminpath {private / 'admin'}", f"all.pidpath {private / 'run'}",
                 "xrootd.chksum adler32"]  # without it every checksum query fails with error 3013
        if self.http_port:
            lines.append(f"xrd.protocol XrdHttp:{self.http_port} libXrdHttp.so")
        return "\n".join(lines) + "\n"

    def _argv(self) -> list[str]:
        return ["xrootd", "-R", XROOTD_USER, "-c", str(self._folder("xrootd.cfg")),
                "-l", str(self._folder("log") / "xrootd.log"), "-n", NAME]

    def _wait_for_port(self, port: int) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self._process.poll() is not None:  # exits 1, often silently, when a folder is not xrootd's
                raise RuntimeError(f"xrootd exited {self._process.returncode} during start\n{self._log_tail()}")
            if self._answers(port):
                return
            time.sleep(0.02)
        raise RuntimeError(f"xrootd did not listen on port {port} in {START_TIMEOUT_S} s\n{self._log_tail()}")

    def _ports(self) -> list[int]:
        return [port for port in (self.port, self.http_port) if port]

    def _answers(self, port: int) -> bool:
        with self.netns.socket() as probe:
            return probe.connect_ex(("127.0.0.1", port)) == 0

    def _log_tail(self, lines: int = 30) -> str:
        tails = []
        for path in (self._folder("stderr"), self.log):
            text = path.read_text(errors="replace") if path.exists() else "(none)"
            tails.append(f"last lines of {path}:\n" + "\n".join(text.splitlines()[-lines:]))
        return "\n".join(tails)


def xrootd_user() -> tuple[int, int]:
    """The uid and gid xrootd runs as. Debian's xrootd-server makes the user on install; on a machine where it
    is missing it is made here the same way: a system user with no login."""
    try:
        entry = pwd.getpwnam(XROOTD_USER)
    except KeyError:
        try:
            grp.getgrnam(XROOTD_USER)
            group = ["--gid", XROOTD_USER]
        except KeyError:
            group = ["--user-group"]
        subprocess.run(["useradd", "--system", *group, "--no-create-home", "--home-dir", "/var/spool/xrootd",
                        "--shell", "/bin/false", XROOTD_USER], check=True, capture_output=True, timeout=30)
        entry = pwd.getpwnam(XROOTD_USER)
    return entry.pw_uid, entry.pw_gid


def _check_reachable(folder: Path, uid: int, gid: int) -> None:
    """Raises unless every folder above ``folder`` lets the xrootd user through: otherwise it fails later with
    a bare 'permission denied' in its log, or no message at all."""
    for parent in folder.resolve().parents:
        info = parent.stat()
        if not (info.st_mode & stat.S_IXOTH or (info.st_uid == uid and info.st_mode & stat.S_IXUSR)
                or (info.st_gid == gid and info.st_mode & stat.S_IXGRP)):
            raise RuntimeError(f"the {XROOTD_USER} user cannot reach {folder}: {parent} is mode "
                               f"{stat.filemode(info.st_mode)}; use a folder under /tmp (tempfile.mkdtemp())")


def _chown_tree(top: Path, uid: int, gid: int) -> None:
    os.chown(top, uid, gid)
    for folder, subfolders, files in os.walk(top):
        for name in subfolders + files:
            os.chown(os.path.join(folder, name), uid, gid, follow_symlinks=False)
