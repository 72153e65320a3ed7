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


def _check_caveat(name: str, chk: Mapping[str, Any] | None) -> str | None:
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
_CLIENT_LEVEL_NOT_CLAIMED = "Client-level (whole-client) privacy is not claimed"  # federated_privacy drops that caveat
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


def _eps_delta(epsilon: Any, delta: Any) -> str:
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
        f"the {title(name)} is ({_eps_delta(rec.get('epsilon'), rec.get('delta'))})-DP{only_while} "
        f"({', '.join(detail)})"
    )


def _claim_caveats(
    name: str, rec: Mapping[str, Any], chk: Mapping[str, Any] | None, n: int, *, seeded: bool
) -> list[str]:
    """One model's caveats: its independent check, a seeded noise source, δ against 1/n, ε over its target."""
    caveats = [line] if (line := _check_caveat(name, chk)) is not None else []
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
            f"ε is the worst client. {_CLIENT_LEVEL_NOT_CLAIMED}."
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


def _student_statuses(distill_out: Any) -> dict[str, Mapping[str, Any]]:
    out = {}
    for model, o in distill_out.items() if isinstance(distill_out, Mapping) else []:
        status = (o.get("record", {}) or {}).get("privacy") if isinstance(o, Mapping) else None
        if isinstance(status, Mapping):
            out[model] = status
    return out


def student_statement(distill_out: Any) -> str:
    """One sentence on the distilled students' guarantees, for the privacy statement ('' without students)."""
    bits = []
    for model, status in _student_statuses(distill_out).items():
        g = status.get("guarantee")
        if g in ("inherited", "composed"):
            bits.append(
                f"students/{model}.* {g} ({_eps_delta(status.get('epsilon'), status.get('delta'))})"
                + (", OVER the budget dp.target_epsilon" if status.get("over_budget") else "")
            )
        else:
            bits.append(f"students/{model}.* NO DP guarantee")
    return ("Distilled students: " + "; ".join(bits) + ".") if bits else ""


def student_checks(distill_out: Any) -> dict[str, dict[str, Any]]:
    """Independent ε checks of the students that ran their own DP-SGD, keyed ``"student <model>"``."""
    out = {}
    for model, o in distill_out.items() if isinstance(distill_out, Mapping) else []:
        record = (o.get("record") or {}) if isinstance(o, Mapping) else {}
        rec = (record.get("training") or {}).get("privacy") if isinstance(record, Mapping) else None
        if isinstance(rec, Mapping) and (chk := independent_check(rec)) is not None:
            out[f"student {model}"] = chk
    return out


