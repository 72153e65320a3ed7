"""What one MLflow run of a completed pipeline run holds, read from the run directory (pipeline/tracking.py logs it).

Pure functions of the recorded, hash-checked files: the metrics (test metrics with their CI bounds, the students'
scalars, ε and δ, stage times), the files to upload, a model's signature, values within MLflow's limits.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from auditml_core.artifacts import read_json
from auditml_core.models import MODELS
from pipeline import distill, predict_model
from pipeline.rundir import CONFIG, RunDir

SPLITS = ("val", "train", "public")  # evaluation entries that are not test metrics
MAX_TAG = 8000  # MLflow's longest tag value (characters)


def fit(text: str, where: str) -> str:
    """A tag value within MLflow's limit; a longer one says where the whole text is rather than being cut silently."""
    if len(text) <= MAX_TAG:
        return text
    note = f" ... (cut at {MAX_TAG} characters; the whole text: {where})"
    return text[: MAX_TAG - len(note)] + note


def param(value: Any) -> str:
    """A config value as an MLflow param: text as it is, anything else as JSON (``true``, ``[8]``, ``0.003``)."""
    return value if isinstance(value, str) else json.dumps(value)


def metric_key(text: str) -> str:
    """A metric key MLflow accepts (letters, digits, ``_ - . / :`` and spaces); user class names may hold more."""
    return re.sub(r"[^A-Za-z0-9_\-./: ]", "_", text)


def metrics(run: RunDir, served: Mapping[tuple[str, str], predict_model.ServedModel]) -> dict[str, float]:
    """Test metrics (``_ci95`` pairs as ``_ci95_low`` / ``_ci95_high``), students' scalars, ε/δ, stage times."""
    out: dict[str, float] = {}
    evaluation = read_json(run.read("metrics/evaluation.json"))
    for name, entry in evaluation.items():
        for key, value in entry.items():
            if key in SPLITS:
                continue
            _flatten(out, f"test.{name}" if key == "test" else f"test.{name}.{key}", value)
    for name in MODELS:
        if f"students/{name}.json" in run.manifest["artifacts"]:
            record = read_json(run.read(f"students/{name}.json")).get("record", {})
            for key, value in record.items():
                if _number(value) and key != "seed":
                    out[metric_key(f"student.{name}.{key}")] = float(value)
    for (name, which), s in served.items():
        for key in ("epsilon", "delta"):
            if _number(s.privacy.get(key)):
                out[f"privacy.{name}.{which}.{key}"] = float(s.privacy[key])
    for stage, entry in run.manifest["stages"].items():
        if entry.get("status") == "complete" and _number(entry.get("seconds")):
            out[f"stage_seconds.{stage}"] = float(entry["seconds"])
    invocation = run.manifest.get("invocations", [{}])[-1]
    for key in ("wall_seconds", "peak_rss_mb", "peak_tree_rss_mb"):
        if _number(invocation.get(key)):
            out[f"invocation.{key}"] = float(invocation[key])
    return out


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _flatten(out: dict[str, float], prefix: str, value: Any) -> None:
    """Numbers under ``prefix`` as dotted keys; ``[lo, hi]`` under a ``*_ci95`` key as two bounds; lists of records
    by their name (``group`` / ``name`` / ``class`` / ``label``) or position; text and other lists are left out."""
    if _number(value):
        out[metric_key(prefix)] = float(value)
    elif isinstance(value, dict):
        for key, item in value.items():
            _flatten(out, f"{prefix}.{key}", item)
    elif isinstance(value, list):
        if prefix.endswith(("_ci95", ".ci95")) and len(value) == 2 and all(_number(v) for v in value):
            out[metric_key(f"{prefix}_low")], out[metric_key(f"{prefix}_high")] = float(value[0]), float(value[1])
        elif value and all(isinstance(v, dict) for v in value):
            for i, item in enumerate(value):
                label = next((item[k] for k in ("group", "name", "class", "label") if isinstance(item.get(k), str)), i)
                _flatten(out, f"{prefix}.{label}", item)


def stage_files(run: RunDir, folder: Path) -> None:
    """The hash-checked bytes of the report stage's outputs (under report/) and the config, to upload."""
    files = {f"report/{rel}": rel for rel, a in run.manifest["artifacts"].items() if a.get("stage") == "report"}
    files[CONFIG] = CONFIG
    for dest, rel in sorted(files.items()):
        data = run.read_config().read_bytes() if rel == CONFIG else run.read(rel)
        target = folder / dest
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)


def signature(s: predict_model.ServedModel) -> Any:
    """The served graph's MLflow signature: raw float32 inputs (N, F) / (N, C, H, W) -> (N,) or (N, K) outputs."""
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec

    name_in, name_out = distill.ONNX_NAMES[s.task]
    out_shape = (-1,) if s.task == "regression" else (-1, len(s.class_names))
    return ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, *s.input_shape), name_in)]),
        outputs=Schema([TensorSpec(np.dtype(np.float32), out_shape, name_out)]),
    )
