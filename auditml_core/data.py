"""Prepared datasets: load both sources, clean, split (train / val / test / public) and standardise.

Splits are seeded and, for classes, stratified. Scalers are fitted on the train
split only. The ``public`` split is the one later stages may use without
touching private training records (explanation backgrounds, distillation).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field, replace
from typing import Any, Mapping

import numpy as np

from auditml_core.artifacts import json_bytes, npz_bytes, read_json, read_npz
from auditml_core.codebook import load_codebook
from auditml_core.config import Config, DataConfig
from auditml_core.datasets import RawImages, RawTable, load_images, load_table
from auditml_core.errors import DataError
from auditml_core.models import MODELS

log = logging.getLogger(__name__)
SPLITS = ("train", "val", "test", "public")


@dataclass(frozen=True)
class Dataset:
    """One prepared dataset: standardised splits plus everything needed to explain and audit them."""

    name: str  # "tabular" or "images"
    task: str  # "regression" or "classification"
    x: Mapping[str, np.ndarray]  # split -> (n, F) or (n, C, H, W) float32, standardised
    y: Mapping[str, np.ndarray]  # split -> (n,) float32 (standardised target) or int64 classes
    index: Mapping[str, np.ndarray]  # split -> (n,) row numbers in the source data
    feature_names: tuple[str, ...] = ()
    class_names: tuple[str, ...] = ()
    target_name: str = ""
    preprocessing: Mapping[str, Any] = field(default_factory=dict)  # scaler statistics and policies
    provenance: Mapping[str, Any] = field(default_factory=dict)
    codebook: Mapping[str, Any] = field(default_factory=dict)  # data.codebook, normalised (auditml_core.codebook)
    groups: Mapping[str, np.ndarray] = field(default_factory=dict)  # split -> (n,) str group labels; {} = none

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Shape of one input row or image."""
        return tuple(self.x["train"].shape[1:])

    def target_to_original(self, y_scaled: np.ndarray) -> np.ndarray:
        """Map standardised regression targets (or predictions) back to the original units."""
        return np.asarray(y_scaled, dtype=np.float64) * self.preprocessing["y_std"] + self.preprocessing["y_mean"]

    def summary(self) -> dict[str, Any]:
        """JSON-safe description for the manifest and the report."""
        out = {
            "name": self.name,
            "task": self.task,
            "input_shape": list(self.input_shape),
            "sizes": {s: int(len(self.y[s])) for s in SPLITS},
            "preprocessing": dict(self.preprocessing),
            "provenance": dict(self.provenance),
        }
        if self.task == "classification":
            out["class_names"] = list(self.class_names)
            out["class_counts"] = {s: np.bincount(self.y[s], minlength=len(self.class_names)).tolist() for s in SPLITS}
        else:
            out["feature_names"] = list(self.feature_names)
            out["target_name"] = self.target_name
        if self.codebook:
            out["codebook"] = dict(self.codebook)
        if self.groups:
            out["group_counts"] = {
                s: dict(zip(*(v.tolist() for v in np.unique(self.groups[s], return_counts=True)))) for s in SPLITS
            }
        return out


Datasets = dict[str, Dataset]  # {"tabular": ..., "images": ...}


def prepare(cfg: Config, *, seed: int) -> Datasets:
    """Load, validate, split and standardise both datasets.

    Parameters
    ----------
    cfg : the resolved configuration (``cfg.data`` and the batch sizes are used).
    seed : seed of the split permutation.

    Returns
    -------
    dict with ``"tabular"`` and ``"images"`` :class:`Dataset` objects.

    Raises
    ------
    DataError
        For any data that cannot be used as given; the message says how to fix it.
    """
    d = cfg.data
    raw = load_table(d.tabular_csv, d.target, ignore_columns=d.ignore_columns, identifier_check=d.identifier_check)
    tabular = prepare_table(raw, d, seed=seed)
    if d.codebook:
        codebook, source = load_codebook(d.codebook, [*raw.feature_names, raw.target_name])
        tabular = replace(tabular, codebook=codebook, provenance={**tabular.provenance, "codebook": source})
    images = prepare_images(load_images(cfg.data.images), cfg.data, seed=seed)
    dp = cfg.dp.enabled
    datasets = {"tabular": tabular, "images": images}
    for key, entry in MODELS.items():
        ds, section = datasets[entry.dataset], "dp_fit" if dp else "fit"
        fit = getattr(getattr(cfg, key), section)
        n_train = len(ds.y["train"])
        if n_train < fit.batch_size:
            raise DataError(
                f"{ds.name} data has {n_train} training rows, fewer than {key}.{section}.batch_size={fit.batch_size}; "
                f"lower {key}.{section}.batch_size or supply more rows"
            )
    return datasets


