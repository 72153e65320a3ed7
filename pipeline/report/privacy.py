"""The report's privacy section: what the DP guarantee covers, with which numbers, and every caveat.

Read by :mod:`pipeline.report`; the numbers come from the training records
(``TrainedModel.training["privacy"]``, central or federated) and, for distilled
students, from the distill stage's recorded privacy status. Records are read
generically: whatever keys a record has reach the report.
"""

from __future__ import annotations

import functools
from typing import Any, Mapping

from auditml_core.artifacts import jsonable
from auditml_core.config import Config
from auditml_core.models import MODELS, title
from auditml_core.privacy.dp_sgd import covers, merge_history
from auditml_core.privacy.second_accountant import RELATIVE_TOLERANCE, check_epsilon, derived_history
from auditml_core.teacher import fit_config
from pipeline.report.fmt import number


def independent_check(
    rec: Mapping[str, Any] | None, *, derive: Mapping[str, int] | None = None
) -> dict[str, Any] | None:
    """Recompute a DP record's ε with dp-accounting (PLD and RDP) and say whether the record understates it.

    With ``derive`` (``n_records``, ``batch_size``, ``epochs`` of a central training, taken from the data
    and the config, not from the record), the history replayed is rebuilt from them
    (:func:`~auditml_core.privacy.second_accountant.derived_history`) with the record's σ, so a record
    whose own history understates the steps or the sample rate is caught; otherwise (federated
    clients: one record per client under ``per_client``; students) the recorded history is replayed.
    Returns None for no record, else ``{"available": False, "reason": ...}`` when there is nothing to
    replay, or ``{"available": True, "agrees": ..., "checks": [...]}`` with one entry per history: the
    recorded ε, dp-accounting's PLD and RDP ε at the recorded δ, and whether the recorded ε lies in
    [PLD, RDP·(1 + tol)] (never below PLD, dp-accounting's upper estimate).
    """
    if not rec:
        return None
    sources: list[tuple[str, Mapping[str, Any]]] = []
    if isinstance(rec.get("per_client"), Mapping) and rec["per_client"]:
        sources = [(f"client {pid}", c) for pid, c in sorted(rec["per_client"].items()) if isinstance(c, Mapping)]
    elif rec.get("accountant_history") is not None or derive is not None:
        sources = [("model", rec)]
    checks = []
    for who, src in sources:
        history, delta, eps = src.get("accountant_history"), src.get("delta", rec.get("delta")), src.get("epsilon")
        derived = None
        if derive is not None and who == "model":
            if src.get("noise_multiplier") is None:
                return {"available": False, "reason": f"{who}: the record has no noise multiplier to replay"}
            try:
                derived = derived_history(**derive, noise_multiplier=float(src["noise_multiplier"]))
            except ValueError as exc:
                return {"available": False, "reason": f"{who}: {exc}"}
            history = derived
        if not history or delta is None or eps is None:
            return {"available": False, "reason": f"{who}: the record has no accountant history, δ or ε to replay"}
        try:
            chk = _cached_check(tuple(merge_history(history)), float(delta), float(eps))
        except ValueError as exc:
            return {"available": False, "reason": f"{who}: {exc}"}
        extra: dict[str, Any] = {"history_source": "recorded"}
        if derived is not None:
            (_, q, steps), recorded = derived[0], merge_history(src.get("accountant_history") or [])
            extra = {
                "history_source": f"derived from n = {derive['n_records']}, batch = {derive['batch_size']}, "
                f"epochs = {derive['epochs']}",
                "derived_steps": steps,
                "derived_sample_rate": q,
                # the record's own history spends at least the derived steps at the derived rate
                "recorded_history_covers_derived": covers(recorded, derived),
            }
        checks.append({"who": who, **chk, **extra})
    if not checks:
        return {"available": False, "reason": "the record has no accountant history to replay"}
    return {
        "available": True,
        "agrees": all(c["agrees"] for c in checks),
        "tolerance": RELATIVE_TOLERANCE,
        "rule": f"recorded ε within [PLD ε, RDP ε·(1 + {RELATIVE_TOLERANCE:g})]: never below PLD",
        "checks": checks,
    }


