"""The client's half of secure aggregation (SecAgg+): a mod on the ClientApp's ``train`` handler.

:func:`secagg_mod` hands SecAgg+ messages to Flower's ``secaggplus_mod`` and translates between the
legacy ``FitIns``/``FitRes`` records it speaks and the handler's ``arrays``/``config``/``metrics``
records. Under ``federated.secure_aggregation`` a client refuses any training request that is not part
of the protocol, so its weights never leave it in the clear. Under user-level DP it uploads its clipped
update (zero when not sampled) with its own noise where the plan puts noise on the clients.
What each party sees, and the server's half: :mod:`federated.app.secagg`.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.client.mod import secaggplus_mod
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS
from flwr.compat.common import recorddict_compat as compat

from auditml_core.config import SecAggConfig, federated_schedule
from auditml_core.errors import ConfigError
from auditml_core.privacy.client_noise import ClientNoise, noisy_upload, out_of_range, rounding_safe_norm
from auditml_core.privacy.user_level import UserDPPlan, plan_user_dp, private_rng
from federated.app.run_config import from_run_config
from federated.app.secagg import SECAGG_KEY, SecAggParams, SecAggRefusal, noise_plan


def secagg_enabled(run_config: dict[str, Any]) -> bool:
    """Whether this run's config turns secure aggregation on."""
    return bool(run_config.get(SECAGG_KEY, False))


def secagg_mod(msg: Message, ctxt: Context, call_next) -> Message:
    """Client mod on ``train``: Flower's ``secaggplus_mod`` when the run-config asks for secure aggregation.

    Off, it refuses SecAgg+ messages (the two apps disagree) and passes everything else on. On,
    it refuses any training request outside the protocol: the update must never leave in the clear.
    """
    in_protocol = RECORD_KEY_CONFIGS in msg.content.config_records
    if not secagg_enabled(ctxt.run_config):
        if in_protocol:
            raise ConfigError(
                f"the server runs SecAgg+ but this client's run-config has {SECAGG_KEY}=false; run both with the same config"
            )
        return call_next(msg, ctxt)
    if not in_protocol:
        raise SecAggRefusal(
            f"{SECAGG_KEY}=true, but the server asked for this client's update outside SecAgg+; refusing to send it "
            "in the clear"
        )
    return secaggplus_mod(msg, ctxt, _legacy_adapter(call_next))


def _legacy_adapter(call_next):
    """Wrap the ``train`` handler: legacy FitIns in, legacy FitRes out (what ``secaggplus_mod`` expects)."""

    def handler(msg: Message, ctxt: Context) -> Message:
        fitins = compat.recorddict_to_fitins(msg.content, keep_input=True)
        keys = [str(k) for k in json.loads(str(fitins.config["param-keys"]))]
        arrays = ArrayRecord(
            OrderedDict((k, Array(np.asarray(v))) for k, v in zip(keys, parameters_to_ndarrays(fitins.parameters)))
        )
        config = ConfigRecord({k: v for k, v in fitins.config.items() if k not in ("param-keys", "dp-sampled")})
        dp = _user_dp_of(ctxt.run_config, model=str(fitins.config.get("model", "")))
        if dp is not None and "dp-sampled" not in fitins.config:
            raise ConfigError(
                "this client runs user-level DP (client_dp.enabled=true) but the server sent no dp-sampled flag; run "
                "both apps with the same config"
            )
        sampled = dp is None or bool(int(fitins.config.get("dp-sampled", 0)))
        if not sampled:  # user-level DP, not in this round's sample: no training, a zero update (+ noise)
            pid = int(ctxt.node_config.get("partition-id", -1))
            metrics = {"num-examples": 0, "partition-id": pid, "refused": 0, "seconds": 0.0}
            content = RecordDict({"metrics": MetricRecord(metrics)})
        else:
            original = msg.content
            msg.content = RecordDict({"arrays": arrays, "config": config})  # the handler's own record layout
            try:
                content = call_next(msg, ctxt).content
            finally:
                msg.content = original
        if dp is None:
            return Message(_to_fitres_record(content, keys, ctxt.run_config), reply_to=msg)
        global_weights = [arrays[k].numpy() for k in keys]
        return Message(_dp_fitres_record(content, keys, global_weights, dp, sampled=sampled), reply_to=msg)

    return handler


def _weights_or_refuse(content: RecordDict, keys: list[str]) -> list[np.ndarray]:
    if "arrays" not in content:  # a client out of privacy budget: under SecAgg+ it drops out of the round
        status = content.config_records.get("status")
        raise SecAggRefusal(str(status["refused"]) if status is not None else "the client sent no weights")
    return [content["arrays"][k].numpy() for k in keys]


