"""The report's privacy section: what the DP guarantee covers, with which numbers, and every caveat.

Read by :mod:`pipeline.report`; the numbers come from the training records
(``TrainedModel.training["privacy"]``, central or federated) and, for distilled
students, from the distill stage's recorded privacy status. Records are read
generically: whatever keys a record has reach the report.
"""

from __future__ import annotations

from typing import Any, Mapping

from core.artifacts import jsonable
from core.config import Config
from core.models import MODELS, title
from pipeline.report.fmt import number


def privacy_section(
    cfg: Config, trained: Mapping[str, Any], datasets: Mapping[str, Any], explain_out: Any
) -> dict[str, Any]:
    """What is guaranteed, for which artifacts, with which numbers, and every caveat."""
    dp = cfg.dp
    mode = cfg.train.mode
    records = {name: trained.models[name].training.get("privacy") for name in MODELS}
    n_train = {
        name: trained.models[name].training.get("n_train") or len(datasets[e.dataset].y["train"])
        for name, e in MODELS.items()
    }
    caveats: list[str] = []
    bg_split = cfg.explain.background_split
    if not dp.enabled or not any(records.values()):
        statement = (
            "No formal privacy guarantee: the models were trained without differential privacy "
            "(dp.enabled = false), so their weights, metrics and explanations may reveal training records."
        )
        covered: list[str] = []
        not_covered = ["every artifact of this run: without DP nothing bounds what it reveals about a training record"]
        caveats.append(
            "DP is off: there is no formal guarantee for any artifact; do not release the models as private."
        )
        return {
            "enabled": False,
            "mode": mode,
            "statement": statement,
            "models": {},
            "covered": covered,
            "not_covered": not_covered,
            "caveats": caveats,
        }
    parts = []
    for name, rec in records.items():
        if not rec:
            continue
        eps, delta = rec.get("epsilon"), rec.get("delta")
        detail = [f"accountant {str(rec.get('accountant', '?')).upper()}", f"Opacus {rec.get('opacus_version', '?')}"]
        if rec.get("noise_multiplier") is not None:
            detail.insert(0, f"σ = {number(rec['noise_multiplier'], 3)}, C = {number(rec.get('max_grad_norm'), 3)}")
        if "epsilon_per_client" in rec:
            detail.insert(0, f"worst of {len(rec['epsilon_per_client'])} clients")
        parts.append(f"the {title(name)} is (ε = {number(eps, 4)}, δ = {number(delta, 3)})-DP ({', '.join(detail)})")
        if not rec.get("secure_mode", False):
            caveats.append(
                f"{title(name)}: secure_mode is off, so the DP noise comes from a seeded pseudo-random "
                "generator and is not cryptographically secure (the guarantee assumes an adversary who cannot "
                "predict it; set dp.secure_mode = true for releases)."
            )
        n = n_train[name]
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
    covered = [
        "models/regressor.safetensors and models/cnn.safetensors: the network weights (DP-SGD output)",
        "checkpoints/*.pt of the networks: intermediate DP-SGD iterates and optimizer state (all iterates are accounted)",
        "predictions, evaluation metrics and explanations computed from the DP weights, as far as they depend on the "
        "training split (post-processing)",
    ]
    if bg_split == "public":
        covered.append("explain/*: computed from the DP weights, the public split and test rows only (post-processing)")
    not_covered = [
        "models/ridge.json: the Ridge baseline is fitted on the training split without DP",
        "data/*.json preprocessing: scaler means and standard deviations (and imputed medians) come from the training "
        "split without DP",
        "data/*.npz: the data files themselves hold every split, training records included; never release them",
        "the public split: declared public, so not protected at all",
        "the validation and test splits: metrics, predictions and explained rows reveal them (DP covers training records only)",
        "training history in models/*.json: per-epoch training loss is computed on private batches without noise",
        "hyper-parameter choices and repeated runs on the same data: not accounted for in ε",
        "the number of training records (n_train) is treated as public",
    ]
    if bg_split != "public":
        not_covered.append(
            f"explain/*: explanation backgrounds come from the private {bg_split} split "
            "(explain.background_split), so the explanations are not covered by DP"
        )
        caveats.append(
            f"explain.background_split = {bg_split!r}: explanation backgrounds use private training records, "
            "outside the DP guarantee."
        )
    if mode == "federated":
        caveats.append(
            "Federated run: ε is computed per client, for records of that client's local data; the reported "
            "ε is the worst client. Client-level (whole-client) privacy is not claimed."
        )
    return {
        "enabled": True,
        "mode": mode,
        "statement": statement,
        "models": jsonable(records),
        "covered": covered,
        "not_covered": not_covered,
        "caveats": caveats,
    }


def student_privacy(distill_out: Any) -> tuple[list[str], list[str]]:
    """(covered, not covered) lines for distilled students, from their recorded privacy status."""
    covered, not_covered = [], []
    for model, o in distill_out.items() if isinstance(distill_out, Mapping) else []:
        status = (o.get("record", {}) or {}).get("privacy") if isinstance(o, Mapping) else None
        if not isinstance(status, Mapping):
            continue
        what = f"students/{model}.* (distilled student of the {title(model)})"
        guarantee = status.get("guarantee")
        detail = status.get("reason") or (
            f"ε = {number(status.get('epsilon'), 3)}" if status.get("epsilon") is not None else ""
        )
        if guarantee in ("inherited", "composed"):
            covered.append(
                f"{what}: {guarantee} guarantee"
                + (f", ε = {number(status.get('epsilon'), 4)}" if status.get("epsilon") is not None else "")
                + (f" ({status['reason']})" if status.get("reason") else "")
            )
        else:
            not_covered.append(f"{what}: no guarantee ({detail})")
    return covered, not_covered
