"""Stage ``explain``: the configured explainers for every model, and how far to trust them.

For each model the stage explains test-split rows with the methods listed in
``explain.<model>_methods`` (default: ``shap-exact`` + ``lime-tabular`` for the
MLP regressor, whose 10 features allow enumerating all 2^10 coalitions;
``shap-deep`` + ``lime-image`` on a pixel grid for the CNN, whose 64 pixels do
not), then measures: additivity of the primary (first) SHAP method, its error
against an independent reference (shap's KernelExplainer: every coalition for
tables, sampled coalitions on a few images), a model-randomisation sanity
check, deletion/insertion faithfulness against random orders for every method,
agreement (top-k, rank correlation, sign) for every pair of methods at a
common resolution (image pairs at the coarser one's segments: LIME's cells)
with disagreeing rows flagged, stability across seeds of every stochastic
method, and LIME's local fidelity (R² and its error at the explained row).

Backgrounds, LIME's sampling statistics and the deletion baseline come from the
split named by ``explain.background_split``: the ``public`` split unless the
user explicitly chooses ``train`` (private records, which DP does not then
cover). Models are rebuilt with :meth:`TrainedModel.build`, a fresh copy
without Opacus hooks. :func:`explain.compare_variants` measures how differently two
variants of a model (teacher and student) attribute the same inputs.
"""

from __future__ import annotations

import contextlib
import logging
import time
import warnings
from dataclasses import dataclass, field
from itertools import combinations
from typing import Any, Callable, Iterator, Mapping

import numpy as np
from torch import nn

from auditml_core import placement
from auditml_core.artifacts import json_bytes, npz_bytes, read_json, read_npz
from auditml_core.config import Config, ExplainConfig
from auditml_core.data import Dataset
from auditml_core.errors import DataError
from auditml_core.models import MODELS
from auditml_core.seeds import derive_seed
from auditml_core.teacher import planned_builders
from explain import (
    Explanation,
    additivity_error,
    agreement,
    class_randomisation,
    deletion_insertion,
    get_explainer,
    make_predict_fn,
    model_randomisation,
    plots,
    reference_error,
    stability,
    tabular_shap_method,
)
from explain.dependence import partial_dependence, strongest_interaction
from explain.registry import MAX_EXACT_FEATURES

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


def _lime_options(method: str, ecfg: ExplainConfig) -> dict[str, Any]:
    """The stage's options for a LIME member (none for the others)."""
    if method == "lime-image":
        return {
            "num_samples": ecfg.lime_image_num_samples,
            "segmentation": "grid",
            "cell_size": ecfg.lime_cell_size or None,
        }
    if method == "lime-tabular":
        return {"num_samples": ecfg.lime_num_samples}
    return {}


def _is_stochastic(method: str) -> bool:
    """Methods whose result depends on the seed: their stability across seeds is measured."""
    return method.startswith("lime") or method in ("shap-gradient", "shap-permutation")


def tabular_methods(requested: list[str], n_features: int) -> tuple[list[str], str | None]:
    """``requested`` with ``shap-exact`` replaced when the table has more features than it enumerates.

    Chosen before any explaining: ``shap-exact`` refuses more than ``explain.registry.MAX_EXACT_FEATURES``
    features (2^F coalitions per row), so the regressor's SHAP method follows the feature count
    (:func:`explain.tabular_shap_method`). Returns the methods and the note for the report (None: unchanged).
    """
    chosen = tabular_shap_method(n_features)
    if "shap-exact" not in requested or chosen == "shap-exact":
        return requested, None
    methods = []
    for m in requested:
        m = chosen if m == "shap-exact" else m
        if m not in methods:
            methods.append(m)
    note = (
        f"the table has {n_features} features, more than shap-exact enumerates ({MAX_EXACT_FEATURES}: 2^F coalitions "
        f"per row), so the regressor is explained with {chosen} (shap's PermutationExplainer: sampled feature "
        "orderings, additive by construction) instead; its values are a sampling estimate of the same interventional "
        "Shapley values, and their error is measured against shap's KernelExplainer (an independent sampling "
        "estimate) below"
    )
    return methods, note


def _primary(methods: list[str]) -> str:
    """The method the additivity, reference and randomisation checks and the figures use: the first SHAP one."""
    return next((m for m in methods if m.startswith("shap")), methods[0])


def primary_method(ecfg: ExplainConfig, ds: Dataset) -> str:
    """The SHAP method the explain stage runs first for a model on ``ds`` (its checks and figures use it).

    Other stages that explain a variant of the model (distillation's teacher vs student) use it too, so
    their comparison is made with the method the report's explanations were made with.
    """
    if ds.task == "classification":
        return _primary(list(ecfg.cnn_methods))
    return _primary(tabular_methods(list(ecfg.regressor_methods), int(np.prod(ds.x["test"].shape[1:])))[0])


def _exactness(expl: Explanation) -> str:
    """What the values of ``expl`` are, in words the report prints."""
    if expl.method == "shap-exact":
        n = int(expl.extras["n_coalitions"])
        return f"exact (enumeration of 2^{n.bit_length() - 1} coalitions)"
    return "approximate"


