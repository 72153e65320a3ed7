"""``shap-gradient``: shap.GradientExplainer (expected gradients).

Approximately additive only: each value is a Monte-Carlo estimate from
``nsamples`` (background row, interpolation point) draws, so
``base + values.sum()`` differs from the output by sampling error that shrinks
like ``1/sqrt(nsamples)``. It works on any differentiable model (no module
restrictions), which is why it is kept beside ``shap-deep``.

Seeding: shap draws from numpy's global RNG and calls ``np.random.seed``; we
give it a per-row seed derived from ``seed`` inside a scope that restores the
caller's global RNG state afterwards.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from explain._checks import check_positive_int, row_seed
from explain._model import prepare, scoped_numpy_seed, single_output_model
from explain.types import Explanation

NAME = "shap-gradient"


def explain(
    model: nn.Module,
    x: np.ndarray,
    *,
    background: np.ndarray,
    task: str,
    seed: int,
    feature_names: Sequence[str] | None = None,
    targets: np.ndarray | None = None,
    nsamples: int = 200,
    batch_size: int = 100,
) -> Explanation:
    """Explain ``model`` with shap.GradientExplainer.

    Parameters
    ----------
    model, x, background, task, seed, feature_names, targets
        As for :func:`explain.shap_deep.explain`.
    nsamples : int
        Gradient samples per row (shap's default 200); cost is linear in it.
    batch_size : int
        Samples per forward/backward pass.

    Returns
    -------
    Explanation
        ``base_values`` is the mean explained output over the background
        (computed here; shap gives none). ``extras["seed"]`` is the root seed.

    Raises
    ------
    ValueError
        On invalid inputs.
    """
    import shap  # before prepare() starts the clock: the import is not timed

    p = prepare(model, x, background=background, task=task, seed=seed, feature_names=feature_names, targets=targets)
    nsamples = check_positive_int("nsamples", nsamples)
    batch_size = check_positive_int("batch_size", batch_size)
    values = np.zeros(p.x.shape, dtype=np.float64)
    bg_out = p.predict(p.background)  # (B,) or (B, K)
    base = np.full(p.x.shape[0], float(bg_out.mean())) if p.targets is None else bg_out.mean(axis=0)[p.targets]
    for target, rows in p.target_groups():
        sub = single_output_model(p.model, task=p.task, n_classes=p.n_classes, target=target)
        explainer = shap.GradientExplainer(sub, torch.from_numpy(p.background), batch_size=batch_size)
        for i in rows:
            # One call per row with its own seed: a row's values do not depend on
            # which other rows are explained with it.
            rs = row_seed(p.seed, int(i))
            with scoped_numpy_seed(rs):
                phi = explainer.shap_values(torch.from_numpy(p.x[i : i + 1]), nsamples=nsamples, rseed=rs)
            values[i] = np.asarray(phi).reshape(p.x.shape[1:])
    return p.explanation(
        NAME,
        values,
        base,
        nsamples=nsamples,
        background_size=int(p.background.shape[0]),
        output=p.output_kind,
    )
