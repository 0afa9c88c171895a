"""What tests and benchmarks set up to run jobs, written once for both: site files, the xen set-up (a XAPI
stand-in and its password file), the kvm set-up (libvirtd, TCG), a cache seeded with the built images of
another, the example job, and the ``vjobs`` command beside this interpreter.

    with StandinProcess(folder / "xapi") as standin:
        write_site(folder / "site.toml", {"driver": "xen", "work_dir": str(folder / "work"),
                                          "drivers": {"xen": standin.settings()}})

The stand-in runs in a process of its own here (``StandinProcess``); tests that inject faults into it run it
in their own process instead (``vjobs.testing.xapi_standin.XapiStandin``) and take ``xen_settings`` from here.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
import xmlrpc.client
from pathlib import Path
from typing import Any, Iterable, Mapping

from vjobs.testing.servers.processes import die_with_parent, end_processes

REPO = Path(__file__).resolve().parents[2]  # a source checkout: examples/ lies beside vjobs/
LIBVIRT_URI = os.environ.get("VJOBS_TEST_LIBVIRT_URI", "qemu:///system")
XAPI_USERNAME, XAPI_SR = "root", "vjobs-sr"  # the stand-in's defaults (vjobs/testing/xapi_standin/__main__.py)


def vjobs_command() -> list[str]:
    """The CLI a batch system would run: the ``vjobs`` script beside this interpreter, else ``python -m vjobs``."""
    script = Path(sys.executable).parent / "vjobs"
    return [str(script)] if script.exists() else [sys.executable, "-m", "vjobs"]


# --- site files ----------------------------------------------------------------------------------------

def toml_text(document: Mapping[str, Any]) -> str:
    """TOML for a site config (tables, strings, numbers, booleans, lists of those)."""
    def key(name: str) -> str:
        return name if re.fullmatch(r"[A-Za-z0-9_-]+", name) else json.dumps(name)

    def value(item: Any) -> str:
        if isinstance(item, bool):
            return "true" if item else "false"
        if isinstance(item, (int, float)):
            return repr(item)
        if isinstance(item, (str, os.PathLike)):
            return json.dumps(os.fspath(item))  # a JSON string is a TOML basic string
        if isinstance(item, (list, tuple)):
            return "[" + ", ".join(value(element) for element in item) + "]"
        raise TypeError(f"cannot write {item!r} as TOML here")

    lines: list[str] = []

    def table(entries: Mapping[str, Any], prefix: str) -> None:
        scalars = {k: v for k, v in entries.items() if not isinstance(v, Mapping)}
        tables = {k: v for k, v in entries.items() if isinstance(v, Mapping)}
        if prefix and (scalars or not tables):
            lines.append(f"[{prefix}]")
        lines.extend(f"{key(k)} = {value(v)}" for k, v in scalars.items())
        for name, entries_below in tables.items():
            table(entries_below, f"{prefix}.{key(name)}" if prefix else key(name))

    table(document, "")
    return "\n".join(lines) + "\n"


def write_site(path: Path, document: Mapping[str, Any]) -> Path:
    """``document`` as a site file at ``path``, checked by vjobs' own loader (InvalidSite now rather than in
    every job)."""
    from vjobs.config.site import load_site

    path.write_text(toml_text(document))
    load_site(path)
    return path


def merged(base: Mapping[str, Any], overrides: Mapping[str, Any]) -> dict:
    """``base`` with ``overrides`` laid over it, table by table."""
    out = dict(base)
    for key, value in overrides.items():
        out[key] = merged(out.get(key, {}), value) if isinstance(value, Mapping) else value
    return out


_PATH_KEYS = (("cache_dir",), ("work_dir",), ("drivers", "xen", "password_file"),
              ("staging", "http", "bearer_token_file"), ("staging", "http", "ca_path"))


def site_document(explicit: str | None) -> tuple[dict, Path | None]:
    """The site config the CLI would load (``--site``, $VJOBS_SITE, /etc/vjobs/site.toml), as a dict with
    its relative paths made absolute, and its file."""
    from vjobs.config.site import find_site_file

    path = find_site_file(explicit)
    if path is None:
        return {}, None
    document = tomllib.loads(path.read_text())
    here = path.resolve().parent

    def absolute(table: dict, keys: tuple[str, ...]) -> None:
        *parents, last = keys
        for key in parents:
            table = table.get(key)
            if not isinstance(table, dict):
                return
        if isinstance(table.get(last), str):
            table[last] = str(here / table[last])

    for keys in _PATH_KEYS:
        absolute(document, keys)
    for image in document.get("images", {}).values():
        for key in ("kernel", "initramfs", "rootfs"):
            if isinstance(image.get(key), str):
                image[key] = str(here / image[key])
    return document, path


# --- xen: the XAPI stand-in --------------------------------------------------------------------------

def write_password(path: Path, password: str) -> Path:
    """A password file as the xen driver reads it: the secret alone, readable by its owner only."""
    path.write_text(password + "\n")
    path.chmod(0o600)
    return path


def xen_settings(url: str, password_file: Path) -> dict:
    """``[drivers.xen]`` for a XAPI stand-in at ``url`` (not in dom0: ``require_dom0 = false``)."""
    return {"url": url, "username": XAPI_USERNAME, "password_file": str(password_file), "sr": XAPI_SR,
            "require_dom0": False}


class XapiPool:
    """A XAPI at ``url`` with the stand-in's user and the password in ``password_file``, as tests look at it:
    its records, and the domains its hypervisor runs (a Xen node's stand-in, vjobs.testing.xen_node)."""

    def __init__(self, url: str, password_file: Path):
        self.url, self.password_file = url, Path(password_file)

    def settings(self) -> dict:
        return xen_settings(self.url, self.password_file)

    def query(self) -> dict[str, dict]:
        """Every VM, VBD and VDI record, and the sessions but this one, over XAPI's own XML-RPC."""
        with self._session() as (proxy, session):
            records = {cls: _value(getattr(proxy, cls).get_all_records(session)) for cls in ("VM", "VBD", "VDI")}
            records["session"] = {ref: None for ref in _value(proxy.session.get_all(session)) if ref != session}
        return records

    def domains(self) -> list[str]:
        """The names of the domains the hypervisor runs, dom0 aside (the stand-in's ``vjobs-testing`` plugin;
        a real Xen's only: the QEMU stand-in answers XENAPI_MISSING_PLUGIN)."""
        with self._session() as (proxy, session):
            host = _value(proxy.session.get_this_host(session, session))
            return json.loads(_value(proxy.host.call_plugin(session, host, "vjobs-testing", "domains", {})))

    @contextlib.contextmanager
    def _session(self):
        proxy = xmlrpc.client.ServerProxy(self.url, allow_none=True)
        password = self.password_file.read_text().strip()
        session = _value(proxy.session.login_with_password(XAPI_USERNAME, password, "1.0", "vjobs-testing"))
        try:
            yield proxy, session
        finally:
            with contextlib.suppress(Exception):
                proxy.session.logout(session)


def _value(answer: dict):
    if answer.get("Status") != "Success":
        raise RuntimeError(f"XAPI answered {answer.get('ErrorDescription')}")
    return answer["Value"]


class StandinProcess:
    """The XAPI stand-in (``python -m vjobs.testing.xapi_standin``) as a process of its own, on a free
    loopback port, with its password file and state under ``root``; a context manager that stops it by its
    PID (and it dies with the thread that started it). Its guests are its descendants."""

    def __init__(self, root: Path, *, password: str = "secret", sr_size_mib: int = 4096):
        self.root, self.password, self.sr_size_mib = Path(root), password, sr_size_mib
        self.password_file = self.root / "xapi-password"
        self.process: subprocess.Popen | None = None
        self.url = ""

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    def start(self) -> "StandinProcess":
        self.root.mkdir(parents=True, exist_ok=True)
        write_password(self.password_file, self.password)
        log = self.root / "standin.log"
        with open(log, "wb") as stderr:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "vjobs.testing.xapi_standin", "--listen", "127.0.0.1:0",
                 "--state-dir", str(self.root / "state"), "--password-file", str(self.password_file),
                 "--sr-size-mib", str(self.sr_size_mib)],
                stdout=subprocess.PIPE, stderr=stderr, stdin=subprocess.DEVNULL, cwd=REPO,
                preexec_fn=die_with_parent)
        line = self.process.stdout.readline().decode()
        found = re.search(r"listening on (http://127\.0\.0\.1:\d+)", line)
        if not found:
            self.stop()
            raise RuntimeError(f"the XAPI stand-in did not start: {line!r}, see {log}")
        self.url = found[1]
        return self

    def settings(self) -> dict:
        return xen_settings(self.url, self.password_file)

    def query(self) -> dict[str, dict]:
        """Every VM, VBD and VDI record, and the sessions but this one, over XAPI's own XML-RPC."""
        return XapiPool(self.url, self.password_file).query()

    def stop(self) -> None:
        if self.process is None:
            return
        end_processes([self.process], grace_s=60)  # SIGTERM: it stops its guests first
        self.process.stdout.close()
        self.process = None

    def __enter__(self) -> "StandinProcess":
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()