def _reference(
    primary: Explanation, model: nn.Module, bg: np.ndarray, ecfg: ExplainConfig, *, task: str, seed: int, k: int
) -> dict[str, Any] | None:
    """The primary SHAP values against an independent reference on the first ``explain.reference_rows`` rows
    (``explain.reference_images`` images).

    Tabular: shap's KernelExplainer with every coalition (exact for F <= 11) when the primary is
    ``shap-exact`` (an independent check of our enumeration), else ``shap-exact`` itself. Images:
    KernelExplainer with ``explain.reference_nsamples`` sampled coalitions (a sampling estimate).
    """
    m = min(ecfg.reference_images if primary.is_image else ecfg.reference_rows, primary.n)
    if m == 0 or not primary.method.startswith("shap"):
        return None
    rows = np.arange(m)
    n_features = int(np.prod(primary.feature_shape))
    if primary.is_image or primary.method == "shap-exact" or n_features > MAX_EXACT_FEATURES:
        # Beyond shap-exact's cap the reference is KernelExplainer: a weighted regression on sampled coalitions,
        # an algorithm independent of the permutation sampling the primary uses there.
        method = "shap-kernel"
        opts: dict[str, Any] = {"nsamples": ecfg.reference_nsamples if primary.is_image else "auto"}
        exact = not primary.is_image and n_features <= 11  # shap's "auto" enumerates all 2^F - 2 coalitions
        how = (
            f"shap KernelExplainer, all {2**n_features - 2} non-trivial coalitions (exact)"
            if exact
            else f"shap KernelExplainer, {opts['nsamples'] if primary.is_image else 2 * n_features + 2048} sampled "
            "coalitions (a sampling estimate, not exact)"
        )
    else:
        method, opts, exact = "shap-exact", {}, True
        how = f"exact enumeration of 2^{n_features} coalitions"
    t0 = time.perf_counter()
    ref = get_explainer(method)(
        model,
        primary.inputs[rows],
        background=bg,
        task=task,
        seed=seed,
        feature_names=primary.feature_names,
        targets=None if primary.targets is None else primary.targets[rows],
        **opts,
    )
    err = reference_error(primary, ref, k=min(k, n_features), rows=rows)
    out = err.to_dict() | {"reference_description": how, "reference_exact": exact}
    n_noise = 0 if exact else min(ecfg.reference_noise_images, m)
    if n_noise:
        # The reference's own sampling noise: the same images again with another seed.
        again = get_explainer(method)(
            model,
            primary.inputs[:n_noise],
            background=bg,
            task=task,
            seed=(seed + 1) % 2**32,
            feature_names=primary.feature_names,
            targets=None if primary.targets is None else primary.targets[:n_noise],
            **opts,
        )
        r1, r2 = ref.values[:n_noise].reshape(n_noise, -1), again.values.reshape(n_noise, -1)
        per_row = np.abs(r1 - r2).max(axis=1) / np.maximum(np.abs(r1).max(axis=1), 1e-300)
        out["reference_noise"] = {
            "n": n_noise,
            "max_rel_error": float(per_row.max()),
            "per_row_max_rel_error": per_row,
            "what": "largest difference between two runs of the reference with different seeds on the same images, "
            "relative to the largest reference value: the reference is itself a sampling estimate, and errors of "
            "this size are within its noise (coalitions shap enumerates in full are shared by both runs, so its "
            "own error can be larger)",
        }
    return out | {"seconds": time.perf_counter() - t0}


def _comparison_segments(a: Explanation, b: Explanation) -> tuple[np.ndarray | None, str]:
    """Segmentation at which two image explanations are compared: the coarser one's (LIME's cells), if any.

    The rule: a segment-level explanation (LIME) is constant over each segment, so it is compared with a
    pixel-level one (SHAP) at the segments, each explanation summed per segment, and top-k counts segments
    covering the same area as ``explain.top_k_pixels`` pixels. Comparing per pixel would count the resolution
    difference as disagreement.
    """
    for e in (a, b):
        seg = e.extras.get("segments") if e.is_image else None
        if seg is not None:
            seg = np.asarray(seg)
            if e.extras.get("segmentation") == "grid":
                side = int(round(np.sqrt(seg[0].size / (int(seg[0].max()) + 1))))
                where = f"{e.method}'s {side}x{side}-pixel grid cells"
            else:
                where = f"{e.method}'s {e.extras.get('segmentation', '')} segments"
            return seg, f"{where} (each explanation summed per cell)"
    return None, "pixels (channels summed)" if a.is_image else "features"


def _cell_k(fraction: float, segments: np.ndarray) -> int:
    """Top-k in segments: ``explain.agreement_cell_fraction`` of them (at least one), the same share at every size.

    (A pixel count converted to cells gave k = 2 of 16 cells on 8x8 images and k = 1 on 16x16 and 28x28.)
    """
    n_seg = int(segments.max()) + 1
    return max(1, min(n_seg, int(round(fraction * n_seg))))


