"""``shap-permutation``: shap.PermutationExplainer, the tabular explainer beyond ``shap-exact``'s reach.

With more than ``shap-exact``'s 14 features, enumerating all ``2**F`` coalitions per row is too
costly, so coalitions are sampled. PermutationExplainer walks random feature orderings forwards
and backwards (antithetic sampling) and credits each feature with the change in the output as it
is added: every ordering gives values that sum to ``f(x) - mean_b f(b)`` exactly, so the result is
additive by construction, and it converges to the same interventional Shapley values that
``shap-exact`` enumerates (the masker is shap's ``Independent`` over the whole background). It is
a sampling estimate: measure its error against a reference (:func:`explain.reference_error`;
the explain stage does so with exact enumeration on a few rows while that is affordable).

Cost: ``max_evals`` coalitions x ``background_size`` model evaluations per row (``"auto"``:
``20 F``, i.e. about 10 antithetic orderings). Seeding: shap draws the orderings from numpy's
global RNG (and reseeds it in its constructor); both are confined to per-row seeded scopes that
restore the caller's RNG state, so a row's values depend only on ``(seed, row)``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from torch import nn

from explain._checks import check_positive_int, row_seed
from explain._model import prepare, scoped_numpy_seed, select_output
from explain.types import Explanation

NAME = "shap-permutation"


def explain(
    model: nn.Module,
    x: np.ndarray,
    *,
    background: np.ndarray,
    task: str,
    seed: int,
    feature_names: Sequence[str] | None = None,
    targets: np.ndarray | None = None,
    max_evals: int | str = "auto",
) -> Explanation:
    """Explain a tabular ``model`` with shap.PermutationExplainer.

    Parameters
    ----------
    model, x, background, task, seed, feature_names, targets
        As for :func:`explain.shap_deep.explain`; ``x`` must be ``(n, F)``.
    max_evals : int or "auto"
        Coalitions evaluated per row, at least ``2 F + 1`` (one antithetic ordering);
        ``"auto"`` is ``20 F``.

    Returns
    -------
    Explanation
        ``base_values`` is the mean explained output over the background; ``extras`` hold
        ``max_evals`` and ``n_orderings`` (antithetic pairs of feature orderings per row).

    Raises
    ------
    ValueError
        On invalid inputs, image inputs, or ``max_evals`` below ``2 F + 1``.
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
        ndims=(2,),
        method=NAME,
    )
    n, f = p.x.shape
    evals = 20 * f if max_evals == "auto" else check_positive_int("max_evals", max_evals)  # type: ignore[arg-type]
    if evals < 2 * f + 1:
        raise ValueError(f"max_evals={evals} is below 2 * F + 1 = {2 * f + 1} (one antithetic ordering); raise it.")
    bg = p.background.astype(np.float64)
    values = np.zeros((n, f), dtype=np.float64)
    base = np.zeros(n, dtype=np.float64)
    for target, rows in p.target_groups():
        fn = select_output(p.predict, task=p.task, target=target)
        masker = shap.maskers.Independent(bg, max_samples=len(bg))  # every background row, as shap-exact uses
        for i in rows:
            rs = row_seed(p.seed, int(i))
            with scoped_numpy_seed(rs):  # the constructor calls np.random.seed(seed): given rs, restored after
                explainer = shap.PermutationExplainer(lambda z: fn(np.asarray(z, dtype=np.float32)), masker, seed=rs)
                out = explainer(p.x[i : i + 1].astype(np.float64), max_evals=evals, silent=True)
            values[i] = np.asarray(out.values, dtype=np.float64).reshape(f)
            base[i] = float(np.asarray(out.base_values, dtype=np.float64).reshape(-1)[0])
    return p.explanation(
        NAME,
        values,
        base,
        max_evals=int(evals),
        n_orderings=int(evals // (2 * f + 1)),
        background_size=int(len(bg)),
        output=p.output_kind,
    )