def _split_indices(n: int, cfg: DataConfig, *, seed: int, stratify: np.ndarray | None) -> dict[str, np.ndarray]:
    """Seeded train/val/test/public row indices; stratified by class when ``stratify`` is given."""
    # Here, not at the top: a federated ServerApp/ClientApp imports this module but never splits (sklearn ~1.5-3 s).
    from sklearn.model_selection import train_test_split

    idx = np.arange(n)
    out: dict[str, np.ndarray] = {}
    remaining, strat = idx, stratify
    # Carve test, then public, then val, each as a share of the whole dataset.
    for name, frac in (("test", cfg.test_fraction), ("public", cfg.public_fraction), ("val", cfg.val_fraction)):
        count = int(round(frac * n))
        if count == 0:
            out[name] = np.empty(0, dtype=np.int64)
            continue
        try:
            rest, taken = train_test_split(
                remaining, test_size=count, random_state=seed, stratify=None if strat is None else strat[remaining]
            )
        except ValueError as exc:
            raise DataError(
                f"cannot split {n} rows into a {name} share of {frac} ({exc}); supply more rows per class or lower data.{name}_fraction"
            ) from None
        out[name], remaining = np.sort(taken), rest
    out["train"] = np.sort(remaining)
    return {k: out[k].astype(np.int64) for k in SPLITS}


def _finite_rows(x: np.ndarray, y: np.ndarray, policy: str, what: str) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    bad = ~np.isfinite(x.reshape(len(x), -1)).all(axis=1)
    bad_y = ~np.isfinite(y)
    info: dict[str, Any] = {"nan_policy": policy, "rows_with_nan_or_inf": int((bad | bad_y).sum())}
    if not (bad.any() or bad_y.any()):
        return x, y, info
    if policy == "error":
        first = int(np.flatnonzero(bad | bad_y)[0])
        raise DataError(
            f"{what} has {int((bad | bad_y).sum())} row(s) with NaN or inf (first: row {first}); clean them, "
            "or set data.nan_policy to 'drop' or 'impute'"
        )
    if policy == "drop" or bad_y.any():
        # Rows without a finite target cannot be imputed: they are always dropped.
        keep = ~(bad | bad_y) if policy == "drop" else ~bad_y
        info["rows_dropped"] = int((~keep).sum())
        x, y = x[keep], y[keep]
    return x, y, info


# Public names for per-site preparation (federated/app/site.py splits and cleans each site's own rows the same way).
split_indices = _split_indices
finite_rows = _finite_rows


