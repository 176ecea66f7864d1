"""The import graph keeps the layers apart: protocol/model/errors at the bottom, HTTP only in
dispatch, hypercorn only in server, pyroute2 only in netlink and the backends, and backends never
reach into the driver, the store or the server.

Every import counts, wherever it is written (module level, inside a function, under
TYPE_CHECKING).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CORE = ROOT / "netplug"
BACKENDS = ROOT / "backends"

# netplug module -> the netplug modules it may import.
ALLOWED: dict[str, set[str]] = {
    "errors": set(),
    "protocol": set(),
    "model": set(),
    "config": {"errors"},
    "store": {"model", "errors"},
    "rtnl": set(),
    "tasks": set(),
    "netlink": {"errors", "rtnl"},
    "firewall": {"errors", "model", "netlink", "tasks"},
    "backend": {"errors", "model", "netlink", "firewall"},
    "driver": {"errors", "protocol", "model", "store", "backend", "tasks"},
    "dispatch": {"errors", "protocol", "driver"},
    "server": {"dispatch"},
}
# The composition root and the command line may import anything of netplug's.
UNCONSTRAINED = {"__init__", "__main__", "app", "cli", "logs", "benchrun"}
BACKEND_ALLOWED = {"backend", "errors", "model", "netlink", "firewall", "tasks"}
HYPERCORN_ALLOWED = {"netplug/server.py"}


def core_modules() -> list[str]:
    return sorted(path.stem for path in CORE.glob("*.py"))


def all_files() -> list[Path]:
    return sorted([*CORE.glob("*.py"), *BACKENDS.glob("*.py")])


def rel(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


def package_of(path: Path) -> str:
    return "netplug" if path.parent == CORE else "netplug_backends"


def imported_names(path: Path, package: str | None = None) -> set[str]:
    """Absolute dotted names of everything `path` imports (`from a import b` gives `a`, or
    `netplug.b` when `b` is a module of netplug)."""
    package = package or package_of(path)
    submodules = set(core_modules())
    tree = ast.parse(path.read_text(), filename=str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                parts = parts[: len(parts) - node.level + 1]
                module = ".".join([*parts, *([node.module] if node.module else [])])
            else:
                module = node.module or ""
            if module == "netplug":
                for alias in node.names:
                    names.add(f"netplug.{alias.name}" if alias.name in submodules else "netplug")
            else:
                names.add(module)
    return names


def netplug_deps(path: Path, package: str | None = None) -> set[str]:
    """The netplug modules `path` imports, by short name (`__init__` for the package)."""
    package = package or package_of(path)
    deps: set[str] = set()
    for name in imported_names(path, package):
        parts = name.split(".")
        if parts[0] != "netplug":
            continue
        deps.add(parts[1] if len(parts) > 1 else "__init__")
    if package == "netplug":
        deps.discard(path.stem)
    return deps


def top_level(path: Path, package: str | None = None) -> set[str]:
    return {name.split(".")[0] for name in imported_names(path, package)}


def test_the_layout_is_what_the_rules_know() -> None:
    assert CORE.is_dir(), CORE
    assert BACKENDS.is_dir(), BACKENDS
    unknown = set(core_modules()) - set(ALLOWED) - UNCONSTRAINED
    assert not unknown, f"new netplug modules without a layering rule: {sorted(unknown)}"
    missing = set(ALLOWED) - set(core_modules())
    assert not missing, f"layering rules for modules that no longer exist: {sorted(missing)}"
    assert list(BACKENDS.glob("*.py")), "no backends found"


@pytest.mark.parametrize("module", sorted(ALLOWED))
def test_core_module_imports(module: str) -> None:
    path = CORE / f"{module}.py"
    extra = netplug_deps(path) - ALLOWED[module]
    assert not extra, (
        f"netplug/{module}.py imports netplug.{', netplug.'.join(sorted(extra))}; "
        f"it may import only {sorted(ALLOWED[module]) or 'nothing from netplug'}"
    )


@pytest.mark.parametrize("path", sorted(BACKENDS.glob("*.py")), ids=rel)
def test_backend_imports(path: Path) -> None:
    deps = netplug_deps(path)
    forbidden = deps & {"dispatch", "server", "driver", "store", "app", "cli"}
    assert not forbidden, f"{rel(path)} reaches into {sorted(forbidden)}"
    extra = deps - BACKEND_ALLOWED
    assert not extra, f"{rel(path)} imports {sorted(extra)}; allowed: {sorted(BACKEND_ALLOWED)}"


@pytest.mark.parametrize("path", all_files(), ids=rel)
def test_hypercorn_only_in_server(path: Path) -> None:
    if rel(path) not in HYPERCORN_ALLOWED:
        assert "hypercorn" not in top_level(path), f"{rel(path)} imports hypercorn"


@pytest.mark.parametrize("path", all_files(), ids=rel)
def test_pyroute2_only_in_netlink_and_backends(path: Path) -> None:
    if path.parent == CORE and path.stem != "netlink":
        assert "pyroute2" not in top_level(path), f"{rel(path)} imports pyroute2"


@pytest.mark.parametrize("path", all_files(), ids=rel)
def test_backends_package_is_netplug_backends(path: Path) -> None:
    # `backends/` is installed as `netplug_backends`; `import backends` only works from the
    # source tree by accident.
    assert "backends" not in top_level(path), f"{rel(path)} imports `backends`"


@pytest.mark.parametrize("path", sorted(CORE.glob("*.py")), ids=rel)
def test_core_finds_backends_through_entry_points(path: Path) -> None:
    assert "netplug_backends" not in top_level(path), (
        f"{rel(path)} imports netplug_backends; the core loads backends from the "
        "`netplug.backends` entry points"
    )


def test_the_checker_sees_every_import_form(tmp_path: Path) -> None:
    """The parser itself: relative imports, `from netplug import x`, TYPE_CHECKING, lazy."""
    source = tmp_path / "sample.py"
    source.write_text(
        "from typing import TYPE_CHECKING\n"
        "import hypercorn.config\n"
        "from netplug import protocol as p\n"
        "from . import model\n"
        "from .errors import NetplugError\n"
        "if TYPE_CHECKING:\n"
        "    from netplug.store import Store\n"
        "def f() -> None:\n"
        "    import pyroute2\n"
        "    from netplug import __version__\n"
        "    import backends.memory\n"
    )
    assert netplug_deps(source, "netplug") == {"protocol", "model", "errors", "store", "__init__"}
    assert {"hypercorn", "pyroute2", "typing", "netplug", "backends"} <= top_level(
        source, "netplug"
    )
    relative = tmp_path / "relative.py"
    relative.write_text("from .memory import MemoryBackend\nfrom . import bridge\n")
    assert imported_names(relative, "netplug_backends") == {
        "netplug_backends.memory",
        "netplug_backends",
    }


def module_level_names(path: Path) -> set[str]:
    """What importing `path` imports right away: module-level imports outside TYPE_CHECKING."""
    tree = ast.parse(path.read_text(), filename=str(path))
    names: set[str] = set()
    for node in tree.body:
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            names.add(node.module)
            if node.module == "netplug":
                names.update(f"netplug.{alias.name}" for alias in node.names)
    return names


def test_importing_app_builds_nothing() -> None:
    # `app` wires the concrete pieces; the kernel workers and hypercorn load only when it runs.
    eager = module_level_names(CORE / "app.py")
    assert not eager & {"netplug.netlink", "netplug.server", "hypercorn", "pyroute2"}, eager
