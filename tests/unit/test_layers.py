"""The package's imports flow one way: glue -> submission -> targets -> core -> base, with no circle.

Every import counts, at module level or inside a function (a lazy import is still a dependency), and so do
module paths named in strings (``importlib``, class paths) and the parent packages an import runs; only
imports in the body of ``if TYPE_CHECKING:`` do not, as they never run.
"""

from __future__ import annotations

import ast
import functools
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

import airflow_amlrun
from airflow_amlrun.targets.registry import CONNECTION_KINDS

PACKAGE = Path(airflow_amlrun.__file__).parent

# Lowest first. A module belongs to the first layer with a prefix naming it or a package above it.
LAYERS: list[tuple[str, list[str]]] = [
    # run_context is also copied alone into runs: it imports only the standard library (mlflow_capture
    # goes with it, and imports mlflow besides).
    ("base", ["errors", "config", "run_context", "mlflow_capture", "progress"]),
    ("core", ["snapshot", "environment", "history", "workspace"]),
    ("targets", ["targets", "hooks.docker_daemon", "hooks.ssh"]),
    (
        "submission",
        [
            "runconfig",
            "run",
            "run_output",
            "heartbeat",
            "submission",
            "run_api",
            "run_log",
            "recorded_run",
            "rerun",
            "model",
            "estimator",
            "hyperdrive",
            "experiment",
            "reconcile",
        ],
    ),
    (
        "glue",
        ["operators", "sensors", "triggers", "plugin", "hooks", "links", "cli", "get_provider_info", ""],
    ),
]
# Packages whose own __init__ sits in a lower layer than the prefix rule gives: importing `hooks.docker_daemon`
# runs `hooks/__init__.py`, so the targets may not find anything of the glue there.
EXACT = {"hooks": 2}
CORE = ("snapshot", "environment", "history", "workspace")
# What names the root package itself, not one of its modules.
ROOT_NAMES = {
    "airflow_amlrun",
    *(f"airflow_amlrun.{name}" for name in ("__version__", *airflow_amlrun.__all__)),
}
# A module path in a string: "airflow_amlrun.x.y", or "airflow_amlrun.x.y:Class".
DOTTED = re.compile(r"(airflow_amlrun(?:\.[A-Za-z_][A-Za-z0-9_]*)+)(?::[A-Za-z_][A-Za-z0-9_]*)?")


def modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


def _runtime_nodes(tree: ast.AST) -> Iterator[ast.AST]:
    """The nodes of a module that run: all but those of the bodies of `if TYPE_CHECKING:` (its else branch
    and `if not TYPE_CHECKING:` run)."""
    todo = [tree]
    while todo:
        node = todo.pop()
        yield node
        if isinstance(node, ast.If) and ast.unparse(node.test) in ("TYPE_CHECKING", "typing.TYPE_CHECKING"):
            todo.extend((node.test, *node.orelse))
        else:
            todo.extend(ast.iter_child_nodes(node))


# Each test reads the package's modules: parsed once a process.
@functools.cache
def imported_names(path: Path) -> tuple[str, ...]:
    """Dotted names a module imports when it runs (absolute; relative imports are resolved)."""
    return tuple(_imported_names(path))


