"""A Ray runtime-env hook for the simulation: let Ray's pre-started workers serve the clients (issue 12).

Flower's ``RayBackend.init_ray`` puts ``sys.path`` into ``os.environ["PYTHONPATH"]`` and then calls
``ray.init(runtime_env={"env_vars": {"PYTHONPATH": <the same>}})``. ``ray.init`` starts this
machine's Ray node from that very process, so every worker inherits that environment already; but a
job with a runtime env cannot use the workers the raylet pre-starts (``default_worker.py``, one per
CPU): Ray starts new ones through ``setup_worker.py``, which imports Ray twice before the worker
runs. On 2 cores that cost the first round ~1 s, and the pre-started workers' start-up was spent for
nothing. :func:`runtime_env_hook` (Ray's ``RAY_RUNTIME_ENV_HOOK``, set by
:func:`federated.launch.simulation.run_simulation`) drops such ``env_vars`` when they are exactly the
driver's own environment and Ray starts its node here (no ``RAY_ADDRESS``); anything else passes
through unchanged. Standard library only: Ray loads it inside Flower's simulation process.
"""

from __future__ import annotations

import os
from typing import Any

HOOK = "federated.launch.ray_start.runtime_env_hook"


def runtime_env_hook(runtime_env: dict[str, Any] | None) -> dict[str, Any] | None:
    """``runtime_env`` without ``env_vars`` the workers inherit anyway (module docstring); else unchanged.

    Parameters
    ----------
    runtime_env : what the driver passed to ``ray.init`` (None: none).

    Returns
    -------
    None when nothing else is left, else ``runtime_env`` (unchanged unless every env var is inherited).
    """
    if not runtime_env or os.environ.get("RAY_ADDRESS"):
        return runtime_env
    env_vars = runtime_env.get("env_vars") or {}
    if set(runtime_env) != {"env_vars"} or any(os.environ.get(k) != v for k, v in env_vars.items()):
        return runtime_env
    return None
