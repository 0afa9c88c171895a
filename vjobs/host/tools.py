"""The host's tools (mke2fs, mksquashfs, mkfs.erofs, mmdebstrap, apt-get, dpkg-deb, qemu-img), run one way,
and a full disk recognised one way.

``run_tool`` runs a tool to its end and turns how it failed into vjobs' own errors, here and nowhere else:

- the tool is not installed: the caller's error class, saying what installs it;
- a file system filled up: ``DiskFull`` (vjobs/errors.py words it). Only ENOSPC is a full disk: an OSError
  with that errno, or the tool's output holding ENOSPC's own text, "No space left on device", which every
  tool prints as strerror gives it. A message that merely mentions space ("not enough space in the
  image", "Could not allocate block") is the tool's failure, not the host's;
- any other failure, or a tool that ran past its ``timeout``: the caller's error class, naming the tool, its
  exit status and the last lines it wrote.

A tool is found, and runs with a ``PATH``, that holds the system folders where Debian and EL keep tools such
as mke2fs (``/usr/sbin``, ``/sbin``), after the caller's own: an ordinary account's login ``PATH`` on Debian
has none of them, and vjobs must work for such an account as it is.

``disk_full_from`` recognises ENOSPC in an exception raised anywhere else: writing a file, copying a tree;
``not_permitted_from`` a folder this user may not use (a cache or work folder of root's or another account's).

A tool that reads what vjobs did not write (``qemu-img`` on a site's image) runs unprivileged
(``as_unprivileged``): as the user vjobs runs QEMU as when vjobs is root, else as the account itself.
"""

from __future__ import annotations

import errno
import os
import pwd
import shutil
import subprocess
from pathlib import Path
from typing import Callable, Collection, Mapping, Sequence

from vjobs.errors import DiskFull, SetupError, VjobsError

NO_SPACE = "No space left on device"  # strerror(ENOSPC), as the tools print it
SYSTEM_TOOL_FOLDERS = ("/usr/local/sbin", "/usr/sbin", "/sbin")  # not on an ordinary Debian account's PATH
TAIL_LINES = 5  # of the tool's output, in the message of its failure
TAIL_CHARS = 600
UNPRIVILEGED_USER = "vjobs-qemu"  # scripts/install.sh creates it; QEMU and qemu-img run as it when vjobs is root
FALLBACK_USER = "nobody"  # on a host set up without the installer


def run_tool(argv: Sequence[str | os.PathLike], what: str, *, error: type[VjobsError] = SetupError,
             code: str | None = None, missing_code: str | None = None, install: str = "", hint: str = "",
             where: Path | None = None, wrapper: Sequence[str] = (), cwd: Path | None = None,
             env: Mapping[str, str] | None = None, timeout: float | None = None,
             each_line: Callable[[str], None] | None = None, pass_fds: Collection[int] = ()) -> str:
    """Run ``argv`` (under ``wrapper``, such as a prlimit command line) and return what it wrote to stdout.

    ``what`` says what the run is for ("building the scratch disk of job 1"), to begin every message;
    ``error``, ``code``: what a failure raises; ``missing_code``: the code when the tool is not installed
    (``error``'s own by default), and ``install`` what installs it; ``hint``: what to do about a failure;
    ``where``: the folder the tool writes to, named when it fills up (``cwd`` by default);
    ``each_line``: given, it gets each line of the tool's stderr as the tool writes it (progress), and
    stdout is discarded; ``timeout`` then does not apply. ``pass_fds``: descriptors the tool inherits (it
    reads them as ``/dev/fd/N``). Raises ``DiskFull`` on ENOSPC (see above)."""
    env = dict(os.environ if env is None else env)
    env["PATH"] = tool_path(env.get("PATH"))  # for the tool, and for the helpers it runs in turn
    command = [*wrapper, *map(str, argv)]
    command[0] = shutil.which(command[0], path=env["PATH"]) or command[0]
    tool = Path(str(argv[0])).name
    try:
        if each_line is None:
            done = subprocess.run(command, capture_output=True, text=True, cwd=cwd, env=env, timeout=timeout,
                                  pass_fds=tuple(pass_fds))
            status, stdout, said = done.returncode, done.stdout, done.stderr or done.stdout
        else:
            status, said = _follow(command, cwd, env, each_line, tuple(pass_fds))
            stdout = ""
    except FileNotFoundError as exc:
        if exc.filename not in command[:1]:  # a folder that is not there (cwd), not a missing program
            raise
        installing = f"; {install}" if install else ""
        raise error(f"{what}: {exc.filename} is not installed{installing}", code=missing_code) from exc
    except subprocess.TimeoutExpired as exc:
        raise error(f"{what}: {tool} took more than {timeout:g} s and was stopped", code=code) from exc
    except OSError as exc:
        full = disk_full_from(exc, doing=what, where=where or cwd)
        if full is None:
            raise
        raise full from exc
    if status == 0:
        return stdout
    if NO_SPACE in said:
        raise DiskFull.at(where or cwd, doing=what, detail=_tail(said))
    advice = f"; {hint}" if hint else ""
    raise error(f"{what}: {tool} failed with exit status {status}: {_tail(said) or 'it said nothing'}{advice}",
                code=code)


