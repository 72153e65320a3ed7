"""The report's first screen: one verdict per area, each derived from numbers the run computed.

Areas: the privacy guarantee, the privacy audit, utility against a trivial predictor, subgroup gaps,
explanation quality, and provenance. Each verdict has a status (``failed``, ``holds with caveat``,
``holds`` or ``not applicable``), the number that matters with its interval, one plain sentence of at
most 25 words and the anchor of its evidence in ``report.html``. Nothing here is a fixed status: every
branch reads a check the run recorded (an ε against its target and a second accountant, the audit's
verdicts, a bootstrap interval against a trivial predictor, subgroup intervals, the explanation sanity
and faithfulness checks, the artifacts' hashes). The verdicts are sorted worst first, so a failed or weak
check is the first thing a reader sees. ``report.json`` holds them as ``summary.verdicts``.
"""

from __future__ import annotations

from typing import Any, Mapping

from auditml_core.models import MODELS
from pipeline.report.fmt import number

FAILED, CAVEAT, HOLDS, NOT_APPLICABLE = "failed", "holds with caveat", "holds", "not applicable"
STATUSES = (FAILED, CAVEAT, HOLDS, NOT_APPLICABLE)  # worst first: the order of the first screen
AREAS = (  # (area, title, evidence anchor)
    ("privacy-guarantee", "Privacy guarantee", "privacy"),
    ("privacy-audit", "Privacy audit", "audit"),
    ("utility", "Utility vs baseline", "models"),
    ("subgroups", "Subgroup gaps", "models"),
    ("explanations", "Explanation quality", "explanations"),
    ("provenance", "Provenance and integrity", "reproducibility"),
)
MAX_WORDS = 25  # per sentence, before a user's own column names (tests check it on every kind of run)
_METRIC = {"r2": "R²"}  # metric keys as people write them
_TOLERANCE = 1e-9  # the privacy section's own tolerance for "ε exceeds the target"


def _n(value: Any) -> str:
    """A number for a sentence: 3 significant digits."""
    return number(value, 3)


def _num(label: str, value: Any, interval: Any = None, unit: str = "") -> dict[str, Any]:
    return {
        "label": label,
        "value": value,
        "interval": list(interval) if isinstance(interval, (list, tuple)) and len(interval) == 2 else None,
        "unit": unit,
    }


def _verdict(area: str, status: str, sentence: str, numbers: list[dict[str, Any]], anchor: str = "") -> dict:
    title, default_anchor = next((t, a) for a_, t, a in AREAS if a_ == area)
    return {
        "area": area,
        "title": title,
        "status": status,
        "numbers": numbers,
        "sentence": sentence,
        "evidence": "#" + (anchor or default_anchor),
        "anchor": f"verdict-{area}",
    }