def _fitres_record(content: RecordDict, metrics: dict[str, Any], upload: list[np.ndarray], n: int) -> RecordDict:
    status = content.config_records.get("status")
    if status is not None and "privacy" in status:
        metrics["privacy"] = str(status["privacy"])
    fitres = FitRes(
        status=Status(code=Code.OK, message="OK"),
        parameters=ndarrays_to_parameters(upload),
        num_examples=n,
        metrics=metrics,
    )
    return compat.fitres_to_recorddict(fitres, keep_input=True)


def _to_fitres_record(content: RecordDict, keys: list[str], run_config: dict[str, Any]) -> RecordDict:
    """The handler's reply (``arrays``, ``metrics``, optional ``status``) as a legacy FitRes record."""
    metrics = {k: v for k, v in content["metrics"].items()}
    weights = _weights_or_refuse(content, keys)
    clip = float(run_config.get("federated.secagg.clipping_range", SecAggConfig.clipping_range))
    metrics["secagg-clipped"] = int(sum(int(np.sum(np.abs(w) > clip)) for w in weights))
    return _fitres_record(content, metrics, weights, int(metrics["num-examples"]))


# the generator each client's noise comes from (tests replace it with a seeded one)
noise_rng: Callable[[], np.random.Generator] = private_rng


@dataclass(frozen=True)
class _ClientDP:
    plan: UserDPPlan
    noise: ClientNoise
    quantization_step: float  # SecAgg+'s rounding grid for these uploads


_DP_CACHE: dict[str, _ClientDP | None] = {}


def _user_dp_of(run_config: dict[str, Any], *, model: str = "") -> _ClientDP | None:
    """The user-level plan and noise this client derives from its own run-config (None: user DP off).

    The client does not take the noise level from the server's messages: it plans σ itself,
    exactly as the server does (the same deterministic Opacus search, over ``model``'s own rounds), once per
    process and model. ``model``: the one the message names ("" = the run's only model).
    """
    if model:
        run_config = {**run_config, "app.model": model}
    key = json.dumps(sorted((str(k), str(v)) for k, v in run_config.items()))
    if key not in _DP_CACHE:
        cfg, settings = from_run_config(run_config)
        if not cfg.client_dp.enabled:
            _DP_CACHE[key] = None
        else:
            if len(settings.models) != 1:
                raise ConfigError(
                    f"this run trains {settings.model!r} but the message names no model (its config has no 'model' "
                    "key); run both apps from the same version"
                )
            rounds = federated_schedule(cfg, settings.models[0]).rounds  # this model's own rounds
            plan = plan_user_dp(cfg.client_dp, rounds=rounds, n_clients=cfg.federated.n_clients)
            noise = noise_plan(cfg, plan)
            step = SecAggParams.from_config(cfg.federated.secagg, max_weight=1.0, noise=noise).quantization_step()
            _DP_CACHE[key] = _ClientDP(plan=plan, noise=noise, quantization_step=step)
    return _DP_CACHE[key]


def _dp_fitres_record(
    content: RecordDict,
    keys: list[str],
    global_weights: list[np.ndarray],
    dp: _ClientDP,
    *,
    sampled: bool,
) -> RecordDict:
    """Upload ``clip_C(weights − global)`` (zero if not sampled) [+ this client's noise], with weight 1.

    With server-placed noise the update is clipped to ``C − step·√d`` so that SecAgg+'s rounding
    keeps it within ``C`` (:func:`auditml_core.privacy.client_noise.rounding_safe_norm`).

    Refuses (drops out of the round) when any coordinate would leave the SecAgg+ range: the
    range is sized so that this happens with probability at most 2Φ(−k) per coordinate, and a
    silent clip would break the analysis (``auditml_core/privacy/client_noise.py``).
    """
    metrics = {k: v for k, v in content["metrics"].items() if k != "train-loss"}  # no data-dependent value in clear
    weights = _weights_or_refuse(content, keys) if sampled else None
    clip = dp.plan.clipping_norm
    if dp.noise.placement == "server":
        d = sum(int(np.size(g)) for g in global_weights)
        clip = rounding_safe_norm(clip, quantization_step=dp.quantization_step, n_parameters=d)
    upload, norm = noisy_upload(
        global_weights, weights, clipping_norm=clip, noise_std=dp.noise.noise_std, rng=noise_rng()
    )
    outside = out_of_range(upload, dp.noise.clipping_range)
    if outside:
        raise SecAggRefusal(
            f"{outside} coordinate(s) of this client's noised update lie outside the SecAgg+ range "
            f"±{dp.noise.clipping_range:.6g}; refusing to upload rather than let them be clipped (this round goes on "
            "without this client; the chance is counted in the recorded δ)"
        )
    metrics.update({"dp-sampled": int(sampled), "dp-clipped": int(norm > dp.plan.clipping_norm), "secagg-clipped": 0})
    return _fitres_record(content, metrics, upload, 1)


__all__ = ["noise_rng", "secagg_enabled", "secagg_mod"]