def _imported_names(path: Path) -> Iterator[str]:
    tree = ast.parse(path.read_text())
    package = ".".join(("airflow_amlrun", *path.relative_to(PACKAGE).parent.parts))
    for node in _runtime_nodes(tree):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(
                    [*package.split(".")[: len(package.split(".")) - node.level + 1], base]
                ).strip(".")
            yield from (f"{base}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            named = DOTTED.fullmatch(node.value)
            if named:  # importlib.import_module("..."), a class path, importlib.resources.files("...")
                yield named.group(1)


def own_module(name: str, known: dict[str, Path]) -> str | None:
    """The package's module a dotted name refers to (longest known prefix), or None outside the package."""
    if name != "airflow_amlrun" and not name.startswith("airflow_amlrun."):
        return None
    rel = name.removeprefix("airflow_amlrun").lstrip(".")
    while rel and rel not in known:
        rel = rel.rpartition(".")[0]
    return rel


def layer_of(module: str) -> int:
    if module in EXACT:
        return EXACT[module]
    for index, (_name, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if module == prefix or (prefix and module.startswith(prefix + ".")):
                return index
    raise AssertionError(f"module {module!r} is in no layer: add it to LAYERS")


@functools.cache
def graph() -> dict[str, set[str]]:
    known = modules()
    edges: dict[str, set[str]] = {module: set() for module in known}
    for module, path in known.items():
        for name in imported_names(path):
            target = own_module(name, known)
            if target is None:
                continue
            if target == "" and module != "" and name in ROOT_NAMES:
                # The root package itself (`import airflow_amlrun`, its version, an export): the top layer.
                # Importing any module of the package runs it too, but it loads nothing until an export is
                # asked for.
                edges[module].add("")
            # Importing a.b.c runs a/__init__.py and a/b/__init__.py first (the root's lazy exports aside).
            parts = target.split(".")
            for found in {".".join(parts[:n]) for n in range(1, len(parts) + 1)} - {module, ""}:
                if found in known and not module.startswith(found + "."):
                    edges[module].add(found)
    return edges


def test_every_module_imports_only_its_own_layer_or_lower() -> None:
    upward = [
        f"{module} ({LAYERS[layer_of(module)][0]}) imports {target or 'airflow_amlrun'} "
        f"({LAYERS[layer_of(target)][0]})"
        for module, targets in graph().items()
        for target in sorted(targets)
        if layer_of(target) > layer_of(module)
    ]
    assert upward == []


def test_no_two_modules_import_each_other_even_lazily() -> None:
    edges = graph()
    circles = []
    for start in edges:
        # A depth-first walk from each module back to itself; the graph is small.
        stack = [(start, [start])]
        seen: set[str] = set()
        while stack:
            module, path = stack.pop()
            for target in edges[module]:
                if target == start:
                    circles.append(" -> ".join(m or "airflow_amlrun" for m in [*path, start]))
                elif target not in seen:
                    seen.add(target)
                    stack.append((target, [*path, target]))
    assert circles == []


def test_the_core_knows_no_airflow() -> None:
    known = modules()
    offending = [
        f"{module} imports {name}"
        for module, path in known.items()
        if module.split(".")[0] in CORE
        for name in imported_names(path)
        if name == "airflow"
        or name.startswith(("airflow.", "airflow_amlrun.hooks", "airflow_amlrun.operators"))
    ]
    assert offending == []


# Every target: the built-in local one, and the kind of each connection type.
TARGET_MODULES = sorted(
    {"airflow_amlrun.targets.local", *(path.partition(":")[0] for path in CONNECTION_KINDS.values())}
)


@pytest.mark.parametrize("module", TARGET_MODULES)
def test_a_target_imports_no_airflow(module: str) -> None:
    # The CLI, a notebook and the benchmarks run targets without Airflow: importing one must not pay for
    # Airflow's import (seconds), which only a connection (or a hook) needs. A fresh interpreter sees it all.
    code = f"import sys, {module}; print('airflow' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "False", f"importing {module} imports airflow"


def test_the_training_scripts_side_needs_only_the_standard_library() -> None:
    # run_context is copied alone into containers and remote hosts, whose Python has nothing else.
    imported = {name.split(".")[0] for name in imported_names(PACKAGE / "run_context.py")}
    assert imported - set(sys.stdlib_module_names) - {"__future__"} == set()


def test_the_mlflow_capture_needs_only_the_standard_library_mlflow_and_run_context() -> None:
    # It is copied with run_context into runs, where mlflow may be the only package installed.
    folder = PACKAGE / "mlflow_capture"
    imported = {name for path in folder.glob("*.py") for name in imported_names(path)}
    foreign = {
        name
        for name in imported
        if name.split(".")[0] not in {*sys.stdlib_module_names, "__future__", "mlflow"}
        and not name.startswith(("airflow_amlrun.run_context", "airflow_amlrun.mlflow_capture"))
    }
    assert foreign == set()
    assert "airflow_amlrun.run_context" in imported


def test_the_graph_sees_lazy_imports_and_skips_type_checking_ones() -> None:
    # The checks above pass trivially if the parser misses imports. Environment.register imports the
    # registry inside the method; the registry names Environment only for type checking.
    edges = graph()
    assert "environment.registry" in edges["environment.spec"]
    assert "environment.spec" not in edges["environment.registry"]
    assert "workspace" in edges["hooks.workspace"]
    assert layer_of("workspace") < layer_of("hooks.workspace")
    assert layer_of("targets.docker") < layer_of("run") < layer_of("operators.script_run")
    # A class path in a string, and a parent package run by an import, count.
    assert {"targets.docker", "targets.ssh"} <= edges["targets.registry"]
    assert "hooks" in edges["targets.docker"]
    # The root package named itself counts (its version); a logger named under it does not.
    assert "" in edges["get_provider_info"]
    assert "" not in edges["targets.spark_job"]


def test_only_the_body_of_if_type_checking_is_skipped(tmp_path: Path) -> None:
    tree = ast.parse(
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n    import a_typing_only\nelse:\n    import a_runtime\n"
        "if not TYPE_CHECKING:\n    import another_runtime\n"
    )
    names = {a.name for n in _runtime_nodes(tree) if isinstance(n, ast.Import) for a in n.names}
    assert names == {"a_runtime", "another_runtime"}
