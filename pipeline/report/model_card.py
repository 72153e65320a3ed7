"""A model card (Markdown) per model, from the report's content tree.

Sections follow Mitchell et al., "Model Cards for Model Reporting" (2019):
model details, intended use, factors, metrics, evaluation data, training data,
quantitative analyses, ethical considerations, caveats and recommendations.
Every user-supplied string goes through :func:`md`, which HTML-escapes it (Markdown
renderers pass raw HTML through) and neutralises table pipes and line breaks.
"""

from __future__ import annotations

from typing import Any, Mapping

from auditml_core.codebook import describe
from auditml_core.models import MODELS, model_entry
from pipeline.report import card_fields
from pipeline.report.fmt import md, number
from pipeline.report.sentences import (
    WHY_NOT_RIDGE,
    baseline_sentence,
    randomisation_sentence,
    reference_sentence,
    replication_cell,
)


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


def _explanation_lines(ex: Mapping[str, Any]) -> list[str]:
    """The card's explanation paragraph, quality table and mean |SHAP| table."""
    q = ex["quality"]
    primary = q["primary"]
    f = q["faithfulness"].get(primary, {})
    ref = q["reference"]
    r = q["randomisation"]
    run = ex["methods"].get("run", [ex["methods"]["shap"], ex["methods"]["lime"]])
    out = [
        f"Explanations ({', '.join(md(x) for x in run)}; {num(ex['n_explained'])} test inputs, backgrounds from "
        f"the {md(ex['background']['split'])} split). Primary SHAP method {md(primary)}: "
        f"**{md(q['exactness'])}**.",
        "",
    ]
    rows = []
    if ref is not None:
        rows.append(
            [
                md(f"{primary} vs reference ({ref['reference_description']}, {ref['n']} inputs)"),
                md(
                    f"{reference_sentence(ref)}; Pearson {number(ref['pearson'], 4)}, top-{ref['k']} overlap "
                    f"{number(ref['topk'], 3)}"
                ),
            ]
        )
    if q["additivity_max_abs_error"] is not None:
        rows.append([md("SHAP additivity error (max |base + sum - output|)"), num(q["additivity_max_abs_error"])])
    for label, rr in (("model-randomisation", r), ("random-logit", q.get("class_randomisation"))):
        if rr is None:
            continue
        rows.append(
            [
                md(
                    f"{label} check ({rr.get('citation') or 'Adebayo et al. 2018'}; {rr['randomisation']}; {rr['rule']})"
                ),
                md(
                    f"signed: {'pass' if rr['passed_signed'] else 'FAIL'}, {randomisation_sentence(rr, 'signed')}; "
                    f"|attribution|: {'pass' if rr['passed_abs'] else 'FAIL'}, {randomisation_sentence(rr, 'abs')}"
                ),
            ]
        )
    rows.append(
        [
            md("deletion AUC (lower is better)"),
            md(f"{number(f.get('deletion_auc'), 4)} vs {number(f.get('random_deletion_auc'), 4)} for a random order"),
        ]
    )
    for pair, a in q["agreement"].items():
        rows.append(
            [
                md(f"agreement {pair}, top-{a['k']} {a['k_unit']} at {a['resolution']}"),
                md(
                    f"overlap {number(a['mean_topk'], 3)}, Spearman {number(a['mean_spearman'], 3)}, "
                    f"{a['n_flagged']} inputs flagged" + (f" ({a['flag_rule']['rule']})" if a.get("flag_rule") else "")
                ),
            ]
        )
    for meth, st in q["stability"].items():
        rows.append([md(f"{meth} stability (top-{st['k']} Jaccard across seeds)"), num(st["mean"])])
    for meth, lf in q["lime_fidelity"].items():
        rows.append(
            [
                md(f"{meth} fidelity: R² (in-sample); surrogate error at the explained input (explained-output units)"),
                md(
                    f"{number(lf['mean_r2'], 3)}; mean {number(lf['mean_abs_error_at_row'], 3)}, "
                    f"max {number(lf['max_abs_error_at_row'], 3)}"
                ),
            ]
        )
    out += [_table(["explanation check", "value"], rows), ""]
    if ex.get("mean_abs_shap"):
        ranked = sorted(ex["mean_abs_shap"].items(), key=lambda kv: -(kv[1] or 0))[:10]
        out += [
            f"Mean absolute SHAP value per feature, in {md(ex.get('mean_abs_shap_units') or 'target units')}. "
            "Feature values are as the dataset provides them (scikit-learn's diabetes features, the default data, "
            "are already mean-centred and scaled, not clinical units).",
            "",
            _table([md("feature"), md("mean |SHAP|")], [[md(k), num(v)] for k, v in ranked]),
            "",
        ]
    if ex.get("dependence"):
        out += [
            "Feature dependence of the top features (figures in the report): partial dependence computed by "
            "scikit-learn over the public background rows, in target units; ICE spread is the largest spread of the "
            "row-centred ICE curves (0 = additive, large = interacting).",
            "",
            _table(
                ["feature", "coloured by (strongest interaction)", "PDP range", "monotone", "ICE spread"],
                [
                    [
                        md(d["feature"]),
                        md(d["interaction"] or "none"),
                        num(d["pdp_range"]),
                        "yes" if d["pdp_monotone"] else "no",
                        num(d["ice_spread"]),
                    ]
                    for d in ex["dependence"]
                ],
            ),
            "",
        ]
    return out


