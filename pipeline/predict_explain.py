"""``predict --explain``: SHAP values of the predicted rows, by the run's recorded method on its public background.

The values are written beside the predictions (``<out>.shap.csv`` / ``.shap.npz``) with a provenance
entry saying which method, which background and how exact (for the regressor the additivity error is
measured on these rows). ``serve``'s ``/explain`` uses the same :class:`Explainer`.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import numpy as np

from auditml_core.artifacts import npz_bytes, read_json, read_npz
from auditml_core.errors import DataError
from explain import get_explainer
from pipeline.predict_model import ServedModel, standardise
from pipeline.rundir import RunDir

EXPLAIN_FILE = "explain/metrics.json"
DEFAULT_SHAP = {"regression": "shap-deep", "classification": "shap-deep"}  # when the run has no explain stage


class Explainer:
    """SHAP for predicted rows with the run's recorded method and its public background."""

    def __init__(self, run: RunDir, served: ServedModel, *, max_rows: int, seed: int):
        self.served, self.max_rows, self.seed = served, max_rows, seed
        method, index, note = DEFAULT_SHAP[served.task], None, "the run has no explain stage: default method"
        if run.stage_status("explain") == "complete":
            rec = read_json(run.read(EXPLAIN_FILE))["models"].get(served.name, {})
            served.artifacts[EXPLAIN_FILE] = run.manifest["artifacts"][EXPLAIN_FILE]["sha256"]
            method = rec.get("methods", {}).get("shap", method)
            bg = rec.get("background", {})
            index, note = (
                (bg.get("index"), "the run's recorded method and background")
                if bg.get("split") == "public"
                else (None, "the run's method; public background (the run's was not public)")
            )
        rel = f"data/{served.dataset}.npz"
        arrays = read_npz(run.read(rel))
        served.artifacts[rel] = run.manifest["artifacts"][rel]["sha256"]
        public, public_index = arrays["x_public"], arrays["index_public"]
        del arrays  # only the public split is used
        if len(public) == 0:
            raise DataError(
                "the run has an empty public split, so there is no public SHAP background; --explain is unavailable"
            )
        chosen = np.isin(public_index, np.asarray(index)) if index is not None else np.arange(len(public)) < 100
        self.background = public[chosen] if chosen.any() else public[:100]
        self.method, self.note = method, note
        self.fn = get_explainer(method)
        self.values: list[np.ndarray] = []
        self.base: list[np.ndarray] = []
        self.targets: list[np.ndarray] = []
        self.rows = 0

    def explain(self, raw: np.ndarray) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
        """SHAP values of raw rows: ``(values, base_values or None, targets or None)``, regressor in target units."""
        s = self.served
        e = self.fn(
            s.model.cpu(),
            standardise(s, raw),
            background=self.background,
            task=s.task,
            seed=self.seed,
            **({"feature_names": list(s.feature_names)} if s.task == "regression" else {}),
        )
        y_std = s.preprocessing.get("y_std", 1.0) if s.task == "regression" else 1.0
        y_mean = s.preprocessing.get("y_mean", 0.0) if s.task == "regression" else 0.0
        base = np.asarray(e.base_values) * y_std + y_mean if e.base_values is not None else None
        return np.asarray(e.values) * y_std, base, np.asarray(e.targets) if e.targets is not None else None

    def add(self, raw: np.ndarray) -> None:
        self.rows += len(raw)
        if self.rows > self.max_rows:
            raise DataError(
                f"--explain was asked for more than --explain-max={self.max_rows} rows; pass fewer rows or raise --explain-max"
            )
        values, base, targets = self.explain(raw)
        self.values.append(values)
        if base is not None:
            self.base.append(base)
        if targets is not None:
            self.targets.append(targets)

    def encode(self, out: Path, predictions: np.ndarray | None) -> tuple[Path, bytes, dict[str, Any]]:
        """The SHAP file beside ``out``: its path, its bytes and its provenance entry (method, file, exactness)."""
        values = np.concatenate(self.values) if self.values else np.empty((0, *self.served.input_shape))
        base = np.concatenate(self.base) if self.base else None
        record: dict[str, Any] = {"method": self.method, "source": self.note, "rows": int(len(values))}
        record["background"] = {"split": "public", "rows": int(len(self.background))}
        if self.served.task == "regression":
            import pandas as pd

            target = out.with_suffix(".shap.csv")
            cols: dict[str, Any] = {"row": np.arange(len(values))}
            if base is not None:
                cols["base_value"] = base
            cols.update({f"shap_{f}": values[:, j] for j, f in enumerate(self.served.feature_names)})
            data = pd.DataFrame(cols).to_csv(index=False).encode("utf-8")
            record["explained_output"] = "prediction in the target's original units"
            if base is not None and predictions is not None:
                err = (
                    float(np.max(np.abs(base + values.sum(axis=1) - predictions[: len(values)])))
                    if len(values)
                    else 0.0
                )
                record["additivity_max_abs_error"] = err
                record["exactness"] = exactness(self.method, err, "original target units")
        else:
            target = out.with_suffix(".shap.npz")
            arrays = {"values": values}  # (N, C, H, W) per-pixel attributions
            if base is not None:
                arrays["base_values"] = base
            if self.targets:
                arrays["targets"] = np.concatenate(self.targets)
            data = npz_bytes(arrays)
            record["explained_output"] = "logit of the predicted class"
            record["exactness"] = exactness(self.method, None, "logits")
        record["file"] = target.name
        record["sha256"] = hashlib.sha256(data).hexdigest()
        return target, data, record


def exactness(method: str, err: float | None, units: str) -> str:
    """What ``method``'s SHAP values are, and the additivity error ``err`` measured here (in ``units``), if any."""
    kind = {
        "shap-exact": "exact interventional Shapley values (shap-exact: every coalition enumerated)",
        "shap-deep": "DeepLIFT (shap-deep): additive by construction on ReLU/Tanh/MaxPool/Linear/Conv models, but an "
        "approximation of Shapley values (the run's report gives its measured error)",
        "shap-gradient": "expected gradients (shap-gradient): a sampled estimate, only approximately additive",
        "shap-kernel": "Kernel SHAP: a sampled, regression-based estimate, approximately additive",
        "shap-permutation": "Permutation SHAP (shap-permutation): sampled feature orderings, additive by construction, "
        "an estimate of interventional Shapley values (the run's report gives its measured error)",
    }.get(method, method)
    if err is None:
        return f"{kind}; additivity not re-measured here"
    return f"{kind}; measured here: base value + sum of SHAP values = prediction within {err:.3g} ({units})"
