"""The first screen's privacy verdicts: the guarantee (each stated ε against its target and a second accountant)
and the membership-inference audit (its own verdicts; without a DP claim, attacks against chance)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

from auditml_core.models import MODELS
from pipeline.report.audit import TPR_REFUTATION, above_chance, control_outcome, refuted_by
from pipeline.report.fmt import sig3
from pipeline.report.verdict_base import (
    CAVEAT,
    FAILED,
    HOLDS,
    NOT_APPLICABLE,
    TOLERANCE,
    lead,
    model_title,
    numbers_entry,
    verdict,
)

# --------------------------------------------------------------------------- privacy guarantee


def _n_train(content: Mapping[str, Any], name: str) -> int | None:
    m = (content.get("models") or {}).get(name) or {}
    n = (m.get("training") or {}).get("n_train")
    if not n and name in MODELS:
        n = (((content.get("data") or {}).get(MODELS[name].dataset) or {}).get("sizes") or {}).get("train")
    return int(n) if n else None


def _guarantees(content: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Every (ε, δ) the run states: per model at sample level, per model at user level, per distilled student."""
    p = content["privacy"]
    checks = p.get("independent_checks") or {}
    out = []
    if p.get("enabled"):
        for name, rec in (p.get("models") or {}).items():
            if rec:
                chk = checks.get(name)
                out.append(
                    {
                        "who": model_title(name),
                        "level": "sample",
                        "epsilon": rec.get("epsilon"),
                        "delta": rec.get("delta"),
                        "target": rec.get("target_epsilon"),
                        "checked": bool(chk and chk.get("available")),
                        "agrees": bool(chk and chk.get("available") and chk.get("agrees")),
                        "seeded": rec.get("noise_source", "seeded") != "os-csprng",
                        "n": _n_train(content, name),
                    }
                )
    for name, m in (content.get("models") or {}).items():
        rec = (m.get("training") or {}).get("user_level_privacy")
        if rec:
            chk = rec.get("independent_check") or {}
            out.append(
                {
                    "who": model_title(name) + " (user level)",
                    "level": "user",
                    "epsilon": rec.get("epsilon"),
                    "delta": rec.get("delta"),
                    "target": rec.get("target_epsilon"),
                    "checked": bool(chk),
                    "agrees": bool(chk.get("agrees")),
                    "seeded": False,
                    "n": None,
                }
            )
    for model, d in (content.get("distill") or {}).items():
        status = ((d.get("record") or {}).get("privacy") if isinstance(d, Mapping) else None) or {}
        if not status or not out:  # a student of a non-DP teacher claims nothing
            continue
        guarantee = status.get("guarantee")
        chk = checks.get(f"student {model}")
        out.append(
            {
                "who": f"student of the {model_title(model)}",
                "level": "student",
                "guarantee": guarantee,
                "epsilon": status.get("epsilon"),
                "delta": status.get("delta"),
                "target": status.get("target_epsilon"),
                "over_budget": bool(status.get("over_budget")),
                # an inherited guarantee is the teacher's (checked above); a composed one has its own DP-SGD check
                "checked": guarantee == "inherited" or bool(chk and chk.get("available")),
                "agrees": guarantee == "inherited" or bool(chk and chk.get("available") and chk.get("agrees")),
                "seeded": False,
                "n": _n_train(content, model) if guarantee == "composed" else None,
            }
        )
    return out


