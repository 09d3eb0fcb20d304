"""The package's import graph, read with ast (nothing is imported): no circle, and no floor imports upward.

A room is a subpackage of mtp_plugin (or a module at its root). FLOORS says which floor each room stands
on; a room may import only rooms on lower floors (its own modules aside), and HOSTS says which rooms may
import a host framework. A new room (mtp_plugin/convert, mtp_plugin/speculate, ...) gets a line in each
table; until it has one, the test fails and names it.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "mtp_plugin"

FLOORS = {
    # the ground: framework-free helpers and MTP math
    "_lazy": 0,
    "core": 0,
    # typed settings and token data: only the ground below them
    "config": 1,
    "data": 1,
    # ρ bookkeeping: FLOPs of shapes, and of a configured model (reads config)
    "accounting": 2,
    # the host adapters: never each other, never an app
    "megatron": 3,
    "deepspeed": 3,
    # the apps: the training app, the seed-table CLI; the planner composes the app's configuration
    "train": 4,
    "rho": 4,
    "plan": 5,
    # decoding with the trained depths: loads the app's checkpoints into the Megatron model
    "speculate": 5,
    # checkpoint conversion to/from the Hugging Face layout: reads and writes the app's checkpoints
    "convert": 5,
}

# Host frameworks (top-level import names) and the rooms that may import them; every other room imports
# none, even lazily (Hydra: the app only; library code takes typed configs).
HOSTS = {
    "megatron": {"megatron", "data", "train", "plan", "speculate", "convert"},
    "deepspeed": {"deepspeed", "train"},
    "hydra": {"train"},
    "omegaconf": {"train"},
}


def _modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = ["mtp_plugin", *path.relative_to(PACKAGE).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def _imports(module: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """Every dotted name the module imports, anywhere in it (function-level imports count too).

    `from pkg import name` is `pkg.name` where that is a module of the package, else `pkg`: importing a
    submodule runs its package's `__init__` first, but that is the package's own edge, not the importer's.
    """
    names = set()
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{anchor}.{base}" if base else anchor
            for alias in node.names:
                names.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base)
    return names


def _graph() -> dict[str, set[str]]:
    """module -> the modules of the package it imports."""
    modules = _modules()
    return {m: {n for n in _imports(m, p, modules) if n in modules and n != m} for m, p in modules.items()}


def _room(module: str) -> str:
    return module.split(".")[1] if "." in module else "<root>"


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle, as the modules along it, or None (depth-first search, colouring)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_the_package_import_graph_has_no_circle():
    cycle = _cycle(_graph())
    assert cycle is None, "import circle: " + " -> ".join(cycle)


def test_every_room_has_a_floor():
    rooms = {_room(m) for m in _modules()} - {"<root>"}
    missing = sorted(rooms - set(FLOORS))
    assert not missing, f"add {missing} to FLOORS (and HOSTS if they import a host framework)"
    assert not sorted(set(FLOORS) - rooms), "FLOORS names a room that no longer exists"


def test_no_room_imports_a_room_on_its_floor_or_above():
    upward = sorted(
        f"{m} imports {n}"
        for m, targets in _graph().items()
        for n in targets
        if _room(m) != _room(n) and FLOORS[_room(n)] >= FLOORS[_room(m)]
    )
    assert not upward, "\n".join(upward)


def test_only_the_listed_rooms_import_a_host_framework():
    modules = _modules()
    found = sorted(
        f"{m} imports {name}"
        for m, path in modules.items()
        for name in _imports(m, path, modules)
        if name.split(".")[0] in HOSTS and _room(m) not in HOSTS[name.split(".")[0]]
    )
    assert not found, "\n".join(found)


@pytest.mark.parametrize(
    ("graph", "expected"),
    [
        ({"a": {"b"}, "b": {"c"}, "c": set()}, None),
        ({"a": {"b"}, "b": {"c"}, "c": {"a"}}, ["a", "b", "c", "a"]),
        ({"a": {"a2"}, "a2": set(), "x": {"y"}, "y": {"x"}}, ["x", "y", "x"]),
    ],
)
def test_the_circle_finder_finds_circles(graph, expected):
    assert _cycle(graph) == expected


def test_the_graph_sees_function_level_imports():
    # lm_patch imports lm_builder inside a function; the edge must be there for the circle test to mean anything.
    graph = _graph()
    assert "mtp_plugin.megatron.lm_builder" in graph["mtp_plugin.megatron.lm_patch"]
    assert "mtp_plugin.megatron.lm_model" in graph["mtp_plugin.megatron.lm_builder"]
