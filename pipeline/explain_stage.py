"""Stage ``explain``: SHAP and LIME for both models, and how far to trust them.

For each model (MLP regressor, CNN) the stage explains test-split rows with one
SHAP explainer (``shap-deep`` by default: exact-additive on these models) and
the matching LIME explainer (``lime-tabular`` / ``lime-image`` on a pixel grid),
then measures: SHAP additivity, deletion/insertion faithfulness against random
orders, SHAP-LIME agreement (top-k, rank correlation, sign) with disagreeing
rows flagged, LIME stability across seeds and LIME's local fidelity (R²).

Backgrounds, LIME's sampling statistics and the deletion baseline come from the
split named by ``explain.background_split``: the ``public`` split unless the
user explicitly chooses ``train`` (private records, which DP does not then
cover). Models are rebuilt with :meth:`TrainedModel.build`, a fresh copy
without Opacus hooks. :func:`explain.compare_variants` measures how differently two
variants of a model (teacher and student) attribute the same inputs.
"""

from __future__ import annotations

import functools
import logging
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import numpy as np
from torch import nn

from core.artifacts import json_bytes, npz_bytes, read_json, read_npz
from core.config import Config, ExplainConfig
from core.data import Dataset
from core.errors import DataError
from core.models import MODELS
from core.seeds import derive_seed
from explain import (
    Explanation,
    additivity_error,
    agreement,
    deletion_insertion,
    get_explainer,
    make_predict_fn,
    plots,
    stability,
)

log = logging.getLogger(__name__)
METRICS_FILE = "explain/metrics.json"


@dataclass(frozen=True)
class ModelExplanations:
    """Everything the stage found about one model: explanations, quality metrics and plots."""

    model: str  # "regressor" or "cnn"
    explanations: Mapping[str, Explanation]  # method -> explanation of the same test rows
    metrics: Mapping[str, Any]  # JSON-safe: methods, background, quality, flagged rows, timings, plot files
    plots: Mapping[str, bytes] = field(default_factory=dict)  # file name -> PNG bytes


@dataclass(frozen=True)
class ExplainResult:
    """The stage output: one :class:`ModelExplanations` per model, plus stage-wide facts."""

    models: Mapping[str, ModelExplanations]
    summary: Mapping[str, Any]  # seconds, background split, warnings raised while explaining


# --------------------------------------------------------------------------- inputs