def student_check_caveats(checks: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """One caveat line per student check (the student's own DP-SGD ε, before composition with its teacher)."""
    lines = []
    for key, chk in checks.items():
        model = key.removeprefix("student ")
        line = _check_caveat(model, chk)
        if line is not None:
            lines.append(
                f"students/{model}.* (student of the {title(model)}) own DP-SGD, before composition: "
                + line.split(": ", 1)[1]
            )
    return lines


def student_caveats(distill_out: Any, n_train: Mapping[str, int] | None = None) -> list[str]:
    """Caveats on distilled students' guarantees: a composed (ε, δ) above the budget, or a composed δ that is not
    below 1/n (n = the teacher's training records), is flagged."""
    caveats = []
    for model, status in _student_statuses(distill_out).items():
        n = (n_train or {}).get(model)
        delta = status.get("delta")
        if status.get("guarantee") == "composed" and n and isinstance(delta, (int, float)) and delta >= 1.0 / n:
            caveats.append(
                f"students/{model}.*: the composed δ = {number(delta, 3)} is not below 1/n = {number(1.0 / n, 3)} "
                f"(n = {n} training records): a guarantee with δ ≥ 1/n allows revealing a record outright."
            )
        if status.get("guarantee") == "composed" and status.get("over_budget"):
            caveats.append(
                f"students/{model}.*: the student of the {title(model)} read private records with its own DP-SGD; "
                f"composed with its teacher (basic composition) it is "
                f"({_eps_delta(status.get('epsilon'), status.get('delta'))})-DP, OVER the budget dp.target_epsilon = "
                f"{number(status.get('target_epsilon'), 3)}. Use distill.transfer = public to keep the teacher's (ε, δ)."
            )
    return caveats


def student_privacy(distill_out: Any) -> tuple[list[str], list[str]]:
    """(covered, not covered) lines for distilled students, from their recorded privacy status."""
    covered, not_covered = [], []
    for model, status in _student_statuses(distill_out).items():
        what = f"students/{model}.* (distilled student of the {title(model)})"
        guarantee = status.get("guarantee")
        detail = status.get("reason") or (
            f"ε = {number(status.get('epsilon'), 3)}" if status.get("epsilon") is not None else ""
        )
        if guarantee in ("inherited", "composed"):
            covered.append(
                f"{what}: {guarantee} guarantee"
                + (f", ε = {number(status.get('epsilon'), 4)}" if status.get("epsilon") is not None else "")
                + (f", δ = {number(status.get('delta'), 3)}" if status.get("delta") is not None else "")
                + (" (OVER the budget dp.target_epsilon)" if status.get("over_budget") else "")
                + (f" ({status['reason']})" if status.get("reason") else "")
            )
        else:
            not_covered.append(f"{what}: no guarantee ({detail})")
    for model, o in distill_out.items() if isinstance(distill_out, Mapping) else []:
        record = (o.get("record") or {}) if isinstance(o, Mapping) else {}
        teacher_file = ((record.get("onnx") or {}) if isinstance(record, Mapping) else {}).get("teacher_file")
        if teacher_file:
            covered.append(
                f"{teacher_file}: the DP teacher's weights exported as a served ONNX graph (post-processing of the "
                "weights); the standardisation statistics inside the graph come from the training split and are "
                "not covered (see data/*.json preprocessing)"
            )
        tree = record.get("tree_student") if isinstance(record, Mapping) else None
        if isinstance(tree, Mapping) and isinstance(tree.get("privacy"), Mapping):
            tp = tree["privacy"]
            what = f"students/{model}.json tree_student (the decision-tree student's rules, thresholds and leaves)"
            if tp.get("guarantee") == "inherited":
                covered.append(
                    f"{what}: inherited guarantee, {_eps_delta(tp.get('epsilon'), tp.get('delta'))} "
                    f"({tp.get('reason')})"
                )
            else:
                not_covered.append(f"{what}: no guarantee ({tp.get('reason')})")
        elif isinstance(tree, Mapping):  # recorded before trees had a privacy status: fitted on the whole transfer set
            splits = (record.get("transfer") or {}).get("splits") or []
            if "train" in splits:
                not_covered.append(
                    f"students/{model}.json tree_student: the decision tree was fitted without DP on the transfer "
                    "set, which holds private training rows; its thresholds are midpoints of private values"
                )
        if "train" in ((record.get("transfer") or {}).get("splits") or []):
            not_covered.append(
                f"students/{model}.json transfer_index: the source-data row numbers of the private training records "
                "the student read (who is in the training split), recorded as is"
            )
            if record.get("training") and not record["training"].get("privacy"):  # DP: no training loss is written
                not_covered.append(
                    f"students/{model}.json training history: the student's per-epoch training loss is computed on "
                    "private transfer rows without noise"
                )
    return covered, not_covered


# --- federated runs: threat model and user-level DP (issue 14) -----------------------------------


_THREAT_BASE = (
    "Threat model: an honest-but-curious server (it follows the protocol but reads everything it receives) and "
    "anyone who later sees the released model, metrics or explanations."
)
_NO_SECAGG = "Secure aggregation is not used: the server sees each participating client's model update in the clear."
_SAMPLE_LEVEL_ON_CLIENTS = (
    "Sample-level DP-SGD on each client: protects each training record of a client from the server and from "
    "anyone who sees the released models, since every update a client sends is already DP-SGD output."
)


def _training(trained: Any, name: str) -> Mapping[str, Any]:
    """A model's training record ({} when there is none)."""
    return trained.models[name].training or {}


def _recorded(trained: Any, key: str) -> dict[str, Any]:
    """The models whose training record has a non-empty ``key``, in model order: {model: that value}."""
    values = {name: trained.models[name].training.get(key) for name in MODELS}
    return {k: v for k, v in values.items() if v}


def _levels(user: Mapping[str, Any], section: Mapping[str, Any], *, sample_on: bool) -> list[dict[str, Any]]:
    """Every (ε, δ) of the run with its unit of privacy: user level per model, then sample level when on."""
    levels = [
        {
            "model": name,
            "level": "user",
            "unit_of_privacy": rec.get("unit_of_privacy"),
            "epsilon": rec.get("epsilon"),
            "delta": rec.get("delta"),
            "noise_multiplier": rec.get("noise_multiplier"),
            "clipping_norm": rec.get("clipping_norm"),
            "sample_rate": rec.get("sample_rate"),
            "rounds": rec.get("completed_rounds"),
            "accountant": rec.get("accountant"),
            "independent_check": rec.get("independent_check"),
            "noise_placement": rec.get("noise_placement", "server"),
            "delta_accountant": rec.get("delta_accountant", rec.get("delta")),
            "delta_clip": rec.get("delta_clip", 0.0),
            "known_sample": rec.get("known_sample"),
        }
        for name, rec in user.items()
    ]
    if sample_on:
        levels += [
            {
                "model": name,
                "level": "sample",
                "unit_of_privacy": rec.get("unit_of_privacy"),
                "epsilon": rec.get("epsilon"),
                "delta": rec.get("delta"),
            }
            for name, rec in (section.get("models") or {}).items()
            if rec
        ]
    return levels


def _level_line(level: Mapping[str, Any]) -> str:
    """One level for the statement: model, level, (ε, δ) (δ split when a SecAgg+ clip adds to it), unit."""
    split = (
        f": the accountant's {number(level['delta_accountant'], 3)} plus {number(level['delta_clip'], 3)} for a "
        "SecAgg+ clip"
        if level.get("delta_clip")
        else ""
    )
    return (
        f"{title(level['model'])}: {level['level']}-level ({_eps_delta(level['epsilon'], level['delta'])}{split}), "
        f"unit of privacy: {level['unit_of_privacy']}"
    )


def _secagg_view(noise_placements: set[str]) -> tuple[str, str, str]:
    """(what the server learns, what it sees, how SecAgg+'s range is kept) for uploads that are plain model
    weights (no user-level DP: empty ``noise_placements``) or clipped updates noised by the server or the clients."""
    if not noise_placements:
        return (
            "the weighted average of the clients that completed a round",
            "the average (the global model) is seen by the server and released",
            "a round in which any uploaded coordinate would be clipped fails instead of being released",
        )
    # Under user-level DP the uploads are clipped updates (weight 1) and the release is their noisy sum over q·N
    # (federated/app/secagg.py): the server unmasks a sum, not the global model.
    noised = noise_placements == {"client"}
    learns = "the sum of the clipped model updates of the clients that completed a round" + (
        " (each already carrying its client's noise)" if noised else ""
    )
    seen = (
        "that sum is seen by the server"
        + ("" if noised else " without noise")
        + "; the released global model adds it"
        + ("" if noised else ", plus the server's DP noise,")
        + " over q·N to the previous one"
    )
    clip_note = (
        "a client refuses an upload with any coordinate outside it, so nothing is clipped; each client "
        "reports whether its update was clipped to C (dp-clipped in the record)"
        if noised
        else "a client's update is clipped to C less the rounding slack, so its coordinates lie inside it; "
        "each client reports whether its update was clipped (dp-clipped in the record)"
    )
    return learns, seen, clip_note


def _secagg_threat(secagg: Mapping[str, Any], user: Mapping[str, Any]) -> str:
    """What SecAgg+ hides from the server, and from whom it does not (issue 14; federated/app/secagg.py)."""
    sa = next(iter(secagg.values()))
    placements = {
        (user.get(n) or {}).get("noise_placement", "server") for n in secagg if "uploads" in (secagg[n] or {})
    }
    learns, seen, clip_note = _secagg_view(placements)
    return (
        f"Secure aggregation (SecAgg+, for {', '.join(title(n) for n in secagg)}): each client masks its upload, so "
        f"the server learns only {learns}, never one client's "
        f"model or update, unless it colludes with at least {sa.get('reconstruction_threshold')} of that client's "
        f"{sa.get('num_shares')} key-share holders. It hides individual updates from the server only: {seen}. "
        "The server relays the clients' public keys, so "
        "this holds against an honest-but-curious server, not an actively malicious one. SecAgg+'s range is "
        f"±{number(sa.get('clipping_range'), 4)}, quantised in steps of {number(sa.get('quantization_step'), 3)} "
        f"({clip_note})."
    )


def _client_noise_threat(name: str, rec: Mapping[str, Any]) -> str:
    """User-level DP with the noise added by the clients under SecAgg+ (auditml_core/privacy/client_noise.py)."""
    cn, ks = rec.get("client_noise") or {}, rec.get("known_sample") or {}
    return (
        f"User-level DP for {title(name)} (DP-FedAvg, noise added by the clients under SecAgg+): every client adds "
        f"Gaussian noise of std {number(cn.get('noise_std'), 4)} (σ·C/√t, t = {cn.get('min_survivors')}) to its "
        "clipped update (a zero update when not sampled) before masking, and the server unmasks a round only "
        f"when at least t uploads arrived, so the server never holds a sum with noise below σ·C = "
        f"{number((rec.get('noise_multiplier') or 0) * (rec.get('clipping_norm') or 0), 4)}. Against the "
        "server, which draws the sample and knows who took part, sampling does not amplify: a client is "
        f"protected at ε = {number(ks.get('epsilon'), 4)} (σ over the at most {ks.get('max_participations')} "
        f"rounds it took part in); the ε = {number(rec.get('epsilon'), 4)} with sampling holds against whoever "
        "sees only the released models. This assumes no client hands its noise to the server and that "
        "dropping out does not depend on a client's data or on its being sampled."
    )


def _server_noise_threat(*, secagg: bool) -> str:
    """User-level DP with the noise added by the server: nothing protects a client from the server itself."""
    return (
        "User-level DP (DP-FedAvg, noise added by the server): protects a whole client's data from whoever sees "
        "the released global models (every round's model, the final weights and everything computed from them). "
        + (
            "It does NOT protect a client from the server itself, which adds the noise after receiving the "
            "un-noised aggregate of the clients' updates (secure aggregation hides the individual ones). Under "
            "secure aggregation each client clips its own update (the server cannot): the bound C holds for "
            "clients that follow the protocol."
            if secagg
            else "It does NOT protect a client from the server itself, which receives the un-noised individual updates."
        )
    )


def _threat_model(
    user: Mapping[str, Any], secagg: Mapping[str, Any], client_noise: Mapping[str, Any], *, sample_on: bool
) -> list[str]:
    """Who is trusted with what, and what DP hides from whom at each level that is on."""
    threat = [_THREAT_BASE, _secagg_threat(secagg, user) if secagg else _NO_SECAGG]
    threat += [_client_noise_threat(name, rec) for name, rec in client_noise.items()]
    if set(user) - set(client_noise):
        threat.append(_server_noise_threat(secagg=bool(secagg)))
    if sample_on:
        threat.append(_SAMPLE_LEVEL_ON_CLIENTS)
    return threat


def _reported_metrics(trained: Any) -> list[str]:
    """What the clients reported in the clear, read from the record (not from what the code should send)."""
    return sorted(
        {
            key
            for name in MODELS
            for r in _training(trained, name).get("client_rounds") or []
            for c in r.get("trained") or []
            for key in c
            if key not in ("node_id", "partition-id", "privacy")
        }
    )


def _federated_not_covered(
    trained: Any, user: Mapping[str, Any], secagg: Mapping[str, Any], client_noise: Mapping[str, Any]
) -> list[str]:
    """What neither level covers: participation, public choices, a known sample, SecAgg+'s rounding and collusion,
    what the sites told the server, and the server's own view."""
    reported = _reported_metrics(trained)
    not_covered = [
        "participation: which clients took part in which round, how many, and their reported metrics ("
        + (", ".join(reported) if reported else "loss, num-examples, seconds")
        + ") reach the server and the record in the clear",
        "the number of rounds, the model architecture and the hyper-parameters are public choices, not protected",
    ]
    for name, rec in user.items():
        ks = rec.get("known_sample")
        if ks and rec.get("sample_rate", 1) < 1:
            not_covered.append(
                f"{title(name)}: which clients were sampled in which round (the server draws it; the record lists "
                "it): the user-level ε with sampling holds only against an observer who does not know it; against "
                f"the server and anyone holding the run directory a client has ε = {number(ks.get('epsilon'), 4)} "
                f"(δ = {number(ks.get('delta'), 3)}) over the at most {ks.get('max_participations')} rounds it took "
                "part in"
            )
    for name in client_noise:
        sa = _training(trained, name).get("secure_aggregation") or {}
        not_covered.append(
            f"{title(name)}: SecAgg+'s stochastic rounding of each noised upload (step "
            f"{number(sa.get('quantization_step'), 3)}, numpy's global generator): the server sees the sum of the "
            "rounded uploads, which depends on each upload beyond the sum by less than one step per coordinate; "
            "the Gaussian analysis does not cover it"
        )
        not_covered.append(
            f"{title(name)}: collusion: a client that gives its noise to the server lowers the noise the server "
            "faces; clients' row counts and seconds reach the server in the clear"
        )
    for name in MODELS:  # per-site data (federated/app/site.py): what the sites told the server in the clear
        sites = _training(trained, name).get("sites")
        if sites:
            not_covered += [f"{title(name)}, per-site data: {line}" for line in sites.get("not_dp_protected", [])]
    not_covered.append(
        "the server's view of each round's sum: it carries the clients' noise, so it is covered only at the "
        "un-amplified ε stated for the server (the known-sample line above)"
        if secagg and client_noise and set(client_noise) >= set(secagg)
        else "the server's view of the aggregate of each round (secure aggregation hides only the individual updates)"
        if secagg
        else "the server's view of individual client updates (no secure aggregation)"
    )
    return not_covered


def _user_level_caveats(name: str, rec: Mapping[str, Any]) -> list[str]:
    """A model's user-level ε with its accounting and independent check, and a warning when the noise drowns it."""
    chk = rec.get("independent_check") or {}
    caveats = [
        f"{title(name)}: user-level ε = {number(rec.get('epsilon'), 4)} after {rec.get('completed_rounds')} "
        f"rounds (σ = {number(rec.get('noise_multiplier'), 4)}, C = {number(rec.get('clipping_norm'), 3)}, "
        f"q = {number(rec.get('sample_rate'), 3)}, {str(rec.get('accountant', '?')).upper()}; "
        f"{rec.get('sampling')}); "
        + (
            f"dp-accounting recomputes PLD ε = {number(chk.get('pld_epsilon'), 4)}, RDP ε = "
            f"{number(chk.get('rdp_epsilon'), 4)} ({'agrees' if chk.get('agrees') else 'DISAGREES'})."
            if chk
            else "NOT independently checked (the record has no independent_check)."
        )
    ]
    noise = rec.get("aggregate_noise") or {}
    if noise.get("dominated"):  # auditml_core.privacy.user_level.aggregate_noise
        caveats.append(
            f"{title(name)}: user-level DP noise drowns the model: noise-to-signal "
            f"{number(noise['noise_to_signal'], 3)} >= 1 ({noise['formula']}; {noise['n_parameters']} weights, "
            f"N = {rec.get('n_clients')} clients, noise std {number(noise['noise_std_per_weight'], 3)} per "
            f"weight and round): the noise moves the weights farther than all the clients together can, so "
            "the model is far below its non-private quality, possibly at chance; it would need about "
            f"{noise['clients_needed']} clients at this ε, a larger ε or a smaller model."
        )
    return caveats


def _server_sees(user: Mapping[str, Any], secagg: Mapping[str, Any], client_noise: Mapping[str, Any]) -> str:
    """What the server sees of each round when user-level DP is the only level."""
    if client_noise and set(client_noise) == set(user):
        return (
            "the server sees only the sum of the clients' noised uploads (client-side noise under secure "
            "aggregation; against the server sampling does not amplify)"
        )
    if secagg:
        return "the server sees the un-noised aggregate of each round (secure aggregation hides individual updates)"
    return "the server sees every client's update in the clear"


def _user_level_only(section: dict[str, Any], lines: list[str], server_sees: str) -> None:
    """Rewrite ``section`` (in place) for user-level DP without sample-level DP: the user-level guarantee is the
    whole claim, and the DP-off lines of :func:`privacy_section` are replaced."""
    section["caveats"] = [c for c in section.get("caveats", []) if not c.startswith("DP is off:")] + [
        "Sample-level DP is off (dp.enabled = false): only the user-level guarantee above holds; a record is "
        f"protected only as part of its client's data, in the released models, and {server_sees}."
    ]
    section["enabled"] = True
    section["statement"] = (
        "User-level differential privacy (DP-FedAvg) protects a whole client's data in the released global "
        "models: " + "; ".join(lines) + ". Individual records get no separate sample-level guarantee "
        f"(dp.enabled = false), and {server_sees}."
    )
    section["covered"] = [
        "models/*.safetensors of the federated networks and every per-round global model: DP-FedAvg output",
        "predictions, metrics and explanations computed from those weights (post-processing)",
    ]
    section["not_covered"] = [
        c for c in section.get("not_covered", []) if not c.startswith("every artifact of this run")
    ] + ["models/ridge.json, data/* preprocessing statistics and data files: fitted without DP"]


def _failure_caveats(trained: Any) -> list[str]:
    """What the server logged as warnings (failed nodes, budget refusals), one line per model that had any."""
    caveats = []
    for name in MODELS:
        t = _training(trained, name)
        failed = len(t.get("failures") or [])
        refused = sum(len(r.get("refused") or []) for r in t.get("client_rounds") or [])
        if failed or refused:
            caveats.append(
                f"{title(name)}: {failed} client update(s) failed and {refused} were refused (a client whose privacy "
                f"budget was spent sends no update) over {t.get('completed_rounds')} round(s): those rounds averaged "
                f"fewer clients than were sampled (per-round detail: client_rounds in models/{name}.json)."
            )
    return caveats


def federated_privacy(section: dict[str, Any], cfg: Config, trained: Any) -> dict[str, Any]:
    """Add the federated threat model, the unit of privacy and ε, δ per level to ``section`` (returned).

    A no-op for central runs. For a federated run it states who is trusted with what
    (honest-but-curious server; with SecAgg+ it sees only the aggregate, without it every
    client's update), what DP hides from whom at each level that is on, and what neither covers.
    """
    if cfg.train.mode != "federated":
        return section
    user = _recorded(trained, "user_level_privacy")
    sample_on = bool(section.get("enabled")) and cfg.dp.enabled
    levels = _levels(user, section, sample_on=sample_on)
    secagg = _recorded(trained, "secure_aggregation")
    client_noise = {k: v for k, v in user.items() if v.get("noise_placement") == "client"}
    threat = _threat_model(user, secagg, client_noise, sample_on=sample_on)
    not_covered = _federated_not_covered(trained, user, secagg, client_noise)
    lines = [_level_line(lv) for lv in levels]
    section = dict(section)
    section["federated"] = {"threat_model": threat, "levels": levels, "not_covered": not_covered}
    if user:
        for name, rec in user.items():
            section.setdefault("caveats", []).extend(_user_level_caveats(name, rec))
        section["caveats"] = [c for c in section.get("caveats", []) if _CLIENT_LEVEL_NOT_CLAIMED not in c]
        if not sample_on:
            _user_level_only(section, lines, _server_sees(user, secagg, client_noise))
        else:
            section["statement"] = (
                section["statement"]
                + " Both levels hold at once (different adjacencies; they do not add up): "
                + "; ".join(lines)
                + "."
            )
    for line in _failure_caveats(trained):
        section.setdefault("caveats", []).append(line)
    section["statement"] = section["statement"] + " " + " ".join(threat)
    section["not_covered"] = list(section.get("not_covered", [])) + not_covered
    return section
