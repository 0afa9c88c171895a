"""The package's shape, read from its source with ``ast`` (nothing imported): no import circle among vjobs'
modules, the core never names a driver, and the pilot integration uses only the public API."""

from __future__ import annotations

import ast
from pathlib import Path

import vjobs

PACKAGE = Path(vjobs.__file__).parent
DRIVERS = sorted(path.parent.name for path in (PACKAGE / "drivers").glob("*/__init__.py"))
# What an integration may import: the API, its errors and results, and (all of vjobs.config) the job and site.
PUBLIC = ("vjobs", "vjobs.api", "vjobs.errors", "vjobs.result")


def _modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


MODULES = _modules()


def _imported(module: str, path: Path) -> set[str]:
    """The vjobs modules ``module`` imports, at its top or inside a function alike: ``from P import N`` is
    module P.N when that is one, else P."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the module's package, one level up per dot after the first
                anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            names.update(f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base
                         for alias in node.names)
    return {_owning_module(name) for name in names if name == "vjobs" or name.startswith("vjobs.")} - {module}


def _owning_module(name: str) -> str:
    while name not in MODULES:
        name = name.rpartition(".")[0]
    return name


GRAPH = {module: _imported(module, path) for module, path in MODULES.items()}


def _cycle() -> list[str] | None:
    """One import circle, as the modules along it, or None."""
    state: dict[str, str] = {}  # "open" while on the current path, "done" once all below it are seen
    path: list[str] = []

    def visit(module: str) -> list[str] | None:
        state[module] = "open"
        path.append(module)
        for imported in sorted(GRAPH[module]):
            if state.get(imported) == "open":
                return path[path.index(imported):] + [imported]
            if imported not in state and (found := visit(imported)):
                return found
        path.pop()
        state[module] = "done"
        return None

    for module in sorted(GRAPH):
        if module not in state and (found := visit(module)):
            return found
    return None


def _inside(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def test_the_graph_sees_the_imports_it_should():
    assert "vjobs.images.store" in GRAPH["vjobs.images.boot"]  # a module-level import
    assert "vjobs.images.checked" in GRAPH["vjobs.cli.commands"]  # inside a function
    assert "vjobs.api" in GRAPH["vjobs.cli.commands"]  # from vjobs import api: the module, not the package
    assert set(DRIVERS) >= {"qemu_user", "kvm", "xen"}


def test_no_module_of_vjobs_imports_itself_through_others():
    cycle = _cycle()
    assert cycle is None, "an import circle: " + " -> ".join(cycle)


def test_the_core_never_imports_a_driver():
    """Drivers are plugins (entry points in pyproject.toml): the core finds them only through the registry."""
    outside_core = [f"vjobs.drivers.{name}" for name in DRIVERS] + ["vjobs.testing", "vjobs.pilot3"]
    wrong = sorted(f"{module} imports {imported}" for module, imports in GRAPH.items()
                   if not any(_inside(module, package) for package in outside_core)
                   for imported in imports if any(_inside(imported, f"vjobs.drivers.{name}") for name in DRIVERS))
    assert wrong == []


def test_the_pilot_integration_uses_only_the_public_api():
    def public(imported: str) -> bool:
        return imported in PUBLIC or _inside(imported, "vjobs.config") or _inside(imported, "vjobs.pilot3")

    wrong = sorted(f"{module} imports {imported}" for module, imports in GRAPH.items()
                   if _inside(module, "vjobs.pilot3") for imported in imports if not public(imported))
    assert wrong == []
