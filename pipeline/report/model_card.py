"""A model card (Markdown) per model, from the report's content tree.

Sections follow Mitchell et al., "Model Cards for Model Reporting" (2019):
model details, intended use, factors, metrics, evaluation data, training data,
quantitative analyses, ethical considerations, caveats and recommendations.
Every user-supplied string goes through :func:`md`, which HTML-escapes it (Markdown
renderers pass raw HTML through) and neutralises table pipes and line breaks.
"""

from __future__ import annotations

from typing import Any, Mapping

from core.models import MODELS, model_entry
from pipeline.report.fmt import md, number


def num(value: Any, digits: int = 4) -> str:
    """A number for a card (escaped), None as "n/a"."""
    return md(number(value, digits, none="n/a"))


def _ci(metrics: Mapping[str, Any], key: str) -> str:
    interval = metrics.get(f"{key}_ci95")
    if isinstance(interval, list) and len(interval) == 2:
        return f"{num(metrics.get(key))} [{num(interval[0])}, {num(interval[1])}]"
    return num(metrics.get(key))


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def render(content: Mapping[str, Any], name: str) -> str:
    """The model card of model ``name`` ("regressor" or "cnn") as Markdown."""
    m = content["models"][name]
    d = content["data"][model_entry(name).dataset]
    ex = content["explanations"]["models"].get(name, {})
    priv = content["privacy"]
    repro = content["reproducibility"]
    t = m["training"]
    test = m["metrics"].get("test", {})
    prov = d.get("provenance", {})
    regression = model_entry(name).task == "regression"
    sha = prov.get("sha256") or prov.get("sha256_of_arrays")
    out = [f"# Model card: {md(m['title'])}", ""]
    out += [
        f"Run `{md(content.get('run_id') or 'n/a')}`, git commit `{md(repro.get('git_commit') or 'n/a')}`, "
        f"generated {md(content['generated'])}. Full report: `{md(content['files']['html'])}`.",
        "",
    ]

    out += ["## Model details", ""]
    spec = m["spec"]
    out += [
        f"- Type: {md(spec.get('kind'))} ({'MLP regression' if regression else 'convolutional classifier'}), "
        f"PyTorch; architecture arguments: {', '.join(f'{md(k)} = {md(v)}' for k, v in spec.get('kwargs', {}).items())}.",
        f"- Trainable parameters: {num(m['n_parameters'])}.",
        *(
            [
                f"- Fixed feature front-end: {md(fe['kind'])}; {num(fe['fixed_parameters'])} fixed weights, "
                f"{'data-independent' if fe.get('data_independent') else 'fitted to data'}: {md(fe['privacy'])}."
            ]
            if (fe := t.get("fixed_front_end"))
            else []
        ),
        f"- Training: {md(t.get('mode', 'central'))}; settings: "
        + ", ".join(f"{md(k)} = {md(v)}" for k, v in (t.get("fit") or {}).items())
        + ".",
        f"- Differential privacy: {'yes' if m.get('privacy') else 'no'}. {md(priv['statement'])}",
        "- Libraries: " + ", ".join(f"{md(k)} {md(v)}" for k, v in repro.get("library_versions", {}).items()) + ".",
        "",
    ]

    out += ["## Intended use", ""]
    task = (
        f"predict `{md(d.get('target_name', 'the target'))}` from {len(d.get('feature_names', []))} numeric features"
        if regression
        else f"classify {md('x'.join(map(str, d.get('input_shape', []))))} images into "
        f"{len(d.get('class_names', []))} classes"
    )
    out += [
        f"- Primary use: to {task} on data drawn like the training data, within an auditable demonstration "
        "pipeline (training, privacy accounting, explanations, report).",
        "- Primary users: engineers and auditors examining how the model was trained, how private it is and "
        "what it relies on.",
        "- Out of scope: decisions about individuals (medical, credit, legal) without a domain-specific validation; "
        "data from another population or acquisition process; treating explanations as causal effects.",
        "",
    ]

    out += ["## Factors", ""]
    if regression:
        out += [
            "- Relevant factors are the input features ("
            + ", ".join(f"`{md(f)}`" for f in d.get("feature_names", []))
            + "). No subgroup analysis was run; where features encode groups (e.g. age or sex), performance per "
            "group is unknown and should be checked before use.",
            "",
        ]
    else:
        out += [
            "- Evaluation factor: the class. Per-class recall and precision are reported below; other factors "
            "(writer, device, image quality) are not recorded in the data and were not evaluated.",
            "",
        ]

    out += ["## Metrics", ""]
    if regression:
        out += [
            "- RMSE and MAE (original target units) and R² on the held-out test split, each with a 95% bootstrap "
            "confidence interval (1000 resamples of the test rows). A Ridge baseline is reported for comparison.",
            "",
        ]
    else:
        out += [
            "- Accuracy and macro-F1 on the held-out test split with 95% bootstrap confidence intervals, per-class "
            "recall and precision, and the confusion matrix.",
            "",
        ]

    out += ["## Evaluation data", ""]
    out += [
        f"- The test split: {num(d['sizes'].get('test'))} rows of `{md(prov.get('source', 'n/a'))}` "
        f"(SHA-256 `{md(sha or 'n/a')}`), held out by a seeded split"
        + (" stratified by class" if not regression else "")
        + "; never used for training or model selection.",
        "",
    ]

    out += ["## Training data", ""]
    out += [
        f"- The train split: {num(d['sizes'].get('train'))} rows of the same source; validation: "
        f"{num(d['sizes'].get('val'))} rows; public split (explanation backgrounds, distillation): "
        f"{num(d['sizes'].get('public'))} rows.",
        "- Preprocessing: standardisation with statistics fitted on the training split only"
        f" (NaN policy: {md(d.get('preprocessing', {}).get('nan_policy', 'n/a'))}).",
        "",
    ]

    out += ["## Quantitative analyses", ""]
    keys = ("rmse", "mae", "r2") if regression else ("accuracy", "macro_f1")
    rows = [[md(k), _ci(test, k)] for k in keys if k in test]
    if regression:
        base = m.get("baseline", {}).get("metrics", {}).get("test", {})
        rows = [[r[0], r[1], _ci(base, k)] for r, k in zip(rows, [k for k in keys if k in test])]
        out += [_table(["test metric", "value [95% CI]", "Ridge baseline [95% CI]"], rows), ""]
    else:
        out += [_table(["test metric", "value [95% CI]"], rows), ""]
        rec, prec = test.get("per_class_recall", {}), test.get("per_class_precision", {})
        out += [_table(["class", "recall", "precision"], [[md(c), num(rec.get(c)), num(prec.get(c))] for c in rec]), ""]
    if ex:
        q = ex["quality"]
        shap_m = ex["methods"]["shap"]
        f = q["faithfulness"].get(shap_m, {})
        out += [
            f"Explanations ({md(shap_m)} and {md(ex['methods']['lime'])}, {num(ex['n_explained'])} test inputs, "
            f"backgrounds from the {md(ex['background']['split'])} split): SHAP additivity error "
            f"{num(q['additivity_max_abs_error'])}; deletion AUC {num(f.get('deletion_auc'))} vs "
            f"{num(f.get('random_deletion_auc'))} for a random order; SHAP-LIME top-{num(ex['top_k'])} overlap "
            f"{num(q['agreement']['mean_topk'])} ({num(q['n_flagged'])} inputs flagged); LIME stability "
            f"{num(q['lime_stability']['mean'])}; LIME fidelity R² {num(q['lime_fidelity']['mean_r2'])}.",
            "",
        ]
        if ex.get("mean_abs_shap"):
            ranked = sorted(ex["mean_abs_shap"].items(), key=lambda kv: -(kv[1] or 0))[:10]
            out += [_table(["feature", "mean |SHAP|"], [[md(k), num(v)] for k, v in ranked]), ""]

    out += ["## Ethical considerations", ""]
    out += [
        f"- Privacy: {md(priv['statement'])}",
        "- Not covered by any guarantee: " + "; ".join(md(x) for x in priv["not_covered"]) + ".",
        "- Explanations describe the model, not the world: a large attribution is not a cause, and explanations "
        "of a non-private model can reveal information about its training data.",
        "",
    ]

    out += ["## Caveats and recommendations", ""]
    model_caveats = [
        c
        for c in content.get("caveats", [])
        if m["title"] in c or not any(t_ in c for t_ in (e.title for e in MODELS.values()))
    ]
    out += [f"- {md(c)}" for c in model_caveats] or ["- None recorded."]
    out += [
        "- Re-check the metrics on data from the deployment population before use; the confidence intervals "
        "describe test-set sampling only.",
        "",
    ]
    return "\n".join(out)
