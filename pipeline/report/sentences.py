"""Sentences the report, its HTML page and the model cards share: checks stated with their nulls and intervals.

Plain functions over the report's JSON tree (no stage outputs), so the renderers import them without the
stages' dependencies.
"""

from __future__ import annotations

from typing import Any, Mapping

from pipeline.report.fmt import number

__all__ = [
    "WHY_NOT_RIDGE",
    "baseline_sentence",
    "randomisation_sentence",
    "reference_sentence",
    "replication_cell",
    "survivors",
]


def reference_sentence(ref: Mapping[str, Any]) -> str:
    """How far the primary SHAP values are from the reference, in words: a percentile with its interval, not a max
    over two images, and what the reference's own sampling noise is."""
    n = ref["n"]
    if ref.get("reference_exact"):  # the reference is exact: the error is the primary's, at float precision here
        return f"max error {number(ref['max_rel_error'], 2)} of the largest reference value over {n} inputs"
    med = ref.get("median_max_rel_error") or {}
    interval = (
        f" [{number(med['lower'], 2)}, {number(med['upper'], 2)}] ({number(100 * med['coverage'], 3)}% "
        "distribution-free interval)"
        if med.get("lower") is not None and med.get("upper") is not None
        else ""
    )
    p = ref.get("exceed_max_probability")
    text = (
        f"per-image max error (relative to the image's largest reference value) median "
        f"{number(med.get('estimate', ref['max_rel_error']), 2)}{interval}, largest {number(ref['max_rel_error'], 2)} "
        f"over {n} inputs"
        + (f" (one more input exceeds it with probability 1/{n + 1} = {number(p, 2)})" if p is not None else "")
    )
    noise = ref.get("reference_noise")
    text += "; the reference is itself a sampling estimate" + (
        f": two of its runs with different seeds differ by up to {number(noise['max_rel_error'], 2)} on the same "
        f"{noise['n']} inputs (errors of that size are within its noise)"
        if noise
        else ""
    )
    return text


def randomisation_sentence(r: Mapping[str, Any], kind: str) -> str:
    """One randomisation check of ``kind`` ("signed" or "abs") in words: trained vs random beside the null, the
    difference with its spread over seeds, and the share of rows that survive (under single seeds too)."""
    t, null = r[f"spearman_{kind}"], r.get(f"null_{kind}")
    text = f"|Spearman| trained vs randomised {number(t, 2)}"
    if null is not None:
        text += (
            f" vs {number(null, 2)} randomised vs randomised (the null): difference "
            f"{number(r[f'difference_{kind}'], 2)} ± {number(r[f'difference_sd_{kind}'], 2)} (SD over "
            f"{len(r.get('seeds') or [])} seeds)"
        )
    frac = r.get(f"fraction_{kind}")
    if frac is not None:
        lo, hi = r.get(f"fraction_range_{kind}") or (None, None)
        text += f"; {number(100 * frac, 3)}% of {r.get('n')} rows survive randomisation" + (
            f" (under one seed alone {number(100 * lo, 3)}-{number(100 * hi, 3)}%)" if lo is not None else ""
        )
    return text


def survivors(r: Mapping[str, Any], kind: str) -> str:
    """The summary's short form of a randomisation check: rows surviving, and trained vs random beside the null."""
    frac, null = r.get(f"fraction_{kind}"), r.get(f"null_{kind}")
    text = f"trained vs random {number(r[f'spearman_{kind}'], 2)}"
    text += "" if null is None else f", random vs random {number(null, 2)}"
    return text if frac is None else f"{number(100 * frac, 3)}% of rows survive; {text}"


def replication_cell(rep: Mapping[str, Any] | None) -> str:
    """A test-split error cohort looked up again on the validation split, in a few words (plain text)."""
    if not rep:
        return "not checked"
    if not rep.get("n"):
        return f"no {rep.get('split', 'val')} rows"
    verdict = {True: "replicates", False: "does not replicate", None: "not confirmed"}[rep.get("replicates")]
    lo, hi = rep.get("mae_ci95") or (None, None)
    interval = "" if lo is None else f" [{number(lo)}, {number(hi)}]"
    return (
        f"{verdict}: n = {rep['n']}, MAE {number(rep['mae'])}{interval}, "
        f"{number(rep['mae_ratio'], 3)} × the {rep.get('split', 'val')} MAE"
    )


def baseline_sentence(cmp: Mapping[str, Any] | None) -> str:
    """The regressor against its Ridge baseline: the paired test R² difference and what it allows one to say."""
    if not cmp:
        return ""
    lo, hi = cmp["ci95"]
    verdict = (
        "the MLP regressor and the Ridge baseline cannot be told apart on this test split"
        if not cmp["distinguishable"]
        else (
            "the MLP regressor is better than Ridge" if cmp["better"] == "regressor" else "Ridge is better than the MLP"
        )
    )
    return (
        f"MLP minus Ridge test R² = {number(cmp['value'], 3)} [{number(lo, 3)}, {number(hi, 3)}] (paired bootstrap over "
        f"{cmp.get('n')} test rows): {verdict}"
    )


WHY_NOT_RIDGE = (
    "The MLP stays the released regressor even where Ridge is not worse: the run's DP training, explanations, "
    "distillation, federated training and ONNX export are built for the network, and the Ridge baseline is fitted "
    "without DP. Where they cannot be told apart, the simpler Ridge model (coefficients in models/ridge.json) "
    "predicts as well on this test split; prefer it if DP, explanations and ONNX are not needed."
)
