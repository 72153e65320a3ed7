"""The report's content: one JSON-safe tree (what ``report.json`` holds) built from every earlier stage's output.

:mod:`pipeline.report.html_page` and :mod:`pipeline.report.model_card` render the same
tree, escaping every string that came from the user (column names, file names, labels).
The SHA-256 of every artifact earlier stages recorded comes from the run's provenance
(the manifest), an explicit input the runner passes as ``inputs["provenance"]``.
"""

from __future__ import annotations

import dataclasses
import logging
import shlex
from typing import Any, Mapping

from auditml_core import config as config_mod
from auditml_core.artifacts import jsonable
from auditml_core.config import Config
from auditml_core.models import MODELS, title
from pipeline.report.annex_iv import annex_iv_map
from pipeline.report.audit import audit_section, public_only_baseline
from pipeline.report.fmt import number
from pipeline.report.privacy import privacy_section
from pipeline.report.privacy_federated import federated_privacy
from pipeline.report.privacy_students import (
    student_caveats,
    student_check_caveats,
    student_checks,
    student_privacy,
    student_statement,
)
from pipeline.report.sentences import randomisation_sentence, reference_sentence, survivors
from pipeline.report.settings import departures
from pipeline.report.utility import trivial_baseline
from pipeline.report.verdicts import verdicts
from pipeline.rundir import git_commit, library_versions
from pipeline.train import TrainOutput

log = logging.getLogger(__name__)
SCHEMA_ID = "pipeline-report/1"
FILES = {
    "html": "report.html",
    "json": "report.json",
    "model_cards": {name: f"model_card_{name}.md" for name in MODELS},
}


# --------------------------------------------------------------------------- content


def _plain(obj: Any, depth: int = 0) -> Any:
    """A JSON-safe copy of an arbitrary stage output (dataclasses, mappings), large arrays summarised."""
    import numpy as np

    if depth > 8:
        return repr(obj)[:200]
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: _plain(getattr(obj, f.name), depth + 1) for f in dataclasses.fields(obj)}
    if isinstance(obj, Mapping):
        return {str(k): _plain(v, depth + 1) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v, depth + 1) for v in obj[:200]]
    if isinstance(obj, (bytes, bytearray)):
        return f"<{len(obj)} bytes>"
    if hasattr(obj, "shape") and hasattr(obj, "dtype"):  # numpy array or tensor
        arr = np.asarray(obj.detach().cpu() if hasattr(obj, "detach") else obj)
        return jsonable(arr) if arr.size <= 64 else {"shape": list(arr.shape), "dtype": str(arr.dtype)}
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return jsonable(obj)
    if isinstance(obj, np.generic):
        return jsonable(obj)
    return repr(obj)[:200]


def _headline(name: str, metrics: Mapping[str, Any]) -> dict[str, Any]:
    test = metrics.get(name, {}).get("test", {})
    key = "r2" if name in ("regressor", "ridge") else "accuracy"
    return {"metric": key, "value": test.get(key), "ci95": test.get(f"{key}_ci95"), "n": test.get("n")}


def data_section(datasets: Mapping[str, Any], manifest: Mapping[str, Any] | None) -> dict[str, Any]:
    """Provenance, sizes per split (incl. public), preprocessing and the data artifacts' hashes."""
    out = {}
    artifacts = (manifest or {}).get("artifacts", {})
    for key, ds in datasets.items():
        s = ds.summary()
        s["files"] = {
            rel: artifacts[rel]["sha256"] for rel in (f"data/{key}.npz", f"data/{key}.json") if rel in artifacts
        }
        out[key] = s
    return out