def _flag_rule(
    a_name: str, b_name: str, stability_records: Mapping[str, Any], resolution: str, ecfg: ExplainConfig
) -> dict[str, Any]:
    """When a row of the pair (a, b) is flagged as a disagreement, calibrated against seed noise.

    A row is flagged when the two methods rank its units (features, or LIME's cells) less alike,
    by the Spearman correlation of the signed attributions, than ``explain.agreement_threshold``,
    or than the ``explain.agreement_noise_quantile`` quantile of a stochastic member's agreement
    with itself across seeds (its stability run, compared at the same resolution), whichever is
    lower: that member's own seed noise alone then flags about that share of rows at most. Spearman
    over all units does not depend on a k, and LIME's grid has the same number of cells at every
    image size, so the flag means the same on 8x8 and 28x28 images.
    """
    q = ecfg.agreement_noise_quantile
    calibration = {}
    for method in (a_name, b_name):
        st = stability_records.get(method)
        if st is None or st.get("resolution") != resolution:
            continue
        values = np.asarray([v for v in st.get("spearman", []) if v is not None], dtype=np.float64)
        values = values[np.isfinite(values)]
        if len(values):
            calibration[method] = {"quantile": float(np.quantile(values, q)), "n_comparisons": int(len(values))}
    threshold = min([ecfg.agreement_threshold, *(c["quantile"] for c in calibration.values())])
    noise = "; ".join(
        f"{m}'s seed-vs-seed Spearman: {q:g} quantile {c['quantile']:.3g} over {c['n_comparisons']} comparisons"
        for m, c in calibration.items()
    )
    return {
        "threshold": float(threshold),
        "fixed_threshold": ecfg.agreement_threshold,
        "noise_quantile": q,
        "calibration": calibration,
        "rule": f"a row is flagged when the two methods' Spearman (signed attributions, at {resolution}) is below "
        f"{threshold:.3g} = the lower of {ecfg.agreement_threshold:g} and the {q:g} quantile of a stochastic "
        f"method's agreement with itself across seeds ({noise or 'no stochastic method compared at this resolution'})",
    }


def compare_pair(
    a: Explanation, b: Explanation, *, ecfg: ExplainConfig, stability_records: Mapping[str, Any], k: int
) -> tuple[Any, dict[str, Any]]:
    """Agreement of two methods' explanations of the same rows, with the flag rule of :func:`_flag_rule`.

    Images are compared at the coarser method's segments (LIME's cells), top-k counting
    ``explain.agreement_cell_fraction`` of the cells; tables per feature with top-k = ``k``. Returns the
    :class:`explain.AgreementResult` and its JSON record (resolution, unit, rule; for images also the
    per-pixel comparison, for reference only).
    """
    segments, resolution = _comparison_segments(a, b)
    k_pair = k if segments is None else _cell_k(ecfg.agreement_cell_fraction, segments)
    rule = _flag_rule(a.method, b.method, stability_records, resolution, ecfg)
    res = agreement(a, b, k=k_pair, threshold=rule["threshold"], segments=segments, flag_on="spearman")
    unit = "features" if segments is None else "cells"
    record = res.to_dict() | {"resolution": resolution, "k_unit": unit, "flag_rule": rule}
    if segments is not None:
        pixel = agreement(a, b, k=k, threshold=ecfg.agreement_threshold)
        record["pixel_level"] = {
            "k": pixel.k,
            "mean_topk": pixel.mean_topk,
            "mean_spearman": pixel.mean_spearman,
            "n_flagged": len(pixel.flagged),
            "note": "per pixel, for comparison only: a cell-level explanation is constant over its cell, "
            "so this mixes the resolution difference into the disagreement; its flag is top-k overlap "
            f"below {ecfg.agreement_threshold:g}",
        }
    return res, record


@dataclass
class _Setup:
    """One model's explain inputs (rows, background, prediction function) and the way its explainers are run."""

    model: nn.Module
    ds: Dataset
    ecfg: ExplainConfig
    seed: int
    x: np.ndarray  # the explained test rows
    row_index: np.ndarray  # their source-row numbers
    bg: np.ndarray  # the background rows
    bg_index: np.ndarray
    baseline: np.ndarray  # the mean background row (deletion, randomisation)
    predict: Callable[[np.ndarray], np.ndarray]
    names: list[str] | None  # feature names (tables)
    k: int  # top-k of agreement and stability
    bar: Any  # counts explainer runs (a tqdm bar, disabled without progress)

    @property
    def image(self) -> bool:
        return self.ds.task == "classification"

    def run(
        self, method: str, xs: np.ndarray, *, seed_: int, targets: np.ndarray | None, mdl: nn.Module | None = None
    ) -> Explanation:
        """One explainer run of ``method`` on ``xs`` (``mdl``: another model than the explained one)."""
        out = get_explainer(method)(
            self.model if mdl is None else mdl,
            xs,
            background=self.bg,
            task=self.ds.task,
            seed=seed_,
            feature_names=self.names,
            targets=targets,
            **_lime_options(method, self.ecfg),
        )
        self.bar.update(1)
        return out


