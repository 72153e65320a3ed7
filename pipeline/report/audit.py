"""The report's "Privacy audit (membership inference)" part and the public-only baseline, as JSON-safe trees.

Read by :mod:`pipeline.report.content`; the numbers come from the ``audit`` stage's records
(:mod:`pipeline.audit`) and the evaluate stage's ``public_only`` comparison.
"""

from __future__ import annotations

from typing import Any, Mapping

from auditml_core.models import title
from auditml_core.privacy import mia
from pipeline.report.fmt import number

HOW_TO_READ_AUDIT = (
    "A membership-inference attack guesses, for each record, whether it was in the model's training split. "
    "Members are training records, non-members are test records the model never saw, in equal numbers. "
    "ROC-AUC 0.5 means the attack does no better than a coin; 1.0 means it separates them perfectly. TPR at a "
    "low FPR is what matters for privacy: the share of members the attacker identifies while wrongly accusing "
    "at most 1% (or 0.1%) of non-members. With n non-members an FPR below 1/n cannot be measured (one false "
    "positive is already 1/n): the report then gives no TPR at that FPR, but the TPR at the lowest FPR the records "
    "resolve, FPR ≤ 1/n, beside the DP bound at 1/n. For a model trained with (ε, δ)-DP no attack can exceed TPR = e^ε·FPR + δ; the audit "
    "also turns the attack's best (FPR, TPR) into an empirical lower bound on ε (Clopper–Pearson, threshold "
    "chosen on one half of the records and evaluated on the other), which must stay below the claimed ε. Such a "
    "bound can never exceed what its number of records certifies (the 'certifiable ε': a perfect attack's bound): "
    "when that is below the claimed ε, the attacks cannot refute the claim whatever the model leaks. A DP model is "
    "therefore also audited in one training run (Steinke, Nasr & Jagielski 2023): a model trained exactly like it "
    "carries gradient canaries, each included with probability 1/2, and the number of correct in/out guesses bounds "
    "ε from below; it checks the noise and the accounting of the training code (σ·C per step, the sample rate, the "
    "number of steps) on a model trained like the released one, not per-sample clipping or the data sampler, which "
    "the canaries bypass. The positive control is a privacy violation the audit must catch: under DP, the same training "
    "with a tenth of its noise while the accountant records the claimed ε (it must FAIL); without DP, the "
    "architecture deliberately overfit on a few records (the attacks must separate them: an AUC interval wholly above "
    "0.5 or an ε lower bound above 0; a point AUC above 0.5 is not enough). When the control is not caught, a quiet "
    "audit of the released model means nothing. An empirical bound is a "
    "lower bound from these attacks only: a small value does not prove privacy."
)


