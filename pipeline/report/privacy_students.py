"""The privacy statement of the distilled students: inherited, composed or none, and their own DP-SGD checks.

Read from the distill stage's recorded privacy status (``students/<model>.json``); the teacher's own claim
is :mod:`pipeline.report.privacy`'s.
"""

from __future__ import annotations

from typing import Any, Mapping

from auditml_core.models import title
from pipeline.report.fmt import number
from pipeline.report.privacy import check_caveat, eps_delta, independent_check


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
                f"students/{model}.* {g} ({eps_delta(status.get('epsilon'), status.get('delta'))})"
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
        line = check_caveat(model, chk)
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
                f"({eps_delta(status.get('epsilon'), status.get('delta'))})-DP, OVER the budget dp.target_epsilon = "
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
                    f"{what}: inherited guarantee, {eps_delta(tp.get('epsilon'), tp.get('delta'))} ({tp.get('reason')})"
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
