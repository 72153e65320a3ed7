"""``shap-kernel``: shap.KernelExplainer, the model-agnostic tabular reference.

With ``F`` features and ``nsamples >= 2**F - 2`` (shap's default ``"auto"``
covers F <= 11) every coalition is enumerated and the result is the exact
interventional Shapley value against the background; values sum to
``output - base`` by construction. Cost is ``nsamples x background_size``
model evaluations per row, so keep the background small (<= 50 rows) or pass
k-means centres. Images are explained pixel by pixel (each element of
``(C, H, W)`` is one feature, flattened for shap): with 64+ features the
coalitions are sampled, so the result is a sampling *reference* for judging a
faster approximation on a few images (:func:`explain.reference_error`), not an
exact value, and its cost is ``nsamples x background_size`` forward passes per
image.

Seeding: for larger F shap samples coalitions from numpy's global RNG; that is
confined to a per-row seeded scope that restores the caller's RNG state.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from torch import nn

from explain._checks import check_positive_int, row_seed
from explain._model import prepare, scoped_numpy_seed, select_output
from explain.types import Explanation

NAME = "shap-kernel"


def explain(
    model: nn.Module,
    x: np.ndarray,
    *,
    background: np.ndarray,
    task: str,
    seed: int,
    feature_names: Sequence[str] | None = None,
    targets: np.ndarray | None = None,
    nsamples: int | str = "auto",
    l1_reg: bool | str | float = False,
) -> Explanation:
    """Explain a tabular ``model`` with shap.KernelExplainer.

    Parameters
    ----------
    model, x, background, task, seed, feature_names, targets
        As for :func:`explain.shap_deep.explain`; ``x`` is ``(n, F)`` or ``(n, C, H, W)``.
    nsamples : int or "auto"
        Coalitions evaluated per row; ``"auto"`` is ``2F + 2048`` (capped at
        ``2**F - 2``, i.e. exact, for F <= 11).
    l1_reg : bool, str or float
        shap's feature-selection option; ``False`` (default) keeps every
        feature so values stay complete and additive.

    Returns
    -------
    Explanation
        ``base_values`` is shap's expected value: mean output over the background.

    Raises
    ------
    ValueError
        On invalid inputs.
    """
    import shap  # before prepare() starts the clock: the import is not timed

    p = prepare(
        model,
        x,
        background=background,
        task=task,
        seed=seed,
        feature_names=feature_names,
        targets=targets,
        ndims=(2, 4),
        method=NAME,
    )
    shape = p.x.shape[1:]
    flat_x = p.x.reshape(len(p.x), -1)
    flat_bg = p.background.reshape(len(p.background), -1)
    if nsamples != "auto":
        nsamples = check_positive_int("nsamples", nsamples, minimum=2)  # type: ignore[arg-type]
    values = np.zeros(p.x.shape, dtype=np.float64)
    base = np.zeros(p.x.shape[0], dtype=np.float64)
    for target, rows in p.target_groups():
        f = select_output(p.predict, task=p.task, target=target)
        explainer = shap.KernelExplainer(_unflatten(f, shape), flat_bg)
        for i in rows:
            with scoped_numpy_seed(row_seed(p.seed, int(i))):
                phi = explainer.shap_values(flat_x[i : i + 1], nsamples=nsamples, l1_reg=l1_reg, silent=True)
            values[i] = np.asarray(phi).reshape(shape)
        base[rows] = float(np.asarray(explainer.expected_value).reshape(-1)[0])
    return p.explanation(
        NAME,
        values,
        base,
        nsamples=nsamples,
        background_size=int(p.background.shape[0]),
        output=p.output_kind,
    )


def _unflatten(f, shape: tuple[int, ...]):
    """``f`` on ``(m, prod(shape))`` rows: shap passes flat vectors, the model takes ``shape``."""
    return lambda flat: f(np.asarray(flat).reshape((-1,) + tuple(shape)))