def models_section(
    cfg: Config, trained: TrainOutput, metrics: Mapping[str, Any], manifest: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """Per model: spec, parameters, training record (without weights), metrics with CIs, and the recorded
    file its training curves are drawn from (with that file's SHA-256 from the provenance)."""
    artifacts = (manifest or {}).get("artifacts", {})
    out = {}
    for name in MODELS:
        m = trained.models[name]
        training = dict(m.training)
        privacy = training.pop("privacy", None)
        out[name] = {
            "title": title(name),
            "spec": _plain(m.spec),
            "n_parameters": training.get("n_parameters"),
            "training": _plain(training),
            "privacy": _plain(privacy),
            "metrics": _plain({k: v for k, v in metrics.get(name, {}).items() if k != "public_only"}),
            "public_only_baseline": _plain(public_only_baseline(name, metrics, privacy)),
            "training_curves_source": {
                "file": f"models/{name}.json",
                "sha256": artifacts.get(f"models/{name}.json", {}).get("sha256"),
                "what": "the training history recorded in this file (training.history)",
            },
        }
    out["regressor"]["baseline"] = {
        # "not DP" tells a reader of a DP run which model is outside the guarantee; in a run without DP it would
        # suggest the other models have one
        "title": "Ridge baseline (scikit-learn" + (", not DP)" if cfg.dp.enabled or cfg.client_dp.enabled else ")"),
        "alpha": trained.ridge.alpha,
        "metrics": _plain(metrics.get("ridge", {})),
        "comparison": _plain(metrics.get("regressor", {}).get("vs_ridge")),
    }
    return out


HOW_TO_READ = {
    "beeswarm": "Each dot is one explained test row. Its horizontal position is the feature's SHAP value: how much "
    "that feature moved this row's prediction away from the average prediction, in the target's original "
    "units. Colour is the feature's value (yellow high, purple low: red and blue mean an attribution's sign in the "
    "other figures). Features are sorted by mean |SHAP|. "
    "Feature values are as the dataset provides them (scikit-learn's diabetes features, the default data, are "
    "already mean-centred and scaled, not clinical measurements).",
    "importance_bar": "Mean absolute attribution per feature, SHAP and LIME side by side (standardised target units). "
    "Long bars are the features the model relies on overall; where the two methods rank features "
    "differently, read the agreement metrics before trusting either.",
    "waterfall": "One test row. Start at the bottom at E[f(X)], the mean prediction over the background; each bar adds "
    "one feature's SHAP value (red pushes the prediction up, blue down) and the top is this row's "
    "prediction f(x), in target units. Feature values are shown as the dataset provides them (scikit-learn's "
    "diabetes features, the default data, are already mean-centred and scaled, not clinical units).",
    "deletion_insertion": "Faithfulness. Left: features (pixels) are replaced by the background mean in order of "
    "decreasing attribution; a faithful explanation makes the explained output fall faster than "
    "a random order (dashed), so lower is better. Right: features are restored in the same order "
    "starting from the background mean; higher is better.",
    "image_grid": "Each row: an explained test image (true and predicted label; misclassified images first, then "
    "the worst SHAP-LIME agreement), the baseline the attributions are measured from (the mean background "
    "image), then the SHAP and LIME attributions toward the predicted class, summed over channels, drawn as in "
    "shap's image_plot: the input in grey underneath, the attribution on top in a diverging map that is "
    "transparent at 0 (so the input shows where attributions are small). Red pixels raise that class's logit "
    "relative to the baseline, blue pixels lower it; one symmetric colour scale per row (its colour bar on the "
    "right, in logit units). A red pixel where the baseline has no ink but the input has can mean 'ink here "
    "raises the logit'; read attributions against the baseline, not as absolute importance. LIME works on grid "
    "cells (a quarter of the image side by default), so its maps are blocky, and SHAP and LIME are compared at "
    "those cells.",
    "dependence": "shap's dependence plot of one of the features with the largest mean |SHAP|. Each dot is one "
    "explained test row: horizontal, the feature's value (as the dataset provides it); vertical, its SHAP value "
    "in target units. A rising cloud means higher values push the prediction up. The colour is the value of the "
    "feature shap finds most interacting with it (named on the colour bar): at a given x, a vertical spread that "
    "sorts by colour is an interaction. The shape describes the model, not a causal effect.",
    "pdp": "Partial dependence (thick black line) and individual conditional expectation curves (thin grey lines, one "
    "per background row of the public split): the model's prediction, in target units, as this one feature is set "
    "to each value of the grid (its 5th to 95th percentile on the background) while every other feature keeps the "
    "row's own value. Computed by scikit-learn's partial_dependence (brute force) on the trained network. Parallel "
    "ICE curves mean the feature acts additively; crossing or fanning curves mean it interacts with others, and the "
    "average can hide opposite effects. Values off the grid, and combinations the data never shows, are "
    "extrapolation.",
    "misclassified": "One row per true class that has errors (the title names the classes without any): the "
    "misclassified test images, in test order, titled 'true → predicted'. The count on the left is every "
    "misclassified test image of that class; the images are the first few of them. Look for a pattern (a writing style, a confusable pair) rather than single images.",
    "training": "Loss per epoch (or round) on the splits the figure's note names, and ε spent where DP was on.",
}


def _plot_kind(fname: str) -> str:
    for kind in HOW_TO_READ:
        if kind in fname:
            return kind
    return "training"


_FAITH_KEYS = (
    "deletion_auc",
    "random_deletion_auc",
    "insertion_auc",
    "random_insertion_auc",
    "deletion_gain",
    "insertion_gain",
    "deletion_win_rate",
    "insertion_win_rate",
    "output_scale",
)
_AGREE_KEYS = (
    "method_a",
    "method_b",
    "k",
    "k_unit",
    "resolution",
    "threshold",
    "mean_topk",
    "mean_spearman",
    "mean_sign",
    "flag_rule",
)
_REFERENCE_KEYS = (
    "reference",
    "reference_description",
    "reference_exact",
    "n",
    "k",
    "max_abs_error",
    "max_rel_error",
    "mean_rel_error",
    "pearson",
    "min_pearson",
    "topk",
    "per_row_max_rel_error",
    "median_max_rel_error",
    "p90_max_rel_error",
    "exceed_max_probability",
    "reference_noise",
)
_RANDOMISATION_KEYS = (
    "method",
    "n",
    "randomisation",
    "citation",
    "seeds",
    "threshold",
    "max_fraction",
    "spearman_signed",
    "spearman_abs",
    "null_signed",
    "null_abs",
    "difference_signed",
    "difference_abs",
    "difference_sd_signed",
    "difference_sd_abs",
    "fraction_signed",
    "fraction_abs",
    "fraction_range_signed",
    "fraction_range_abs",
    "input_only_spearman_abs",
    "passed_signed",
    "passed_abs",
    "rule",
    "cascade",
)


def _reference_summary(ref: Mapping[str, Any]) -> dict[str, Any]:
    """The reference comparison as the report shows it (the noise run's per-image values kept, they are few)."""
    return {k: ref.get(k) for k in _REFERENCE_KEYS}


def _quality_summary(m: Mapping[str, Any]) -> dict[str, Any]:
    """The report's view of one model's explanation quality (the explain stage's metrics, without per-row arrays)."""
    q = m["quality"]
    primary = m["methods"].get("primary", m["methods"]["shap"])
    add = q.get("additivity") or {}
    ref = q.get("reference")
    return {
        "primary": primary,
        "exactness": q.get("exactness", "approximate"),
        "reference": None if ref is None else _reference_summary(ref),
        "additivity_max_abs_error": add.get("max_abs_error"),
        "additivity_max_rel_error": add.get("max_rel_error"),
        "faithfulness": {meth: {k: d[k] for k in _FAITH_KEYS} for meth, d in q["deletion_insertion"].items()},
        "agreement": {
            pair: {k: a.get(k) for k in _AGREE_KEYS}
            | {"n_flagged": len(a["flagged"]), "pixel_level": a.get("pixel_level")}
            for pair, a in q["agreement"].items()
        },
        "n_flagged": len(m["flagged"]),
        "stability": {
            meth: {k: st[k] for k in ("k", "seeds", "mean", "min")}
            | {"n_rows": len(st["per_row"]), "resolution": st.get("resolution")}
            for meth, st in q["stability"].items()
        },
        "lime_fidelity": {
            meth: {
                k: f.get(k) for k in ("mean_r2", "median_r2", "min_r2", "mean_abs_error_at_row", "max_abs_error_at_row")
            }
            for meth, f in q["lime_fidelity"].items()
        },
        "randomisation": {k: q["randomisation"].get(k) for k in _RANDOMISATION_KEYS},
        "class_randomisation": None
        if q.get("class_randomisation") is None
        else {k: q["class_randomisation"].get(k) for k in _RANDOMISATION_KEYS},
    }


def _quality_caveats(name: str, summary: Mapping[str, Any], m: Mapping[str, Any]) -> list[str]:
    """Caveats a reader must see for one model's explanations."""
    caveats = []
    ref = summary["reference"]
    if summary["exactness"] == "approximate" and ref is not None:
        caveats.append(
            f"{name}: {summary['primary']} values are an approximation of Shapley values: against "
            f"{ref['reference_description']}, {reference_sentence(ref)} (Pearson {number(ref['pearson'], 3)}, "
            f"top-{ref['k']} overlap {number(ref['topk'], 2)}). Additivity alone does not make them exact."
        )
    r = summary["randomisation"]
    if not r["passed_signed"]:
        caveats.append(
            f"{name}: the signed {r['method']} attributions FAIL the model-randomisation check "
            f"({randomisation_sentence(r, 'signed')}; {r['rule']}): on these rows they look like a random model's "
            "attributions, no less than random models look like each other, so they do not show what the model "
            "learned."
        )
    if not r["passed_abs"]:
        caveats.append(
            f"{name}: rankings by |attribution| FAIL the model-randomisation check ({randomisation_sentence(r, 'abs')}; "
            f"|x - baseline| alone ranks them at {number(r['input_only_spearman_abs'], 2)}): much of every "
            "|attribution| ranking (top-k agreement, stability) follows the input, not the model. Signed attributions "
            "pass."
            if r["passed_signed"]
            else ""
        )
    c = summary["class_randomisation"]
    if c is not None and not c["passed_signed"]:
        caveats.append(
            f"{name}: the signed {c['method']} attributions FAIL the random-logit check (Sixt et al. 2020; "
            f"{randomisation_sentence(c, 'signed')} between the explained class and random other classes; "
            f"{c['rule']}): they change little with the class explained."
        )
    if c is not None and not c["passed_abs"]:
        caveats.append(
            f"{name}: rankings by |attribution| FAIL the random-logit check (Sixt et al. 2020; "
            f"{randomisation_sentence(c, 'abs')} between the explained class and random other classes): which "
            "features rank high by |attribution| barely depends on the class explained."
        )
    for pair, a in summary["agreement"].items():
        if a["n_flagged"]:
            rule = (a.get("flag_rule") or {}).get("rule") or (
                f"top-{a['k']} {a['k_unit']} overlap below {number(a['threshold'], 3)} at {a['resolution']}"
            )
            caveats.append(
                f"{name}: {pair} disagree on {a['n_flagged']} of {m['n_explained']} explained inputs ({rule}; listed as "
                "flagged disagreements in the report); read those explanations with care."
            )
    for meth, f in summary["lime_fidelity"].items():
        if f["mean_r2"] is not None and f["mean_r2"] < 0.5:
            caveats.append(
                f"{name}: {meth}'s local surrogate explains on average only "
                f"R² = {number(f['mean_r2'], 3)} of the model's local behaviour."
            )
    for meth, st in summary["stability"].items():
        if st["mean"] is not None and st["mean"] < 0.7:
            caveats.append(
                f"{name}: {meth}'s top-{st['k']} set changes with its seed (mean Jaccard {number(st['mean'], 3)})."
            )
    for meth, d in summary["faithfulness"].items():
        if d["deletion_gain"] is not None and d["deletion_gain"] <= 0:
            caveats.append(
                f"{name}: {meth}'s feature order removes the output no faster "
                "than a random order (deletion gain ≤ 0): its ranking is not faithful here."
            )
    return [c for c in caveats if c]


_DEPENDENCE_FIELDS = (  # what report.json keeps of each recorded dependence/PDP entry of explain/metrics.json
    "rank",
    "feature",
    "mean_abs_shap",
    "interaction",
    "pdp_rows",
    "pdp_grid_points",
    "pdp_range",
    "pdp_monotone",
    "ice_spread",
)


def _explanation_plots(name: str, m: Mapping[str, Any], artifacts: Mapping[str, Any]) -> list[dict[str, Any]]:
    """One entry per plot of a model (file, hash, kind, title, how to read); dependence and PDP plots are titled by
    their feature's rank."""
    plots = []
    for fname in m["plots"]:
        rel = f"explain/plots/{fname}"
        kind = _plot_kind(fname)
        plots.append(
            {
                "file": rel,
                "sha256": artifacts.get(rel, {}).get("sha256"),
                "kind": kind,
                "title": _plot_title(name, fname, kind),
                "how_to_read": HOW_TO_READ[kind],
            }
        )
    dependence = {d_[f]: d_ for d_ in m.get("dependence", []) for f in ("dependence_plot", "pdp_plot")}
    for plot in plots:
        dep = dependence.get(plot["file"].rsplit("/", 1)[-1])
        if dep is not None:
            partner = (
                f", coloured by {dep['interaction']}" if plot["kind"] == "dependence" and dep["interaction"] else ""
            )
            what = "SHAP dependence" if plot["kind"] == "dependence" else "Partial dependence and ICE"
            plot["title"] = f"{what}: {dep['feature']} (top feature #{dep['rank'] + 1} by mean |SHAP|{partner})"
    return plots


def _explained_model(
    name: str, m: Mapping[str, Any], summary: Mapping[str, Any], plots: list[dict[str, Any]]
) -> dict[str, Any]:
    """One model's entry of the explanations section, from its explain metrics and quality summary."""
    importance = m["explanations"][summary["primary"]].get("mean_abs_attribution")
    return {
        "title": title(name),
        "methods": m["methods"],
        "dependence": [{k: d_[k] for k in _DEPENDENCE_FIELDS} for d_ in m.get("dependence", [])],
        "explained_output": m["explained_output"],
        "n_explained": m["n_explained"],
        "explained_split": m["explained_split"],
        "background": {k: v for k, v in m["background"].items() if k != "index"}
        | {"index_recorded_in": "explain/metrics.json"},
        "top_k": m["top_k"],
        "quality": summary,
        "flagged": m["flagged"][:50],
        "mean_abs_shap": importance,
        "mean_abs_shap_units": "standardised target units (1 = one standard deviation of the target)"
        if importance
        else None,
        "notes": m["notes"],
        "seconds": m["seconds"],
        "plots": plots,
    }


def explanations_section(
    cfg: Config, explain_out: Any, manifest: Mapping[str, Any] | None, variants: list[dict[str, Any]]
) -> dict[str, Any]:
    """Methods, backgrounds, quality summaries, flagged rows and the plots (file, hash, how to read) per model."""
    artifacts = (manifest or {}).get("artifacts", {})
    models = {}
    caveats: list[str] = []
    for name, me in explain_out.models.items():
        m = me.metrics
        summary = _quality_summary(m)
        models[name] = _explained_model(name, m, summary, _explanation_plots(name, m, artifacts))
        caveats += [f"{title(name)}: {n}" for n in m["notes"]]
        caveats += _quality_caveats(title(name), summary, m)
    caveats += [f"While explaining: {w}" for w in explain_out.summary.get("warnings", [])]
    if cfg.explain.background_split != "public":
        caveats.append(
            f"Backgrounds come from the {cfg.explain.background_split} split (private records), as configured."
        )
    return {
        "background_split": cfg.explain.background_split,
        "seconds": explain_out.summary.get("seconds"),
        "target_seconds": explain_out.summary.get("target_seconds"),
        "models": models,
        "variants": variants,
        "warnings": list(explain_out.summary.get("warnings", [])),
        "caveats": caveats,
    }


def _plot_title(model: str, fname: str, kind: str) -> str:
    titles = {
        "beeswarm": "SHAP beeswarm (global)",
        "importance_bar": "Mean |attribution|: SHAP vs LIME (global)",
        "deletion_insertion": "Deletion and insertion curves (faithfulness)",
        "image_grid": "Attribution maps: SHAP and LIME (local)",
        "dependence": "SHAP dependence",
        "pdp": "Partial dependence and ICE",
        "misclassified": "Misclassified test images per true class (true → predicted)",
        "training": "Training curves",
    }
    if kind == "waterfall":
        row = fname.rsplit("_row", 1)[-1].removesuffix(".png")
        return f"SHAP waterfall of explained row {row} (local)"
    return titles[kind]


def _variants(distill_out: Any) -> list[dict[str, Any]]:
    """Teacher/student explanation comparisons the distill stage recorded (any record key naming explanations)."""
    out = []
    for model, o in distill_out.items() if isinstance(distill_out, Mapping) else []:
        record = o.get("record", o) if isinstance(o, Mapping) else {}
        for key, value in record.items() if isinstance(record, Mapping) else []:
            if "explanation" in key and isinstance(value, Mapping):
                out.append({"model": str(model), "comparison": "teacher vs student", **_plain(value)})
    return out


def distill_section(distill_out: Any) -> dict[str, Any]:
    """The distill stage's records per student (weights and ONNX bytes left out: they are artifacts)."""
    if not isinstance(distill_out, Mapping):
        return {"output": _plain(distill_out)}
    return {
        str(model): _plain({k: v for k, v in o.items() if k not in ("state_dict", "onnx", "teacher_onnx")})
        if isinstance(o, Mapping)
        else _plain(o)
        for model, o in distill_out.items()
    }


def reproducibility_section(cfg: Config, manifest: Mapping[str, Any] | None, seed: int) -> dict[str, Any]:
    """Resolved config, seeds per stage, versions, git commit, artifact hashes, the commands that re-run it."""

    m = manifest or {}
    command = m.get("command")
    stages = m.get("stages", {})
    artifacts = [
        {"path": rel, **{k: a.get(k) for k in ("sha256", "bytes", "stage", "kind")}}
        for rel, a in sorted(m.get("artifacts", {}).items())
        if a.get("stage") != "report"
    ]
    if m.get("config"):
        artifacts.insert(
            0,
            {
                "path": m["config"]["path"],
                "sha256": m["config"]["sha256"],
                "bytes": None,
                "stage": "config",
                "kind": "config",
            },
        )
    seeds = {name: s.get("seed") for name, s in stages.items()}
    seeds.setdefault("report", seed)
    return {
        "config_toml": config_mod.to_toml(cfg),
        "config": config_mod.flatten(cfg),
        "root_seed": cfg.seed,
        "seeds": seeds,
        "seed_note": "every stage, model, client and explainer derives its seed from the root seed (auditml_core.seeds), "
        + (
            "DP-SGD's sampling and noise included (dp.reproducible_noise = true): a rerun reproduces the DP weights, "
            "so the DP guarantee holds only while the seed stays secret."
            if cfg.dp.reproducible_noise
            else "except DP-SGD's sampling and noise: their generators' state is drawn from the OS's CSPRNG and never "
            "recorded, so a DP run is not bit-for-bit reproducible, by design."
        ),
        "library_versions": m.get("library_versions") or library_versions(),
        "git_commit": m.get("git_commit", git_commit()),
        "python_executable": m.get("python_executable"),
        "platform": m.get("platform"),
        "device": m.get("device"),
        "run_id": m.get("run_id"),
        "command": shlex.join(command) if command else None,
        "rerun_commands": [
            "python -m pipeline --config RUN_DIR/config.toml --out runs   # a new run with this resolved config",
            "python -m pipeline --run-dir RUN_DIR --from report          # re-render this report from recorded outputs",
            "python -m pipeline verify RUN_DIR                           # re-hash every artifact against the manifest",
            "python -m pipeline verify RUN_DIR --rerender                # re-render the report; compare it byte for byte",
        ],
        "stage_seconds": {name: s.get("seconds") for name, s in stages.items()},
        # where each model-running stage ran and why (auditml_core.placement): "cpu: auto: small steps (...)"
        "stage_devices": {
            name: f"{s['device']['device']}: {s['device']['reason']}"
            for name, s in stages.items()
            if isinstance(s.get("device"), dict)
        },
        "artifacts": artifacts,
        "self_hash_note": "The report's own files cannot contain their hashes; manifest.json records them "
        "(stage 'report') and `python -m pipeline verify RUN_DIR` checks them.",
    }


def summary_section(content: Mapping[str, Any], explain_out: Any) -> dict[str, Any]:
    """The first screen: models, headline metrics, one sentence on privacy and one on explanation quality."""
    models = []
    for name in MODELS:
        mod = content["models"][name]
        models.append(
            {
                "name": name,
                "title": title(name),
                "n_parameters": mod["n_parameters"],
                "mode": mod["training"].get("mode"),
                "headline": _headline(name, content["_metrics"]),
            }
        )
    baseline = _headline("ridge", content["_metrics"]) | {
        "comparison": _plain(content["_metrics"].get("regressor", {}).get("vs_ridge"))
    }
    ex = content["explanations"]["models"]
    bits = []
    for name, e in sorted(ex.items(), key=lambda kv: list(MODELS).index(kv[0]) if kv[0] in MODELS else 99):
        q = e["quality"]
        primary = q["primary"]
        f = q["faithfulness"][primary]
        ref = q["reference"]
        accuracy = "" if ref is None else f"; against {ref['reference']}: {reference_sentence(ref)}"
        agree = "; ".join(
            f"{pair} top-{a['k']} overlap {number(a['mean_topk'], 2)} at {a['resolution']} ({a['n_flagged']} flagged)"
            for pair, a in q["agreement"].items()
        )
        r = q["randomisation"]
        checks = [("model-randomisation", r)] + (
            [("random-logit", q["class_randomisation"])] if q["class_randomisation"] else []
        )
        sanity = ", ".join(
            f"{kind} {'passed' if c['passed_signed'] else 'FAILED'} for signed values "
            f"({survivors(c, 'signed')}) and {'passed' if c['passed_abs'] else 'FAILED'} for |values| "
            f"({survivors(c, 'abs')})"
            for kind, c in checks
        )
        bits.append(
            f"{title(name)}: {primary}, {q['exactness']}{accuracy}; "
            f"deletion AUC {number(f['deletion_auc'], 3)} vs {number(f['random_deletion_auc'], 3)} for a random "
            f"order (lower is better); {agree}; sanity checks: {sanity}"
        )
    sentence = "; ".join(bits) + f" (explain stage: {number(explain_out.summary.get('seconds', 0.0), 3)} s)."
    n_caveats = (
        len(content["privacy"]["caveats"]) + len(content["audit"]["caveats"]) + len(content["explanations"]["caveats"])
    )
    return {
        "models": models,
        "baseline": baseline,
        "privacy": content["privacy"]["statement"],
        "explanations": sentence,
        "n_caveats": n_caveats,
    }


def inputs_recorded_until(manifest: Mapping[str, Any] | None) -> str:
    """The latest ``started`` time among the stages the provenance records (ISO 8601 sorts as text)."""
    times = [s.get("started") for s in (manifest or {}).get("stages", {}).values() if s.get("started")]
    return max(times) if times else "unknown"


def build_content(cfg: Config, inputs: Mapping[str, Any], *, seed: int) -> dict[str, Any]:
    """The whole report as a JSON-safe tree (what ``report.json`` holds)."""
    datasets, trained, metrics, explain_out = inputs["data"], inputs["train"], inputs["evaluate"], inputs["explain"]
    manifest = inputs.get("provenance")
    distill_out = inputs.get("distill")  # optional: present when the run has it
    content: dict[str, Any] = {
        "schema": SCHEMA_ID,
        "title": "Run report",
        "run_id": (manifest or {}).get("run_id"),
        "created": (manifest or {}).get("created"),
        # Not the wall clock: the report is a pure function of its recorded inputs, so re-rendering it
        # gives the same bytes. "generated" is when the last stage it reads started.
        "generated": inputs_recorded_until(manifest),
        "manifest_sha256": inputs.get("provenance_sha256"),
        "files": FILES,
        "_metrics": metrics,
    }
    content["data"] = data_section(datasets, manifest)
    content["models"] = models_section(cfg, trained, metrics, manifest)
    content["privacy"] = federated_privacy(privacy_section(cfg, trained, datasets, explain_out), cfg, trained)
    content["explanations"] = explanations_section(cfg, explain_out, manifest, _variants(distill_out))
    content["card"] = dataclasses.asdict(cfg.card)  # what only the owner can state ("" = not stated)
    if distill_out is not None:
        content["distill"] = distill_section(distill_out)
        covered, not_covered = student_privacy(distill_out)
        if content["privacy"]["enabled"]:
            content["privacy"]["covered"] += covered
            content["privacy"]["not_covered"] += not_covered
            n_train = {name: len(datasets[e.dataset].y["train"]) for name, e in MODELS.items()}
            content["privacy"]["caveats"] += student_caveats(distill_out, n_train)
            if sentence := student_statement(distill_out):
                content["privacy"]["statement"] += " " + sentence
            checks = student_checks(distill_out)
            content["privacy"].setdefault("independent_checks", {}).update(checks)
            content["privacy"]["caveats"] += student_check_caveats(checks)
    user_level = {  # a user-level guarantee is a DP claim the record-level attacks do not test
        name: (m["training"].get("user_level_privacy") or {}).get("epsilon")
        for name, m in content["models"].items()
        if m["training"].get("user_level_privacy")
    }
    content["audit"] = audit_section(inputs.get("audit"), user_level)  # optional input: the audit stage's records
    if content["audit"]["ran"] and content["privacy"]["enabled"]:
        content["privacy"]["not_covered"].append(
            "audit/* and the privacy-audit section: per-record attack scores and losses of training records "
            "(members), and the AUCs, TPRs and ε lower bounds computed from them, are functions of the private "
            "records themselves, not post-processing of the DP weights; the positive control is trained WITHOUT DP "
            "on training records, and the shadow models' trainings on training records are not accounted in ε. "
            "Keep audit/* with the data files, not with the released model"
        )
    for name, m in content["models"].items():
        po = m.get("public_only_baseline")
        if po and po.get("available") and not po["private_data_contributed"]:
            content["privacy"]["caveats"].append(f"{title(name)}: {po['statement']}")
    for name, entry in MODELS.items():  # any training mode: a released model at chance is said so (#23 item 4)
        trivial = trivial_baseline(name, datasets[entry.dataset], metrics)
        content["models"][name]["trivial_baseline"] = trivial
        if trivial and trivial["no_better"]:
            content["privacy"]["caveats"].append(trivial["statement"])
    content["reproducibility"] = reproducibility_section(cfg, manifest, seed)
    content["annex_iv"] = annex_iv_map(content)  # EU AI Act Annex IV: what this run documents, what it cannot
    content["summary"] = summary_section(content, explain_out)
    content["summary"]["settings"] = departures(cfg)  # a scaled-down run says so on the first screen
    content["caveats"] = (
        content["privacy"]["caveats"] + content["audit"]["caveats"] + content["explanations"]["caveats"]
    )
    content["summary"]["verdicts"] = verdicts(content)  # the first screen, from the checks above (worst first)
    del content["_metrics"]
    return jsonable(content)