# --- kvm: libvirtd -----------------------------------------------------------------------------------

def libvirt_reachable(uri: str = LIBVIRT_URI) -> str | None:
    """None when libvirtd answers at ``uri``, else why not."""
    import libvirt

    libvirt.registerErrorHandler(lambda _context, _error: None, None)
    try:
        libvirt.open(uri).close()
    except libvirt.libvirtError as exc:
        return f"libvirtd at {uri}: {exc.get_error_message()}"
    return None


def libvirt_settings(uri: str = LIBVIRT_URI) -> dict:
    """``[drivers.kvm]`` against libvirtd at ``uri`` with TCG: KVM boots no guest on these machines."""
    return {"uri": uri, "virt_type": "qemu"}


# --- a cache seeded with another's built images -------------------------------------------------------

def seed_cache(source: Path | None, cache: Path, families: Iterable[str] = ("default",), *,
               rootfs: bool = False, probes: bool = False) -> None:
    """Hard links (copies across file systems) to the built images of ``families`` in the cache ``source``,
    and with ``rootfs`` its built base images, with ``probes`` its probe verdicts. vjobs never writes a
    cached file in place (it replaces it), so the source is left as it was."""
    cache.mkdir(parents=True, exist_ok=True)
    if source is None or not source.is_dir():
        return
    families = tuple(families)
    for folder in sorted((source / "images").glob("*-*")):
        if folder.is_dir() and folder.name.rsplit("-", 1)[0] in families and not folder.name.startswith("."):
            link_tree(folder, cache / "images" / folder.name)
    if rootfs:
        for path in sorted((source / "rootfs").glob("*")):
            if re.fullmatch(r"[0-9a-f]{64}\.(raw|v\d+\.json)", path.name):
                link_tree(path, cache / "rootfs" / path.name)
    if probes and (source / "probes").is_dir():
        link_tree(source / "probes", cache / "probes")