def tool_path(path: str | None = None) -> str:
    """``path`` (default: this process's ``PATH``), then the system tool folders it lacks."""
    folders = [folder for folder in (path if path is not None else os.environ.get("PATH", os.defpath)).split(os.pathsep)
               if folder]
    return os.pathsep.join(folders + [folder for folder in SYSTEM_TOOL_FOLDERS if folder not in folders])


def unprivileged_user(name: str | None = None) -> pwd.struct_passwd:
    """The user ``name`` (a site's setting), else ``vjobs-qemu``, else ``nobody``. Raises KeyError when
    ``name`` does not exist, ValueError when it is root or in root's group."""
    try:
        user = pwd.getpwnam(name or UNPRIVILEGED_USER)
    except KeyError:
        if name:
            raise
        user = pwd.getpwnam(FALLBACK_USER)
    if user.pw_uid == 0 or user.pw_gid == 0:
        raise ValueError(f"{user.pw_name} is root")
    return user


def as_unprivileged() -> list[str]:
    """A ``wrapper`` for ``run_tool`` that runs the tool as ``unprivileged_user()`` when vjobs is root: that
    uid and gid, no supplementary groups, no capabilities, no new privileges. Nothing when vjobs is not root:
    the tool runs as the account itself, which has nothing to give away."""
    if os.geteuid() != 0:
        return []
    user = unprivileged_user()
    return ["setpriv", f"--reuid={user.pw_uid}", f"--regid={user.pw_gid}", "--clear-groups", "--no-new-privs",
            "--inh-caps=-all", "--bounding-set=-all", "--"]


def disk_full_from(error: BaseException, *, doing: str = "", where: Path | None = None) -> DiskFull | None:
    """``error`` as ``DiskFull`` when a full file system caused it (ENOSPC, or a ``shutil.copytree`` error
    that gathered one), else None: a full disk anywhere on the way (building disks, copying binds, caching
    images) is the host's state, not a bug. ``where`` defaults to the file that could not be written."""
    if isinstance(error, shutil.Error) and error.args and isinstance(error.args[0], list):
        # copytree gathers its errors as (source, target, "[Errno 28] ...") and raises them together
        full = [target for _, target, why in error.args[0] if f"[Errno {errno.ENOSPC}]" in str(why)]
        return DiskFull.at(where or full[0], doing=doing) if full else None
    if isinstance(error, OSError) and error.errno == errno.ENOSPC:
        return DiskFull.at(where or error.filename, doing=doing)
    return None


def not_permitted_from(error: BaseException) -> SetupError | None:
    """``error`` as a ``SetupError`` naming the file or folder, when the host's permissions refused this user
    (EACCES, EPERM) something vjobs did not expect to be refused, else None: a setup to fix, not a bug."""
    if not isinstance(error, PermissionError):
        return None
    where = f" at {error.filename}" if error.filename else ""
    return SetupError(f"permission denied{where} ({error.strerror}) for uid {os.geteuid()}: vjobs writes only into "
                      "folders this user owns (work_dir, and its cache: vjobs/host/roles.py); point work_dir or "
                      "cache_dir in the site config at folders of this user's, or ask the administrator",
                      code="permission_denied")


def _follow(command: list[str], cwd: Path | None, env: Mapping[str, str] | None,
            each_line: Callable[[str], None], pass_fds: tuple[int, ...]) -> tuple[int, str]:
    """Run ``command``, handing each line of its stderr to ``each_line``; its exit status, and its last lines
    of stderr after the first that says the disk is full, if one does."""
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=cwd,
                               env=env, pass_fds=pass_fds)
    tail: list[str] = []
    no_space: list[str] = []
    with process:
        for line in process.stderr:
            line = line.rstrip("\n")
            tail = (tail + [line])[-TAIL_LINES:]
            if NO_SPACE in line and not no_space:
                no_space.append(line)
            each_line(line)
    return process.returncode, "\n".join(no_space + [line for line in tail if line not in no_space])


def _tail(text: str) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return " / ".join(lines[-TAIL_LINES:])[-TAIL_CHARS:]