def _setup(name: str, model: nn.Module, ds: Dataset, ecfg: ExplainConfig, *, seed: int, progress: bool) -> _Setup:
    """The explained rows (the first test rows), the background and the prediction function of one model."""
    image = ds.task == "classification"
    n_explain = min(ecfg.n_images if image else ecfg.n_rows, len(ds.y["test"]))
    if n_explain == 0:
        raise DataError(f"the test split of the {ds.name} data is empty; raise data.test_fraction")
    x = ds.x["test"][:n_explain]
    bg, bg_index = background_rows(ds, ecfg, size=ecfg.background_size, seed=derive_seed(seed, "background"))
    n_units = int(np.prod(x.shape[2:])) if image else x.shape[1]
    from tqdm.auto import tqdm

    return _Setup(
        model=model,
        ds=ds,
        ecfg=ecfg,
        seed=seed,
        x=x,
        row_index=ds.index["test"][:n_explain],
        bg=bg,
        bg_index=bg_index,
        baseline=bg.mean(axis=0),
        predict=make_predict_fn(model, task=ds.task),
        names=None if image else list(ds.feature_names),
        k=min(ecfg.top_k_pixels if image else ecfg.top_k, n_units),
        bar=tqdm(desc=f"explain {name}", unit=" runs", leave=False, disable=not progress),
    )


def _run_methods(
    name: str, s: _Setup, requested: list[str], notes: list[str], timings: dict[str, float]
) -> tuple[dict[str, Explanation], str, list[str]]:
    """Every requested method on the explained rows; returns the explanations, the primary method, the methods run.

    The primary method runs first: its targets (the predicted class) are the ones every other method explains.
    A failing ``shap-deep`` on the CNN falls back to ``shap-gradient`` (noted).
    """
    explanations: dict[str, Explanation] = {}
    primary_requested = primary = _primary(requested)
    t0 = time.perf_counter()
    try:
        explanations[primary] = s.run(primary, s.x, seed_=derive_seed(s.seed, primary), targets=None)
    except (ValueError, RuntimeError, AssertionError) as exc:
        if not (s.image and primary == "shap-deep"):
            raise
        notes.append(
            f"shap-deep failed on the CNN ({str(exc).splitlines()[0][:300]}); fell back to shap-gradient, "
            "whose values are a sampled, only approximately additive estimate"
        )
        log.warning("%s: %s", name, notes[-1])
        primary = "shap-gradient"
        explanations[primary] = s.run(primary, s.x, seed_=derive_seed(s.seed, primary), targets=None)
    timings[primary] = time.perf_counter() - t0
    targets = explanations[primary].targets
    methods = [primary] + [m for m in requested if m not in (primary_requested, primary)]
    for method in methods[1:]:
        t0 = time.perf_counter()
        explanations[method] = s.run(method, s.x, seed_=_seeds(s.seed, method, 1)[0], targets=targets)
        timings[method] = time.perf_counter() - t0
    return explanations, primary, methods


def _accuracy(s: _Setup, shap_expl: Explanation, primary: str) -> dict[str, Any]:
    """Additivity of the primary SHAP method, what its values are, and their error against a reference."""
    quality: dict[str, Any] = {}
    if primary.startswith("shap"):
        quality["additivity"] = additivity_error(shap_expl, s.predict).to_dict()
    quality["exactness"] = _exactness(shap_expl)
    quality["reference"] = _reference(
        shap_expl, s.model, s.bg, s.ecfg, task=s.ds.task, seed=derive_seed(s.seed, "reference"), k=s.k
    )
    return quality


def _randomisation(s: _Setup, shap_expl: Explanation, primary: str) -> dict[str, Any]:
    """The model-randomisation sanity check and, for a classifier, the class-randomisation one."""
    ecfg, x = s.ecfg, s.x
    m_rand = min(ecfg.randomisation_rows, len(x))
    sub = _subset(shap_expl, m_rand)
    # The trained model's explanation of these rows is the main run's (reused); each seed adds one random model.
    bounds = {"threshold": ecfg.randomisation_threshold, "max_fraction": ecfg.randomisation_max_fraction}
    seed_ = derive_seed(s.seed, primary)
    out = {
        "randomisation": model_randomisation(
            lambda mdl: s.run(primary, x[:m_rand], seed_=seed_, targets=sub.targets, mdl=mdl),
            s.model,
            sub,
            seeds=_seeds(s.seed, "randomise", ecfg.randomisation_seeds),
            baseline=s.baseline,
            **bounds,
        ).to_dict()
    }
    if sub.targets is not None:
        out["class_randomisation"] = class_randomisation(
            lambda tgt: s.run(primary, x[:m_rand], seed_=seed_, targets=tgt),
            sub,
            n_classes=int(s.predict(x[:1]).shape[1]),
            seeds=_seeds(s.seed, "randomise-class", ecfg.randomisation_seeds),
            baseline=s.baseline,
            **bounds,
        ).to_dict()
    return out


def _faithfulness(s: _Setup, explanations: Mapping[str, Explanation]) -> dict[str, Any]:
    """Deletion/insertion curves of every method against random orders (the results, keyed by method)."""
    return {
        method: deletion_insertion(
            expl,
            s.predict,
            baseline=s.baseline,
            n_steps=s.ecfg.deletion_steps,
            seed=derive_seed(s.seed, "deletion", method),
            n_random=s.ecfg.deletion_random_orders,
        )
        for method, expl in explanations.items()
    }


