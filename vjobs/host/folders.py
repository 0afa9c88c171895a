"""The folders an account's vjobs writes a job's files into, made so that no other account on the node reaches them.

Many accounts run vjobs side by side on one node (issue 18), and none trusts the others. A job's files lie in
two places, and both are checked before anything of the job is written there:

- the **work folder** (``work_dir``; by default ``/var/tmp/vjobs-UID``): the job folders, with the disks, the
  console logs and the results on their way out. ``private_folder`` makes it ``0700``. One that is already
  there must be a real folder (not a link), the account's own, and writable by nobody else; otherwise the job
  is refused (``work_dir_unusable``) and nothing is written into it: another account may have made
  ``/var/tmp/vjobs-<this uid>`` before this account's first job, to read what it puts there. A folder of the
  account's own with a wider mode (made by an earlier vjobs) is narrowed to ``0700``.
- the **output folder**: ``output_folder`` makes it ``0700`` when it is missing. One that exists keeps its
  mode (the caller chose it), but must be the account's own and writable by nobody else
  (``outdir_unusable``).

For both, every folder on the way must be one that only root, a system account (a batch system's, say) or the
account itself may change, or a sticky one such as ``/tmp``; links on the way must belong to root or the
account. Whoever may rename the entries of a folder on the way could swap the folder vjobs checked for one
of their own between the check and the writes.

A group counts as nobody else when it is the owner's private group (Debian's and EL's user private groups):
umask 002 is the norm there. What vjobs writes into these folders is never writable by another account,
whatever the umask: files are created at most ``0644``, folders at most ``0755``.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import grp
import os
import pwd
import secrets
import stat
from pathlib import Path

from vjobs.errors import SetupError

PRIVATE_MODE = 0o700
FILE_MODE = 0o644  # the most vjobs gives a file it writes for the account: never writable by others
FOLDER_MODE = 0o755
LOGIN_DEFS = Path("/etc/login.defs")
DEFAULT_UID_MIN = 1000  # below it: root and system accounts (daemons, a batch system), as useradd counts


def private_folder(path: Path, *, what: str = "work_dir", code: str = "work_dir_unusable") -> Path:
    """``path``, made ``0700`` if missing (and its missing parents ``0755``); raises ``SetupError``
    (``code``) when it is a link, not a folder, someone else's or writable by others, or when a folder on
    its way may be changed by another account."""
    path = Path(os.path.abspath(path))
    _make_where_safe(path, what, code)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENOTDIR):
            raise SetupError(f"{what} {path} is {_kind(path)}, not a folder: vjobs does not follow or use it "
                             f"(another account could point it anywhere); {_advice(what)}", code=code) from exc
        raise SetupError(f"cannot use {what} {path}: {exc.strerror or exc}", code=code) from exc
    try:
        info = os.fstat(fd)
        problem = not_own(info)
        if problem:
            raise SetupError(f"{what} {path} {problem}: vjobs writes nothing of this account's into it; "
                             f"{_advice(what)}", code=code)
        check_way(path, what, code)
        if stat.S_IMODE(info.st_mode) != PRIVATE_MODE:  # ours, made wider by an earlier vjobs or by hand
            os.fchmod(fd, PRIVATE_MODE)
    finally:
        os.close(fd)
    return path


def output_folder(path: Path) -> Path:
    """The output folder ``path``, made ``0700`` if missing; one that exists keeps its mode but must be this
    account's, writable by nobody else, on a way only trusted owners can change (``outdir_unusable``)."""
    path = Path(os.path.abspath(path))
    _make_where_safe(path, "the output folder", "outdir_unusable")
    check_way(path, "the output folder", "outdir_unusable")
    try:
        info = os.stat(path)  # a link the account made to a folder of its own is fine: check_way checked it
    except OSError as exc:
        raise SetupError(f"cannot use the output folder {path}: {exc.strerror or exc}", code="outdir_unusable") from exc
    problem = "is not a folder" if not stat.S_ISDIR(info.st_mode) else not_own(info)
    if problem:
        raise SetupError(f"the output folder {path} {problem}: vjobs writes no results into it; give --outdir "
                         "a folder of your own that only you may write to", code="outdir_unusable")
    return path


def not_own(info: os.stat_result) -> str | None:
    """What makes a folder not this account's alone to write, in words; None when it is."""
    if info.st_uid != os.geteuid():
        return f"belongs to {_who(info.st_uid)}, not to {_who(os.geteuid())}"
    if writable_by_others(info):
        return f"may be written by others (mode {stat.S_IMODE(info.st_mode):04o})"
    return None