def link_tree(source: Path, target: Path) -> None:
    if target.exists():
        return
    if source.is_dir():
        target.mkdir(parents=True)
        for child in source.iterdir():
            link_tree(child, target / child.name)
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


def system_cache(source: Path, target: Path, families: Iterable[str] = ("default",)) -> Path:
    """``target`` made a system cache as root's ``vjobs image build`` leaves one (vjobs/host/roles.py), holding
    copies of the built images of ``families`` in the cache ``source`` (their manifests naming the copies), all
    root's and readable by every account: a test's accounts cannot reach a test session's own cache. An
    account's vjobs takes it for /var/cache/vjobs with VJOBS_SYSTEM_CACHE set to it."""
    target.mkdir(mode=0o755, parents=True, exist_ok=True)
    for folder in sorted((Path(source) / "images").glob("*-*")):
        if folder.is_dir() and folder.name.rsplit("-", 1)[0] in families and not folder.name.startswith("."):
            copy = target / "images" / folder.name
            shutil.copytree(folder, copy)
            manifest = copy / "manifest.json"
            manifest.write_text(manifest.read_text().replace(str(folder), str(copy)))
    for path in (target, *target.rglob("*")):
        os.chmod(path, 0o755 if path.is_dir() else 0o644)
    return target


# --- the example job ----------------------------------------------------------------------------------

def example_job(memory_mib: int | None = None, append: str = "") -> dict:
    """examples/hello with absolute paths; ``memory_mib`` (when set) and a shell tail after its command."""
    base = REPO / "examples/hello"
    job = json.loads((base / "job.json").read_text())
    job["inputs"], job["release"]["path"] = str(base / job["inputs"]), str(base / job["release"]["path"])
    if memory_mib:
        job["resources"]["memory_mib"] = memory_mib
    if append:
        job["command"] = [*job["command"][:-1], f"{job['command'][-1]} {append}"]
    return job