def _stability(
    s: _Setup, explanations: Mapping[str, Explanation], methods: list[str], primary: str
) -> tuple[dict[str, Any], dict[str, list[int]]]:
    """Agreement of every stochastic method with itself across seeds; returns the records and the seeds used."""
    records: dict[str, Any] = {}
    m = min(s.ecfg.stability_rows, len(s.x))
    targets = explanations[primary].targets
    stability_seeds: dict[str, list[int]] = {}
    for method in methods:
        if not _is_stochastic(method):
            continue
        seeds = _seeds(s.seed, method, s.ecfg.stability_seeds)
        stability_seeds[method] = seeds
        first = _subset(explanations[method], m)

        def rerun(xs: np.ndarray, *, seed: int, method: str = method, first: Explanation = first) -> Explanation:
            # Each row is seeded from (seed, row), so the first m rows of the main run are the first seed's run.
            if seed == stability_seeds[method][0] and method != primary:
                return first
            return s.run(method, xs, seed_=seed, targets=None if targets is None else targets[: len(xs)])

        segments, resolution = _comparison_segments(first, first)
        k_stab = s.k if segments is None else _cell_k(s.ecfg.agreement_cell_fraction, segments)
        records[method] = stability(
            rerun, s.x[:m], seeds=seeds, k=k_stab, segments=None if segments is None else segments[:m]
        ).to_dict() | {"resolution": resolution}
    return records, stability_seeds


