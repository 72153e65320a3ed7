"""Input checks shared by the explainers; each error names the value and the fix."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

TASKS = ("regression", "classification")


def check_task(task: str) -> str:
    """Return ``task`` if it is one of :data:`TASKS`, else raise ValueError."""
    if task not in TASKS:
        raise ValueError(f"task={task!r} is not valid; use one of {TASKS}.")
    return task


def check_seed(seed: int) -> int:
    """Return ``seed`` as an int in ``[0, 2**32)``, else raise ValueError."""
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= int(seed) < 2**32:
        raise ValueError(f"seed={seed!r} is not valid; pass an explicit integer in [0, 2**32).")
    return int(seed)


def check_positive_int(name: str, value: int, *, minimum: int = 1) -> int:
    """Return ``value`` if it is an int >= ``minimum``, else raise ValueError."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or int(value) < minimum:
        raise ValueError(f"{name}={value!r} is not valid; pass an integer >= {minimum}.")
    return int(value)


def as_inputs(x: np.ndarray, *, name: str = "x", ndims: Sequence[int] = (2, 4)) -> np.ndarray:
    """Check a batch of inputs and return it as a float32 array.

    Parameters
    ----------
    x : array-like
        ``(n, F)`` tabular rows or ``(n, C, H, W)`` images.
    name : str
        Name used in error messages.
    ndims : sequence of int
        Allowed numbers of dimensions.

    Returns
    -------
    np.ndarray
        ``x`` as a C-contiguous float32 array.

    Raises
    ------
    ValueError
        If ``x`` has the wrong number of dimensions, no rows, or non-finite values.
    """
    try:
        arr = np.ascontiguousarray(np.asarray(x, dtype=np.float32))
    except (TypeError, ValueError) as err:
        raise ValueError(f"{name} could not be read as a float array ({err}); pass a numpy array.") from err
    if arr.ndim not in ndims:
        want = " or ".join({2: "(n, F)", 4: "(n, C, H, W)"}.get(d, f"{d}-D") for d in ndims)
        raise ValueError(f"{name} has shape {arr.shape}; expected {want}. Reshape it (add the batch axis).")
    if arr.shape[0] == 0:
        raise ValueError(f"{name} is empty (shape {arr.shape}); pass at least one row.")
    if not np.isfinite(arr).all():
        raise ValueError(f"{name} contains NaN or infinite values; impute or drop them first.")
    return arr


def check_background(background: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Check that ``background`` is non-empty and shaped like ``x``'s rows."""
    bg = as_inputs(background, name="background")
    if bg.shape[1:] != x.shape[1:]:
        raise ValueError(
            f"background rows have shape {bg.shape[1:]} but x rows have shape {x.shape[1:]}; "
            "draw the background from the same feature space as x."
        )
    return bg


def check_feature_names(feature_names: Sequence[str] | None, x: np.ndarray) -> tuple[str, ...] | None:
    """Check there is one feature name per tabular column."""
    if feature_names is None:
        return None
    names = tuple(str(n) for n in feature_names)
    if x.ndim != 2:
        raise ValueError("feature_names are only meaningful for tabular (n, F) inputs; pass None for images.")
    if len(names) != x.shape[1]:
        raise ValueError(f"feature_names has {len(names)} names but x has {x.shape[1]} features; give one per column.")
    return names


def check_k(k: int, n_features: int) -> int:
    """Check ``1 <= k <= n_features``."""
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= int(k) <= n_features:
        raise ValueError(f"k={k!r} is not valid for {n_features} features; pass an integer in [1, {n_features}].")
    return int(k)


def row_seed(seed: int, index: int) -> int:
    """Independent per-row seed, so a row's explanation does not depend on its batch."""
    return int(np.random.SeedSequence([seed, index]).generate_state(1)[0])