@functools.lru_cache(maxsize=256)
def _cached_check(history: tuple[tuple[float, float, int], ...], delta: float, epsilon: float) -> dict[str, Any]:
    """check_epsilon, once per distinct (history, δ, ε): federated clients often share a history."""
    return check_epsilon(history, delta=delta, recorded_epsilon=epsilon).to_dict()


def _schedule(cfg: Config, name: str, n_recorded: int, datasets: Mapping[str, Any]) -> dict[str, int] | None:
    """A central model's (n, batch, epochs) from the data and the config, for the derived ε check; None if federated."""
    if cfg.train.mode != "central":
        return None
    ds = datasets.get(MODELS[name].dataset)
    n = len(ds.y["train"]) if ds is not None else n_recorded
    fit = fit_config(cfg, name)
    return {"n_records": int(n), "batch_size": int(fit.batch_size), "epochs": int(fit.epochs)}


def check_caveat(name: str, chk: Mapping[str, Any] | None) -> str | None:
    if chk is None:
        return None
    if not chk["available"]:
        return f"{title(name)}: ε was NOT independently checked ({chk['reason']})."
    lines = [
        f"{c['who']}: recorded ε = {number(c['recorded_epsilon'], 4)}, PLD ε = {number(c['pld_epsilon'], 4)}, "
        f"RDP ε = {number(c['rdp_epsilon'], 4)}"
        for c in chk["checks"]
    ]
    verdict = (
        "the recorded ε lies between them (agrees)"
        if chk["agrees"]
        else "the recorded ε does NOT lie between them: DISAGREES, do not rely on the stated ε"
    )
    first = chk["checks"][0]
    source = first.get("history_source", "recorded")
    replay = (
        "replaying the recorded accountant history"
        if source == "recorded"
        else f"replaying {number(first['derived_steps'])} steps at sample rate {number(first['derived_sample_rate'], 4)} "
        f"{source} with the recorded σ, not the recorded history"
    )
    short = (
        " The record's own accountant history spends fewer steps or a lower sample rate than that: it understates."
        if first.get("recorded_history_covers_derived") is False
        else ""
    )
    return (
        f"{title(name)}: independent check of ε ({first['implementation']}, {replay} at δ = "
        f"{number(first['delta'], 3)}): " + "; ".join(lines) + f"; {verdict} ({chk['rule']})." + short
    ) + _rdp_looseness(chk["checks"])


def _rdp_looseness(checks: list[Mapping[str, Any]]) -> str:
    """A sentence when dp-accounting dropped RDP orders it could not evaluate (its RDP ε may then be loose)."""
    dropped = sorted({o for c in checks for o in c.get("rdp_orders_excluded") or []})
    if not dropped:
        return ""
    loose = [c["who"] for c in checks if c.get("rdp_may_be_loose")]
    shown = ", ".join(number(o, 3) for o in dropped[:6]) + (", ..." if len(dropped) > 6 else "")
    return f" dp-accounting could not evaluate RDP order(s) {shown} and left them out of its RDP minimum: " + (
        f"the best remaining order is next to a dropped one for {', '.join(loose)}, so that RDP ε is an upper "
        "bound that may be loose (the PLD value is unaffected)."
        if loose
        else "the best remaining order is not next to a dropped one (still an upper bound; the PLD value is "
        "unaffected)."
    )


