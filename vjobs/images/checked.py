"""The files a VM gets, each opened once and checked through that open file.

A catalogue's kernel, initramfs and base image, the built-in images, a job's release and bind images, a
template's saved guest: vjobs opens each once (read-only, never through a symbolic link, a FIFO or a device),
reads, hashes and inspects it only through that descriptor, and the driver gives the hypervisor that same
descriptor, or a copy made from it (vjobs/drivers/contract.py). The path names the file in messages and
nowhere else, so another file put at that path after the check (its folder replaced by another, say)
changes nothing for the job that opened it.

A change of the file itself is another matter: a rewrite in place changes what every descriptor of it reads.
Its stamp says so (device, inode, size, mtime and ctime, ``file_stamp``: no one can set a ctime, which every
write, ``utime``, rename and unlink moves): a file whose sum was verified (``CheckedFile.verify``) is checked
again once the hypervisor holds it and before the guest runs (``check_unchanged``, which the drivers call),
and one changed since refuses the job; a file renamed over is refused too, since its ctime cannot tell an
unlink from a rewrite. What a rewrite after that changes, the guest reads as a change of its disk: the
hypervisor opened the file as it was checked (a qcow2 with its backing disabled), and the next job's check
refuses the file.

``CheckedFiles`` is one job's (or one command's) set of them: what it opened is closed when it ends.
"""

from __future__ import annotations

import errno
import json
import os
import stat
from pathlib import Path

from vjobs.config.site import InspectionLimits
from vjobs.errors import ImageError
from vjobs.images.store import sha256_of


def file_stamp(info: os.stat_result) -> str:
    """What a file is, as the kernel sees it, for remembering what was learnt from its bytes: its device, inode,
    size, mtime and ctime (see ``ChecksumCache``)."""
    return f"{info.st_dev}:{info.st_ino}:{info.st_size}:{info.st_mtime_ns}:{info.st_ctime_ns}"


class CheckedFile:
    """One file a VM gets, opened once: ``fd`` (read-only, close-on-exec) is what vjobs reads and what the
    hypervisor gets; ``path`` and ``label`` (the site config's key, e.g. ``images.el9.rootfs``) are for
    messages. Made by ``CheckedFiles.open``, or ``CheckedFile.open`` for a file of one's own to close."""

    def __init__(self, fd: int, path: Path, label: str):
        self.fd, self.path, self.label = fd, Path(path), label
        self.info = os.fstat(fd)  # as it was opened
        self.verified = False  # its sha256 was checked against a sum vjobs was given: check_unchanged applies
        self._sha256: str | None = None

    @classmethod
    def open(cls, path: Path, label: str) -> CheckedFile:
        """``path`` opened read-only, refused with a reason unless it is a regular file that may be read."""
        path = Path(path)
        try:
            # O_NONBLOCK: opening a FIFO for reading would wait for a writer for ever; it is refused below.
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
        except FileNotFoundError as exc:
            raise ImageError(f"{label}: {path} does not exist; fix the path in the site config") from exc
        except PermissionError as exc:
            raise ImageError(f"{label}: {path} is not readable by uid {os.getuid()}; make it readable (0644) "
                             "for the user vjobs runs as") from exc
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise ImageError(f"{label}: {path} is a symbolic link, which vjobs does not follow; name the file "
                                 f"itself ({os.path.realpath(path)})") from exc
            raise ImageError(f"{label}: cannot read {path}: {exc.strerror}") from exc
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise ImageError(f"{label}: {path} is not a regular file; give the path of an image file")
            os.set_blocking(fd, True)
            return cls(fd, path, label)
        except BaseException:
            os.close(fd)
            raise

    def __enter__(self) -> CheckedFile:
        return self

    def __exit__(self, *_exc) -> None:
        self.close()

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    @property
    def size(self) -> int:
        return self.info.st_size

    @property
    def stamp(self) -> str:
        return file_stamp(self.info)

    def read(self, offset: int, length: int) -> bytes:
        """Up to ``length`` bytes from ``offset`` (fewer at the end of the file), leaving the file's offset alone:
        a hypervisor may share it."""
        parts, end = [], offset + length
        while offset < end and (block := os.pread(self.fd, end - offset, offset)):
            parts.append(block)
            offset += len(block)
        return b"".join(parts)

    def sha256(self) -> str:
        """The sha256 of its content, read through the descriptor once (or as ``verify`` found it)."""
        if self._sha256 is None:
            self._sha256 = sha256_of(self.fd)
            self.refuse_if_changed("while vjobs hashed it")
        return self._sha256

    def verify(self, expected: str, checksums: Path) -> None:
        """Refuse the file unless its sha256 is ``expected``: hashed through the descriptor, or found in
        ``checksums`` (a ``ChecksumCache``) for the file as it was opened. From then on ``check_unchanged``
        refuses it if it is rewritten."""
        remembered = ChecksumCache(checksums)
        self._sha256 = self._sha256 or remembered.known_sum(self)
        actual = self.sha256()
        if actual != expected:
            raise ImageError(f"{self.label}: {self.path} has sha256 {actual}, the catalogue says {expected}; "
                             "the file changed or the catalogue is out of date: ask the site admins")
        remembered.remember(self, actual)
        self.verified = True

    def check_unchanged(self) -> None:
        """For a verified file: refuse it (ImageError) if it was written or its times set since it was opened."""
        if self.verified:
            self.refuse_if_changed("after vjobs checked it and before the VM started")

    def refuse_if_changed(self, when: str) -> None:
        """Raise ImageError if the file was written or its times set since it was opened; ``when`` says
        during what ("while vjobs hashed it")."""
        if file_stamp(os.fstat(self.fd)) != self.stamp:
            raise ImageError(f"{self.label}: {self.path} was changed {when}; the job is refused rather than "
                             "given a file nobody checked: run it again once the file is no longer written")

    def copy_to(self, target: int) -> None:
        """Its bytes, as checked, into the open file ``target`` from its start (a sealed memory file, a private
        copy for a hypervisor that opens files by path); refused if the file shrank since it was opened."""
        copied = 0
        while copied < self.size:
            sent = os.sendfile(target, self.fd, copied, self.size - copied)
            if sent == 0:
                self.refuse_if_changed("while vjobs copied it")
                raise ImageError(f"{self.label}: {self.path} ended after {copied} of its {self.size} bytes")
            copied += sent

    def private_copy(self, target: Path) -> Path:
        """A copy made from the descriptor, as a new file ``target`` that only this user may read, for a
        hypervisor that takes a path (libvirt's kernel and initramfs, XAPI's): put it in a folder only the job
        and the hypervisor can reach."""
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            self.copy_to(fd)
        finally:
            os.close(fd)
        return target


