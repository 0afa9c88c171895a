"""qemu-img on an image vjobs did not write (a site's qcow2), run one way for every call, to inspect it
(inspect.py) or to convert it to raw (``disk_for``):

- through the checked descriptor (``/dev/fd/N``, never the path; vjobs/images/checked.py), with the format
  named and the backing file disabled (``"backing": null``): a qcow2 may name any host file as its backing,
  and one rewritten after its check to name one still makes qemu-img read nothing else. A file that changes
  while qemu-img reads it is refused;
- under the site's ``[inspection]`` limits: ``prlimit`` (address space ``memory_mib``, CPU time, few
  descriptors, no core) and one time budget (``budget_s``) for all the calls on one image, which a qcow2 can
  make each slow and ask for many of;
- never as root: as the user QEMU runs as (``vjobs-qemu``) when vjobs is root, else as the account itself
  (``as_unprivileged``, vjobs/host/tools.py). That user opens ``/dev/fd/N`` anew, so the image must be
  readable by it (0644), as it must be for the accounts whose jobs boot it; it writes only a file vjobs lends
  it (``_lent_file``), in a folder of vjobs' own that no path it could open leads to.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import stat
import tempfile
import time
from pathlib import Path
from typing import Iterator

from vjobs.config.site import InspectionLimits
from vjobs.errors import ImageError
from vjobs.host.tools import as_unprivileged, run_tool, unprivileged_user
from vjobs.images.checked import CheckedFile

SECTOR = 512


class Budget:
    """The time left for one image's qemu-img calls (``[inspection] budget_s``)."""

    def __init__(self, limits: InspectionLimits):
        self.limits = limits
        self.deadline = time.monotonic() + limits.budget_s

    def left(self, file: CheckedFile) -> float:
        remaining = self.deadline - time.monotonic()
        if remaining <= 0:
            raise ImageError(f"{file.label}: reading the qcow2 {file.path} took more than {self.limits.budget_s:g} s "
                             "in all (the site's [inspection] budget_s); convert it once to a raw file (qemu-img "
                             "convert -f qcow2 -O raw) or give a squashfs")
        return remaining


def image(fd: int, fmt: str) -> str:
    """How qemu-img is told to open the image behind ``fd``: its format named, a qcow2's backing disabled."""
    node: dict = {"driver": fmt, "file": {"driver": "file", "filename": f"/dev/fd/{fd}"}}
    if fmt == "qcow2":
        node["backing"] = None
    return "json:" + json.dumps(node)


def info(file: CheckedFile, budget: Budget) -> dict:
    """``qemu-img info`` of a qcow2, as JSON."""
    answer = _run(["info", "--output=json", image(file.fd, "qcow2")], file, budget)
    try:
        return json.loads(answer)
    except ValueError as exc:
        raise ImageError(f"{file.label}: qemu-img info gave no JSON for {file.path}") from exc


def read_sectors(file: CheckedFile, first: int, end: int, budget: Budget) -> bytes:
    """The guest's view of a qcow2 from sector ``first`` up to sector ``end``."""
    with tempfile.TemporaryDirectory(prefix=f"vjobs-inspect-{os.getpid()}-") as folder, \
            _lent_file(Path(folder) / "range") as out:  # the folder's name: `vjobs gc` knows it
        # qemu-img dd (7.2) stops at block `count` counted from block 0, not from `skip` as GNU dd does:
        # a block count read short or nothing past the head, and no partition of a qcow2 was found.
        _run(["dd", "-O", "raw", f"bs={SECTOR}", f"skip={first}", f"count={end}", f"if={image(file.fd, 'qcow2')}",
              f"of=/dev/fd/{out}"], file, budget, out)
        return os.pread(out, (end - first) * SECTOR, 0)


def convert_to_raw(file: CheckedFile, target: Path, virtual_size: int, limits: InspectionLimits) -> None:
    """The guest's view of the qcow2 ``file``, as a new raw file ``target`` (sparse), made within one budget of
    its own; ``target`` is left owned by vjobs' user, read-only."""
    with _lent_file(target) as out:
        os.ftruncate(out, virtual_size)  # convert -n writes into a file of the right size, and skips zeros
        _run(["convert", "-n", "-O", "raw", image(file.fd, "qcow2"), f"/dev/fd/{out}"], file, Budget(limits), out)


def _run(arguments: list[str], file: CheckedFile, budget: Budget, *more_fds: int) -> str:
    remaining = budget.left(file)
    limits = ["prlimit", f"--as={budget.limits.memory_mib << 20}", f"--cpu={math.ceil(remaining)}", "--nofile=64",
              "--core=0"]
    try:
        answer = run_tool(["qemu-img", *arguments], f"{file.label}: reading the qcow2 {file.path}",
                          error=ImageError, wrapper=[*limits, *as_unprivileged()], timeout=remaining,
                          pass_fds=(file.fd, *more_fds), install="install qemu-utils and util-linux (prlimit, setpriv)",
                          hint=_hint(file))
    except ImageError:
        budget.left(file)  # a call the budget stopped is refused as the budget's
        raise
    file.refuse_if_changed("while qemu-img read it")
    return answer


def _hint(file: CheckedFile) -> str:
    if os.geteuid() != 0 or file.info.st_mode & stat.S_IROTH:
        return ""
    return (f"qemu-img reads it as the user {unprivileged_user().pw_name}, not as root: make it readable by "
            "others (0644), as the accounts whose jobs boot it need it too")


@contextlib.contextmanager
def _lent_file(path: Path) -> Iterator[int]:
    """A new file at ``path``, in a folder of vjobs' own, open for writing; while the block runs it belongs to
    the unprivileged user, who may open it anew through ``/dev/fd/N`` (and through nothing else: the folder
    is not theirs), then to vjobs' user again, read-only. Removed if the block fails."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        if os.geteuid() == 0:
            user = unprivileged_user()
            os.fchown(fd, user.pw_uid, user.pw_gid)
        yield fd
        os.fchown(fd, os.geteuid(), os.getegid())
        os.fchmod(fd, 0o444)
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    finally:
        os.close(fd)