_TPR_KEYS = (
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


def _tpr_row(t: Mapping[str, Any]) -> dict[str, Any]:
    return {k: t.get(k) for k in _TPR_KEYS if k in t}


def tpr_rows(a: Mapping[str, Any]) -> list[dict[str, Any]]:
    """What an attack's TPR at low FPR may say: each stated FPR that n non-members resolve (FPR >= 1/n) with its TPR
    and DP bound; the stated FPRs below 1/n only as 'not resolvable', never a TPR beside a bound at an FPR the
    records cannot measure; then the TPR at the lowest FPR they resolve, 1/n, with the DP bound at 1/n.

    Returns ``[{"kind": "at" | "unresolvable" | "lowest", ...}]``; "unresolvable" lists ``fprs`` and ``n``.
    """
    n = a.get("n_non_members")
    out: list[dict[str, Any]] = [{"kind": "at", **t} for t in a["tpr_at_fpr"] if not t.get("resolution_limited")]
    below = [t["target_fpr"] for t in a["tpr_at_fpr"] if t.get("resolution_limited")]
    if below:
        out.append({"kind": "unresolvable", "fprs": below, "n": n})
    if below and a.get("tpr_at_lowest_resolvable_fpr"):
        out.append({"kind": "lowest", **a["tpr_at_lowest_resolvable_fpr"], "n": n})
    return out


def _attack_row(attack: str, s: Mapping[str, Any]) -> dict[str, Any]:
    e = s["empirical_epsilon"]
    held = e.get("held_out_counts", {})
    certifiable = e.get("certifiable_epsilon")
    if certifiable is None and held:  # a record written before the audit stated it
        certifiable = mia.certifiable_epsilon(held["members"], held["non_members"], delta=e["delta"])
    row = {
        "attack": attack,
        "auc": s["auc"],
        "auc_ci95": s["auc_ci95"],
        "n_members": s["n_members"],
        "n_non_members": s["n_non_members"],
        "tpr_at_fpr": [_tpr_row(t) for t in s["tpr_at_fpr"]],
        # the TPR at FPR <= 1/n where a stated FPR is below 1/n (None: every stated FPR resolves, or a record from
        # before the audit kept it)
        "tpr_at_lowest_resolvable_fpr": _tpr_row(s["tpr_at_lowest_resolvable_fpr"])
        if s.get("tpr_at_lowest_resolvable_fpr")
        else None,
        "epsilon_lower_bound": e["epsilon_lower_bound"],
        "epsilon_lower_bound_optimistic": e["optimistic_max_over_thresholds"],
        "epsilon_method": e["method"],
        "certifiable_epsilon": certifiable,
    }
    return row


def _canary_row(c: Mapping[str, Any] | None) -> dict[str, Any]:
    """The one-run canary audit of one training, or why it did not run."""
    if not c or not c.get("ran"):
        return {"ran": False, "why": (c or {}).get("why", "not recorded (an audit from before the canary audit)")}
    keys = ("m", "included", "epsilon_lower_bound", "certifiable_epsilon", "confidence", "guesses", "best")
    return {"ran": True, **{k: c[k] for k in keys}, "method": c["method"], "kind": c["kind"], "trained": c["trained"]}


TPR_REFUTATION = " (TPR above the DP bound)"  # how a refutation through a TPR at low FPR is named


def _caught(claimed: float | None, attacks: list[Mapping[str, Any]], canaries: Mapping[str, Any]) -> list[str]:
    """What refutes ``claimed``: each attack or canary audit whose ε lower bound exceeds it."""
    if claimed is None:
        return []
    out = [a["attack"] for a in attacks if a["epsilon_lower_bound"] > claimed]
    out += [
        a["attack"] + TPR_REFUTATION
        for a in attacks
        if any(t.get("exceeds_dp_bound") for t in a["tpr_at_fpr"] + [a.get("tpr_at_lowest_resolvable_fpr") or {}])
    ]
    if canaries.get("ran") and canaries["epsilon_lower_bound"] > claimed:
        out.append("canaries")
    return out


def refuted_by(m: Mapping[str, Any]) -> list[str]:
    """What refutes an audited model's claimed ε (its attacks and canaries as the audit record holds them)."""
    return _caught(m.get("claimed_epsilon"), m.get("attacks") or [], m.get("canaries") or {})


def above_chance(attack: Mapping[str, Any]) -> bool:
    """Evidence that an attack tells members from non-members: its AUC interval lies wholly above 0.5, or its
    held-out ε lower bound (Clopper–Pearson, 95%) is above 0."""
    lo = (attack.get("auc_ci95") or [None])[0]
    return (isinstance(lo, (int, float)) and lo > 0.5) or (attack.get("epsilon_lower_bound") or 0.0) > 0.0


def control_outcome(m: Mapping[str, Any]) -> dict[str, Any]:
    """Whether the audit caught its positive control, on evidence, and by what.

    The noise mutant (DP) is caught when an attack's or the canaries' ε lower bound exceeds the ε its accountant
    recorded (or a TPR's lower bound exceeds the DP bound); the overfit control (no DP) when an attack's AUC
    interval lies wholly above 0.5 or its ε lower bound is above 0. A point AUC above 0.5 whose interval includes
    0.5 is no evidence: the control is then not caught, and a quiet audit of the released model means nothing.
    """
    control, claimed = m["control"], m["claimed_epsilon"]
    if control.get("kind") == "noise mutant":
        by = _caught(claimed, control["attacks"], control.get("canaries") or {"ran": False})
    else:
        by = [a["attack"] for a in control["attacks"] if above_chance(a)]
    best = max(control["attacks"], key=lambda a: ((a.get("auc_ci95") or [0.0])[0] or 0.0, a["auc"]), default=None)
    return {"caught": bool(by), "by": by, "best_attack": best}


def control_name(m: Mapping[str, Any]) -> str:
    """The positive control in words: the noise mutant or the deliberately overfit copy."""
    control = m["control"]
    if control.get("kind") == "noise mutant":
        return f"the same training with ×{number(control.get('noise_factor'), 2)} of its noise"
    return "a copy of the architecture deliberately overfit on a few records"


def _verdict(m: Mapping[str, Any], user_level_epsilon: float | None = None) -> dict[str, Any]:
    """FAILED, passed (with the power to fail), or no verdict, with the reason in one sentence.

    ``user_level_epsilon``: the model's user-level ε where it was trained with user-level DP (the audit attacks
    single records, so it tests no claim of that model). A positive control the audit did not catch leads the
    statement whatever the model's claim: without it, finding no leak means nothing.
    """
    claimed, t = m["claimed_epsilon"], m["title"]
    outcome = control_outcome(m)
    blind = (
        ""
        if outcome["caught"]
        else f"The audit could not catch its own planted leak ({control_name(m)}), so finding no leak here means "
        "nothing. "
    )
    if claimed is None:
        if user_level_epsilon is not None:
            return {
                "verdict": "no record-level claim",
                "statement": blind + f"The {t}'s DP guarantee is at user level (ε = {number(user_level_epsilon, 3)} "
                "per client), which these record-level attacks do not test: they measure its leakage per record.",
            }
        return {
            "verdict": "no DP claim",
            "statement": blind + f"The {t} makes no DP claim: the attacks measure its leakage.",
        }
    failed = _caught(claimed, m["attacks"], m["canaries"])
    ceiling = max((v for v in m["certifiable_epsilon"].values() if v is not None), default=0.0)
    control_caught = outcome["by"]
    if failed:
        return {
            "verdict": "FAILED",
            "statement": f"PRIVACY AUDIT FAILED for the {t}: {', '.join(failed)} refute the claimed ε = "
            f"{number(claimed, 3)}.",
        }
    if ceiling <= claimed:
        return {
            "verdict": "no verdict",
            "statement": blind
            + f"No verdict on the {t}: this audit can certify at most ε = {number(ceiling, 3)}, not above "
            f"the claimed ε = {number(claimed, 3)}, so it could not have refuted the claim.",
        }
    if not control_caught:
        return {
            "verdict": "no verdict",
            "statement": blind + f"No verdict on the {t}.",
        }
    return {
        "verdict": "passed",
        "statement": f"Passed for the {t}: no lower bound exceeds the claimed ε = {number(claimed, 3)}, while the audit "
        f"can certify up to ε = {number(ceiling, 3)} and caught its positive control ({', '.join(control_caught)}).",
    }


def _model_caveats(m: Mapping[str, Any]) -> list[str]:
    """The loud lines of one model's audit: failures, missing power, a control the audit did not catch."""
    t, claimed, out = m["title"], m["claimed_epsilon"], []
    if m["verdict"]["verdict"] == "FAILED":
        out.append(
            m["verdict"]["statement"] + " Either the implementation has a bug or the DP guarantee does not hold as "
            "stated; do not release this model as private."
        )
    cert = m["certifiable_epsilon"]
    if claimed is not None and cert["membership_attacks"] is not None and cert["membership_attacks"] <= claimed:
        out.append(
            f"Privacy audit of the {t}: with {m['n_members']} + {m['n_non_members']} attacked records (half of them held "
            f"out for the bound) the membership attacks can certify at most ε = {number(cert['membership_attacks'], 3)}, below the claimed ε = "
            f"{number(claimed, 3)}: their bounds cannot refute the claim whatever the model leaks"
            + (
                f"; the canary audit (up to ε = {number(cert['canaries'], 3)}) carries the verdict."
                if cert.get("canaries") is not None and cert["canaries"] > claimed
                else "."
            )
        )
    if claimed is not None and cert.get("canaries") is not None and cert["canaries"] <= claimed:
        out.append(
            f"Privacy audit of the {t}: {m['canaries']['m']} canaries certify at most ε = {number(cert['canaries'], 3)}, "
            f"below the claimed ε = {number(claimed, 3)}; raise audit.canaries (δ = {number(m['delta'], 3)} caps what "
            "one run can certify near ln(1/(2·m·δ)), so a large claim may be beyond any affordable audit)."
        )
    control = m["control"]
    if control_outcome(m)["caught"]:
        return out
    if control.get("kind") == "noise mutant":
        out.append(
            f"Privacy audit of the {t}: the audit did not catch its positive control, the same training with "
            f"×{number(control.get('noise_factor'), 2)} of its noise while recording the claimed ε (no ε lower bound "
            "above the claim): it has no power against a violation of that size here, and a pass on the released "
            "model means nothing."
        )
    else:
        aucs = "; ".join(
            f"{a['attack']} AUC {number(a['auc'], 3)} [{number((a.get('auc_ci95') or [None])[0], 3)}, "
            f"{number((a.get('auc_ci95') or [None, None])[1], 3)}], ε ≥ {number(a['epsilon_lower_bound'], 3)}"
            for a in control["attacks"]
        )
        out.append(
            f"Privacy audit of the {t}: even the deliberately overfit positive control was not caught ({aucs}: no "
            "AUC interval lies above 0.5 and no ε lower bound above 0); the attacks are too weak here for a low AUC "
            "to mean anything (raise audit.n_eval, audit.control_epochs or audit.n_shadows)."
        )
    return out


def _resolution_caveat(m: Mapping[str, Any]) -> list[str]:
    n_non = m["n_non_members"]
    below = [f for f in sorted({t["target_fpr"] for a in m["attacks"] for t in a["tpr_at_fpr"]}) if f * n_non < 1]
    if not below:
        return []
    rates = " and ".join(f"{number(100 * f, 3)}%" for f in below)
    ceiling = m["certifiable_epsilon"]["membership_attacks"]
    at_most = f" (at most {number(ceiling, 3)})" if ceiling is not None else ""
    return [
        f"Privacy audit of the {m['title']}: {n_non} non-members, so FPR = {rates} "
        f"{'is' if len(below) == 1 else 'are'} below the resolution 1/{n_non} ({number(100 / n_non, 3)}%) and "
        f"cannot be measured: the report gives the TPR at FPR ≤ 1/{n_non} instead, beside the DP bound at that FPR; "
        f"the empirical ε bound that this many records can certify is limited{at_most}."
    ]


def _model_entry(r: Mapping[str, Any], user_level_epsilon: float | None = None) -> dict[str, Any]:
    attacks = [_attack_row(a, s) for a, s in r["attacks"].items()]
    control = r["control"]
    canaries = _canary_row(r.get("canaries"))
    m = {
        "title": r["title"],
        "dp": r["dp"],
        "claimed_epsilon": r.get("claimed_epsilon"),
        "delta": r["delta"],
        "n_members": r["n_members"],
        "n_non_members": r["n_non_members"],
        "shadows": r["shadows"],
        "attacks": attacks,
        "canaries": canaries,
        "certifiable_epsilon": {
            "membership_attacks": max(
                (a["certifiable_epsilon"] for a in attacks if a["certifiable_epsilon"] is not None), default=None
            ),
            "canaries": canaries.get("certifiable_epsilon"),
        },
        "control": {
            "kind": control.get("kind", "overfit"),
            "description": control["description"],
            "train_loss": control["train_loss"],
            "test_loss": control["test_loss"],
            "noise_factor": control.get("noise_factor"),
            "attacks": [_attack_row(a, s) for a, s in control["attacks"].items()],
            "canaries": _canary_row(control["canaries"]) if "canaries" in control else None,
        },
        "max_epsilon_lower_bound": max(
            [a["epsilon_lower_bound"] for a in attacks] + [canaries.get("epsilon_lower_bound", 0.0)]
        ),
    }
    outcome = control_outcome(m)
    m["control"]["caught"], m["control"]["caught_by"] = outcome["caught"], outcome["by"]
    m["verdict"] = _verdict(m, user_level_epsilon)
    return m


def audit_section(audit_out: Any, user_level_epsilon: Mapping[str, float | None] | None = None) -> dict[str, Any]:
    """The audit part of the report: per model, the attacks and the canary audit on the released model's
    training, on the positive control (and whether the audit caught it, on evidence), what the audit could
    certify at all, and a verdict. ``user_level_epsilon``: per model, its user-level ε where it was trained with
    user-level DP (a claim these record-level attacks do not test)."""
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
        m = _model_entry({**r, "title": r.get("title") or title(name)}, (user_level_epsilon or {}).get(name))
        models[name] = m
        caveats += _model_caveats(m) + _resolution_caveat(m)
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