def _agreement(
    s: _Setup, explanations: Mapping[str, Explanation], methods: list[str], stability_records: Mapping[str, Any]
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Agreement of every pair of methods (:func:`compare_pair`): the results and their records, keyed by pair."""
    records: dict[str, Any] = {}
    results = {}
    for a_name, b_name in combinations(methods, 2):
        key = f"{a_name} vs {b_name}"
        results[key], records[key] = compare_pair(
            explanations[a_name], explanations[b_name], ecfg=s.ecfg, stability_records=stability_records, k=s.k
        )
    return results, records


def _flagged(s: _Setup, pair_results: Mapping[str, Any], targets: np.ndarray | None) -> list[dict[str, Any]]:
    """The rows each pair of methods disagrees on (the flag rule of :func:`_flag_rule`)."""
    return [
        {
            "pair": key,
            "row": int(i),
            "source_index": int(s.row_index[i]),
            "topk": res.topk[i],
            "spearman": res.spearman[i],
            "sign": res.sign[i],
            **({"class": int(targets[i])} if targets is not None else {}),
        }
        for key, res in pair_results.items()
        for i in res.flagged
    ]


def _figures(
    name: str,
    s: _Setup,
    explanations: Mapping[str, Explanation],
    primary: str,
    lime_name: str,
    faith: Mapping[str, Any],
    pair_results: Mapping[str, Any],
) -> tuple[dict[str, bytes], list[dict[str, Any]]]:
    """Every figure of one model (PNG bytes by file name) and, for a table, its dependence records."""
    worst = pair_results[next(iter(pair_results))] if pair_results else None
    shap_expl = explanations[primary]
    png = _plots(name, s.ds, shap_expl, explanations[lime_name], list(faith.values()), worst, s.ecfg, s.baseline)
    if s.image:
        return png | _error_examples(name, s.ds, s.predict, s.ecfg.n_error_examples), []
    dep_png, dependence = _dependence(name, s.ds, shap_expl, s.predict, s.bg, s.ecfg.n_dependence_plots)
    return png | dep_png, dependence


def _metrics(
    name: str,
    s: _Setup,
    explanations: Mapping[str, Explanation],
    *,
    methods: list[str],
    configured: list[str],
    primary: str,
    lime_name: str,
    quality: dict[str, Any],
    stability_seeds: dict[str, list[int]],
    flagged: list[dict[str, Any]],
    dependence: list[dict[str, Any]],
    notes: list[str],
    timings: dict[str, float],
    plots: list[str],
) -> dict[str, Any]:
    """The JSON-safe record of one model's explanations (``explain/metrics.json``)."""
    return {
        "model": name,
        "dataset": s.ds.name,
        "task": s.ds.task,
        "feature_names": s.names,
        "explained_output": "logit of the predicted class"
        if s.image
        else "standardised regression output "
        f"(x {s.ds.preprocessing.get('y_std', 1.0):.6g} + {s.ds.preprocessing.get('y_mean', 0.0):.6g} = target units)",
        "methods": {"run": methods, "requested": configured, "primary": primary, "shap": primary, "lime": lime_name},
        "n_explained": int(len(s.x)),
        "explained_split": "test",
        "explained_index": s.row_index,
        "background": {
            "split": s.ecfg.background_split,
            "size": int(len(s.bg)),
            "available": int(len(s.ds.x[s.ecfg.background_split])),
            "index": s.bg_index,
            "private": s.ecfg.background_split != "public",
        },
        "top_k": int(s.k),
        "lime_options": {
            mm: {k_: v for k_, v in _lime_options(mm, s.ecfg).items() if v is not None}
            for mm in methods
            if mm.startswith("lime")
        },
        "stability_seeds": stability_seeds,
        "quality": quality,
        "flagged": flagged,
        "dependence": dependence,
        "explanations": {m_: e.to_dict() for m_, e in explanations.items()},
        "notes": notes,
        "seconds": timings,
        "plots": plots,
    }


def explain_model(
    name: str, model: nn.Module, ds: Dataset, ecfg: ExplainConfig, *, seed: int, progress: bool = False
) -> ModelExplanations:
    """Explain ``model`` on the first test rows of ``ds`` with its configured methods and measure the quality.

    Parameters
    ----------
    name : a key of ``auditml_core.models.MODELS``.
    model : a plain eval-mode module (``TrainedModel.build()``), never an Opacus-wrapped one.
    ds : its prepared dataset.
    ecfg : the ``explain`` config section.
    seed : this model's seed; every explainer and metric derives its own.
    progress : show a bar counting the explainer runs (each method, and each re-run its checks need).

    Returns
    -------
    ModelExplanations

    Raises
    ------
    DataError
        If the background split is too small, or the test split is empty.
    ValueError
        If a configured method is not a registered explainer, or does not explain this input kind.
    """
    t_start = time.perf_counter()
    s = _setup(name, model, ds, ecfg, seed=seed, progress=progress)
    notes: list[str] = []
    timings: dict[str, float] = {}
    configured, requested = _requested_methods(name, s, notes)
    explanations, primary, methods = _run_methods(name, s, requested, notes, timings)
    quality, faith, stability_seeds, pair_results = _quality(s, explanations, primary, methods, timings)
    flagged = _flagged(s, pair_results, explanations[primary].targets)
    lime_name = next((mm for mm in methods if mm.startswith("lime")), methods[-1])
    with _timed(timings, "plots"):
        png, dependence = _figures(name, s, explanations, primary, lime_name, faith, pair_results)
    metrics = _metrics(
        name,
        s,
        explanations,
        methods=methods,
        configured=configured,
        primary=primary,
        lime_name=lime_name,
        quality=quality,
        stability_seeds=stability_seeds,
        flagged=flagged,
        dependence=dependence,
        notes=notes,
        timings=timings,
        plots=sorted(png),
    )
    metrics["seconds"]["total"] = time.perf_counter() - t_start
    s.bar.close()
    return ModelExplanations(model=name, explanations=explanations, metrics=metrics, plots=png)


def _requested_methods(name: str, s: _Setup, notes: list[str]) -> tuple[list[str], list[str]]:
    """The configured methods and those to run: a table too wide for ``shap-exact`` gets another (noted)."""
    configured = list(s.ecfg.cnn_methods if s.image else s.ecfg.regressor_methods)
    requested = configured
    if not s.image:
        requested, note = tabular_methods(configured, s.x.shape[1])
        if note is not None:
            notes.append(note)
            log.warning("%s: %s", name, note)
    return configured, requested


@contextlib.contextmanager
def _timed(timings: dict[str, float], key: str) -> Iterator[None]:
    """Record the block's wall time as ``timings[key]`` (nothing when it raises)."""
    t0 = time.perf_counter()
    yield
    timings[key] = time.perf_counter() - t0


def _quality(
    s: _Setup, explanations: Mapping[str, Explanation], primary: str, methods: list[str], timings: dict[str, float]
) -> tuple[dict[str, Any], dict[str, Any], dict[str, list[int]], dict[str, Any]]:
    """Every check of how far to trust the explanations, each timed into ``timings``.

    Returns the quality record (reference error, randomisation, deletion/insertion, stability, agreement, LIME's
    fidelity, in that order), the deletion/insertion results, the stability seeds and the pairs' agreement results.
    """
    shap_expl = explanations[primary]
    with _timed(timings, "reference"):
        quality = _accuracy(s, shap_expl, primary)
    with _timed(timings, "randomisation"):
        quality |= _randomisation(s, shap_expl, primary)
    with _timed(timings, "deletion_insertion"):
        faith = _faithfulness(s, explanations)
        quality["deletion_insertion"] = {m: r.to_dict() for m, r in faith.items()}
    with _timed(timings, "stability"):
        quality["stability"], stability_seeds = _stability(s, explanations, methods, primary)
    with _timed(timings, "agreement"):
        pair_results, quality["agreement"] = _agreement(s, explanations, methods, quality["stability"])
    quality["lime_fidelity"] = {
        method: _lime_fidelity(expl) for method, expl in explanations.items() if "score" in expl.extras
    }
    return quality, faith, stability_seeds, pair_results


def _seeds(seed: int, method: str, n: int) -> list[int]:
    return [derive_seed(seed, method, i) for i in range(n)]


def _lime_fidelity(expl: Explanation) -> dict[str, Any]:
    """LIME's in-sample R² and its surrogate's error at the explained row itself (in output units)."""
    score = np.asarray(expl.extras["score"], dtype=np.float64)
    out: dict[str, Any] = {
        "mean_r2": float(score.mean()),
        "min_r2": float(score.min()),
        "median_r2": float(np.median(score)),
        "per_row_r2": score,
    }
    if "local_pred" in expl.extras:
        gap = np.abs(np.asarray(expl.extras["local_pred"], dtype=np.float64) - expl.outputs)
        out |= {
            "mean_abs_error_at_row": float(gap.mean()),
            "max_abs_error_at_row": float(gap.max()),
            "per_row_abs_error_at_row": gap,
        }
    return out


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
    name: str,
    ds: Dataset,
    shap_expl: Explanation,
    lime_expl: Explanation,
    faith: list,
    agree,
    ecfg: ExplainConfig,
    baseline: np.ndarray,
) -> dict[str, bytes]:
    """PNG bytes of every figure of one model, keyed by file name."""
    out = {f"{name}_deletion_insertion.png": plots.deletion_insertion_png(faith)}
    if shap_expl.is_image:
        truth = np.asarray(ds.y["test"][: shap_expl.n])
        rows, why = image_rows(shap_expl, truth, agree, ecfg.n_grid_images)
        out[f"{name}_image_grid.png"] = plots.attribution_rows_png(
            [shap_expl, lime_expl], rows=rows, baseline=baseline, true_labels=truth, row_notes=why
        )
        return out
    shown = _display_units(shap_expl, ds)
    out[f"{name}_beeswarm.png"] = plots.beeswarm_png(shown)
    out[f"{name}_importance_bar.png"] = plots.importance_bar_png([shap_expl, lime_expl])
    for j, row in enumerate(waterfall_rows(shap_expl, agree, ecfg.n_waterfalls)):
        out[f"{name}_waterfall_{j}_row{row}.png"] = plots.waterfall_png(shown, row=row)
    return out


