"""The Flower apps' start-up: what a ServerApp/ClientApp process imports before its first round (issue 12).

Every simulated client (each Ray actor) and the ServerApp import their module before the first round; on
this 2-core machine Opacus' engine (via auditml_core.privacy.bk / auditml_core.privacy.ghost_conv) cost ~6 s and scikit-learn ~1.5-3 s of
it, for runs that never use them (scripts/bench_flower_floor.py measures the whole start-up). They are
imported where they are used; these checks run in a fresh interpreter, since pytest's own process has
imported everything already.
"""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

IMPORTS = textwrap.dedent(
    """
    import sys
    import federated.app.client_app, federated.app.server_app
    print("HEAVY", sorted({m.split(".")[0] for m in sys.modules} & {"opacus", "sklearn", "shap", "lime"}))
    """
)

GHOST = textwrap.dedent(
    """
    import sys
    import torch
    from torch import nn
    from opacus.grad_sample import GradSampleHooksFastGradientClipping as Hooks
    from auditml_core import seeds
    from auditml_core.privacy import dp_sgd as privacy
    from auditml_core.config import DPConfig

    assert "auditml_core.privacy.ghost_conv" not in sys.modules
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(2 * 6 * 6, 2))
    ds = torch.utils.data.TensorDataset(torch.zeros(64, 1, 8, 8), torch.zeros(64, dtype=torch.long))
    plan = privacy.plan(DPConfig(enabled=True, target_epsilon=3.0), n_samples=64, batch_size=16, max_grad_norm=1.0, epochs=1)
    run = privacy.make_private(
        model, torch.optim.SGD(model.parameters(), lr=0.1), ds, plan=plan,
        sampling_generator=seeds.make_generator("cpu", 1), noise_generator=seeds.make_generator("cpu", 1),
        grad_sample_mode="ghost", criterion=nn.CrossEntropyLoss(),
    )
    sampler = Hooks.NORM_SAMPLERS.get(nn.Conv2d)
    print("GHOST", run.criterion is not None and sampler is sys.modules["auditml_core.privacy.ghost_conv"].conv2d_norm_sample)
    """
)


COMPONENTS = textwrap.dedent(
    """
    import importlib, sys, tomllib
    from flwr.clientapp import ClientApp
    from flwr.serverapp import ServerApp

    components = tomllib.load(open("pyproject.toml", "rb"))["tool"]["flwr"]["app"]["components"]
    loaded = {}
    for kind, ref in components.items():
        module, attr = ref.split(":")
        loaded[kind] = getattr(importlib.import_module(module), attr)
    assert isinstance(loaded["serverapp"], ServerApp) and isinstance(loaded["clientapp"], ClientApp), loaded
    print("TORCH", "torch" in sys.modules)
    """
)


def _run(script: str) -> dict[str, str]:
    out = subprocess.run(
        [sys.executable, "-c", script],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return dict(line.split(" ", 1) for line in out.stdout.splitlines() if line.startswith(("HEAVY", "GHOST", "TORCH")))


def test_flower_apps_import_neither_opacus_nor_sklearn():
    heavy = _run(IMPORTS)["HEAVY"]
    assert heavy == "[]", f"the Flower apps import {heavy} at start-up; import them where they are used"


def test_the_flower_components_load_without_torch():
    """Flower loads them in its simulation process before it starts Ray (federated/app/components.py)."""
    assert _run(COMPONENTS)["TORCH"] == "False"


@pytest.mark.slow
def test_ghost_mode_registers_its_conv_norm_sampler_when_imported_lazily():
    assert _run(GHOST)["GHOST"] == "True"
