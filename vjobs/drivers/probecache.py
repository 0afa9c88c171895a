"""Answers that a probe gets from a program (``qemu-system-x86_64 -version``, its list of network backends),
remembered until that program changes or the host reboots.

A probe asks them before every job, each a subprocess of 10-20 ms, and the answers depend on nothing but the
program: they are kept in memory and in ``cache_dir/probes/`` (where ``vjobs gc`` removes an earlier host
boot's, as it does the deep probe's verdicts, vjobs/drivers/bootcheck.py), keyed by the host boot and by the
program's file as the kernel sees it (its resolved path, device, inode, size, modification and change
times): a package upgrade, a rebuilt or replaced binary changes one of them and the question is asked again.
A question that fails (raises) is not remembered.

Which ``cache_dir``: the one of the host the caller passes (a driver passes its own, ``self.host``); with none,
the answer is kept in memory only.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, TypeVar

from vjobs.drivers.contract import HostContext

T = TypeVar("T")

_remembered: dict[tuple, Any] = {}  # this process's answers, by where they are stored and what they depend on


def remember(question: str, program: str, ask: Callable[[str], T], host: HostContext | None) -> T:
    """``ask(path)``'s answer for ``program`` (a name looked up on PATH, or a path), asked only when this
    program's file or the host boot changed since it was last asked. ``question`` names the question in file
    names (letters, digits, ``-``); the answer must be a JSON value (a string, usually) and is shared: do not
    change it. ``ask`` gets the path found on PATH; what it raises goes to the caller and is not kept. ``host``:
    whose ``cache_dir`` keeps the answer for the next process (None: this process only)."""
    if not re.fullmatch(r"[a-z0-9-]+", question):
        raise ValueError(f"question {question!r}: lower-case letters, digits and '-' only")
    path = shutil.which(program)
    identity = _identity(path) if path else None
    if identity is None:  # not found, or gone: let ``ask`` say what is wrong, every time
        return ask(program)
    boot_id = host.boot_id if host is not None else None
    store = None
    if host is not None and boot_id != "unknown":  # with no boot id, nothing would tell a stale record
        store = host.cache_dir / "probes" / f"answer-{question}-{_digest(identity['path'])}.json"
    key = (str(store), question, boot_id, tuple(identity.values()))
    if key in _remembered:
        return _remembered[key]
    record = _read(store) if store is not None else None
    if record is not None and record.get("boot_id") == boot_id and record.get("program") == identity \
            and record.get("question") == question and "answer" in record:
        answer = record["answer"]
    else:
        answer = ask(path)
        if store is not None:
            _write(store, {"boot_id": boot_id, "question": question, "program": identity, "answer": answer})
    _remembered[key] = answer
    return answer


def _identity(path: str) -> dict[str, Any] | None:
    """What changes when the program's file does: any of these, and the answer is asked for again."""
    resolved = os.path.realpath(path)
    try:
        info = os.stat(resolved)
    except OSError:
        return None
    return {"path": resolved, "device": info.st_dev, "inode": info.st_ino, "size": info.st_size,
            "mtime_ns": info.st_mtime_ns, "ctime_ns": info.st_ctime_ns}


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _read(path: Path) -> dict | None:
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def _write(path: Path, record: dict) -> None:
    """Whole or not at all (several vjobs may probe at once); a cache that cannot be written costs the next
    process the question, nothing more."""
    text = json.dumps(record)  # before any file is made: an answer that is no JSON value is a bug of the caller's
    temporary = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", dir=path.parent, prefix=".answer-", suffix=".json",
                                         delete=False) as file:
            temporary = file.name
            file.write(text)
            os.fchmod(file.fileno(), 0o644)  # as the deep probe's verdicts: readable by whoever shares the cache
        os.replace(temporary, path)
    except OSError:
        if temporary is not None:
            with contextlib.suppress(OSError):
                os.unlink(temporary)
