"""The first screen's verdict on the distilled students: each student's test metric against the trivial predictor
its teacher is judged against, and its fidelity to the teacher, from the distill stage's records."""

from __future__ import annotations

from typing import Any, Mapping

from pipeline.report.fmt import metric_name, sig3
from pipeline.report.verdict_base import (
    CAVEAT,
    FAILED,
    HOLDS,
    NOT_APPLICABLE,
    dead_classes,
    lead,
    model_title,
    numbers_entry,
    verdict,
)

CLOSE_FIDELITY = 0.9  # a student follows its teacher closely when its fidelity R² / top-1 agreement is at least this


def _student_checks(title: str, rec: Mapping[str, Any], trivial: float | None) -> dict[str, Any]:
    """One student's test metric against the trivial predictor and its fidelity to the teacher: what fails, what is
    a caveat, what could not be judged (no recorded metric, no trivial predictor, no chance agreement), and the
    numbers. An interval's lower end decides 'no better than' (its point value when no interval was recorded, as for
    the teachers)."""
    who = f"student of the {title}"
    classifier = "student_accuracy" in rec
    metric, fidelity = ("student_accuracy", "top1_agreement") if classifier else ("student_r2", "student_fidelity_r2")
    shown = "accuracy" if classifier else metric_name("r2")
    fid_name = "top-1 agreement" if classifier else "fidelity R²"
    value, ci = rec.get(metric), rec.get(f"{metric}_ci95")
    fid, fid_ci = rec.get(fidelity), rec.get(f"{fidelity}_ci95")
    # chance: two predictors answering independently with these answer frequencies; R² 0: the teacher's mean output
    chance = rec.get("top1_agreement_chance") if classifier else 0.0  # None: a record from before it was kept
    # "unjudged": whole sentences, never after "Network students beat a trivial predictor and chance fidelity, but"
    out: dict[str, Any] = {"failed": [], "unjudged": [], "caveats": [], "numbers": []}
    if not isinstance(value, (int, float)) or not isinstance(fid, (int, float)):
        out["unjudged"].append(f"The {who} has no recorded test metric or fidelity to judge.")
        return out
    out["numbers"] += [
        numbers_entry(
            f"test {shown}, {title}'s student", value, ci, f"trivial {sig3(trivial)}" if trivial is not None else ""
        ),
        numbers_entry(
            f"{fid_name} {'with' if classifier else 'to'} its teacher, {title}'s student",
            fid,
            fid_ci,
            f"chance {sig3(chance)}" if chance is not None else "",
        ),
    ]

    def shown_ci(v: float, interval: Any) -> str:
        return sig3(v) + (f" [{sig3(interval[0])}, {sig3(interval[1])}]" if interval else "")

    if trivial is not None and (ci or [value])[0] <= trivial:
        out["failed"].append(
            f"The {who} is no better than a trivial predictor: test {shown} {shown_ci(value, ci)} vs {sig3(trivial)}."
        )
    if chance is not None and (fid_ci or [fid])[0] <= chance:
        out["failed"].append(
            f"The {who} does not track its teacher: {fid_name} {shown_ci(fid, fid_ci)} vs {sig3(chance)} by chance."
        )
    elif fid < CLOSE_FIDELITY:
        out["caveats"].append(f"the {who} tracks its teacher loosely ({fid_name} {sig3(fid)} < {sig3(CLOSE_FIDELITY)})")
    if trivial is None:  # the teacher has no test metric, so no trivial predictor was scored
        out["unjudged"].append(
            f"The {who} is not judged against a trivial predictor: its teacher has no recorded test metric."
        )
    if chance is None:
        out["unjudged"].append(
            f"The {who}'s {fid_name} is not judged against chance: its record holds no chance agreement."
        )
    if not ci or not fid_ci:
        out["caveats"].append(f"the {who}'s metrics have no recorded interval")
    dead = dead_classes(rec.get("student_confusion_matrix"))
    if dead and dead["recall_zero"]:
        out["caveats"].append(f"the {who} has recall 0 on {dead['recall_zero']} of {dead['classes']} classes")
    return out


def students(content: Mapping[str, Any]) -> dict[str, Any]:
    """The distilled network students, from the distill stage's records (the regressor's depth-limited tree is a
    readable surrogate, judged in the Distillation section by its own fidelity, not here). Failed: a student's test metric interval does not
    clear the trivial predictor its teacher is judged against, or its fidelity to the teacher is no better than
    chance (fidelity R²'s interval reaches 0, or top-1 agreement's interval reaches what two independent predictors
    with these answer frequencies agree on). With caveat: fidelity R² or agreement below 0.9, recall 0 on a class,
    no interval recorded, or a check that could not be made (no recorded metric, no trivial predictor to beat, no
    chance agreement): then the row says so, never that the student beat it. Not applicable when the distill stage
    did not run."""
    distill = content.get("distill")
    if not isinstance(distill, Mapping) or not distill:
        return verdict("students", NOT_APPLICABLE, "No student was distilled in this run.", [])
    failed, unjudged, caveats, numbers = [], [], [], []
    first = first_unjudged = first_caveat = None  # the first student that fails, ... : their numbers lead
    for name, d in distill.items():
        rec = (d.get("record") if isinstance(d, Mapping) else None) or {}
        if not rec:
            continue
        tb = ((content.get("models") or {}).get(name) or {}).get("trivial_baseline") or {}
        out = _student_checks(model_title(name), rec, tb.get("trivial"))
        failed += out["failed"]
        unjudged += out["unjudged"]
        caveats += out["caveats"]
        numbers += out["numbers"]
        first = first or (model_title(name) if out["failed"] else None)
        first_unjudged = first_unjudged or (model_title(name) if out["unjudged"] else None)
        first_caveat = first_caveat or (model_title(name) if out["caveats"] else None)
    if not numbers and not unjudged:
        return verdict("students", NOT_APPLICABLE, "The distill stage recorded no student.", [])
    if failed:
        more = len(failed) - 1
        sentence = (
            failed[0]
            if not more
            else failed[0][:-1] + f"; {more} more {'check fails' if more == 1 else 'checks fail'}."
        )
        return verdict("students", FAILED, sentence, lead(numbers, f"{first}'s student"), "distill")
    if unjudged:
        return verdict("students", CAVEAT, unjudged[0], lead(numbers, f"{first_unjudged}'s student"), "distill")
    if caveats:
        return verdict(
            "students",
            CAVEAT,
            f"Network students beat a trivial predictor and chance fidelity, but {caveats[0]}.",
            lead(numbers, f"{first_caveat}'s student"),
            "distill",
        )
    return verdict(
        "students",
        HOLDS,
        f"Network students beat a trivial predictor and follow their teachers closely (fidelity R² or top-1 "
        f"agreement at least {sig3(CLOSE_FIDELITY)}).",
        numbers,
        "distill",
    )