def _dp_levels(m: Mapping[str, Any]) -> str:
    """'yes (...)' naming the DP levels this model's training records hold, else 'no'."""
    levels = [
        level
        for level, rec in (
            ("sample-level DP-SGD", m.get("privacy")),
            ("user-level DP-FedAvg", (m.get("training") or {}).get("user_level_privacy")),
        )
        if rec
    ]
    return f"yes ({', '.join(levels)})" if levels else "no"


def _training_line(t: Mapping[str, Any]) -> str:
    """'- Training: ...': the settings that shaped this model. Federated: rounds x local epochs, clients, strategy,
    partitioner and the clients' optimiser settings (``fit.epochs`` is not used there, so it is not shown)."""
    if t.get("mode") != "federated":
        settings = ", ".join(f"{md(k)} = {md(v)}" for k, v in (t.get("fit") or {}).items())
        return f"- Training: {md(t.get('mode', 'central'))}; settings: {settings}."
    strategy = dict(t.get("strategy") or {})
    name = strategy.pop("name", "n/a")
    partition = t.get("partition") or {}
    method = partition.get("method", "n/a")
    split = {
        "dirichlet": f"Dirichlet label skew, α = {num(partition.get('dirichlet_alpha'))}",
        "sites": "per-site data (each site its own file)",
    }.get(method, method)
    client = ", ".join(f"{md(k)} = {md(v)}" for k, v in (t.get("fit") or {}).items() if k != "epochs")
    return (
        f"- Training: federated, {num(t.get('rounds'))} rounds × {num(t.get('local_epochs'))} local epochs "
        f"({num(t.get('completed_rounds'))} completed), {num(t.get('clients'))} clients (at least "
        f"{num(t.get('min_clients'))} per round), strategy {md(name)}"
        + (" (" + ", ".join(f"{md(k)} = {md(v)}" for k, v in strategy.items()) + ")" if strategy else "")
        + f", partitioner: {md(split)}; each client's optimiser: {client}."
    )


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
        f"built from stages recorded up to {md(content['generated'])}, manifest SHA-256 "
        f"`{md(content.get('manifest_sha256') or 'n/a')}`. Full report: `{md(content['files']['html'])}`.",
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
        _training_line(t),
        f"- Differential privacy: {_dp_levels(m)}. {md(priv['statement'])}",
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
        groups = (m["metrics"].get("test") or {}).get("subgroups") or {}
        out += [
            "- Relevant factors are the input features ("
            + ", ".join(f"`{md(f)}`" for f in d.get("feature_names", []))
            + ")."
            + (
                " Test error per group is below (MAE with a 95% bootstrap CI, in target units; bias = mean of "
                "prediction minus target). Groups are small: overlapping intervals do not show equal performance."
                if groups
                else " No subgroup analysis was run; where features encode groups (e.g. age or sex), performance "
                "per group is unknown and should be checked before use."
            ),
            "",
        ]
        if d.get("codebook"):
            out += [
                "- Data dictionary (data.codebook): "
                + "; ".join(
                    f"`{md(c)}`" + (f" in {md(u)}" if u else "") + (f": {md(codes)}" if codes else "")
                    for c, u, codes in describe(d["codebook"])
                )
                + ".",
                "",
            ]
        units = (
            "dataset units: scikit-learn's diabetes features are already mean-centred and scaled, not years or codes"
            if "load_diabetes" in str(prov.get("source", ""))
            else "dataset units"
        )
        for feat, g in groups.items():
            out += [
                f"Test error by `{md(feat)}` ({md(g['kind'])}; {units}). Largest MAE gap between groups: "
                f"{num(g['mae_gap'])}.",
                "",
                _table(
                    ["group", "n", "MAE [95% CI]", "RMSE", "bias"],
                    [[md(r["group"]), num(r["n"]), _ci(r, "mae"), num(r["rmse"]), num(r["bias"])] for r in g["groups"]],
                ),
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
        + "; never used to train or select this model.",
        "",
    ]

    out += ["## Training data", ""]
    out += [
        f"- The train split: {num(d['sizes'].get('train'))} rows of the same source; validation: "
        f"{num(d['sizes'].get('val'))} rows; public split (explanation backgrounds, distillation): "
        f"{num(d['sizes'].get('public'))} rows.",
        *(
            [
                f"- Public pretraining: before DP-SGD the weights were fitted without DP on the public split "
                f"({num((t.get('public_pretraining') or {}).get('rows'))} rows, "
                f"{num((t.get('public_pretraining') or {}).get('epochs'))} epochs)."
            ]
            if t.get("public_pretraining") and not m.get("privacy")  # with DP, the fuller line below says it
            else []
        ),
        "- Preprocessing: standardisation with statistics fitted on the training split only"
        f" (NaN policy: {md(d.get('preprocessing', {}).get('nan_policy', 'n/a'))}).",
    ]
    pre = t.get("public_pretraining")
    if m.get("privacy") and isinstance(pre, Mapping):
        out += [
            f"- Public pretraining: before DP-SGD, the weights were first fitted WITHOUT differential privacy on "
            f"the {md(pre.get('split', 'public'))} split ({num(pre.get('rows'))} rows, {num(pre.get('epochs'))} "
            "epochs). Those rows are declared public and not protected; part of this model's accuracy may come "
            "from them rather than from the private training split."
        ]
    out += [""]

    out += ["## Quantitative analyses", ""]
    keys = ("rmse", "mae", "r2") if regression else ("accuracy", "macro_f1")
    rows = [[md(k), _ci(test, k)] for k in keys if k in test]
    if regression:
        base = m.get("baseline", {}).get("metrics", {}).get("test", {})
        rows = [[r[0], r[1], _ci(base, k)] for r, k in zip(rows, [k for k in keys if k in test])]
        out += [_table(["test metric", "value [95% CI]", "Ridge baseline [95% CI]"], rows), ""]
        versus = m.get("baseline", {}).get("comparison")
        if versus:
            out += [md(f"{baseline_sentence(versus)}. {WHY_NOT_RIDGE}"), ""]
        co = test.get("cohorts")
        if co and co.get("cohorts"):
            out += [
                f"Where the model is worst (error cohorts of the test split): a regression tree of depth "
                f"{num(co['max_depth'])}, each leaf at least {num(co['min_leaf_rows'])} of {num(co['n'])} rows, fitted "
                f"on the test rows' features to predict the absolute error. Overall MAE {num(co['overall_mae'])}. "
                f"Descriptive only: {md(co['descriptive'])}.",
                "",
                _table(
                    ["cohort", "n", "MAE [95% CI]", "MAE / overall", "bias", "on the validation split"],
                    [
                        [
                            md(r["rule"]),
                            num(r["n"]),
                            _ci(r, "mae"),
                            num(r["mae_ratio"], 3),
                            num(r["bias"]),
                            md(replication_cell(r.get("replication"))),
                        ]
                        for r in co["cohorts"]
                    ],
                ),
                "",
            ]
    else:
        out += [_table(["test metric", "value [95% CI]"], rows), ""]
        rec, prec = test.get("per_class_recall", {}), test.get("per_class_precision", {})
        errs = {r["class"]: r for r in test.get("per_class_errors") or []}
        out += [
            _table(
                ["class", "recall", "precision", "errors", "most often predicted instead (count)"],
                [
                    [
                        md(c),
                        num(rec.get(c)),
                        num(prec.get(c)),
                        num(errs.get(c, {}).get("errors")),
                        "none"
                        if not errs.get(c, {}).get("most_confused_with")
                        else f"{md(errs[c]['most_confused_with'])} ({num(errs[c]['most_confused_count'])})",
                    ]
                    for c in rec
                ],
            ),
            "",
        ]
        if any(p["kind"] == "misclassified" for p in ex.get("plots", [])):
            out += [
                "Misclassified test images per true class are shown in the report (`"
                + md(next(p["file"] for p in ex["plots"] if p["kind"] == "misclassified"))
                + "`).",
                "",
            ]
    if ex:
        out += _explanation_lines(ex)

    po = m.get("public_only_baseline")
    if po:
        out += [f"Utility from the private data: {md(po['statement'])}", ""]
    tb = m.get("trivial_baseline")
    if tb:
        out += [f"Against a trivial predictor: {md(tb['statement'])}", ""]
    audit = content.get("audit", {})
    am = audit.get("models", {}).get(name)
    if am:
        bits = []
        control_who = (
            "noise-mutant positive control"
            if am["control"].get("kind") == "noise mutant"
            else "overfit positive control"
        )
        for who, attacks in (("released model", am["attacks"]), (control_who, am["control"]["attacks"])):
            for a in attacks:
                tprs = ", ".join(f"TPR@FPR {num(t['target_fpr'], 2)} = {num(t['tpr'], 3)}" for t in a["tpr_at_fpr"])
                bits.append(
                    f"{who}, {md(a['attack'])} attack: AUC {num(a['auc'], 3)} [{num(a['auc_ci95'][0], 3)}, "
                    f"{num(a['auc_ci95'][1], 3)}], {tprs}, empirical ε ≥ {num(a['epsilon_lower_bound'], 3)}"
                )
        claimed = f" (claimed ε = {num(am['claimed_epsilon'])})" if am.get("claimed_epsilon") is not None else ""
        for who, c in (
            ("released model's training", am.get("canaries")),
            ("positive control", am["control"].get("canaries")),
        ):
            if c and c.get("ran"):
                bits.append(
                    f"{who}, one-run canary audit ({c['m']} canaries): ε ≥ {num(c['epsilon_lower_bound'], 3)} "
                    f"(certifies up to {num(c['certifiable_epsilon'], 3)})"
                )
        out += [f"Privacy audit (membership inference){claimed}: " + "; ".join(bits) + ".", ""]
        if am.get("verdict"):
            out += [f"Audit verdict: {md(am['verdict']['statement'])}", ""]
    elif audit and not audit.get("ran", True):
        out += ["Privacy audit (membership inference): not run.", ""]

    out += card_fields.sections(content, name, _table)
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
    return "\n".join(card_fields.front_matter(content, name) + out)