def _dependence(
    name: str, ds: Dataset, shap_expl: Explanation, predict: Callable, bg: np.ndarray, n: int
) -> tuple[dict[str, bytes], list[dict[str, Any]]]:
    """Dependence (shap scatter) and PDP/ICE plots of the ``n`` features with the largest mean |SHAP|.

    The PDP averages over the background rows (the public split by default), never the private
    training rows, and is drawn in the data's units: features as the dataset gives them, output in
    target units. Files are named by feature index, not name (names are user strings).
    """
    p = ds.preprocessing
    y_std, y_mean = float(p.get("y_std", 1.0)), float(p.get("y_mean", 0.0))
    x_std, x_mean = (
        np.asarray(p.get("x_std", 1.0), dtype=np.float64),
        np.asarray(p.get("x_mean", 0.0), dtype=np.float64),
    )

    def predict_units(x_units: np.ndarray) -> np.ndarray:  # dataset units in, target units out
        return np.asarray(predict((x_units - x_mean) / x_std), dtype=np.float64).reshape(-1) * y_std + y_mean

    shown = _display_units(shap_expl, ds)
    bg_units = np.asarray(bg, dtype=np.float64) * x_std + x_mean
    feature_names = list(shap_expl.names())
    png: dict[str, bytes] = {}
    records = []
    for rank, f in enumerate(np.argsort(-shap_expl.mean_abs(), kind="stable")[: min(n, len(feature_names))]):
        f = int(f)
        partner = strongest_interaction(shap_expl.values, shap_expl.inputs, f) if len(feature_names) > 1 else None
        dep_file, pdp_file = f"{name}_dependence_{rank}_f{f}.png", f"{name}_pdp_{rank}_f{f}.png"
        png[dep_file] = plots.dependence_png(shown, feature=f, interaction=partner)
        pd_res = partial_dependence(predict_units, bg_units, f, grid_resolution=20)
        png[pdp_file] = plots.pdp_ice_png(
            pd_res, feature_name=feature_names[f], output_label=f"prediction ({ds.target_name or 'target'} units)"
        )
        slope = np.diff(pd_res.average) / np.where(np.diff(pd_res.grid) == 0, np.nan, np.diff(pd_res.grid))
        records.append(
            {
                "rank": rank,
                "feature": feature_names[f],
                "feature_index": f,
                "mean_abs_shap": float(shap_expl.mean_abs()[f]),
                "interaction": None if partner is None else feature_names[partner],
                "dependence_plot": dep_file,
                "pdp_plot": pdp_file,
                "pdp_rows": int(len(bg_units)),
                "pdp_grid_points": int(len(pd_res.grid)),
                "pdp_range": float(pd_res.average.max() - pd_res.average.min()),
                "pdp_monotone": bool(np.all(np.nan_to_num(slope) >= 0) or np.all(np.nan_to_num(slope) <= 0)),
                "ice_spread": float(
                    np.ptp(pd_res.individual - pd_res.individual.mean(axis=1, keepdims=True), axis=0).max()
                ),
            }
        )
    return png, records


def _error_examples(name: str, ds: Dataset, predict: Callable, per_class: int) -> dict[str, bytes]:
    """The misclassified-examples figure of the whole test split (none when ``per_class`` is 0)."""
    if per_class == 0:
        return {}
    x, y = ds.x["test"], np.asarray(ds.y["test"]).astype(int)
    pred = np.asarray(predict(x)).argmax(axis=1)
    return {
        f"{name}_misclassified.png": plots.misclassified_grid_png(
            x, y, pred, class_names=list(ds.class_names), per_class=per_class
        )
    }