def privacy_guarantee(content: Mapping[str, Any]) -> dict[str, Any]:
    """Failed: an ε over its target, a student over budget, or a second accountant that disagrees. With caveat: an ε
    not independently checked, a seeded noise source, δ not below 1/n, a student without a guarantee."""
    gs = _guarantees(content)
    if not gs:
        return verdict(
            "privacy-guarantee",
            NOT_APPLICABLE,
            "No differential privacy in this run: nothing bounds what the weights, metrics or explanations reveal "
            "about training records.",
            [],
        )
    stated = [g for g in gs if g["level"] != "student" or g.get("guarantee") in ("inherited", "composed")]
    worst = max((g for g in stated if isinstance(g["epsilon"], (int, float))), key=lambda g: g["epsilon"], default=None)
    numbers = (
        [
            numbers_entry(
                f"ε, {worst['who']}",
                worst["epsilon"],
                unit=f"target {sig3(worst['target'])}, δ = {sig3(worst['delta'])}",
            )
        ]
        if worst
        else []
    )
    over = [
        g
        for g in stated
        if g.get("over_budget")
        or (
            isinstance(g["epsilon"], (int, float))
            and g["target"] is not None
            and g["epsilon"] > g["target"] + TOLERANCE
        )
    ]
    if over:
        g = over[0]
        return verdict(
            "privacy-guarantee",
            FAILED,
            f"The {g['who']} spends ε = {sig3(g['epsilon'])}, over its target {sig3(g['target'])}: the configured "
            "guarantee does not hold.",
            numbers,
        )
    disagree = [g for g in stated if g["checked"] and not g["agrees"]]
    if disagree:
        return verdict(
            "privacy-guarantee",
            FAILED,
            f"A second accountant disagrees with the recorded ε of the {disagree[0]['who']}: the stated guarantee is "
            "not confirmed.",
            numbers,
        )
    caveats = [f"the ε of the {g['who']} was not independently checked" for g in stated if not g["checked"]] + [
        f"the {g['who']}'s noise is seeded: DP holds only while the seed stays secret" for g in stated if g["seeded"]
    ]
    caveats += [
        f"δ of the {g['who']} is not below 1/n"
        for g in stated
        if g["n"] and isinstance(g["delta"], (int, float)) and g["delta"] >= 1.0 / g["n"]
    ]
    caveats += [f"the {g['who']} has no DP guarantee" for g in gs if g["level"] == "student" and g not in stated]
    if caveats:
        return verdict(
            "privacy-guarantee",
            CAVEAT,
            f"Every stated ε is within its target, but {caveats[0]}.",
            numbers,
        )
    levels = {g["level"] for g in stated}
    unit = (
        "per client" if levels == {"user"} else "per training record" if "user" not in levels else "per record/client"
    )
    return verdict(
        "privacy-guarantee",
        HOLDS,
        f"Every model is within its ε target ({unit}; worst ε = {sig3(worst['epsilon'] if worst else None)}), and a "
        "second accountant agrees with every recorded ε.",
        numbers,
    )


# --------------------------------------------------------------------------- privacy audit


def _best_attack(m: Mapping[str, Any]) -> Mapping[str, Any] | None:
    return max(m.get("attacks") or [], key=lambda a: a.get("auc") or 0.0, default=None)


def _largest_bound(attacks: list[Mapping[str, Any]], canaries: Mapping[str, Any] | None) -> float | None:
    """The largest ε lower bound of the attacks and, when they ran, the canaries (None when none has one)."""
    bounds = [a.get("epsilon_lower_bound") for a in attacks]
    if canaries and canaries.get("ran"):
        bounds.append(canaries.get("epsilon_lower_bound"))
    return max((b for b in bounds if isinstance(b, (int, float))), default=None)


def _auc_with_interval(attack: Mapping[str, Any]) -> str:
    """``AUC a [lo, hi]`` of one attack (its 95% interval)."""
    lo, hi = attack.get("auc_ci95") or [None, None]
    return f"AUC {sig3(attack.get('auc'))} [{sig3(lo)}, {sig3(hi)}]"


def _control_number(m: Mapping[str, Any]) -> dict[str, Any]:
    """The evidence the positive control was (not) caught: the noise mutant's ε lower bound against the recorded ε,
    or the overfit control's strongest attack AUC with its interval."""
    control = m["control"]
    if control.get("kind") == "noise mutant":
        bound = _largest_bound(control["attacks"], control.get("canaries"))
        return numbers_entry(
            f"control's ε bound, {m['title']}", bound, unit=f"must exceed {sig3(m['claimed_epsilon'])}"
        )
    best = control_outcome(m)["best_attack"] or {}
    return numbers_entry(f"control's attack AUC, {m['title']}", best.get("auc"), best.get("auc_ci95"), "must clear 0.5")