class CheckedFiles:
    """The files one job (or one command) opened, closed together when it ends (``close``, or ``with``).
    ``cache_dir``: where sums are remembered (checksums.json); ``limits``: what inspecting a file may cost (the
    site's ``[inspection]``)."""

    def __init__(self, cache_dir: Path, limits: InspectionLimits | None = None):
        self.cache_dir = Path(cache_dir)
        self.limits = limits or InspectionLimits()
        self._opened: list[CheckedFile] = []

    def __enter__(self) -> CheckedFiles:
        return self

    def __exit__(self, *_exc) -> None:
        self.close()

    def open(self, path: Path, label: str) -> CheckedFile:
        opened = CheckedFile.open(path, label)
        self._opened.append(opened)
        return opened

    def verified(self, path: Path, label: str, sha256: str) -> CheckedFile:
        """``path`` opened, and refused unless its sha256 is ``sha256`` (hashed once per stamp)."""
        opened = self.open(path, label)
        opened.verify(sha256, self.cache_dir / "checksums.json")
        return opened

    def close(self) -> None:
        for opened in self._opened:
            opened.close()
        self._opened = []


class ChecksumCache:
    """Remembers a file's sha256 by its stamp (device, inode, size, mtime, ctime) so a large file is hashed
    once, not per job. The change time is what makes the stamp trustworthy: anyone who may write the file can
    put its mtime back after rewriting it (``touch -d``), but no one can set its ctime."""

    def __init__(self, path: Path):
        self.path = path
        try:
            self.known = json.loads(path.read_text())
        except (OSError, ValueError):
            self.known = {}

    def known_sum(self, file: CheckedFile) -> str | None:
        return self.known.get(str(file.path), {}).get(file.stamp)

    def remember(self, file: CheckedFile, sha256: str) -> None:
        self.known[str(file.path)] = {file.stamp: sha256}
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            temporary = self.path.with_suffix(f".{os.getpid()}.tmp")
            temporary.write_text(json.dumps(self.known))
            os.replace(temporary, self.path)
        except OSError:
            pass  # only a cache: the next job hashes again
