"""The report's "Privacy audit (membership inference)" part and the public-only baseline, as JSON-safe trees.

Read by :mod:`pipeline.report.content`; the numbers come from the ``audit`` stage's records
(:mod:`pipeline.audit`) and the evaluate stage's ``public_only`` comparison.
"""

from __future__ import annotations

from typing import Any, Mapping

from auditml_core.models import title
from pipeline.report.fmt import number

HOW_TO_READ_AUDIT = (
    "A membership-inference attack guesses, for each record, whether it was in the model's training split. "
    "Members are training records, non-members are test records the model never saw, in equal numbers. "
    "ROC-AUC 0.5 means the attack does no better than a coin; 1.0 means it separates them perfectly. TPR at a "
    "low FPR is what matters for privacy: the share of members the attacker identifies while wrongly accusing "
    "at most 1% (or 0.1%) of non-members; with n non-members, an FPR below 1/n can only be read as 'no false "
    "positive at all'. For a model trained with (ε, δ)-DP no attack can exceed TPR = e^ε·FPR + δ; the audit "
    "also turns the attack's best (FPR, TPR) into an empirical lower bound on ε (Clopper–Pearson, threshold "
    "chosen on one half of the records and evaluated on the other), which must stay below the claimed ε. A "
    "low AUC on the released model is evidence only if the same attacks break the positive control (the same "
    "architecture deliberately overfit on a few records): the control shows the attacks have teeth. An "
    "empirical bound is a lower bound from these attacks only: a small value does not prove privacy."
)
TOOTHLESS_AUC = 0.6  # a control AUC at or below this means the attacks could not break even an overfit model


def _attack_row(attack: str, s: Mapping[str, Any]) -> dict[str, Any]:
    e = s["empirical_epsilon"]
    row = {
        "attack": attack,
        "auc": s["auc"],
        "auc_ci95": s["auc_ci95"],
        "n_members": s["n_members"],
        "n_non_members": s["n_non_members"],
        "tpr_at_fpr": [
            {
                k: t.get(k)
                for k in (
                    "target_fpr",
                    "fpr",
                    "fpr_ci95",
                    "tpr",
                    "tpr_ci95",
                    "resolution_limited",
                    "dp_bound",
                    "dp_bound_at_fpr_upper",
                    "exceeds_dp_bound",
                )
                if k in t
            }
            for t in s["tpr_at_fpr"]
        ],
        "epsilon_lower_bound": e["epsilon_lower_bound"],
        "epsilon_lower_bound_optimistic": e["optimistic_max_over_thresholds"],
        "epsilon_method": e["method"],
    }
    return row