def _title(name: str) -> str:
    return MODELS[name].title if name in MODELS else name


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
                        "who": _title(name),
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
                    "who": _title(name) + " (user level)",
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
                "who": f"student of the {_title(model)}",
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
        return _verdict(
            "privacy-guarantee",
            NOT_APPLICABLE,
            "No differential privacy in this run: nothing bounds what the weights, metrics or explanations reveal "
            "about training records.",
            [],
        )
    stated = [g for g in gs if g["level"] != "student" or g.get("guarantee") in ("inherited", "composed")]
    worst = max((g for g in stated if isinstance(g["epsilon"], (int, float))), key=lambda g: g["epsilon"], default=None)
    numbers = (
        [_num(f"ε, {worst['who']}", worst["epsilon"], unit=f"target {_n(worst['target'])}, δ = {_n(worst['delta'])}")]
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
            and g["epsilon"] > g["target"] + _TOLERANCE
        )
    ]
    if over:
        g = over[0]
        return _verdict(
            "privacy-guarantee",
            FAILED,
            f"The {g['who']} spends ε = {_n(g['epsilon'])}, over its target {_n(g['target'])}: the configured "
            "guarantee does not hold.",
            numbers,
        )
    disagree = [g for g in stated if g["checked"] and not g["agrees"]]
    if disagree:
        return _verdict(
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
        return _verdict(
            "privacy-guarantee",
            CAVEAT,
            f"Every stated ε is within its target, but {caveats[0]}.",
            numbers,
        )
    levels = {g["level"] for g in stated}
    unit = (
        "per client" if levels == {"user"} else "per training record" if "user" not in levels else "per record/client"
    )
    return _verdict(
        "privacy-guarantee",
        HOLDS,
        f"Every model is within its ε target ({unit}; worst ε = {_n(worst['epsilon'] if worst else None)}), and a "
        "second accountant agrees with every recorded ε.",
        numbers,
    )


# --------------------------------------------------------------------------- privacy audit


def _best_attack(m: Mapping[str, Any]) -> Mapping[str, Any] | None:
    return max(m.get("attacks") or [], key=lambda a: a.get("auc") or 0.0, default=None)


def _above_chance(attack: Mapping[str, Any]) -> bool:
    """Whether an attack's AUC interval lies wholly above 0.5 (it tells members from non-members)."""
    lo = (attack.get("auc_ci95") or [None])[0]
    return isinstance(lo, (int, float)) and lo > 0.5


def privacy_audit(content: Mapping[str, Any]) -> dict[str, Any]:
    """From the audit's own verdicts: FAILED refutes a claim; 'no verdict' lacked power; without a DP claim, an
    attack AUC whose interval lies above 0.5 means training records are identifiable."""
    a = content.get("audit") or {}
    if not a.get("ran"):
        return _verdict(
            "privacy-audit",
            NOT_APPLICABLE,
            "No membership-inference audit was run, so no attack measured what the models leak.",
            [],
        )
    models = a.get("models") or {}
    failed, weak, leaks, quiet, passed = [], [], [], [], []
    numbers = []
    for name, m in models.items():
        kind = (m.get("verdict") or {}).get("verdict")
        best = _best_attack(m)
        if m.get("claimed_epsilon") is not None:
            bounds = [x.get("epsilon_lower_bound") for x in m.get("attacks") or []]
            if (m.get("canaries") or {}).get("ran"):
                bounds.append(m["canaries"].get("epsilon_lower_bound"))
            bound = max((b for b in bounds if isinstance(b, (int, float))), default=None)
            numbers.append(_num(f"ε lower bound, {m['title']}", bound, unit=f"claimed ε {_n(m['claimed_epsilon'])}"))
        elif best is not None:
            numbers.append(_num(f"attack AUC, {m['title']}", best.get("auc"), best.get("auc_ci95"), "0.5 = chance"))
        if kind == "FAILED":
            failed.append(m)
        elif kind == "no verdict":
            weak.append(m)
        elif kind == "no DP claim":
            above = [x for x in m.get("attacks") or [] if _above_chance(x)]
            (leaks if above else quiet).append(m)
        elif kind == "passed":
            passed.append(m)
    if failed:
        return _verdict(
            "privacy-audit",
            FAILED,
            f"The audit refutes the claimed ε of the {failed[0]['title']}: an attack's ε lower bound exceeds it.",
            numbers,
        )
    if leaks:
        best = max((x for x in leaks[0]["attacks"] if _above_chance(x)), key=lambda x: x["auc_ci95"][0])
        lo, hi = best.get("auc_ci95") or [None, None]
        return _verdict(
            "privacy-audit",
            FAILED,
            f"Attacks tell training records of the {leaks[0]['title']} from others better than chance (AUC "
            f"{_n(best.get('auc'))} [{_n(lo)}, {_n(hi)}]); no DP bounds this.",
            numbers,
        )
    if weak:
        return _verdict(
            "privacy-audit",
            CAVEAT,
            f"No verdict for the {weak[0]['title']}: the audit lacked the power to refute its claimed ε.",
            numbers,
        )
    if quiet:
        return _verdict(
            "privacy-audit",
            CAVEAT,
            "No attack told training records from others better than chance (no AUC interval lies above 0.5), but "
            "no DP claim bounds the leakage.",
            numbers,
        )
    if passed:
        return _verdict(
            "privacy-audit",
            HOLDS,
            "Passed for every model: no attack's ε lower bound exceeds the claimed ε, and the audit could have "
            "refuted it.",
            numbers,
        )
    return _verdict("privacy-audit", NOT_APPLICABLE, "The audit ran but recorded no model to judge.", numbers)


# --------------------------------------------------------------------------- utility


def utility(content: Mapping[str, Any]) -> dict[str, Any]:
    """Each model's test metric interval against a predictor that ignores its input; Ridge and the public-only
    model as caveats."""
    numbers, no_better, missing, caveats = [], [], [], []
    for name, m in (content.get("models") or {}).items():
        tb = m.get("trivial_baseline")
        if not tb:
            missing.append(m["title"])
            continue
        numbers.append(
            _num(
                f"test {_METRIC.get(tb['metric'], tb['metric'])}, {m['title']}",
                tb["model"],
                tb.get("model_ci95"),
                f"trivial {_n(tb['trivial'])}",
            )
        )
        if tb["no_better"]:
            no_better.append((m, tb))
        po = m.get("public_only_baseline") or {}
        if po.get("available") and not po.get("private_data_contributed"):
            caveats.append(
                f"the {m['title']} does not measurably beat the same model trained on the public split alone"
            )
        cmp = (m.get("baseline") or {}).get("comparison") or {}
        if cmp.get("distinguishable") and cmp.get("better") != "regressor":
            caveats.append(f"the Ridge baseline beats the {m['title']} on test R²")
    if no_better:
        m, tb = no_better[0]
        lo, hi = tb.get("model_ci95") or [None, None]
        return _verdict(
            "utility",
            FAILED,
            f"The {m['title']} is no better than a trivial predictor: test {_METRIC.get(tb['metric'], tb['metric'])} "
            f"{_n(tb['model'])} "
            f"[{_n(lo)}, {_n(hi)}] vs {_n(tb['trivial'])}.",
            numbers,
        )
    if missing:
        return _verdict("utility", CAVEAT, f"The {missing[0]} has no recorded test metric to judge.", numbers)
    if caveats:
        return _verdict("utility", CAVEAT, f"Every model beats a trivial predictor, but {caveats[0]}.", numbers)
    return _verdict(
        "utility",
        HOLDS,
        "Every model beats a trivial predictor: each test metric's whole 95% interval lies above what ignoring the "
        "input scores.",
        numbers,
    )


# --------------------------------------------------------------------------- subgroups


def _group_metric(g: Mapping[str, Any]) -> str | None:
    return next((k for k in ("mae", "accuracy", "recall") if isinstance(g.get(k), (int, float))), None)


def subgroups(content: Mapping[str, Any]) -> dict[str, Any]:
    """Failed when two groups' 95% intervals of a test metric do not overlap (a gap this test split resolves);
    with caveat when every pair overlaps (small groups: not a proof of equal performance)."""
    tables = []
    for name, m in (content.get("models") or {}).items():
        for feat, g in (((m.get("metrics") or {}).get("test") or {}).get("subgroups") or {}).items():
            tables.append((name, m, feat, g))
    if not tables:
        return _verdict(
            "subgroups",
            NOT_APPLICABLE,
            "No subgroup analysis was possible in this run (no group column), so error per group is unknown.",
            [],
        )
    resolved, largest = [], None
    for name, m, feat, g in tables:
        rows = [r for r in g.get("groups") or [] if _group_metric(r)]
        for a in rows:
            for b in rows:
                key = _group_metric(a)
                ia, ib = a.get(f"{key}_ci95"), b.get(f"{key}_ci95")
                if key != _group_metric(b) or not ia or not ib:
                    continue
                gap = a[key] - b[key]
                if ia[0] > ib[1]:
                    resolved.append((gap, name, m, feat, key, a, b))
                if largest is None or abs(gap) > abs(largest[0]):
                    largest = (abs(gap), name, m, feat, key, a, b)
    anchor = f"subgroups-{(max(resolved, key=lambda r: r[0]) if resolved else largest or (None, tables[0][0]))[1]}"
    if resolved:
        gap, name, m, feat, key, a, b = max(resolved, key=lambda r: r[0])
        return _verdict(
            "subgroups",
            FAILED,
            f"The {m['title']}'s test {key.upper()} differs by {feat} ({_n(a[key])} vs {_n(b[key])} between two "
            "groups): their 95% intervals do not overlap.",
            [_num(f"{key.upper()} gap by {feat}, {m['title']}", gap)],
            anchor,
        )
    gap, name, m, feat, key = largest[:5] if largest else (None, tables[0][0], tables[0][1], tables[0][2], "mae")
    return _verdict(
        "subgroups",
        CAVEAT,
        f"No gap between groups is resolved on this test split (largest {key.upper()} gap {_n(gap)}, by {feat}); "
        "small groups give wide intervals.",
        [_num(f"largest {key.upper()} gap, by {feat}", gap)],
        anchor,
    )


# --------------------------------------------------------------------------- explanations


def explanations(content: Mapping[str, Any]) -> dict[str, Any]:
    """Failed: signed attributions fail the model-randomisation check, or deleting the top-ranked features changes
    the output no faster than a random order. With caveat: |attribution| or random-logit checks fail, or the primary
    SHAP values are approximate."""
    failed, caveats, numbers = [], [], []
    for name, e in ((content.get("explanations") or {}).get("models") or {}).items():
        q = e.get("quality") or {}
        t = e.get("title", _title(name))
        f = (q.get("faithfulness") or {}).get(q.get("primary")) or {}
        if f:
            numbers.append(
                _num(f"deletion AUC, {t}", f.get("deletion_auc"), unit=f"random {_n(f.get('random_deletion_auc'))}")
            )
        r = q.get("randomisation") or {}
        if r and not r.get("passed_signed"):
            failed.append(
                f"The {t}'s attributions fail the model-randomisation check: they look like a random model's."
            )
        if f and f.get("deletion_auc") is not None and f["deletion_auc"] >= f.get("random_deletion_auc", float("inf")):
            failed.append(
                f"Deleting the features the {t}'s explanations rank highest changes its output no faster than a "
                "random order."
            )
        if r and r.get("passed_signed") and not r.get("passed_abs"):
            caveats.append(f"|attribution| rankings of the {t} fail the model-randomisation check")
        c = q.get("class_randomisation") or {}
        if c and not (c.get("passed_signed") and c.get("passed_abs")):
            caveats.append(f"the {t}'s attributions fail the random-logit check")
        if q.get("exactness") == "approximate":
            caveats.append(f"the {t}'s SHAP values are approximate")
    if not numbers and not failed:
        return _verdict("explanations", NOT_APPLICABLE, "No explanation was recorded in this run.", [])
    if failed:
        return _verdict("explanations", FAILED, failed[0], numbers)
    if caveats:
        return _verdict(
            "explanations",
            CAVEAT,
            f"Signed attributions pass the randomisation check and beat random deletion, but {caveats[0]}.",
            numbers,
        )
    return _verdict(
        "explanations",
        HOLDS,
        "For every model, attributions pass the randomisation checks, beat a random deletion order, and the SHAP "
        "values are exact.",
        numbers,
    )


# --------------------------------------------------------------------------- provenance


def provenance(content: Mapping[str, Any]) -> dict[str, Any]:
    """Failed without a manifest (nothing ties the report to files); with caveat when an artifact has no hash or the
    code's commit is unknown or has uncommitted changes."""
    r = content.get("reproducibility") or {}
    artifacts = r.get("artifacts") or []
    hashed = [a for a in artifacts if a.get("sha256")]
    numbers = [_num("artifacts with SHA-256", len(hashed), unit=f"of {len(artifacts)}")]
    if not artifacts or not content.get("manifest_sha256"):
        return _verdict(
            "provenance",
            FAILED,
            "This report was built without a run manifest: no artifact it describes is tied to a hash.",
            numbers,
        )
    if len(hashed) < len(artifacts):
        return _verdict(
            "provenance",
            CAVEAT,
            f"{len(artifacts) - len(hashed)} of {len(artifacts)} artifacts the report lists have no recorded SHA-256.",
            numbers,
        )
    commit = r.get("git_commit")
    if not commit or str(commit).endswith("-dirty"):
        why = "is unknown" if not commit else "had uncommitted changes"
        return _verdict(
            "provenance",
            CAVEAT,
            f"All {len(artifacts)} artifacts are listed with SHA-256, but the code's git commit {why}, so the code "
            "is not pinned.",
            numbers,
        )
    return _verdict(
        "provenance",
        HOLDS,
        f"All {len(artifacts)} artifacts are listed with SHA-256 and the code's commit; pipeline verify re-checks "
        "them against the manifest.",
        numbers,
    )


def verdicts(content: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Every area's verdict, worst first (failed, holds with caveat, holds, not applicable), then in area order."""
    out = [
        privacy_guarantee(content),
        privacy_audit(content),
        utility(content),
        subgroups(content),
        explanations(content),
        provenance(content),
    ]
    order = [a for a, _, _ in AREAS]
    return sorted(out, key=lambda v: (STATUSES.index(v["status"]), order.index(v["area"])))
