"""Measure how far the default approximate SHAP values are from exact / reference values on a run.

Usage::

    PYTHONPATH=$PWD python scripts/measure_explain_accuracy.py RUN_DIR [N_IMAGES] [NSAMPLES]

Reads the trained models and data of ``RUN_DIR`` and prints, for the regressor,
shap-deep against exact enumeration (``shap-exact``) on every explained row and,
for the CNN, shap-deep against shap's KernelExplainer on the first ``N_IMAGES``
test images with ``NSAMPLES`` coalitions, plus the Kernel reference's own
seed-to-seed spread (two seeds) so its sampling noise can be read beside it.
A benchmark script: it prints figures, asserts nothing.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
import torch

from auditml_core.config import load_config
from auditml_core.models import MODELS
from auditml_core.seeds import derive_seed
from explain import get_explainer, reference_error
from pipeline import data, explain_stage, train


def main() -> None:
    torch.set_num_threads(1)
    run = Path(sys.argv[1])
    n_images = int(sys.argv[2]) if len(sys.argv) > 2 else 3
    nsamples = int(sys.argv[3]) if len(sys.argv) > 3 else 6000
    read = lambda rel: (run / rel).read_bytes()  # noqa: E731
    cfg = load_config(None)
    datasets, trained = data.load(read), train.load(read)
    ecfg = cfg.explain
    stage_seed = derive_seed(cfg.seed, "explain")
    for name, entry in MODELS.items():
        ds = datasets[entry.dataset]
        model = trained.models[name].build()
        seed = derive_seed(stage_seed, name)
        bg, _ = explain_stage.background_rows(ds, ecfg, size=ecfg.background_size, seed=derive_seed(seed, "background"))
        image = ds.task == "classification"
        x = ds.x["test"][: ecfg.n_images if image else ecfg.n_rows]
        names = None if image else list(ds.feature_names)
        deep = get_explainer("shap-deep")(model, x, background=bg, task=ds.task, seed=0, feature_names=names)
        if not image:
            t = time.perf_counter()
            exact = get_explainer("shap-exact")(model, x, background=bg, task=ds.task, seed=0, feature_names=names)
            print(f"regressor shap-exact: {len(x)} rows in {time.perf_counter() - t:.2f} s")
            err = reference_error(deep, exact, k=3)
            y_std = float(ds.preprocessing.get("y_std", 1.0))
            print(
                f"regressor shap-deep vs exact: max abs error {err.max_abs_error:.4f} standardised units "
                f"({err.max_abs_error * y_std:.2f} target units), largest exact value {np.abs(exact.values).max():.3f}, "
                f"max rel error {err.max_rel_error:.3f}, mean rel error per row {err.mean_rel_error:.3f}, "
                f"pearson {err.pearson:.4f}, top-3 overlap {err.topk:.3f}"
            )
            rank = lambda e: [names[j] for j in np.argsort(-np.abs(e.values).mean(axis=0))]  # noqa: E731
            print("  global ranking deep :", rank(deep))
            print("  global ranking exact:", rank(exact))
            continue
        rows = np.arange(n_images)
        refs = []
        for s in (1, 2):
            t = time.perf_counter()
            refs.append(
                get_explainer("shap-kernel")(
                    model, x[rows], background=bg, task=ds.task, seed=s, targets=deep.targets[rows], nsamples=nsamples
                )
            )
            print(
                f"cnn kernel reference seed {s}: {n_images} images x {nsamples} coalitions in "
                f"{time.perf_counter() - t:.1f} s"
            )
        for s, ref in enumerate(refs, start=1):
            err = reference_error(deep, ref, k=8, rows=rows)
            print(
                f"cnn shap-deep vs kernel(seed {s}): max rel error {err.max_rel_error:.3f}, mean rel error "
                f"{err.mean_rel_error:.3f}, pearson {err.pearson:.4f} (min {err.min_pearson:.4f}), "
                f"top-8 overlap {err.topk:.3f}"
            )
        noise = reference_error(refs[0], refs[1], k=8)
        print(
            f"cnn kernel seed 1 vs seed 2 (reference noise): max rel {noise.max_rel_error:.3f}, mean rel "
            f"{noise.mean_rel_error:.3f}, pearson {noise.pearson:.4f}, top-8 overlap {noise.topk:.3f}"
        )


if __name__ == "__main__":
    main()