def background_rows(ds: Dataset, ecfg: ExplainConfig, *, size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The background (reference) inputs and their source-row indices.

    Rows are drawn without replacement from ``explain.background_split`` (all of
    it when it holds ``size`` rows or fewer).

    Raises
    ------
    DataError
        If the split has fewer than ``explain.min_background`` rows; for the public
        split the message says to raise ``data.public_fraction``.
    """
    split = ecfg.background_split
    x, index = ds.x[split], ds.index[split]
    if len(x) < ecfg.min_background:
        fix = (
            (
                'raise data.public_fraction (e.g. data.public_fraction=0.1), or set explain.background_split="train" '
                "to use private training records (then the explanations are not covered by DP)"
            )
            if split == "public"
            else "supply more rows"
        )
        raise DataError(
            f"the {split} split of the {ds.name} data has {len(x)} rows, fewer than explain.min_background="
            f"{ecfg.min_background} needed for explanation backgrounds; {fix}"
        )
    if len(x) <= size:
        chosen = np.arange(len(x))
    else:
        chosen = np.sort(np.random.default_rng(seed).choice(len(x), size=size, replace=False))
    return x[chosen], index[chosen]


def _subset(expl: Explanation, m: int) -> Explanation:
    """The first ``m`` rows of an explanation (per-row extras sliced, others kept)."""
    extras = {
        k: (v[:m] if isinstance(v, np.ndarray) and v.ndim >= 1 and len(v) == expl.n else v)
        for k, v in expl.extras.items()
    }
    return Explanation(
        method=expl.method,
        values=expl.values[:m],
        inputs=expl.inputs[:m],
        outputs=expl.outputs[:m],
        base_values=None if expl.base_values is None else expl.base_values[:m],
        targets=None if expl.targets is None else expl.targets[:m],
        feature_names=expl.feature_names,
        seconds=expl.seconds * m / max(expl.n, 1),
        extras=extras,
    )


# --------------------------------------------------------------------------- one model


def explain_model(name: str, model: nn.Module, ds: Dataset, ecfg: ExplainConfig, *, seed: int) -> ModelExplanations:
    """Explain ``model`` on the first test rows of ``ds`` with SHAP and LIME and measure the quality.

    Parameters
    ----------
    name : "regressor" or "cnn".
    model : a plain eval-mode module (``TrainedModel.build()``), never an Opacus-wrapped one.
    ds : its prepared dataset.
    ecfg : the ``explain`` config section.
    seed : this model's seed; every explainer and metric derives its own.

    Returns
    -------
    ModelExplanations

    Raises
    ------
    DataError
        If the background split is too small, or the test split is empty.
    """
    t_start = time.perf_counter()
    image = ds.task == "classification"
    task = ds.task
    n_explain = min(ecfg.n_images if image else ecfg.n_rows, len(ds.y["test"]))
    if n_explain == 0:
        raise DataError(f"the test split of the {ds.name} data is empty; raise data.test_fraction")
    x = ds.x["test"][:n_explain]
    row_index = ds.index["test"][:n_explain]
    bg, bg_index = background_rows(ds, ecfg, size=ecfg.background_size, seed=derive_seed(seed, "background"))
    baseline = bg.mean(axis=0)
    predict = make_predict_fn(model, task=task)
    names = None if image else list(ds.feature_names)
    n_units = int(np.prod(x.shape[2:])) if image else x.shape[1]
    k = min(ecfg.top_k_pixels if image else ecfg.top_k, n_units)
    notes: list[str] = []
    timings: dict[str, float] = {}

    # SHAP: shap-deep is exact on nn.ReLU/Tanh/MaxPool/Linear/Conv models; for the CNN it falls back to
    # shap-gradient when DeepLIFT cannot pass a layer (its additivity check fails).
    shap_method = ecfg.cnn_shap if image else ecfg.regressor_shap
    t0 = time.perf_counter()
    try:
        shap_expl = get_explainer(shap_method)(
            model, x, background=bg, task=task, seed=derive_seed(seed, shap_method), feature_names=names
        )
    except (ValueError, RuntimeError, AssertionError) as exc:
        if not (image and shap_method == "shap-deep"):
            raise
        notes.append(
            f"shap-deep failed on the CNN ({str(exc).splitlines()[0][:300]}); fell back to shap-gradient, "
            "whose values are a sampled, only approximately additive estimate"
        )
        log.warning("%s: %s", name, notes[-1])
        shap_method = "shap-gradient"
        shap_expl = get_explainer(shap_method)(model, x, background=bg, task=task, seed=derive_seed(seed, shap_method))
    timings[shap_method] = time.perf_counter() - t0
    targets = shap_expl.targets  # LIME explains the same class (the predicted one)

    lime_method = "lime-image" if image else "lime-tabular"
    lime_opts: dict[str, Any] = (
        {"num_samples": ecfg.lime_image_num_samples, "segmentation": "grid", "cell_size": ecfg.lime_cell_size or None}
        if image
        else {"num_samples": ecfg.lime_num_samples}
    )
    lime = functools.partial(
        get_explainer(lime_method), model, background=bg, task=task, feature_names=names, **lime_opts
    )

    def lime_fn(xs: np.ndarray, *, seed: int) -> Explanation:
        return lime(xs, seed=seed, targets=None if targets is None else targets[: len(xs)])

    stability_seeds = [derive_seed(seed, lime_method, i) for i in range(ecfg.stability_seeds)]
    t0 = time.perf_counter()
    lime_expl = lime_fn(x, seed=stability_seeds[0])
    timings[lime_method] = time.perf_counter() - t0

    quality: dict[str, Any] = {}
    t0 = time.perf_counter()
    quality["additivity"] = additivity_error(shap_expl, predict).to_dict()
    timings["additivity"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    faith = {}
    for method, expl in ((shap_method, shap_expl), (lime_method, lime_expl)):
        faith[method] = deletion_insertion(
            expl,
            predict,
            baseline=baseline,
            n_steps=ecfg.deletion_steps,
            seed=derive_seed(seed, "deletion", method),
            n_random=ecfg.deletion_random_orders,
        )
    quality["deletion_insertion"] = {m: r.to_dict() for m, r in faith.items()}
    timings["deletion_insertion"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    agree = agreement(shap_expl, lime_expl, k=k, threshold=ecfg.agreement_threshold)
    quality["agreement"] = agree.to_dict()
    timings["agreement"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    m = min(ecfg.stability_rows, n_explain)
    first = _subset(lime_expl, m)

    def rerun(xs: np.ndarray, *, seed: int) -> Explanation:
        # LIME seeds each row from (seed, row), so the first m rows of the main run are the seed-0 run.
        return first if seed == stability_seeds[0] else lime_fn(xs, seed=seed)

    quality["lime_stability"] = stability(rerun, x[:m], seeds=stability_seeds, k=k).to_dict()
    timings["lime_stability"] = time.perf_counter() - t0
    score = np.asarray(lime_expl.extras["score"], dtype=np.float64)
    quality["lime_fidelity"] = {
        "mean_r2": float(score.mean()),
        "min_r2": float(score.min()),
        "median_r2": float(np.median(score)),
        "per_row_r2": score,
    }

    flagged = [
        {
            "row": int(i),
            "source_index": int(row_index[i]),
            "topk": agree.topk[i],
            "spearman": agree.spearman[i],
            "sign": agree.sign[i],
            **({"class": int(targets[i])} if targets is not None else {}),
        }
        for i in agree.flagged
    ]
    t0 = time.perf_counter()
    png = _plots(name, ds, shap_expl, lime_expl, list(faith.values()), agree, ecfg)
    timings["plots"] = time.perf_counter() - t0
    explanations = {shap_method: shap_expl, lime_method: lime_expl}
    metrics = {
        "model": name,
        "dataset": ds.name,
        "task": task,
        "feature_names": names,
        "explained_output": "logit of the predicted class"
        if image
        else "standardised regression output "
        f"(x {ds.preprocessing.get('y_std', 1.0):.6g} + {ds.preprocessing.get('y_mean', 0.0):.6g} = original units)",
        "methods": {
            "shap": shap_method,
            "lime": lime_method,
            "requested_shap": ecfg.cnn_shap if image else ecfg.regressor_shap,
        },
        "n_explained": int(n_explain),
        "explained_split": "test",
        "explained_index": row_index,
        "background": {
            "split": ecfg.background_split,
            "size": int(len(bg)),
            "available": int(len(ds.x[ecfg.background_split])),
            "index": bg_index,
            "private": ecfg.background_split != "public",
        },
        "top_k": int(k),
        "lime_options": {k_: v for k_, v in lime_opts.items() if v is not None},
        "stability_seeds": stability_seeds,
        "quality": quality,
        "flagged": flagged,
        "explanations": {m_: e.to_dict() for m_, e in explanations.items()},
        "notes": notes,
        "seconds": timings,
        "plots": sorted(png),
    }
    metrics["seconds"]["total"] = time.perf_counter() - t_start
    return ModelExplanations(model=name, explanations=explanations, metrics=metrics, plots=png)


def _display_units(expl: Explanation, ds: Dataset) -> Explanation:
    """A tabular explanation in the data's original units (for plots): target in y units, features unscaled."""
    p = ds.preprocessing
    y_std, y_mean = float(p.get("y_std", 1.0)), float(p.get("y_mean", 0.0))
    x_std, x_mean = np.asarray(p.get("x_std", 1.0)), np.asarray(p.get("x_mean", 0.0))
    base = None if expl.base_values is None else expl.base_values * y_std + y_mean
    return Explanation(
        method=expl.method,
        values=expl.values * y_std,
        base_values=base,
        inputs=expl.inputs * x_std + x_mean,
        outputs=expl.outputs * y_std + y_mean,
        targets=None,
        feature_names=expl.feature_names,
        seconds=expl.seconds,
    )


def _plots(
    name: str, ds: Dataset, shap_expl: Explanation, lime_expl: Explanation, faith: list, agree, ecfg: ExplainConfig
) -> dict[str, bytes]:
    """PNG bytes of every figure of one model, keyed by file name."""
    out = {f"{name}_deletion_insertion.png": plots.deletion_insertion_png(faith)}
    if shap_expl.is_image:
        out[f"{name}_image_grid.png"] = plots.image_grid_png([shap_expl, lime_expl], n_images=ecfg.n_grid_images)
        return out
    shown = _display_units(shap_expl, ds)
    out[f"{name}_beeswarm.png"] = plots.beeswarm_png(shown)
    out[f"{name}_importance_bar.png"] = plots.importance_bar_png([shap_expl, lime_expl])
    for j, row in enumerate(waterfall_rows(shap_expl, agree, ecfg.n_waterfalls)):
        out[f"{name}_waterfall_{j}_row{row}.png"] = plots.waterfall_png(shown, row=row)
    return out


def waterfall_rows(expl: Explanation, agree, n: int) -> list[int]:
    """Rows worth a local plot: highest and lowest prediction, then the worst SHAP-LIME disagreement, then the rest."""
    order = [int(np.argmax(expl.outputs)), int(np.argmin(expl.outputs)), int(np.argmin(agree.topk))]
    order += list(range(expl.n))
    return list(dict.fromkeys(order))[: min(n, expl.n)]


# --------------------------------------------------------------------------- the stage


def run(cfg: Config, inputs: Mapping[str, Any], *, seed: int, runtime: Any = None) -> ExplainResult:
    """Explain the regressor and the CNN and measure the quality of the explanations.

    Parameters
    ----------
    cfg : resolved configuration (``cfg.explain``).
    inputs : ``{"data": ..., "train": ...}`` outputs of the earlier stages.
    seed : stage seed; each model, explainer and metric derives its own.
    runtime : unused.

    Returns
    -------
    ExplainResult

    Raises
    ------
    DataError
        If the background split is too small (see :func:`background_rows`).
    """
    t0 = time.perf_counter()
    datasets, trained = inputs["data"], inputs["train"]
    out: dict[str, ModelExplanations] = {}
    with warnings.catch_warnings(record=True) as caught:
        # Recorded, not silenced: each is logged now and copied into the report's caveats.
        warnings.simplefilter("always")
        for name, entry in MODELS.items():
            model = trained.models[name].build()  # a fresh copy: no Opacus hooks
            out[name] = explain_model(name, model, datasets[entry.dataset], cfg.explain, seed=derive_seed(seed, name))
    # Deprecation notices (e.g. matplotlib's, raised inside shap's plots) say nothing about the explanations;
    # they are kept apart from the warnings the report copies into its caveats.
    maintenance = (DeprecationWarning, PendingDeprecationWarning, FutureWarning)
    messages = list(
        dict.fromkeys(f"{w.category.__name__}: {w.message}" for w in caught if not issubclass(w.category, maintenance))
    )
    deprecations = list(
        dict.fromkeys(f"{w.category.__name__}: {w.message}" for w in caught if issubclass(w.category, maintenance))
    )
    for msg in messages:
        log.warning("while explaining: %s", msg)
    for msg in deprecations:
        log.debug("while explaining: %s", msg)
    seconds = time.perf_counter() - t0
    log.info(
        "explain: %s in %.1f s (target for 100 rows and 100 images: 30 s)",
        ", ".join(f"{n} {m.metrics['n_explained']} inputs" for n, m in out.items()),
        seconds,
    )
    summary = {
        "seconds": seconds,
        "background_split": cfg.explain.background_split,
        "warnings": messages,
        "library_deprecations": deprecations,
        "target_seconds": 30.0,
    }
    return ExplainResult(models=out, summary=summary)


def dump(result: ExplainResult) -> dict[str, bytes]:
    """Attributions as .npz per model and method, metrics as JSON, plots as PNG."""
    files: dict[str, bytes] = {}
    models = {}
    for name, me in result.models.items():
        arrays = {}
        for method, e in me.explanations.items():
            rel = f"explain/{name}_{method}.npz"
            files[rel] = npz_bytes(_explanation_arrays(e))
            arrays[method] = rel
        for fname, png in me.plots.items():
            files[f"explain/plots/{fname}"] = png
        models[name] = {**me.metrics, "files": {"arrays": arrays, "plots": {f: f"explain/plots/{f}" for f in me.plots}}}
    files[METRICS_FILE] = json_bytes({"summary": result.summary, "models": models})
    return files


def _explanation_arrays(e: Explanation) -> dict[str, np.ndarray]:
    arrays = {"values": e.values, "inputs": e.inputs, "outputs": e.outputs}
    if e.base_values is not None:
        arrays["base_values"] = e.base_values
    if e.targets is not None:
        arrays["targets"] = e.targets
    for key, v in e.extras.items():
        if isinstance(v, np.ndarray) and v.dtype != object:
            arrays[f"extra_{key}"] = v
    return arrays


def load(read: Callable[[str], bytes]) -> ExplainResult:
    """Rebuild the stage output from the run directory."""
    meta = read_json(read(METRICS_FILE))
    models = {}
    for name, m in meta["models"].items():
        expls = {}
        for method, rel in m["files"]["arrays"].items():
            a = read_npz(read(rel))
            recorded = m["explanations"][method]
            extras = {k[len("extra_") :]: v for k, v in a.items() if k.startswith("extra_")}
            names = m.get("feature_names")
            expls[method] = Explanation(
                method=method,
                values=a["values"],
                base_values=a.get("base_values"),
                inputs=a["inputs"],
                outputs=a["outputs"],
                targets=a.get("targets"),
                feature_names=None if a["values"].ndim == 4 else names,
                seconds=float(recorded.get("seconds", 0.0)),
                extras=extras,
            )
        png = {f: read(rel) for f, rel in m["files"]["plots"].items()}
        metrics = {k: v for k, v in m.items() if k != "files"}
        models[name] = ModelExplanations(model=name, explanations=expls, metrics=metrics, plots=png)
    return ExplainResult(models=models, summary=meta["summary"])
