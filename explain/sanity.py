"""Sanity checks for attributions, each against a null: model and logit randomisation.

An attribution that describes the *model* must change when the model's learned
weights are destroyed (Adebayo et al., 2018, "Sanity checks for saliency maps":
model-parameter randomisation, cascading from the head). A classifier's
attribution must also change with the class it explains (Sixt et al., 2020,
"When explanations lie": the random-logit test).

One re-initialisation is one draw: the verdict of a single draw flips with its
seed, and two random models already agree to some degree because attributions
carry the input's structure (|attribution| ranks follow ``|x - baseline|``). So
:func:`model_randomisation` draws several random models (``seeds``) and, per
explained row ``i`` and seed ``s``, compares

* the trained model's attributions with random model ``s``'s:
  ``t_is = |Spearman(A_trained, A_random_s)|``, and
* the null, two random models with each other:
  ``n_is = |Spearman(A_random_s, A_random_s+1)|`` (seeds paired cyclically).

A row *survives randomisation* (its explanation is not shown to depend on the
learned weights) when its mean ``t_i`` over seeds is above ``threshold`` and it
is not clearly below the null (``d_i = t_i - n_i`` plus two standard errors
over seeds is not below 0): it looks like a random model's explanation, and no
less so than random models look like each other. The check passes when at
most ``max_fraction`` of the rows survive. An explainer whose output does not
depend on the weights (the input itself, an edge map) gives ``t = n = 1`` on
every row and fails; so does one that follows the input more than the weights.

Reported beside the verdict: the mean difference ``t - n`` and its spread over
seeds (the SD of the per-seed mean: how much one draw would move it), the
surviving fraction under each single seed (min and max: whether one draw
would have given another verdict), the cascade (layers re-initialised from the
head down, one seed) and how well the input alone, ``|x - baseline|``, ranks
the trained |attributions|. Signed and absolute attributions are checked
separately.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from scipy.stats import rankdata
from torch import nn

from explain._arrays import Result, unit_attributions
from explain._checks import check_seed
from explain.types import Explanation

__all__ = [
    "RandomisationResult",
    "class_randomisation",
    "model_randomisation",
    "randomised_copy",
    "trainable_layers",
]

ADEBAYO = "Adebayo et al. 2018, model-parameter randomisation (cascading from the head)"
SIXT = "Sixt et al. 2020, random-logit test"


def _resettable(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in model.named_modules() if callable(getattr(m, "reset_parameters", None))]


def trainable_layers(model: nn.Module) -> list[str]:
    """Names of the layers with learned weights, in registration (for ``nn.Sequential``: forward) order.

    A layer counts when it has ``reset_parameters`` and owns a parameter that trains; fixed filters
    (``requires_grad=False``, e.g. a Gabor front-end) learned nothing and are left as they are.
    """
    return [n for n, m in _resettable(model) if any(p.requires_grad for p in m.parameters(recurse=False))]


def randomised_copy(model: nn.Module, *, seed: int, layers: Sequence[str] | None = None) -> nn.Module:
    """A copy of ``model`` with the named layers' parameters re-initialised (seeded), in eval mode.

    Uses each module's own ``reset_parameters`` (PyTorch's default initialisers), inside a forked
    RNG so the caller's global torch state is untouched. Each layer's draw is seeded from
    ``(seed, its position among the resettable layers)``, so a layer gets the same random weights
    whichever other layers are re-initialised with it (the steps of a cascade nest).

    Parameters
    ----------
    model : the model; copied, never changed.
    seed : seed of the re-initialisation, in ``[0, 2**32)``.
    layers : names (``model.named_modules()``) to re-initialise; None = every layer with ``reset_parameters``.

    Raises
    ------
    ValueError
        If no layer of ``model`` has ``reset_parameters``, or a name in ``layers`` is not one of them.
    """
    seed = check_seed(seed)
    clone = copy.deepcopy(model)
    resettable = _resettable(clone)
    if not resettable:
        raise ValueError(f"{type(model).__name__} has no layer with reset_parameters(); cannot randomise it.")
    names = [n for n, _ in resettable]
    chosen = set(names if layers is None else layers)
    unknown = sorted(chosen - set(names))
    if unknown:
        raise ValueError(f"layers {unknown} have no reset_parameters(); choose from {names}.")
    with torch.random.fork_rng(devices=[]):
        for j, (name, m) in enumerate(resettable):
            if name in chosen:
                torch.manual_seed(int(np.random.SeedSequence([seed, j]).generate_state(1)[0]))
                m.reset_parameters()
    return clone.eval()


def _ranks(v: np.ndarray) -> np.ndarray:
    """Row-wise average ranks, centred and scaled to unit norm (NaN rows where a row is constant)."""
    r = rankdata(v, axis=1)
    r = r - r.mean(axis=1, keepdims=True)
    norm = np.linalg.norm(r, axis=1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(norm > 0, r / np.where(norm > 0, norm, 1.0), np.nan)


def _spearman(ra: np.ndarray, rb: np.ndarray) -> np.ndarray:
    """Per-row Spearman correlation of two ``_ranks`` outputs.

    A constant row ranks nothing: two constant rows count as identical (1), one as unrelated (0), so an
    explainer that returns zeros whatever the weights cannot pass a randomisation check.
    """
    rho = np.clip((np.nan_to_num(ra) * np.nan_to_num(rb)).sum(axis=1), -1.0, 1.0)
    flat_a, flat_b = np.isnan(ra).any(axis=1), np.isnan(rb).any(axis=1)
    return np.where(flat_a & flat_b, 1.0, np.where(flat_a | flat_b, 0.0, rho))


@dataclass(frozen=True)
class RandomisationResult(Result):
    """A randomisation check of one explanation against its null (see the module docstring).

    ``spearman_*``: mean over rows of ``t_i`` (trained vs randomised, |Spearman|, mean over seeds);
    ``null_*``: mean over rows of ``n_i`` (randomised vs randomised); ``difference_*``: mean of
    ``t_i - n_i`` and ``difference_sd_*`` its SD over seeds; ``fraction_*``: share of rows that
    survive randomisation, ``fraction_range_*`` its min and max under single seeds; ``cascade``: per
    step, the layers re-initialised from the head and the same statistics for one seed.
    """

    method: str
    n: int
    randomisation: str  # what was randomised and how
    citation: str
    seeds: tuple[int, ...]
    threshold: float
    max_fraction: float
    spearman_signed: float
    spearman_abs: float
    null_signed: float | None
    null_abs: float | None
    difference_signed: float | None
    difference_abs: float | None
    difference_sd_signed: float | None
    difference_sd_abs: float | None
    fraction_signed: float
    fraction_abs: float
    fraction_range_signed: tuple[float, float]
    fraction_range_abs: tuple[float, float]
    input_only_spearman_abs: float  # |x - baseline| vs the trained |attribution|
    passed_signed: bool
    passed_abs: bool
    rule: str
    per_row_signed: tuple[float, ...]  # t_i
    per_row_abs: tuple[float, ...]
    per_row_null_signed: tuple[float, ...]  # n_i
    per_row_null_abs: tuple[float, ...]
    cascade: tuple[dict, ...] = ()


def _rule(threshold: float, max_fraction: float, n_seeds: int) -> str:
    if n_seeds < 2:
        return (
            f"one draw, no null: a row survives randomisation when |Spearman(trained, randomised)| > {threshold:g}; "
            f"pass when at most {max_fraction:g} of the rows survive"
        )
    return (
        f"a row survives randomisation when, over {n_seeds} seeds, |Spearman(trained, randomised)| is above "
        f"{threshold:g} beyond seed noise (mean - 2 SE > {threshold:g}) and not below the null |Spearman(randomised, "
        f"randomised)| beyond seed noise (mean difference + 2 SE < 0 clears the row); pass when at most "
        f"{max_fraction:g} of the rows survive"
    )


def _statistics(
    trained: np.ndarray, randoms: Sequence[np.ndarray], *, threshold: float
) -> dict[str, np.ndarray | float | tuple[float, float] | None]:
    """Per-row t, n, surviving flags and their summaries for one kind (signed or absolute) of attribution."""
    rt = _ranks(trained)
    rr = [_ranks(r) for r in randoms]
    t = np.abs(np.stack([_spearman(rt, r) for r in rr]))  # (S, n)
    s_count = len(rr)
    single = [t[s] > threshold for s in range(s_count)]
    out: dict[str, np.ndarray | float | tuple[float, float] | None] = {"t": t.mean(axis=0)}
    if s_count >= 2:
        n = np.abs(np.stack([_spearman(rr[s], rr[(s + 1) % s_count]) for s in range(s_count)]))  # (S, n)
        d = t - n
        se_t = t.std(axis=0, ddof=1) / np.sqrt(s_count)
        se_d = d.std(axis=0, ddof=1) / np.sqrt(s_count)
        # beyond seed noise (2 standard errors over seeds): above the threshold, and not below the null
        survives = (t.mean(axis=0) - 2 * se_t > threshold) & ~(d.mean(axis=0) + 2 * se_d < 0)
        single = [(t[s] > threshold) & ~(d[s] < 0) for s in range(s_count)]
        out |= {
            "n": n.mean(axis=0),
            "difference": float(d.mean()),
            "difference_sd": float(d.mean(axis=1).std(ddof=1)),  # of the per-seed mean: what one draw moves
        }
    else:
        survives = single[0]
        out |= {"n": None, "difference": None, "difference_sd": None}
    fractions = [float(f.mean()) for f in single]
    out |= {"fraction": float(survives.mean()), "fraction_range": (min(fractions), max(fractions))}
    return out


def _check(
    trained: Explanation,
    randoms: Sequence[Explanation],
    *,
    baseline: np.ndarray,
    threshold: float,
    max_fraction: float,
    seeds: Sequence[int],
    how: str,
    citation: str,
    cascade: Sequence[dict] = (),
) -> RandomisationResult:
    if not 0 < threshold <= 1 or not 0 <= max_fraction < 1:
        raise ValueError(f"threshold={threshold} must be in (0, 1] and max_fraction={max_fraction} in [0, 1).")
    a = unit_attributions(trained)
    rs = [unit_attributions(r) for r in randoms]
    signed = _statistics(a, rs, threshold=threshold)
    absolute = _statistics(np.abs(a), [np.abs(r) for r in rs], threshold=threshold)
    diff = np.abs(trained.inputs - np.broadcast_to(np.asarray(baseline, dtype=np.float64), trained.feature_shape))
    inp = diff.sum(axis=1).reshape(trained.n, -1) if trained.is_image else diff.reshape(trained.n, -1)
    inp_rho = _spearman(_ranks(inp), _ranks(np.abs(a)))

    def mean(v):
        return None if v is None else float(np.mean(v))

    def row(v):
        return () if v is None else tuple(float(x) for x in v)

    return RandomisationResult(
        method=trained.method,
        n=trained.n,
        randomisation=how,
        citation=citation,
        seeds=tuple(int(s) for s in seeds),
        threshold=float(threshold),
        max_fraction=float(max_fraction),
        spearman_signed=mean(signed["t"]),  # type: ignore[arg-type]
        spearman_abs=mean(absolute["t"]),  # type: ignore[arg-type]
        null_signed=mean(signed["n"]),
        null_abs=mean(absolute["n"]),
        difference_signed=signed["difference"],  # type: ignore[arg-type]
        difference_abs=absolute["difference"],  # type: ignore[arg-type]
        difference_sd_signed=signed["difference_sd"],  # type: ignore[arg-type]
        difference_sd_abs=absolute["difference_sd"],  # type: ignore[arg-type]
        fraction_signed=signed["fraction"],  # type: ignore[arg-type]
        fraction_abs=absolute["fraction"],  # type: ignore[arg-type]
        fraction_range_signed=signed["fraction_range"],  # type: ignore[arg-type]
        fraction_range_abs=absolute["fraction_range"],  # type: ignore[arg-type]
        input_only_spearman_abs=float(np.mean(inp_rho)),
        passed_signed=bool(signed["fraction"] <= max_fraction),  # type: ignore[operator]
        passed_abs=bool(absolute["fraction"] <= max_fraction),  # type: ignore[operator]
        rule=_rule(threshold, max_fraction, len(randoms)),
        per_row_signed=row(signed["t"]),
        per_row_abs=row(absolute["t"]),
        per_row_null_signed=row(signed["n"]),
        per_row_null_abs=row(absolute["n"]),
        cascade=tuple(cascade),
    )


def _seeds(seeds: Sequence[int]) -> list[int]:
    out = [check_seed(s) for s in seeds]
    if not out or len(set(out)) != len(out):
        raise ValueError(f"seeds={list(seeds)}: pass one or more distinct seeds (five or more give the null a spread).")
    return out


def model_randomisation(
    explain_fn: Callable[[nn.Module], Explanation],
    model: nn.Module,
    trained: Explanation,
    *,
    seeds: Sequence[int],
    baseline: np.ndarray,
    threshold: float = 0.5,
    max_fraction: float = 0.1,
    cascade: bool = True,
) -> RandomisationResult:
    """Model-parameter randomisation test of an explanation, against random-vs-random (the null).

    Parameters
    ----------
    explain_fn : callable
        ``explain_fn(model) -> Explanation`` of the same inputs and targets as ``trained`` (the
        caller fixes inputs, background, targets and seed).
    model : nn.Module
        The trained model; it is copied, never changed.
    trained : Explanation
        ``explain_fn(model)``, already computed (reused, not recomputed).
    seeds : sequence of int
        One random model per seed (all learned layers re-initialised); two or more give the null.
    baseline : np.ndarray
        Reference input of the input-only comparison (e.g. the background mean).
    threshold : float
        |Spearman| above which a row looks like a random model's explanation, in (0, 1].
    max_fraction : float
        Pass when at most this share of rows survives randomisation, in [0, 1).
    cascade : bool
        Also re-initialise the learned layers one at a time from the head down (first seed only;
        its last step is the first seed's full randomisation, reused): ``len(layers) - 1`` more calls.

    Returns
    -------
    RandomisationResult

    Raises
    ------
    ValueError
        If the model has no learned layer, the seeds are not distinct, or a bound is out of range.
    """
    seeds = _seeds(seeds)
    layers = trainable_layers(model)
    if not layers:
        raise ValueError(f"{type(model).__name__} has no learned layer with reset_parameters(); cannot randomise it.")
    randoms = [explain_fn(randomised_copy(model, seed=s, layers=layers)) for s in seeds]
    steps = []
    if cascade:
        a_signed, a_abs = _ranks(unit_attributions(trained)), _ranks(np.abs(unit_attributions(trained)))
        for depth in range(1, len(layers) + 1):
            top = layers[-depth:]
            e = randoms[0] if depth == len(layers) else explain_fn(randomised_copy(model, seed=seeds[0], layers=top))
            u = unit_attributions(e)
            ts, ta = np.abs(_spearman(a_signed, _ranks(u))), np.abs(_spearman(a_abs, _ranks(np.abs(u))))
            steps.append(
                {
                    "layers": list(top),
                    "spearman_signed": float(np.mean(ts)),
                    "spearman_abs": float(np.mean(ta)),
                    "fraction_signed": float((ts > threshold).mean()),
                    "fraction_abs": float((ta > threshold).mean()),
                }
            )
    how = (
        f"learned layers re-initialised (PyTorch default initialisers), {len(seeds)} seed(s); null: random vs "
        "random models" + ("; cascade from the head on the first seed" if cascade else "")
    )
    return _check(
        trained,
        randoms,
        baseline=baseline,
        threshold=threshold,
        max_fraction=max_fraction,
        seeds=seeds,
        how=how,
        citation=ADEBAYO,
        cascade=steps,
    )


def class_randomisation(
    explain_fn: Callable[[np.ndarray], Explanation],
    trained: Explanation,
    *,
    n_classes: int,
    seeds: Sequence[int],
    baseline: np.ndarray,
    threshold: float = 0.5,
    max_fraction: float = 0.1,
) -> RandomisationResult:
    """Random-logit test of a classifier's explanation (Sixt et al. 2020): does it depend on the class explained?

    Each input is re-explained toward other classes than the explained one, with the same trained
    model: one draw per seed, distinct classes per row across draws (at most ``n_classes - 1`` draws).
    Trained-vs-other is compared with other-vs-other (the null) as in :func:`model_randomisation`.
    (Adebayo et al.'s data randomisation, which retrains on permuted labels, is a different test.)

    Parameters
    ----------
    explain_fn : callable
        ``explain_fn(targets) -> Explanation`` of the same inputs as ``trained`` toward ``targets``.
    trained : Explanation
        The explanation toward the original classes (``targets`` not None).
    n_classes : int
        Number of classes K (>= 2).
    seeds, baseline, threshold, max_fraction
        As for :func:`model_randomisation`; the first seed draws every row's other classes.

    Returns
    -------
    RandomisationResult

    Raises
    ------
    ValueError
        If ``trained`` has no targets or ``n_classes < 2``.
    """
    if trained.targets is None or n_classes < 2:
        raise ValueError("class_randomisation needs a classifier's explanation (targets) and n_classes >= 2.")
    seeds = _seeds(seeds)[: n_classes - 1]
    rng = np.random.default_rng(seeds[0])
    # per row, a random order of the other classes: draw s explains the s-th (never the same class twice)
    shifts = np.stack([rng.permutation(np.arange(1, n_classes))[: len(seeds)] for _ in range(trained.n)])
    others = [(trained.targets + shifts[:, s]) % n_classes for s in range(len(seeds))]
    return _check(
        trained,
        [explain_fn(o) for o in others],
        baseline=baseline,
        threshold=threshold,
        max_fraction=max_fraction,
        seeds=seeds,
        how=f"explained logit replaced by random other classes' logits (same trained model), {len(seeds)} draw(s); "
        "null: other class vs other class",
        citation=SIXT,
    )