def image_rows(expl: Explanation, truth: np.ndarray, agree, n: int) -> tuple[list[int], list[str]]:
    """Images worth showing: the misclassified ones, then the worst SHAP-LIME agreement, then the rest."""
    wrong = [int(i) for i in np.flatnonzero(expl.targets != truth)]
    worst = [] if agree is None else [int(i) for i in np.argsort(np.asarray(agree.topk), kind="stable")]
    order = list(dict.fromkeys(wrong + worst + list(range(expl.n))))[: min(n, expl.n)]
    why = [
        "misclassified" if i in wrong else (f"agreement {agree.topk[i]:.2f}" if agree is not None else "")
        for i in order
    ]
    return order, why


def waterfall_rows(expl: Explanation, agree, n: int) -> list[int]:
    """Rows worth a local plot: highest and lowest prediction, then the worst SHAP-LIME disagreement, then the rest."""
    order = [int(np.argmax(expl.outputs)), int(np.argmin(expl.outputs))]
    order += [] if agree is None else [int(np.argmin(agree.topk))]
    order += list(range(expl.n))
    return list(dict.fromkeys(order))[: min(n, expl.n)]


# --------------------------------------------------------------------------- the stage


def device_placement(
    cfg: Config,
    datasets: Mapping[str, Dataset],
    builders: Mapping[str, Callable[[], nn.Module]],
    *,
    cuda_available: bool | None = None,
) -> placement.Placement:
    """The explain stage's decision: always the CPU (shap and LIME are given CPU arrays); its work is recorded."""
    e = cfg.explain
    work = [
        (
            builders[name],
            tuple(datasets[entry.dataset].x["test"].shape[1:]),
            e.background_size,
            e.lime_num_samples * max(e.n_rows, e.n_images),
        )
        for name, entry in MODELS.items()
    ]
    return placement.stage_placement(
        "explain", requested=cfg.train.device, work=work, cuda_path=False, cuda_available=cuda_available
    )


def run(cfg: Config, inputs: Mapping[str, Any], *, seed: int, runtime: Any = None) -> ExplainResult:
    """Explain the regressor and the CNN and measure the quality of the explanations.

    Parameters
    ----------
    cfg : resolved configuration (``cfg.explain``).
    inputs : ``{"data": ..., "train": ...}`` outputs of the earlier stages.
    seed : stage seed; each model, explainer and metric derives its own.
    runtime : receives the stage's device decision (always the CPU: shap and LIME are given CPU arrays).

    Returns
    -------
    ExplainResult

    Raises
    ------
    DataError
        If the background split is too small (see :func:`background_rows`).
    """
    return combine(cfg, {name: run_part(cfg, inputs, name, seed=seed, runtime=runtime) for name in parts(cfg)})


def parts(cfg: Config) -> tuple[str, ...]:
    """The stage's independent parts, one per model: the runner may run them in separate workers."""
    return tuple(MODELS)


@dataclass(frozen=True)
class ExplainPart:
    """One model's explanations, the warnings raised while making them and the seconds it took."""

    explanations: ModelExplanations
    warnings: tuple[tuple[bool, str], ...]  # (a library deprecation notice?, "Category: message"), in order
    seconds: float


def run_part(cfg: Config, inputs: Mapping[str, Any], name: str, *, seed: int, runtime: Any = None) -> ExplainPart:
    """Explain model ``name`` (one of :func:`parts`); :func:`combine` makes the stage output of all parts."""
    t0 = time.perf_counter()
    datasets, trained = inputs["data"], inputs["train"]
    where = device_placement(cfg, datasets, planned_builders(cfg, datasets))
    if runtime is not None:
        runtime.record_placement(where)
    with warnings.catch_warnings(record=True) as caught:
        # Recorded, not silenced: each is logged and copied into the report's caveats (see combine).
        warnings.simplefilter("always")
        out = explain_model(
            name,
            trained.models[name].build(),  # a fresh copy: no Opacus hooks
            datasets[MODELS[name].dataset],
            cfg.explain,
            seed=derive_seed(seed, name),
            progress=bool(runtime is not None and runtime.progress),
        )
    # Deprecation notices (e.g. matplotlib's, raised inside shap's plots) say nothing about the explanations;
    # they are kept apart from the warnings the report copies into its caveats.
    maintenance = (DeprecationWarning, PendingDeprecationWarning, FutureWarning)
    noted = tuple((issubclass(w.category, maintenance), f"{w.category.__name__}: {w.message}") for w in caught)
    return ExplainPart(explanations=out, warnings=noted, seconds=time.perf_counter() - t0)


def combine(cfg: Config, done: Mapping[str, ExplainPart]) -> ExplainResult:
    """The stage output from every part (in :func:`parts` order); ``seconds`` is the parts' total."""
    ordered = [done[name] for name in parts(cfg)]
    noted = [w for part in ordered for w in part.warnings]
    messages = list(dict.fromkeys(text for maintenance, text in noted if not maintenance))
    deprecations = list(dict.fromkeys(text for maintenance, text in noted if maintenance))
    for msg in messages:
        log.warning("while explaining: %s", msg)
    for msg in deprecations:
        log.debug("while explaining: %s", msg)
    out = {name: part.explanations for name, part in zip(parts(cfg), ordered)}
    seconds = sum(part.seconds for part in ordered)
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