_NO_DP_STATEMENT = (
    "No formal privacy guarantee: the models were trained without differential privacy "
    "(dp.enabled = false), so their weights, metrics and explanations may reveal training records."
)
_SEEDED_NOISE = (  # after "<Model>: "
    "dp.reproducible_noise = true, so DP-SGD's sampling and noise come from generators "
    "seeded by the run's recorded seed. Anyone holding this run directory can replay the training with "
    "and without a record and match the released weights exactly: the (ε, δ) guarantee holds only while "
    "the seed stays secret. Retrain with dp.reproducible_noise = false before release."
)
_CSPRNG_NOISE = (  # after "<Model>, <Model>: "
    "DP-SGD's Poisson sampling and Gaussian noise come from torch generators "
    "whose whole state is drawn from the OS's CSPRNG (os.urandom) and never recorded: 19,936 secret bits "
    "for the CPU's Mersenne Twister (the sampling always, the noise when training runs on the CPU), 126 "
    "for CUDA's Philox (its 64-bit key and counter offset, the most it accepts) when the noise is drawn on "
    "a GPU. Nothing in the run directory lets anyone replay them, and there are too many states to try. "
    "These are seeded pseudo-random generators with a secret full-entropy state, not a cryptographic "
    "stream like Opacus' secure mode (torchcsprng); the noise uses Opacus' floating-point-safe recipe."
)
CLIENT_LEVEL_NOT_CLAIMED = "Client-level (whole-client) privacy is not claimed"  # federated_privacy drops that caveat
_DP_COVERED = (
    "models/regressor.safetensors and models/cnn.safetensors: the network weights (DP-SGD output)",
    "checkpoints/*.pt of the networks: intermediate DP-SGD iterates, optimizer state and accountant history (all "
    "iterates are accounted); their per-epoch history holds no training-split statistic under DP (validation "
    "metrics, wall times and ε only: the noise-free training loss is not written)",
    "predictions, evaluation metrics and explanations computed from the DP weights, as far as they depend on the "
    "training split (post-processing)",
)
_DP_NOT_COVERED = (
    "models/ridge.json: the Ridge baseline is fitted on the training split without DP",
    "data/*.json preprocessing: scaler means and standard deviations (and imputed medians) come from the training "
    "split without DP",
    "data/*.npz: the data files themselves hold every split, training records included; never release them",
    "the public split: declared public, so not protected at all",
    "the validation and test splits: metrics, predictions and explained rows reveal them (DP covers training records only)",
    "models/*_public_only.safetensors and checkpoints/*_public_pretraining.safetensors: weights fitted without "
    "DP on the public split alone, before any private record was read (the public split is not protected)",
    "hyper-parameter choices and repeated runs on the same data: not accounted for in ε",
    "the number of training records (n_train) is treated as public",
    "class_counts of the training split (data section of report.json and report.html): exact "
    "per-class counts of the private records, released without noise",
)


def eps_delta(epsilon: Any, delta: Any) -> str:
    """``ε = …, δ = …`` as every (ε, δ) pair of this section is written (4 and 3 significant digits)."""
    return f"ε = {number(epsilon, 4)}, δ = {number(delta, 3)}"


def _no_dp_section(mode: str) -> dict[str, Any]:
    """The section of a run without DP: no guarantee, nothing covered."""
    return {
        "enabled": False,
        "mode": mode,
        "statement": _NO_DP_STATEMENT,
        "models": {},
        "covered": [],
        "not_covered": [
            "every artifact of this run: without DP nothing bounds what it reveals about a training record"
        ],
        "caveats": ["DP is off: there is no formal guarantee for any artifact; do not release the models as private."],
    }


def _claim(name: str, rec: Mapping[str, Any], chk: Mapping[str, Any] | None, *, seeded: bool) -> str:
    """One model's (ε, δ)-DP claim for the statement, with its σ, C, accountant and independent check."""
    detail = [f"accountant {str(rec.get('accountant', '?')).upper()}", f"Opacus {rec.get('opacus_version', '?')}"]
    if rec.get("noise_multiplier") is not None:
        detail.insert(0, f"σ = {number(rec['noise_multiplier'], 3)}, C = {number(rec.get('max_grad_norm'), 3)}")
    if "epsilon_per_client" in rec:
        detail.insert(0, f"worst of {len(rec['epsilon_per_client'])} clients")
    if chk and chk["available"]:
        c = max(chk["checks"], key=lambda c: c["recorded_epsilon"])
        detail.append(
            f"independently recomputed by {c['implementation']}: PLD ε = {number(c['pld_epsilon'], 4)}, "
            f"RDP ε = {number(c['rdp_epsilon'], 4)}, {'agrees' if chk['agrees'] else 'DISAGREES'}"
        )
    elif chk:
        detail.append("not independently checked")
    only_while = " only while the seed stays secret" if seeded else ""
    return (
        f"the {title(name)} is ({eps_delta(rec.get('epsilon'), rec.get('delta'))})-DP{only_while} ({', '.join(detail)})"
    )


