"""Fuzzing every surface a user or a guest controls: vjobs must answer each input with a result or a typed
``VjobsError`` (``VMError`` for the guest), never another exception. Used by ``fuzz/run.py`` (the campaign,
10,000 cases a surface by default, its counts in docs/security.md) and by tests/security/test_fuzz.py (a short run).

Surfaces:
  job      job documents: valid jobs mutated field by field (NUL bytes, huge and odd strings, wrong types,
           nesting), and arbitrary JSON
  site     site documents, the same way
  cli      command lines: the subcommands and options in random order with random words
  results  the guest's results stream: tar archives with random names, types, sizes and contents, and raw
           bytes, as read_results reads them from the io disk
  status   the guest's status lines (vjobs/status), as the container interprets them
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import tarfile
import tempfile
from pathlib import Path
from typing import Callable

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vjobs.errors import VjobsError
from vjobs.guest.collect import read_results

TEXT = st.text(st.characters(codec="utf-8"), max_size=40) | st.sampled_from(
    ["", "\0", "a\0b", "/", "..", "../../etc", "x" * 5000, "/" + "y" * 300, "ü", "*", "-1", "1e999", "NaN"])
SCALAR = st.none() | st.booleans() | st.integers(-(2 ** 70), 2 ** 70) | st.floats(allow_nan=True) | TEXT
JSON = st.recursive(SCALAR, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(TEXT, inner, max_size=4),
                    max_leaves=12)

VALID_JOB = {"id": "fuzz", "command": ["true"], "env": {"A": "b"}, "inputs": ".", "outputs": ["out"],
             "release": {"path": ".", "mount": "/opt/release"}, "walltime_s": 60,
             "resources": {"vcpus": 1, "memory_mib": 256}, "image": "default", "workdir": "/work", "cwd": "/work",
             "binds": [{"source": ".", "target": "/data", "mode": "ro"}], "network": False}
VALID_SITE = {"driver": "qemu_user", "cache_dir": "cache", "work_dir": "work", "boot_timeout_s": 30,
              "payload_user": "root", "cache_max_gib": 20, "limits": {"vcpus": 4, "bind_mib": 100},
              "host": {"vcpus": 8, "memory_mib": 16384, "admission_wait_s": 600},
              "images": {"b": {"rootfs": "b.squashfs", "rootfs_sha256": "a" * 64,
                               "kernel": "k", "kernel_sha256": "b" * 64, "initramfs": "i", "initramfs_sha256": "c" * 64}},
              "drivers": {"qemu_user": {"accel": "tcg"}}}


def _places(document, prefix=()) -> list[tuple]:
    """Every place in a document (each key and list index, at every depth) a mutation may hit."""
    places = [prefix] if prefix else []
    if isinstance(document, dict):
        for key, value in document.items():
            places += _places(value, prefix + (key,))
    elif isinstance(document, list):
        for index, value in enumerate(document):
            places += _places(value, prefix + (index,))
    return places


def _replace(document, place: tuple, value, remove: bool):
    if len(place) == 1:
        copy = dict(document) if isinstance(document, dict) else list(document)
        if remove and isinstance(copy, dict):
            copy.pop(place[0], None)
        else:
            copy[place[0]] = value
        return copy
    copy = dict(document) if isinstance(document, dict) else list(document)
    copy[place[0]] = _replace(document[place[0]], place[1:], value, remove)
    return copy


def mutated(valid: dict) -> st.SearchStrategy:
    """A valid document with one to three of its fields, at any depth, replaced (by odd text, NUL bytes,
    huge strings, wrong types, nested junk) or removed, or with a new top-level key."""
    def mutate(changes: list) -> dict:
        document = valid
        for place, value, remove in changes:
            with contextlib.suppress(KeyError, IndexError, TypeError):  # an earlier change removed the place
                document = _replace(document, place, value, remove)
        return document

    place = st.sampled_from(_places(valid)) | TEXT.map(lambda key: (key,))
    return st.lists(st.tuples(place, TEXT | JSON, st.booleans()), min_size=1, max_size=3).map(mutate)


def documents(valid: dict) -> st.SearchStrategy:
    return mutated(valid) | JSON


# --- the checks: each returns normally when vjobs answered as it should ------------------------------------

def check_job(document, folder: Path) -> None:
    from vjobs.config.job import job_from_dict

    with contextlib.suppress(VjobsError):
        job_from_dict(document, base_dir=folder, source="fuzz")


def check_site(document, folder: Path) -> None:
    from vjobs.config.site import site_from_dict

    with contextlib.suppress(VjobsError):
        site_from_dict(document, base_dir=folder, source="fuzz")


CLI_WORDS = ["run", "validate", "exec", "image", "inspect", "list", "build", "drivers", "pilot3", "install",
             "--json", "--site", "--driver", "--outdir", "-B", "--bind", "--pwd", "--env", "--vcpus", "--walltime",
             "--result", "--force", "--name", "default", "debian12", "nosuch", "x:/y:ro", "/nonexistent"]


def check_cli(argv: list[str], folder: Path) -> None:
    """Commands that would boot a VM, probe drivers or build images get a job or image that cannot exist,
    so each case ends before any of that: what is fuzzed is the parsing and the refusals."""
    from vjobs import cli

    if any(word in argv for word in ("probe", "gc", "build")) or "drivers" in argv[:1]:
        return
    if argv[:1] == ["exec"] and "nosuch" not in argv:
        argv = [*argv, "nosuch", "true"]  # an image that is not there: refused before a VM
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            code = cli.main(["--version"] if not argv else argv)
    except SystemExit as exit:  # argparse's usage error (2) or --version/--help (0)
        code = exit.code
    if not isinstance(code, int):
        raise AssertionError(f"vjobs {argv} returned {code!r}, not an exit status")


MEMBER = st.tuples(
    st.sampled_from(["vjobs/status", "vjobs/stdout", "vjobs/stderr", "work/out", "work/a/b", "binds/0/x", "binds/x",
                     "/abs", "../up", "work/../../x", "work", "vjobs", "VJOBS-IO-DISK", "binds/0"]) | TEXT,
    st.sampled_from([tarfile.REGTYPE, tarfile.DIRTYPE, tarfile.SYMTYPE, tarfile.LNKTYPE, tarfile.CHRTYPE,
                     tarfile.FIFOTYPE]),
    st.binary(max_size=300), TEXT, st.integers(-2 ** 40, 2 ** 40))


def tar_of(members: list) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.GNU_FORMAT) as archive:
        for name, kind, data, link, mtime in members:
            info = tarfile.TarInfo(name or ".")
            info.type, info.linkname, info.mtime = kind, link, max(0, mtime)
            info.size = len(data) if kind == tarfile.REGTYPE else 0
            with contextlib.suppress(ValueError, OverflowError):
                archive.addfile(info, io.BytesIO(data) if kind == tarfile.REGTYPE else None)
    return buffer.getvalue()


def check_results(raw: bytes, folder: Path) -> None:
    disk = folder / "io.raw"
    disk.write_bytes(raw)
    with contextlib.suppress(VjobsError):
        read_results(disk, folder / "incoming", max(len(raw), 1 << 16))


def check_status(text: str, folder: Path) -> None:
    """Status lines as the agent writes them: the container reads the exit code, timings and errors."""
    from vjobs.container.lifecycle import _add_guest_timing

    raw = tar_of([("vjobs/status", tarfile.REGTYPE, text.encode(errors="surrogatepass"), "", 0)])
    disk = folder / "io.raw"
    disk.write_bytes(raw)
    try:
        results = read_results(disk, folder / "incoming", 1 << 20)
    except VjobsError:
        return
    results.exit_code  # noqa: B018 (the property parses the guest's value)
    _add_guest_timing({}, results.status)


SURFACES: dict[str, tuple[st.SearchStrategy, Callable]] = {
    "job": (documents(VALID_JOB), check_job),
    "site": (documents(VALID_SITE), check_site),
    "cli": (st.lists(st.sampled_from(CLI_WORDS) | TEXT, max_size=6), check_cli),
    "results": (st.lists(MEMBER, max_size=6).map(tar_of) | st.binary(max_size=2048), check_results),
    "status": (st.lists(st.tuples(TEXT, TEXT), max_size=8).map(lambda pairs: "\n".join(f"{k}={v}" for k, v in pairs))
               | TEXT, check_status),
}


def run_surface(name: str, cases: int) -> int:
    """Run ``cases`` generated inputs against one surface; returns how many ran. An input that makes vjobs
    raise anything but a VjobsError fails the run with hypothesis's shrunk example."""
    strategy, check = SURFACES[name]
    ran = 0

    @settings(max_examples=cases, database=None, deadline=None, derandomize=False,
              suppress_health_check=list(HealthCheck))
    @given(strategy)
    def case(value) -> None:
        nonlocal ran
        ran += 1
        folder = Path(tempfile.mkdtemp(prefix="vjobs-fuzz-"))
        cwd = os.getcwd()
        try:
            os.chdir(folder)  # the CLI writes vjobs-out/ into the current folder
            check(value, folder)
        finally:
            os.chdir(cwd)
            shutil.rmtree(folder, ignore_errors=True)

    case()
    return ran