def prepare_table(raw: RawTable, cfg: DataConfig, *, seed: int) -> Dataset:
    """Clean, split and standardise a table (features and target scaled on train statistics)."""
    x, y, info = _finite_rows(raw.x, raw.y, cfg.nan_policy, f"table {raw.provenance.get('source')!r}")
    if len(y) < 10:
        raise DataError(f"the table has {len(y)} usable rows; supply at least 10 (more for useful models)")
    if np.ptp(y) == 0:
        raise DataError(f"target {raw.target_name!r} is constant ({y[0]}); a regressor needs a varying target")
    split = _split_indices(len(y), cfg, seed=seed, stratify=None)
    xs = {s: x[i] for s, i in split.items()}
    if cfg.nan_policy == "impute":
        medians = np.nanmedian(np.where(np.isfinite(xs["train"]), xs["train"], np.nan), axis=0)
        medians = np.where(np.isfinite(medians), medians, 0.0)
        xs = {s: np.where(np.isfinite(v), v, medians) for s, v in xs.items()}
        info["imputed_medians"] = medians.tolist()
    with np.errstate(over="ignore", invalid="ignore"):  # overflow is detected below, by name
        mean, std = xs["train"].mean(axis=0), xs["train"].std(axis=0)
        std = np.where(std > 0, std, 1.0)
        y_mean, y_std = float(y[split["train"]].mean()), float(y[split["train"]].std() or 1.0)
        x_scaled = {s: ((v - mean) / std).astype(np.float32) for s, v in xs.items()}
        y_scaled = {s: ((y[i] - y_mean) / y_std).astype(np.float32) for s, i in split.items()}
    source = raw.provenance.get("source")
    bad = [
        name
        for j, name in enumerate(raw.feature_names)
        if not all(np.isfinite(v[:, j]).all() for v in x_scaled.values())
    ]
    if not (math.isfinite(y_mean) and math.isfinite(y_std) and all(np.isfinite(v).all() for v in y_scaled.values())):
        bad.append(raw.target_name)
    if bad or not (np.isfinite(mean).all() and np.isfinite(std).all()):
        raise DataError(
            f"column(s) {', '.join(map(repr, bad[:5]))} of {source!r} hold values too large to standardise "
            "(their mean or spread overflows a float); rescale them (e.g. to other units or a log scale)"
        )
    return Dataset(
        name="tabular",
        task="regression",
        x=x_scaled,
        y=y_scaled,
        index=split,
        feature_names=raw.feature_names,
        target_name=raw.target_name,
        preprocessing={
            **info,
            "x_mean": mean.tolist(),
            "x_std": std.tolist(),
            "y_mean": y_mean,
            "y_std": y_std,
            "fitted_on": "train split only",
        },
        provenance=dict(raw.provenance),
    )


def prepare_images(raw: RawImages, cfg: DataConfig, *, seed: int) -> Dataset:
    """Clean, split (stratified) and standardise images per channel on train statistics."""
    x, y, info = _finite_rows(raw.x, raw.y.astype(np.float64), cfg.nan_policy, "image data")
    y = y.astype(np.int64)
    counts = np.bincount(y, minlength=len(raw.class_names))
    if len(y) == 0:
        raise DataError("the image data is empty; supply labelled images")
    if (counts > 0).sum() < 2:
        raise DataError(
            f"the image data has only one class ({raw.class_names[int(np.argmax(counts))]!r}); a classifier needs two or more"
        )
    h, w = x.shape[2:]
    if min(h, w) < 4:
        raise DataError(f"images are {h}x{w}; the CNN needs at least 4x4 pixels")
    split = _split_indices(len(y), cfg, seed=seed, stratify=y)
    groups = raw.groups
    if groups is not None and info.get("rows_dropped"):  # the rows _finite_rows kept (labels are always finite)
        groups = groups[np.isfinite(raw.x.reshape(len(raw.x), -1)).all(axis=1)]
    finite = bool(np.isfinite(x).all())  # one pass; whole-array copies below only when pixels need filling
    if not finite:
        x = np.where(np.isfinite(x), x, np.nan)  # "impute" kept non-finite pixels: fill them with the train mean
    with np.errstate(over="ignore", invalid="ignore"):  # overflow is detected below, by name
        if finite:
            mean = _channel_mean(x, split["train"])
        else:  # nanmean copies its input to mask NaNs: only when pixels need filling
            mean = np.nan_to_num(np.nanmean(x[split["train"]], axis=(0, 2, 3)))
            x = np.where(np.isnan(x), mean[None, :, None, None], x)
        std = _channel_std(x, split["train"], mean)
        std = np.where(std > 0, std, 1.0)
        x_scaled = {s: _scaled(x, i, mean, std) for s, i in split.items()}
    if not (np.isfinite(std).all() and all(np.isfinite(v).all() for v in x_scaled.values())):
        raise DataError(
            f"image data {raw.provenance.get('source')!r} holds intensities too large to standardise (their spread "
            "overflows a float); rescale the images, e.g. to [0, 1] or [0, 255]"
        )
    return Dataset(
        name="images",
        task="classification",
        x=x_scaled,
        y={s: y[i] for s, i in split.items()},
        index=split,
        class_names=raw.class_names,
        preprocessing={
            **info,
            "channel_mean": mean.tolist(),
            "channel_std": std.tolist(),
            "fitted_on": "train split only",
        },
        provenance=dict(raw.provenance),
        groups={} if groups is None else {s: groups[i] for s, i in split.items()},
    )


