"""Find drivers through the ``vjobs.drivers`` entry-point group (stevedore) and pick one by probing.

The core never imports a driver by name: vjobs' own drivers are entry points in its pyproject.toml, exactly
as a contributor's driver is one in theirs.
"""

from __future__ import annotations

import importlib.metadata
from dataclasses import dataclass
from typing import Iterator

from stevedore import DriverManager, ExtensionManager
from stevedore.exception import NoMatches

from vjobs.config.site import DEFAULT_PREFERENCE, SiteConfig
from vjobs.drivers.contract import Capabilities, Check, Driver, HostContext
from vjobs.errors import DriverNotFound, NoUsableDriver

NAMESPACE = "vjobs.drivers"


@dataclass(frozen=True)
class InstalledDriver:
    name: str
    target: str  # "module:Class" as declared
    distribution: str | None
    load_error: str | None  # None when it imports cleanly


def installed_drivers() -> list[InstalledDriver]:
    """Every driver declared by any installed package, including those that fail to import (and why)."""
    failures: dict[str, str] = {}

    def record_failure(_manager, entry_point, error):
        failures[entry_point.name] = f"{type(error).__name__}: {error}"

    manager = ExtensionManager(NAMESPACE, invoke_on_load=False, on_load_failure_callback=record_failure)
    found = {ext.name: ext.entry_point for ext in manager.extensions}
    entries = {ep.name: ep for ep in manager.list_entry_points()}
    owners = {ep.name: ep.dist.name for ep in importlib.metadata.entry_points(group=NAMESPACE) if ep.dist}
    drivers = []
    for name, entry_point in sorted(entries.items()):
        distribution = owners.get(name)
        error = failures.get(name) or (None if name in found else "not loaded")
        drivers.append(InstalledDriver(name, entry_point.value, distribution, error))
    return drivers


def load_driver(name: str, site: SiteConfig, host: HostContext) -> Driver:
    try:
        manager = DriverManager(NAMESPACE, name, invoke_on_load=False)
    except NoMatches as exc:
        known = ", ".join(d.name for d in installed_drivers()) or "none"
        raise DriverNotFound(f"no driver named {name!r} is installed (installed: {known}); "
                             "check the spelling in the site config or --driver") from exc
    except Exception as exc:  # a plugin's own import error: say whose it is
        raise DriverNotFound(f"driver {name!r} is installed but does not load: {type(exc).__name__}: {exc}") from exc
    driver_class = manager.driver
    if not (isinstance(driver_class, type) and issubclass(driver_class, Driver)):
        raise DriverNotFound(f"entry point {name!r} in {NAMESPACE} is not a vjobs.drivers.contract.Driver subclass")
    driver = driver_class(site.driver_settings(name), host)
    driver.name = name
    return driver


def safe_probe(driver: Driver) -> Capabilities:
    """A probe that raises is a driver bug; it must still not stop the pilot from trying the next driver."""
    try:
        return driver.probe()
    except Exception as exc:
        return Capabilities(driver.name, False, f"probe failed: {type(exc).__name__}: {exc}",
                            checks=(Check("probe", False, repr(exc)),))


def candidate_names(site: SiteConfig) -> Iterator[str]:
    """The drivers to try, in order: the site's preference, or the default one and then every other driver
    installed. Lazily: the others are looked up (by name, none imported) only when no default one would do."""
    if site.preference != DEFAULT_PREFERENCE:
        yield from site.preference
        return
    yield from DEFAULT_PREFERENCE
    installed = {entry_point.name for entry_point in importlib.metadata.entry_points(group=NAMESPACE)}
    yield from sorted(installed - set(DEFAULT_PREFERENCE))


def probe_all(site: SiteConfig, host: HostContext, names: list[str] | None = None) -> list[Capabilities]:
    verdicts = []
    for name in names or [d.name for d in installed_drivers()]:
        try:
            verdicts.append(safe_probe(load_driver(name, site, host)))
        except DriverNotFound as exc:
            verdicts.append(Capabilities(name, False, str(exc)))
    return verdicts


def choose_driver(site: SiteConfig, host: HostContext, pinned: str | Driver | None = None) \
        -> tuple[Driver, Capabilities]:
    """The driver to use and its verdict: the pinned one (a ``Driver`` object, ``--driver`` or the site's
    ``driver``) if it is usable, else the first usable one in the preference order."""
    pinned = pinned or site.pinned_driver
    if pinned:
        driver = pinned if isinstance(pinned, Driver) else load_driver(pinned, site, host)
        verdict = safe_probe(driver)
        if not verdict.usable:
            raise NoUsableDriver(f"the pinned driver {driver.name!r} cannot run VMs here: {verdict.reason}")
        return driver, verdict
    seen: list[Capabilities] = []
    for name in candidate_names(site):
        try:
            driver = load_driver(name, site, host)
        except DriverNotFound as exc:
            seen.append(Capabilities(name, False, str(exc)))
            continue
        verdict = safe_probe(driver)
        seen.append(verdict)
        if verdict.usable:
            return driver, verdict
    reasons = "; ".join(f"{v.driver}: {v.reason}" for v in seen) or "no drivers installed"
    raise NoUsableDriver(f"no driver can run VMs on this host ({reasons}); run the job without a VM or "
                         "fix the host (see `vjobs probe`)")
