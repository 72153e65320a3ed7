"""The report's first screen: one verdict per area, each derived from numbers the run computed.

Areas: the privacy guarantee, the privacy audit, utility against a trivial predictor, subgroup gaps, explanation
quality, the distilled students (:mod:`pipeline.report.verdicts_students`), and provenance. Each verdict has a
status (``failed``, ``holds with caveat``, ``holds`` or ``not applicable``), the number that matters (first) with
its interval, one plain sentence of at most 25 words and the anchor of its evidence in ``report.html``. Nothing
here is a fixed status: every branch reads a check the run recorded (an ε against its target and a second
accountant, the audit's verdicts and its positive control, a bootstrap interval against a trivial predictor, the
test confusion matrix, subgroup intervals, the explanation sanity and faithfulness checks, the students' intervals
and fidelity, the artifacts' hashes). The verdicts are sorted worst first, so a failed or weak check is the first
thing a reader sees. ``report.json`` holds them as ``summary.verdicts``.
"""

from __future__ import annotations

from typing import Any, Mapping

from pipeline.report.fmt import metric_name, sig3
from pipeline.report.verdict_base import (
    AREAS,
    CAVEAT,
    FAILED,
    HOLDS,
    MAX_WORDS,
    NOT_APPLICABLE,
    STATUSES,
    dead_classes,
    lead,
    model_title,
    numbers_entry,
    verdict,
)
from pipeline.report.verdicts_privacy import privacy_audit, privacy_guarantee
from pipeline.report.verdicts_students import students

__all__ = ["AREAS", "MAX_WORDS", "STATUSES", "verdicts"]


# --------------------------------------------------------------------------- utility