# Per-channel statistics and scaling run over blocks of this many float64 elements of the selected images
# at most, so the data stage never holds a float64 copy of a whole split (60,000 32x32 RGB images: a
# 1.1 GB train copy, and as much again for each temporary of its standard deviation). A split that fits
# in one block gives numpy's own mean and std bit for bit (the same sum, divided by the same count).
_BLOCK_ELEMENTS = 1 << 24


def _blocks(index: np.ndarray, per_row: int) -> list[np.ndarray]:
    rows = max(1, _BLOCK_ELEMENTS // max(1, per_row))
    return [index[s : s + rows] for s in range(0, len(index), rows)] or [index]


def _channel_mean(x: np.ndarray, index: np.ndarray) -> np.ndarray:
    """``x[index].mean(axis=(0, 2, 3))`` without the copy of ``x[index]``."""
    total = sum(x[b].sum(axis=(0, 2, 3)) for b in _blocks(index, x[0].size))
    return np.asarray(total) / (len(index) * x.shape[2] * x.shape[3])


def _channel_std(x: np.ndarray, index: np.ndarray, mean: np.ndarray) -> np.ndarray:
    """``x[index].std(axis=(0, 2, 3))`` (two passes: ``mean`` first) without the copy of ``x[index]``."""
    m = mean[None, :, None, None]
    total = sum(np.square(x[b] - m).sum(axis=(0, 2, 3)) for b in _blocks(index, x[0].size))
    return np.sqrt(np.asarray(total) / (len(index) * x.shape[2] * x.shape[3]))


def _scaled(x: np.ndarray, index: np.ndarray, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    """``((x[index] - mean) / std)`` per channel, as float32, written block by block."""
    out = np.empty((len(index), *x.shape[1:]), dtype=np.float32)
    m, sd, start = mean[None, :, None, None], std[None, :, None, None], 0
    for b in _blocks(index, x[0].size):
        out[start : start + len(b)] = (x[b] - m) / sd
        start += len(b)
    return out


# --------------------------------------------------------------------------- files


def dump(datasets: Datasets) -> dict[str, bytes]:
    """Encode the stage output as files for the run directory."""
    files = {}
    for key, ds in datasets.items():
        arrays = {}
        for s in SPLITS:
            arrays[f"x_{s}"], arrays[f"y_{s}"], arrays[f"index_{s}"] = ds.x[s], ds.y[s], ds.index[s]
            if ds.groups:
                arrays[f"group_{s}"] = ds.groups[s]
        files[f"data/{key}.npz"] = npz_bytes(arrays)
        files[f"data/{key}.json"] = json_bytes(
            {
                "name": ds.name,
                "task": ds.task,
                "feature_names": ds.feature_names,
                "class_names": ds.class_names,
                "target_name": ds.target_name,
                "preprocessing": ds.preprocessing,
                "provenance": ds.provenance,
            }
            | ({"codebook": ds.codebook} if ds.codebook else {})
        )
    return files


def load(read) -> Datasets:
    """Rebuild the stage output from the run directory (``read(relpath) -> bytes``)."""
    out = {}
    for key in ("tabular", "images"):
        arrays, meta = read_npz(read(f"data/{key}.npz")), read_json(read(f"data/{key}.json"))
        out[key] = Dataset(
            name=meta["name"],
            task=meta["task"],
            x={s: arrays[f"x_{s}"] for s in SPLITS},
            y={s: arrays[f"y_{s}"] for s in SPLITS},
            index={s: arrays[f"index_{s}"] for s in SPLITS},
            feature_names=tuple(meta["feature_names"]),
            class_names=tuple(meta["class_names"]),
            target_name=meta["target_name"],
            preprocessing=meta["preprocessing"],
            provenance=meta["provenance"],
            codebook=meta.get("codebook") or {},
            groups={s: arrays[f"group_{s}"] for s in SPLITS} if "group_test" in arrays else {},
        )
    return out
