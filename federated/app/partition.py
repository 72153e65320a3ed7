"""Split a training set between simulated clients: IID, Dirichlet label skew, quantity skew.

Why not flwr-datasets: it is not installed here, and installing it pulls Hugging Face
``datasets``, ``pyarrow`` and ``huggingface_hub`` (checked with ``pip install --dry-run``)
to partition Hugging Face ``Dataset`` objects, while our splits are numpy arrays already
in memory. Each partitioner below is the textbook algorithm in a few lines of numpy,
seeded through its own ``numpy.random.Generator`` (no global RNG state).

Every client computes the same partition from the same inputs and keeps its own part,
so no index list has to travel.
"""

from __future__ import annotations

from typing import Callable, Protocol

import numpy as np

from auditml_core.errors import ConfigError, DataError

N_TARGET_BINS = 10  # regression targets are binned into this many quantile bins for label skew
MAX_TRIES = 20  # redraws of a skewed partition until every client reaches the minimum size


class Partitioner(Protocol):
    """``(y, n_clients, rng, alpha) -> one index array per client`` (disjoint, covering every row)."""

    def __call__(self, y: np.ndarray, n_clients: int, rng: np.random.Generator, alpha: float) -> list[np.ndarray]: ...


def iid(y: np.ndarray, n_clients: int, rng: np.random.Generator, alpha: float) -> list[np.ndarray]:
    """Shuffle, then cut into ``n_clients`` parts whose sizes differ by at most one."""
    return [np.sort(p) for p in np.array_split(rng.permutation(len(y)), n_clients)]


def _labels(y: np.ndarray) -> np.ndarray:
    """Class labels; a continuous (regression) target is binned into quantiles so label skew has a meaning."""
    if np.issubdtype(y.dtype, np.integer):
        return y
    edges = np.quantile(y, np.linspace(0, 1, N_TARGET_BINS + 1)[1:-1])
    return np.searchsorted(edges, y, side="right")


def dirichlet(y: np.ndarray, n_clients: int, rng: np.random.Generator, alpha: float) -> list[np.ndarray]:
    """Label skew (Hsu et al., 2019): each class is shared between clients in proportions ~ Dir(alpha).

    Small ``alpha`` gives each client few classes; large ``alpha`` approaches IID.
    """
    labels = _labels(y)
    parts: list[list[np.ndarray]] = [[] for _ in range(n_clients)]
    for c in np.unique(labels):
        rows = rng.permutation(np.flatnonzero(labels == c))
        shares = rng.dirichlet(np.full(n_clients, alpha))
        cuts = (np.cumsum(shares)[:-1] * len(rows)).astype(int)
        for k, chunk in enumerate(np.split(rows, cuts)):
            parts[k].append(chunk)
    return [np.sort(np.concatenate(p)) for p in parts]


def quantity(y: np.ndarray, n_clients: int, rng: np.random.Generator, alpha: float) -> list[np.ndarray]:
    """Quantity skew: client sizes in proportions ~ Dir(alpha), rows assigned at random (labels stay IID)."""
    order = rng.permutation(len(y))
    shares = rng.dirichlet(np.full(n_clients, alpha))
    cuts = (np.cumsum(shares)[:-1] * len(y)).astype(int)
    return [np.sort(p) for p in np.split(order, cuts)]


PARTITIONERS: dict[str, Callable[..., list[np.ndarray]]] = {"iid": iid, "dirichlet": dirichlet, "quantity": quantity}


def partition(
    y: np.ndarray,
    *,
    n_clients: int,
    method: str,
    alpha: float = 0.5,
    seed: int,
    min_size: int = 1,
    min_size_key: str = "",
) -> list[np.ndarray]:
    """Row indices of each client's part of a training set.

    Parameters
    ----------
    y : (n,) labels (int) or regression targets (float).
    n_clients : number of clients, >= 1.
    method : ``"iid"``, ``"dirichlet"`` or ``"quantity"``.
    alpha : Dirichlet concentration for the skewed methods, > 0.
    seed : seeds the partition (same seed, same parts).
    min_size : every part must hold at least this many rows (the training batch size).
        Skewed methods redraw up to ``MAX_TRIES`` times to reach it.
    min_size_key : config key that sets ``min_size``, named in the error.

    Returns
    -------
    list of ``n_clients`` sorted, disjoint index arrays covering ``range(len(y))``.

    Raises
    ------
    ConfigError
        For an unknown method or n_clients < 1.
    DataError
        If a part stays smaller than ``min_size``.
    """
    if method not in PARTITIONERS:
        raise ConfigError(f"federated.partitioner={method!r} is unknown; choose one of: {', '.join(PARTITIONERS)}")
    if n_clients < 1:
        raise ConfigError(f"federated.n_clients={n_clients} must be >= 1")
    rng = np.random.default_rng(seed)
    tries = 1 if method == "iid" else MAX_TRIES
    for _ in range(tries):
        parts = PARTITIONERS[method](np.asarray(y), n_clients, rng, alpha)
        smallest = min(len(p) for p in parts)
        if smallest >= min_size:
            return parts
    client = int(np.argmin([len(p) for p in parts]))
    skew = ", or raise federated.dirichlet_alpha" if method != "iid" else ""
    if min_size <= 1 or not min_size_key:
        raise DataError(
            f"client {client} gets {smallest} training rows with federated.partitioner={method!r} over {n_clients} "
            f"clients ({len(y)} rows): the partition is too small (every client needs at least {min_size} row(s)); "
            f"lower federated.n_clients{skew}"
        )
    raise DataError(
        f"client {client} gets {smallest} training rows with federated.partitioner={method!r} over {n_clients} clients "
        f"({len(y)} rows), fewer than {min_size_key}={min_size}; lower {min_size_key} or federated.n_clients{skew}"
    )


def label_histograms(y: np.ndarray, parts: list[np.ndarray], n_classes: int) -> list[list[int]]:
    """Per client: count of each class (for the training record)."""
    return [np.bincount(np.asarray(y)[p], minlength=n_classes).tolist() for p in parts]