def audit_section(audit_out: Any) -> dict[str, Any]:
    """The audit part of the report: per model, both attacks on the released model and on the control."""
    if not isinstance(audit_out, Mapping) or not audit_out.get("enabled"):
        return {
            "ran": False,
            "how_to_read": HOW_TO_READ_AUDIT,
            "models": {},
            "caveats": [
                "No membership-inference audit was run (audit.enabled = false or the audit stage is missing): "
                "nothing in this report checks the privacy claim against an attack."
            ],
        }
    models, caveats = {}, []
    for name, r in audit_out["models"].items():
        t = title(name)
        attacks = [_attack_row(a, s) for a, s in r["attacks"].items()]
        control = [_attack_row(a, s) for a, s in r["control"]["attacks"].items()]
        claimed = r.get("claimed_epsilon")
        best_lb = max(a["epsilon_lower_bound"] for a in attacks)
        models[name] = {
            "title": t,
            "dp": r["dp"],
            "claimed_epsilon": claimed,
            "delta": r["delta"],
            "n_members": r["n_members"],
            "n_non_members": r["n_non_members"],
            "shadows": r["shadows"],
            "attacks": attacks,
            "control": {
                "description": r["control"]["description"],
                "train_loss": r["control"]["train_loss"],
                "test_loss": r["control"]["test_loss"],
                "attacks": control,
            },
            "max_epsilon_lower_bound": best_lb,
        }
        if claimed is not None and best_lb > claimed:
            caveats.append(
                f"PRIVACY AUDIT FAILED for the {t}: the empirical ε lower bound {number(best_lb, 3)} exceeds the "
                f"claimed ε = {number(claimed, 3)}. Either the implementation has a bug or the DP guarantee does "
                "not hold as stated; do not release this model as private."
            )
        for a in attacks:
            for row in a["tpr_at_fpr"]:
                if row.get("exceeds_dp_bound"):
                    caveats.append(
                        f"PRIVACY AUDIT FAILED for the {t}: the {a['attack']} attack's TPR at FPR "
                        f"{number(row['target_fpr'], 2)} (lower bound {number(row['tpr_ci95'][0], 3)}) exceeds "
                        f"what (ε = {number(claimed, 3)}, δ) -DP allows ({number(row['dp_bound_at_fpr_upper'], 3)})."
                    )
        if max(c["auc"] for c in control) <= TOOTHLESS_AUC:
            caveats.append(
                f"Privacy audit of the {t}: even the deliberately overfit positive control was not broken "
                f"(AUC ≤ {TOOTHLESS_AUC}); the attacks are too weak here for a low AUC to mean anything "
                "(raise audit.n_eval, audit.control_epochs or audit.n_shadows)."
            )
        n_non = r["n_non_members"]
        below = [f for f in sorted({t["target_fpr"] for a in attacks for t in a["tpr_at_fpr"]}) if f * n_non < 1]
        if below:
            rates = " and ".join(f"{number(100 * f, 3)}%" for f in below)
            caveats.append(
                f"Privacy audit of the {t}: {n_non} non-members, so FPR = {rates} "
                f"{'is' if len(below) == 1 else 'are'} below the resolution 1/{n_non}: read TPR at "
                f"{rates} as TPR with no false positive; the empirical ε bound that this many records can certify "
                "is limited."
            )
    return {"ran": True, "how_to_read": HOW_TO_READ_AUDIT, "models": models, "caveats": caveats}


def public_only_baseline(name: str, metrics: Mapping[str, Any], privacy: Any) -> dict[str, Any] | None:
    """What the private data added to a DP model: its test metric beside the public-only model's, or None."""
    po = metrics.get(name, {}).get("public_only") if isinstance(metrics, Mapping) else None
    if not privacy:
        return None
    if not po:
        return {
            "available": False,
            "statement": "No public-only baseline was recorded (no public pretraining, a federated run, or training resumed "
            "from a checkpoint): the "
            "utility of this DP model cannot be compared with a model that never read private data.",
        }
    key = po["metric"]
    gain = po["private_gain"]
    released = metrics[name]["test"].get(key)
    public = po["test"].get(key)
    if gain["measurable"]:
        statement = (
            f"DP training on the private split raised test {key} from {number(public, 4)} (public split only) to "
            f"{number(released, 4)}: +{number(gain['value'], 3)} [{number(gain['ci95'][0], 3)}, "
            f"{number(gain['ci95'][1], 3)}]."
        )
    else:
        statement = (
            f"DP training on the private split added no measurable test {key}: {number(released, 4)} vs "
            f"{number(public, 4)} for the same architecture trained on the public split alone (difference "
            f"{number(gain['value'], 3)} [{number(gain['ci95'][0], 3)}, {number(gain['ci95'][1], 3)}]). On this "
            "test split the released model cannot be told apart from one that never read the private records DP "
            "protects: as far as this test can show, its utility comes from the public data."
        )
    return {
        "available": True,
        "metric": key,
        "released": released,
        "released_ci95": metrics[name]["test"].get(f"{key}_ci95"),
        "public_only": public,
        "public_only_ci95": po["test"].get(f"{key}_ci95"),
        "private_gain": gain["value"],
        "private_gain_ci95": gain["ci95"],
        "private_data_contributed": gain["measurable"],
        "statement": statement,
    }