def _claim_caveats(
    name: str, rec: Mapping[str, Any], chk: Mapping[str, Any] | None, n: int, *, seeded: bool
) -> list[str]:
    """One model's caveats: its independent check, a seeded noise source, δ against 1/n, ε over its target."""
    caveats = [line] if (line := check_caveat(name, chk)) is not None else []
    if seeded:
        caveats.append(f"{title(name)}: {_SEEDED_NOISE}")
    eps, delta = rec.get("epsilon"), rec.get("delta")
    if delta is not None and n:
        if delta >= 1.0 / n:
            caveats.append(
                f"{title(name)}: δ = {number(delta, 3)} is not below 1/n = 1/{n} = {number(1.0 / n, 3)}; "
                "such a δ permits leaking whole records. Lower dp.delta well below 1/n."
            )
        else:
            caveats.append(
                f"{title(name)}: δ = {number(delta, 3)} vs 1/n = {number(1.0 / n, 3)} (n = {n} training "
                f"records); δ·n = {number(delta * n, 3)}."
            )
    target = rec.get("target_epsilon")
    if target is not None and eps is not None and eps > target + 1e-9:
        caveats.append(f"{title(name)}: spent ε = {number(eps, 3)} exceeds the target {number(target, 3)}.")
    return caveats


def _coverage(bg_split: str, mode: str) -> tuple[list[str], list[str], list[str]]:
    """(covered, not covered, caveats) of a DP run: the explanations count only with public backgrounds; a
    federated run adds the clients' training loss and the per-client meaning of ε."""
    covered, not_covered, caveats = list(_DP_COVERED), list(_DP_NOT_COVERED), []
    if bg_split == "public":
        covered.append("explain/*: computed from the DP weights, the public split and test rows only (post-processing)")
    else:
        not_covered.append(
            f"explain/*: explanation backgrounds come from the private {bg_split} split "
            "(explain.background_split), so the explanations are not covered by DP"
        )
        caveats.append(
            f"explain.background_split = {bg_split!r}: explanation backgrounds use private training records, "
            "outside the DP guarantee."
        )
    if mode == "federated":
        not_covered.append(
            "training history in models/*.json: the clients' per-round training loss, sent to the server, is "
            "computed on their private batches without noise"
        )
        caveats.append(
            "Federated run: ε is computed per client, for records of that client's local data; the reported "
            f"ε is the worst client. {CLIENT_LEVEL_NOT_CLAIMED}."
        )
    return covered, not_covered, caveats


def privacy_section(
    cfg: Config, trained: Mapping[str, Any], datasets: Mapping[str, Any], explain_out: Any
) -> dict[str, Any]:
    """What is guaranteed, for which artifacts, with which numbers, and every caveat."""
    mode = cfg.train.mode
    records = {name: trained.models[name].training.get("privacy") for name in MODELS}
    n_train = {
        name: trained.models[name].training.get("n_train") or len(datasets[e.dataset].y["train"])
        for name, e in MODELS.items()
    }
    if not cfg.dp.enabled or not any(records.values()):
        return _no_dp_section(mode)
    checks = {
        name: independent_check(rec, derive=_schedule(cfg, name, n_train[name], datasets))
        for name, rec in records.items()
        if rec
    }
    parts: list[str] = []
    caveats: list[str] = []
    csprng_models: list[str] = []
    for name, rec in records.items():
        if not rec:
            continue
        # Records written before noise_source existed came from seeded generators: read them as seeded.
        seeded = rec.get("noise_source", "seeded") != "os-csprng"
        parts.append(_claim(name, rec, checks.get(name), seeded=seeded))
        caveats += _claim_caveats(name, rec, checks.get(name), n_train[name], seeded=seeded)
        if not seeded:
            csprng_models.append(title(name))
    if csprng_models:
        caveats.append(f"{', '.join(csprng_models)}: {_CSPRNG_NOISE}")
    unit = next(
        (r.get("unit_of_privacy") for r in records.values() if r and r.get("unit_of_privacy")),
        "one training record (sample-level DP)",
    )
    where = "each client's local data" if mode == "federated" else "the training split"
    statement = (
        f"Differential privacy (DP-SGD) protects {where} at the level of {unit}: "
        + "; ".join(parts)
        + ". The Ridge baseline, the scaler statistics and the other splits are not covered."
    )
    covered, not_covered, coverage_caveats = _coverage(cfg.explain.background_split, mode)
    return {
        "enabled": True,
        "mode": mode,
        "statement": statement,
        "models": jsonable(records),
        "independent_checks": jsonable(checks),
        "covered": covered,
        "not_covered": not_covered,
        "caveats": caveats + coverage_caveats,
    }
