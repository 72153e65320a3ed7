"""The house's shape: layers without loops (see ARCHITECTURE.md).

auditml_core and explain know nothing of Flower's apps or of stages; federated stands on auditml_core (inside it:
patches, then the Flower app, then the launchers); pipeline stands on all three. No import cycle between modules, and first-party imports
sit at module level (the one exception is commented in pipeline/train.py: Flower is
imported only when a federated run is asked for).
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# A module's floor is that of the longest package prefix listed here; imports may only point to the same or a lower
# floor. Floors inside federated: patches (Flower internals) < app (what `flwr run` loads) < launch (how it starts).
LAYER = {
    "auditml_core": 0,
    "explain": 0,
    "federated": 1,
    "federated.patches": 1,
    "federated.app": 2,
    "federated.launch": 3,
    "federated.site": 3,  # `python -m federated.site`: the per-site command's short entry point, a launcher
    "pipeline": 4,
}
PACKAGES = ("auditml_core", "explain", "federated", "pipeline")


def _floor(module: str) -> int:
    parts = module.split(".")
    return next(LAYER[".".join(parts[:i])] for i in range(len(parts), 0, -1) if ".".join(parts[:i]) in LAYER)


# Each edge imports a dependency that costs seconds, for a path that may never use it: Flower and Ray (a central run);
# Opacus (auditml_core.privacy.accounting, auditml_core.privacy.bk, auditml_core.privacy.ghost_conv: a run without DP, e.g. every federated client's start-up, issue 12,
# tests/federated/test_import_cost.py); torch, from the Flower components pyproject.toml names (federated.app.components: Flower
# loads them before it starts Ray, issue 12).
LAZY_ALLOWED = {
    ("federated.app.components", "federated.app.server_app"),
    ("federated.app.components", "federated.app.client_app"),
    ("federated.app.components", "federated.app.secagg_client"),
    ("pipeline.train", "federated.launch.simulation"),
    ("pipeline.__main__", "pipeline.serve"),  # FastAPI, uvicorn, prometheus-client: only `serve` needs them
    # the commands that use them import them (CLI start-up of config / verify / keygen pays for neither)
    ("pipeline.__main__", "pipeline"),
    ("pipeline.__main__", "pipeline.predict"),
    ("pipeline.__main__", "pipeline.tracking"),
    # where a run is logged: ~2 s of predict/distill/explain imports a run with tracking off never pays
    ("pipeline.tracking", "pipeline"),
    ("pipeline.tracking", "pipeline.predict_model"),
    ("pipeline.tracking", "pipeline.tracking_content"),
    ("pipeline.stage_workers", "auditml_core.distributed"),  # torch: the runner's import stays light
    ("auditml_core.privacy.dp_sgd", "auditml_core.privacy.accounting"),
    ("auditml_core.privacy.dp_sgd", "auditml_core.privacy.bk"),
    ("auditml_core.privacy.dp_sgd", "auditml_core.privacy.ghost_conv"),
}


def _modules() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for path in (ROOT / pkg).rglob("*.py"):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = path
    return out


def _edges(mods: dict[str, Path]) -> list[tuple[str, str, bool]]:
    """(importer, imported, at module level) for every first-party import."""
    edges = []
    for name, path in mods.items():
        for node in ast.walk(ast.parse(path.read_text())):
            targets: list[str] = []
            if isinstance(node, ast.ImportFrom) and node.module:
                targets = [node.module, *(f"{node.module}.{a.name}" for a in node.names)]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            for t in targets:
                if t in mods and t != name:
                    edges.append((name, t, node.col_offset == 0))
    return edges


def test_no_import_from_a_higher_layer():
    mods = _modules()
    upward = [(a, b) for a, b, _ in _edges(mods) if _floor(b) > _floor(a)]
    sideways = [(a, b) for a, b, _ in _edges(mods) if {a.split(".")[0], b.split(".")[0]} == {"auditml_core", "explain"}]
    assert upward == [] and sideways == []


def test_no_import_cycle():
    mods = _modules()
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for a, b, _ in _edges(mods):
        graph[a].add(b)
    state: dict[str, int] = {}
    cycles = []

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycles.append(stack[stack.index(nxt) :] + [nxt])
            elif nxt not in state:
                visit(nxt, stack)
        stack.pop()
        state[node] = 2

    for m in sorted(mods):
        if m not in state:
            visit(m, [])
    # A package's __init__ importing its own submodules is not a loop of the code's design.
    cycles = [c for c in cycles if not all(x.startswith(c[0]) or c[0].startswith(x) for x in c)]
    assert cycles == []


def test_first_party_imports_are_at_module_level():
    lazy = {(a, b) for a, b, top in _edges(_modules()) if not top}
    assert lazy <= LAZY_ALLOWED


def test_every_model_loop_reads_the_registry():
    """The registered model names appear as literals only where a model is defined or configured."""
    allowed = {"auditml_core/models.py", "auditml_core/teacher.py", "auditml_core/config.py", "pipeline/distill.py"}
    offenders = []
    for pkg in PACKAGES:
        for path in (ROOT / pkg).rglob("*.py"):
            rel = path.relative_to(ROOT).as_posix()
            if rel in allowed:
                continue
            text = path.read_text()
            if '("regressor", "cnn")' in text or '{"regressor": "tabular", "cnn": "images"}' in text:
                offenders.append(rel)
    assert offenders == []
