"""Which settings of a run depart from this code's defaults, for the report's first screen.

A scaled-down run (a few epochs, 40 audited records) reads like a default one unless the report says so. The
comparison is between the run's resolved config and :class:`auditml_core.config.Config`'s defaults, key by
dotted key (:func:`auditml_core.config.flatten`). The federated schedule keys are resolved from other keys under
DP (``<model>.federated.rounds`` takes ``dp_rounds`` where none was set): those count as departures only when
they differ from what the run's own DP settings resolve them to, so ``dp.enabled=true`` is one departure, not five.
"""

from __future__ import annotations

import json
from typing import Any

from auditml_core import config as config_mod
from auditml_core.config import Config

SHOWN = 3  # keys named on the first screen (one line at 1280 px); the full list is under Reproducibility


def _resolved_by_dp(cfg: Config) -> dict[str, Any]:
    """The federated schedule keys the run's DP settings resolve, with the values they resolve to (as
    :func:`auditml_core.config.load_config` does where neither a file nor an override set them)."""
    if not (cfg.dp.enabled or cfg.client_dp.enabled):
        return {}
    out = {}
    for name in config_mod.schedule_sections(cfg):
        own = getattr(cfg, name).federated
        for key, dp_key in config_mod.DP_SCHEDULE_KEYS.items():
            out[f"{name}.federated.{key}"] = getattr(cfg.federated, dp_key) or getattr(own, dp_key)
    return out


def _shown(value: Any) -> str:
    """A value as an override would write it (``[8]``, ``true``, ``3``, ``'path'``)."""
    return json.dumps(value, ensure_ascii=False) if not isinstance(value, str) else repr(value)


def departures(cfg: Config) -> dict[str, Any]:
    """The settings of ``cfg`` that differ from the defaults, in config order, and one sentence for the first screen.

    Returns
    -------
    ``{"n_changed": int, "changed": [{"key", "value", "default"}], "statement": str}``
    """
    run, default, by_dp = config_mod.flatten(cfg), config_mod.flatten(Config()), _resolved_by_dp(cfg)
    changed = [
        {"key": key, "value": value, "default": default.get(key)}
        for key, value in run.items()
        if value != default.get(key) and (key not in by_dp or value != by_dp[key])
    ]
    n = len(changed)
    if not n:
        statement = "Settings: every setting is this code's default."
    else:
        named = ", ".join(f"{c['key']}={_shown(c['value'])}" for c in changed[:SHOWN])
        more = f", {n - SHOWN} more" if n > SHOWN else ""
        statement = f"Settings: {n} {'differs' if n == 1 else 'differ'} from this code's defaults ({named}{more})."
    return {"n_changed": len(changed), "changed": changed, "statement": statement}
