"""Agreement between sites without pooling rows: schemas, their comparison, federated standardisation.

Pure functions on what each site reports (no Flower, no file access), so that the
server's decisions can be checked in-process:

- :func:`compare_schemas` refuses a federation whose sites disagree on what they hold
  (columns and their order, target, image shape, class list), naming the site and the
  difference in one line;
- :func:`local_moments` is what a site sends for standardisation: per feature (or per image
  channel) its count, sum and *centred* sum of squares (the sum of squared deviations from the
  site's own mean; together with the count and the sum it gives the plain sum of squares, and
  it keeps full precision when the mean is large against the spread);
- :func:`pooled_standardisation` combines them exactly (Chan et al.'s parallel variance), so the
  server gets the mean and (population) standard deviation that pooling every site's training
  rows would give, without any row leaving its site.

These aggregates are exact and **not differentially private**: each site's count, sums and
sums of squares reach the server in the clear (the federation's record says so, and the
report lists them under what DP does not cover).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np

from auditml_core.errors import UserError


class SiteMismatchError(UserError):
    """Two sites of one federation hold data of different shape or meaning."""


@dataclass(frozen=True)
class Moments:
    """One site's (or the pooled) count, sum and centred sum of squares per column / channel."""

    n: int
    total: np.ndarray  # (k,) float64 sums
    m2: np.ndarray  # (k,) float64 sums of squared deviations from total / n

    def to_json(self) -> dict[str, Any]:
        """JSON-safe form (what a site sends)."""
        return {"n": int(self.n), "sum": self.total.tolist(), "m2": self.m2.tolist()}

    @staticmethod
    def from_json(obj: Mapping[str, Any]) -> Moments:
        """Inverse of :meth:`to_json`."""
        return Moments(int(obj["n"]), np.asarray(obj["sum"], dtype=np.float64), np.asarray(obj["m2"], dtype=np.float64))


def local_moments(values: np.ndarray) -> Moments:
    """Moments of ``values`` (n, k) per column: what one site reports for standardisation."""
    v = np.asarray(values, dtype=np.float64)
    if len(v) == 0:
        return Moments(0, np.zeros(v.shape[1]), np.zeros(v.shape[1]))
    mean = v.mean(axis=0)
    return Moments(len(v), v.sum(axis=0), ((v - mean) ** 2).sum(axis=0))


def pool_moments(parts: Sequence[Moments]) -> Moments:
    """Exact moments of the union of the sites' rows (Chan, Golub & LeVeque's pairwise update)."""
    parts = [p for p in parts if p.n > 0]
    if not parts:
        raise UserError("no site reported any training rows; every site needs at least one row to train on")
    n, total, m2 = parts[0].n, parts[0].total.copy(), parts[0].m2.copy()
    for p in parts[1:]:
        delta = p.total / p.n - total / n
        m2 = m2 + p.m2 + delta**2 * (n * p.n / (n + p.n))
        n, total = n + p.n, total + p.total
    return Moments(n, total, m2)


def mean_std(m: Moments) -> tuple[np.ndarray, np.ndarray]:
    """Mean and population standard deviation (``np.std``'s, as ``auditml_core.data`` scales), std 0 -> 1."""
    mean = m.total / m.n
    std = np.sqrt(np.maximum(m.m2 / m.n, 0.0))
    return mean, np.where(std > 0, std, 1.0)


def pooled_standardisation(kind: str, reports: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """The standardisation every site applies, from the sites' moment reports.

    ``kind`` is ``"table"`` (reports carry ``x`` and ``y`` moments) or ``"images"`` (``x`` per channel).
    Returns the ``auditml_core.data`` preprocessing keys (``x_mean``/``x_std``/``y_mean``/``y_std`` or
    ``channel_mean``/``channel_std``) plus ``fitted_on``.
    """
    x = pool_moments([Moments.from_json(r["x"]) for r in reports])
    mean, std = mean_std(x)
    fitted = (
        f"train splits of all {len(reports)} sites, federated: each site sent its count, per-{'feature' if kind == 'table' else 'channel'} "
        "sums and centred sums of squares (exact, not DP-protected); no row left its site"
    )
    if kind == "images":
        return {"channel_mean": mean.tolist(), "channel_std": std.tolist(), "fitted_on": fitted}
    y = pool_moments([Moments.from_json(r["y"]) for r in reports])
    y_mean, y_std = mean_std(y)
    return {
        "x_mean": mean.tolist(),
        "x_std": std.tolist(),
        "y_mean": float(y_mean[0]),
        "y_std": float(y_std[0]),
        "fitted_on": fitted,
    }


# ----------------------------------------------------------------------------------------- schemas

# Keys of a site's schema that every site must share (dtypes are recorded, not compared: every column is
# read as float64, so a column that is integer at one site and decimal at another is the same feature).
AGREED = ("kind", "feature_names", "target", "input_shape", "class_names")


def _difference(key: str, ref: Any, got: Any) -> str:
    if key == "feature_names":
        missing = [c for c in ref if c not in got]
        extra = [c for c in got if c not in ref]
        if missing or extra:
            parts = []
            if missing:
                parts.append(f"lacks column(s) {', '.join(map(repr, missing[:5]))}")
            if extra:
                parts.append(f"has extra column(s) {', '.join(map(repr, extra[:5]))}")
            return " and ".join(parts)
        return f"has the same columns in another order ({', '.join(map(repr, got[:5]))}...)"
    if key == "class_names":
        missing = [c for c in ref if c not in got]
        extra = [c for c in got if c not in ref]
        if missing or extra:
            return (
                f"has class list {list(got)!r} ({'lacks ' + repr(missing) if missing else ''}"
                f"{' and ' if missing and extra else ''}{'has extra ' + repr(extra) if extra else ''})"
            )
        return f"orders its classes {list(got)!r}"
    return f"has {key} {got!r}"


def compare_schemas(schemas: Mapping[str, Mapping[str, Any]]) -> None:
    """Refuse sites that disagree with the first site (by site name order) on any of :data:`AGREED`.

    Parameters
    ----------
    schemas : site name (e.g. ``"site 2 (node 81…)"``) -> the schema that site reported.

    Raises
    ------
    SiteMismatchError
        One line naming the first disagreeing site, the reference site and the difference.
    """
    names = sorted(schemas)
    if not names:
        raise SiteMismatchError("no site reported its schema; start the SuperNodes with data-path in --node-config")
    ref_name = names[0]
    ref = schemas[ref_name]
    for name in names[1:]:
        s = schemas[name]
        for key in AGREED:
            a, b = ref.get(key), s.get(key)
            if (list(a) if isinstance(a, (list, tuple)) else a) != (list(b) if isinstance(b, (list, tuple)) else b):
                raise SiteMismatchError(
                    f"{name} disagrees with {ref_name}: it {_difference(key, a, b)} where {ref_name} has "
                    f"{_short(a)}; give every site's file the same {key.replace('_', ' ')} before federating"
                )


def _short(v: Any) -> str:
    if isinstance(v, (list, tuple)) and len(v) > 8:
        return repr(list(v[:8]))[:-1] + ", ...]"
    return repr(list(v) if isinstance(v, tuple) else v)