def _model_number(m: Mapping[str, Any]) -> dict[str, Any] | None:
    """An audited model's figure: its largest ε lower bound beside a claimed ε (or, when only a TPR above the DP
    bound refutes the claim, that TPR beside its bound), else its strongest attack's AUC."""
    refuted = refuted_by(m)
    if refuted and all(r.endswith(TPR_REFUTATION) for r in refuted):
        row = next(
            t
            for a in m.get("attacks") or []
            for t in a["tpr_at_fpr"] + [a.get("tpr_at_lowest_resolvable_fpr") or {}]
            if t.get("exceeds_dp_bound")
        )
        return numbers_entry(
            f"TPR at FPR ≤ {sig3(row['fpr_ci95'][1])}, {m['title']}",
            row["tpr"],
            row["tpr_ci95"],
            unit=f"DP bound {sig3(row['dp_bound_at_fpr_upper'])}",
        )
    if m.get("claimed_epsilon") is not None:
        bound = _largest_bound(m.get("attacks") or [], m.get("canaries"))
        return numbers_entry(f"ε lower bound, {m['title']}", bound, unit=f"claimed ε {sig3(m['claimed_epsilon'])}")
    best = _best_attack(m)
    if best is not None:
        return numbers_entry(f"attack AUC, {m['title']}", best.get("auc"), best.get("auc_ci95"), "0.5 = chance")
    return None


def _refutations(m: Mapping[str, Any]) -> str:
    """What refuted a FAILED model's ε (an attack's bound, a TPR above the DP bound, the canaries), briefly."""
    what = refuted_by(m) or ["an attack"]
    first = "the canaries" if what[0] == "canaries" else what[0]
    if len(what) == 1:
        return f"{first} {'contradict' if what[0] == 'canaries' else 'contradicts'} it"
    more = len(what) - 1
    return f"{first} and {more} more check{'s' if more > 1 else ''} contradict it"


@dataclass
class _ByVerdict:
    """The audited models grouped by the audit's own verdict (each list in the audit's model order)."""

    failed: list[Mapping[str, Any]] = field(default_factory=list)  # FAILED: the claimed ε is refuted
    weak: list[Mapping[str, Any]] = field(default_factory=list)  # no verdict: the audit lacked power
    leaks: list[Mapping[str, Any]] = field(default_factory=list)  # no DP claim, an attack above chance
    quiet: list[Mapping[str, Any]] = field(default_factory=list)  # no DP claim, no attack above chance
    untested: list[Mapping[str, Any]] = field(default_factory=list)  # user-level DP: no record-level claim to test
    passed: list[Mapping[str, Any]] = field(default_factory=list)


def _by_verdict(models: Mapping[str, Mapping[str, Any]]) -> _ByVerdict:
    """Sort the audited models by their verdict; a model without DP is split by whether any attack beat chance."""
    out = _ByVerdict()
    for m in models.values():
        kind = (m.get("verdict") or {}).get("verdict")
        if kind == "FAILED":
            out.failed.append(m)
        elif kind == "no verdict":
            out.weak.append(m)
        elif kind == "no record-level claim":  # user-level DP: the record-level attacks do not test its ε
            out.untested.append(m)
        elif kind == "no DP claim":
            above = [x for x in m.get("attacks") or [] if above_chance(x)]
            (out.leaks if above else out.quiet).append(m)
        elif kind == "passed":
            out.passed.append(m)
    return out