def utility(content: Mapping[str, Any]) -> dict[str, Any]:
    """Each model's test metric interval against a predictor that ignores its input. With caveat: a classifier gets
    no test example of some class right (recall 0; from its test confusion matrix), the Ridge baseline beats the MLP,
    a DP model does not beat its public-only twin."""
    numbers, no_better, missing, caveats = [], [], [], []
    for name, m in (content.get("models") or {}).items():
        tb = m.get("trivial_baseline")
        if not tb:
            missing.append(m["title"])
            continue
        numbers.append(
            numbers_entry(
                f"test {metric_name(tb['metric'])}, {m['title']}",
                tb["model"],
                tb.get("model_ci95"),
                f"trivial {sig3(tb['trivial'])}",
            )
        )
        if tb["no_better"]:
            no_better.append((m, tb))
        dead = dead_classes((((m.get("metrics") or {}).get("test")) or {}).get("confusion_matrix"))
        if dead and dead["recall_zero"]:
            numbers.append(
                numbers_entry(
                    f"classes with test recall 0, {m['title']}", dead["recall_zero"], unit=f"of {dead['classes']}"
                )
            )
            caveats.insert(
                sum(1 for c, _ in caveats if "recall 0" in c),  # before the milder caveats
                (
                    f"the {m['title']} has recall 0 on {dead['recall_zero']} of {dead['classes']} classes "
                    f"(one class takes {dead['top_predicted']} of {dead['n']} predictions)",
                    f"recall 0, {m['title']}",
                ),
            )
        po = m.get("public_only_baseline") or {}
        if po.get("available") and not po.get("private_data_contributed"):
            caveats.append(
                (
                    f"the {m['title']} does not measurably beat the same model trained on the public split alone",
                    m["title"],
                )
            )
        cmp = (m.get("baseline") or {}).get("comparison") or {}
        if cmp.get("distinguishable") and cmp.get("better") != "regressor":
            caveats.append((f"the Ridge baseline beats the {m['title']} on test R²", m["title"]))
    if no_better:
        m, tb = no_better[0]
        lo, hi = tb.get("model_ci95") or [None, None]
        return verdict(
            "utility",
            FAILED,
            f"The {m['title']} is no better than a trivial predictor: test {metric_name(tb['metric'])} "
            f"{sig3(tb['model'])} "
            f"[{sig3(lo)}, {sig3(hi)}] vs {sig3(tb['trivial'])}.",
            lead(numbers, f", {m['title']}"),
        )
    if missing:
        return verdict("utility", CAVEAT, f"The {missing[0]} has no recorded test metric to judge.", numbers)
    if caveats:
        text, key = caveats[0]
        return verdict("utility", CAVEAT, f"Every model beats a trivial predictor, but {text}.", lead(numbers, key))
    return verdict(
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
        return verdict(
            "subgroups",
            NOT_APPLICABLE,
            "No subgroup analysis: no table column named sex or age and no image group array, so error per group is unknown.",
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
        return verdict(
            "subgroups",
            FAILED,
            f"The {m['title']}'s test {metric_name(key)} differs by {feat} ({sig3(a[key])} vs {sig3(b[key])} between two "
            "groups): their 95% intervals do not overlap.",
            [numbers_entry(f"{metric_name(key)} gap by {feat}, {m['title']}", gap)],
            anchor,
        )
    gap, name, m, feat, key = largest[:5] if largest else (None, tables[0][0], tables[0][1], tables[0][2], "mae")
    return verdict(
        "subgroups",
        CAVEAT,
        f"No gap between groups is resolved on this test split (largest {metric_name(key)} gap {sig3(gap)}, by {feat}); "
        "small groups give wide intervals.",
        [numbers_entry(f"largest {metric_name(key)} gap, by {feat}", gap)],
        anchor,
    )


# --------------------------------------------------------------------------- explanations


def _checks(q: Mapping[str, Any]) -> list[tuple[str, str, bool]]:
    """Every check one model's explanations went through: (family, kind, passed). Families: model randomisation
    and random-logit (each on signed and on |values|), deletion (the output falls faster than for a random order)."""
    out = []
    for family, key in (("model randomisation", "randomisation"), ("random-logit", "class_randomisation")):
        r = q.get(key) or {}
        if r:
            out += [(family, "signed", bool(r.get("passed_signed"))), (family, "|value|", bool(r.get("passed_abs")))]
    f = (q.get("faithfulness") or {}).get(q.get("primary")) or {}
    if f and f.get("deletion_auc") is not None:
        out.append(("deletion", "", f["deletion_auc"] < f.get("random_deletion_auc", float("inf"))))
    return out


def _failures(failed: list[tuple[str, str, bool]]) -> str:
    """'|value| model randomisation, random-logit and deletion': a family failed on both signed and |values| is named
    without its kind."""
    items = []
    for family in dict.fromkeys(f for f, _, _ in failed):
        kinds = [k for f, k, _ in failed if f == family]
        items.append(family if len(kinds) != 1 or not kinds[0] else f"{kinds[0]} {family}")
    return ", ".join(items[:-1]) + " and " + items[-1] if len(items) > 1 else items[0]


def explanations(content: Mapping[str, Any]) -> dict[str, Any]:
    """Every check's outcome for every model, in the status and the sentence. Failed: signed attributions fail the
    model-randomisation check, or deleting the top-ranked features changes the output no faster than a random order.
    With caveat: the |attribution| model-randomisation or either random-logit check fails, or the primary SHAP
    values are approximate."""
    severe, failures, failed_models, approximate, numbers = False, [], [], [], []
    n_checks = n_passed = 0
    families: dict[str, None] = {}
    for name, e in ((content.get("explanations") or {}).get("models") or {}).items():
        q = e.get("quality") or {}
        t = e.get("title", model_title(name))
        checks = _checks(q)
        if not checks:
            continue
        families.update(dict.fromkeys(f for f, _, _ in checks))
        failed = [c for c in checks if not c[2]]
        n_checks, n_passed = n_checks + len(checks), n_passed + len(checks) - len(failed)
        severe = severe or any(k != "|value|" for f, k, _ in failed if f != "random-logit")
        if failed:
            failures.append(f"the {t} fails {_failures(failed)}")
            failed_models.append(t)
        if q.get("exactness") == "approximate":
            approximate.append(t)
        numbers.append(
            numbers_entry(
                f"checks passed, {t}",
                len(checks) - len(failed),
                unit=f"of {len(checks)}" + ("; SHAP approximate" if q.get("exactness") == "approximate" else ""),
            )
        )
    if not numbers:
        return verdict("explanations", NOT_APPLICABLE, "No explanation was recorded in this run.", [])
    if failures:
        text = "; ".join(failures)
        return verdict(
            "explanations",
            FAILED if severe else CAVEAT,
            f"{text[0].upper()}{text[1:]}; {n_passed} of {n_checks} checks pass.",
            lead(numbers, *failed_models),
        )
    names = [f for f in ("model randomisation", "random-logit", "deletion") if f in families]
    checks_text = ", ".join(names[:-1]) + " and " + names[-1] if len(names) > 1 else names[0]
    if approximate:
        return verdict(
            "explanations",
            CAVEAT,
            f"Every model passes all {n_checks} checks ({checks_text}), but the {approximate[0]}'s SHAP values are "
            "approximate.",
            numbers,
        )
    return verdict(
        "explanations",
        HOLDS,
        f"Every model passes all {n_checks} checks ({checks_text}), and the SHAP values are exact.",
        numbers,
    )


# --------------------------------------------------------------------------- provenance


def provenance(content: Mapping[str, Any]) -> dict[str, Any]:
    """Failed without a manifest (nothing ties the report to files); with caveat when an artifact has no hash or the
    code's commit is unknown or has uncommitted changes."""
    r = content.get("reproducibility") or {}
    artifacts = r.get("artifacts") or []
    hashed = [a for a in artifacts if a.get("sha256")]
    numbers = [numbers_entry("artifacts with SHA-256", len(hashed), unit=f"of {len(artifacts)}")]
    if not artifacts or not content.get("manifest_sha256"):
        return verdict(
            "provenance",
            FAILED,
            "This report was built without a run manifest: no artifact it describes is tied to a hash.",
            numbers,
        )
    if len(hashed) < len(artifacts):
        return verdict(
            "provenance",
            CAVEAT,
            f"{len(artifacts) - len(hashed)} of {len(artifacts)} artifacts the report lists have no recorded SHA-256.",
            numbers,
        )
    commit = r.get("git_commit")
    if not commit or str(commit).endswith("-dirty"):
        why = "is unknown" if not commit else "had uncommitted changes"
        return verdict(
            "provenance",
            CAVEAT,
            f"All {len(artifacts)} artifacts are listed with SHA-256, but the code's git commit {why}, so the code "
            "is not pinned.",
            numbers,
        )
    return verdict(
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
        students(content),
        provenance(content),
    ]
    order = [a for a, _, _ in AREAS]
    return sorted(out, key=lambda v: (STATUSES.index(v["status"]), order.index(v["area"])))
