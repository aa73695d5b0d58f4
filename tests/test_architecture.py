"""The package's import graph (docs/architecture.md): read from the source with `ast`, every
import counted (also those inside functions), it has no cycle, and every arrow points down the
layers below: a unit (a subpackage, or a module at the package root) imports only itself and
units of lower layers."""

from __future__ import annotations

import ast
import pathlib

import reducio_jax

PACKAGE = pathlib.Path(reducio_jax.__file__).resolve().parent
# Lowest first. A unit may import units of strictly lower layers (and itself), never a unit of
# its own layer or above.
LAYERS = (
    ("errors",),  # the exit statuses' base classes: imports nothing of the package
    ("config", "sharding", "storage"),  # the config schema, the mesh, paths and checkpoints
    ("models",),
    ("losses",),
    ("convert", "data", "metrics", "programs"),
    ("api",),  # ReducioVAE
    ("runs",),  # what the commands' runs share; reconstruct, eval, the parity report
    ("latents", "train"),
    ("aot",),  # compiles the training step and the inference programs for a topology
    ("cli", "__init__"),  # the commands, and what `import reducio_jax` gives
    ("__main__",),  # `python -m reducio_jax`
)
LAYER = {unit: i for i, units in enumerate(LAYERS) for unit in units}


def module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def unit_of(module: str) -> str:
    """`reducio_jax.programs.planner` -> "programs"; `reducio_jax` -> "__init__"."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def imports_of(path: pathlib.Path, modules: set[str]) -> set[str]:
    """The package modules `path` imports (absolute or relative, anywhere in the file)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            # `from P import M` imports the module P.M where there is one, else P
            targets = [f"{base}.{alias.name}" for alias in node.names]
            if any(t not in modules for t in targets):
                targets.append(base)
        else:
            continue
        for target in targets:
            while target and target not in modules:
                target = target.rpartition(".")[0]
            if target.startswith("reducio_jax") and target != name:
                found.add(target)
    return found


def import_graph() -> dict[str, set[str]]:
    files = sorted(PACKAGE.rglob("*.py"))
    modules = {module_name(f) for f in files}
    return {module_name(f): imports_of(f, modules) for f in files}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def test_every_unit_has_a_layer():
    units = {unit_of(m) for m in import_graph()}
    assert units == set(LAYER), f"give these a layer: {sorted(units ^ set(LAYER))}"


def test_no_import_cycle():
    assert cycles(import_graph()) == []


def test_every_arrow_points_down():
    upward = [
        f"{module} -> {target}"
        for module, targets in import_graph().items()
        for target in targets
        if unit_of(target) != unit_of(module) and LAYER[unit_of(target)] >= LAYER[unit_of(module)]
    ]
    assert upward == []


def test_the_ground_floor_imports_nothing_of_the_package():
    assert import_graph()["reducio_jax.errors"] == set()


def test_the_checks_see_an_upward_arrow_and_a_cycle():
    """The checks themselves can fail: a made-up arrow up and a made-up loop are found."""
    graph = import_graph()
    graph["reducio_jax.models.vae"] = graph["reducio_jax.models.vae"] | {"reducio_jax.api"}
    assert any("reducio_jax.api" in c for c in cycles(graph))
    assert LAYER[unit_of("reducio_jax.api")] > LAYER[unit_of("reducio_jax.models.vae")]