def writable_by_others(info: os.stat_result) -> bool:
    """Whether an account other than the owner may create, remove or rename entries (sticky bit ignored)."""
    mode = info.st_mode
    return bool(mode & stat.S_IWOTH) or bool(mode & stat.S_IWGRP) and not _private_group(info.st_gid, info.st_uid)


def check_way(path: Path, what: str, code: str, *, named: Path | None = None) -> None:
    """Every folder and link on the way to ``path`` (``path`` too, when it is a link), as written and once
    resolved, must be changeable only by trusted owners (root, a system account, this account), or be a
    sticky folder; raises ``SetupError`` otherwise, naming ``named`` (default ``path``). ``path`` itself,
    resolved, is the caller's to judge."""
    named = named or path
    literal, resolved = Path(os.path.abspath(path)), Path(os.path.realpath(path))
    for step in dict.fromkeys([*reversed(literal.parents), literal, *reversed(resolved.parents)]):
        try:
            info = os.lstat(step)
        except OSError as exc:
            raise SetupError(f"cannot use {what} {named}: {step}: {exc.strerror or exc}", code=code) from exc
        problem = _unsafe_step(info)
        if problem:
            raise SetupError(f"cannot use {what} {named}: {step} on its way {problem}, who could swap what vjobs "
                             f"checked for something else; {_advice(what)}", code=code)


def _unsafe_step(info: os.stat_result) -> str | None:
    if not _trusted(info.st_uid):
        return f"belongs to {_who(info.st_uid)}"
    if stat.S_ISDIR(info.st_mode) and writable_by_others(info) and not info.st_mode & stat.S_ISVTX:
        return f"may be written by others (mode {stat.S_IMODE(info.st_mode):04o}, not sticky)"
    return None


def _trusted(uid: int) -> bool:
    return uid in (0, os.geteuid()) or uid < _first_account_uid()


@functools.cache
def _first_account_uid() -> int:
    """``UID_MIN`` of /etc/login.defs: the first uid useradd gives an ordinary account."""
    with contextlib.suppress(OSError, ValueError):
        for line in LOGIN_DEFS.read_text().splitlines():
            words = line.split()
            if len(words) == 2 and words[0] == "UID_MIN":
                return int(words[1])
    return DEFAULT_UID_MIN


def _private_group(gid: int, uid: int) -> bool:
    """A user private group: named as its only member, whose primary group it is."""
    try:
        user, group = pwd.getpwuid(uid), grp.getgrgid(gid)
    except KeyError:
        return False
    return user.pw_gid == gid and group.gr_name == user.pw_name and set(group.gr_mem) <= {user.pw_name}


def _make_where_safe(path: Path, what: str, code: str) -> None:
    """``make_folder(path)``, once the way to the part of it that exists is found safe: nothing is made in a
    folder another account may change."""
    existing = path.parent
    while not os.path.lexists(existing):
        existing = existing.parent
    check_way(existing, what, code, named=path)
    make_folder(path)


def make_folder(path: Path) -> None:
    """``path`` made ``0700`` if it is missing, and the folders above it that are missing too, ``0755`` at most
    (never writable by others, whatever the umask). A link in its place is left for the checks to refuse."""
    missing = []
    while not os.path.lexists(path):
        missing.append(path)
        path = path.parent
    for folder in reversed(missing):
        try:
            os.mkdir(folder, PRIVATE_MODE if folder == missing[0] else FOLDER_MODE)
        except FileExistsError:  # another vjobs of this account made it just now
            pass
        except OSError:
            return  # the checks that follow say what is wrong with the way, in words


def _kind(path: Path) -> str:
    try:
        info = os.lstat(path)
    except OSError:
        return "missing"
    if stat.S_ISLNK(info.st_mode):
        return f"a symbolic link of {_who(info.st_uid)}"
    return "a file"


def _who(uid: int) -> str:
    try:
        return f"uid {uid} ({pwd.getpwuid(uid).pw_name})"
    except KeyError:
        return f"uid {uid}"


def _advice(what: str) -> str:
    if what == "work_dir":
        return ("ask the administrator to remove it, or set work_dir in a site file (or TMPDIR) to a folder of "
                "your own")
    return "give --outdir a folder of your own that only you may write to, under folders only you and root may change"


def write_atomically(path: Path, text: str) -> None:
    """Replace ``path`` with ``text`` at once, so a reader never sees half a file. The temporary file has a
    name nobody can guess and is created here, never through a link: whoever else may write into the
    folder (a result file in /tmp) cannot make vjobs write into a file of their choosing."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(8)}")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, FILE_MODE)
    with os.fdopen(fd, "w") as handle:
        handle.write(text)
    os.replace(temporary, path)