def _leak_verdict(m: Mapping[str, Any], numbers: list[dict[str, Any]]) -> dict[str, Any]:
    """FAILED for a model without DP whose attacks beat chance, led by the attack that tells records apart."""
    above = [x for x in m["attacks"] if above_chance(x)]
    best = max(above, key=lambda x: ((x.get("auc_ci95") or [0.0])[0] or 0.0, x.get("epsilon_lower_bound") or 0.0))
    lo, _ = best.get("auc_ci95") or [None, None]
    evidence = (
        _auc_with_interval(best)
        if isinstance(lo, (int, float)) and lo > 0.5
        else f"ε lower bound {sig3(best.get('epsilon_lower_bound'))} > 0"
    )
    return verdict(
        "privacy-audit",
        FAILED,
        f"Attacks tell training records of the {m['title']} from others better than chance ({evidence}); "
        "no DP bounds this.",
        [  # the evidence first: the attack that tells them apart, not the one with the highest point AUC
            numbers_entry(
                f"{best['attack']} attack AUC, {m['title']}",
                best.get("auc"),
                best.get("auc_ci95"),
                f"ε ≥ {sig3(best.get('epsilon_lower_bound'))}; 0.5 = chance",
            )
        ]
        + [n for n in numbers if not n["label"].endswith(f", {m['title']}")],
    )


def _audit_verdict(groups: _ByVerdict, blind: list[Mapping[str, Any]], numbers: list[dict[str, Any]]) -> dict[str, Any]:
    """The first verdict that applies: a refuted claim, a leak without DP, a positive control the audit missed, too
    little power, an untested user-level claim, no DP claim, then passed."""
    if groups.failed:
        m = groups.failed[0]
        return verdict(
            "privacy-audit",
            FAILED,
            f"The audit refutes the claimed ε of the {m['title']}: {_refutations(m)}.",
            lead(numbers, f", {m['title']}"),
        )
    if groups.leaks:
        return _leak_verdict(groups.leaks[0], numbers)
    if blind:
        who = " and ".join(m["title"] for m in blind)
        return verdict(
            "privacy-audit",
            CAVEAT,
            f"The audit could not catch its own planted leak for the {who}, so finding no leak here means nothing.",
            numbers,
        )
    if groups.weak:
        return verdict(
            "privacy-audit",
            CAVEAT,
            f"No verdict for the {groups.weak[0]['title']}: the audit lacked the power to refute its claimed ε.",
            lead(numbers, f", {groups.weak[0]['title']}"),
        )
    if groups.untested:
        m = groups.untested[0]
        return verdict(
            "privacy-audit",
            CAVEAT,
            f"The audit tests no stated ε of the {m['title']}; its strongest attack reaches "
            f"{_auc_with_interval(_best_attack(m) or {})} (0.5 = chance).",
            lead(numbers, f", {m['title']}"),
        )
    if groups.quiet:
        return verdict(
            "privacy-audit",
            CAVEAT,
            "No attack beat chance on evidence (no AUC interval above 0.5, no ε lower bound above 0), but no DP "
            "claim bounds the leakage.",
            numbers,
        )
    if groups.passed:
        return verdict(
            "privacy-audit",
            HOLDS,
            "Passed for every model: no attack's ε lower bound exceeds the claimed ε, and the audit could have "
            "refuted it.",
            numbers,
        )
    return verdict("privacy-audit", NOT_APPLICABLE, "The audit ran but recorded no model to judge.", numbers)


def privacy_audit(content: Mapping[str, Any]) -> dict[str, Any]:
    """From the audit's own verdicts: FAILED refutes a claim; in a run without any DP, an attack AUC whose interval
    lies above 0.5 means training records are identifiable; a positive control the audit did not catch (on
    evidence) leads a caveat, never a pass; 'no verdict' lacked power; a guarantee the audit does not test
    (user-level DP) is a caveat, never a pass."""
    a = content.get("audit") or {}
    if not a.get("ran"):
        return verdict(
            "privacy-audit",
            NOT_APPLICABLE,
            "No membership-inference audit was run, so no attack measured what the models leak.",
            [],
        )
    models = a.get("models") or {}
    blind = [m for m in models.values() if not control_outcome(m)["caught"]]
    numbers = [_control_number(m) for m in blind]  # the evidence that the audit was blind comes first
    numbers += [n for m in models.values() if (n := _model_number(m)) is not None]
    return _audit_verdict(_by_verdict(models), blind, numbers)
