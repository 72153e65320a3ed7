"""What ``python -m pipeline serve`` documents: the OpenAPI shapes of its bodies and answers, and ``/metadata``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field

from pipeline.rundir import CONFIG, library_versions
from pipeline.serve_inputs import CSV, JSON


class RowsBody(BaseModel):
    """Regressor input: one object per row, every training column, raw units."""

    rows: list[dict[str, float | None]] = Field(examples=[[{"age": 0.038, "sex": 0.05}]])


class ImagesBody(BaseModel):
    """CNN input: (N, H, W) or (N, C, H, W) nested lists of raw pixel values."""

    images: list[list[Any]]


class PredictResponse(BaseModel):
    """Predictions with what produced them (regressor: ``predictions`` in target units; CNN: labels and probabilities)."""

    model: str
    which: str
    engine: str
    run_id: str
    model_sha256: str
    rows: int
    predictions: list[float] | list[int]
    label_names: list[str] | None = None
    probabilities: list[list[float]] | None = None
    units: str
    privacy_guarantee: str
    request_id: str


class ExplainResponse(BaseModel):
    """SHAP values by the run's recorded method and its public background."""

    model: str
    method: str
    source: str
    exactness: str
    explained_output: str
    shap_values: list[Any]
    base_values: list[float] | None = None
    feature_names: list[str] | None = None
    targets: list[int] | None = None  # CNN: the class whose logit each map explains
    predictions: list[Any]
    additivity_max_abs_error: float | None = None
    request_id: str


class ErrorResponse(BaseModel):
    """Every refusal: a one-line reason that names the field/row/column and the fix."""

    error: str
    request_id: str


def body_doc() -> dict[str, Any]:
    """The request body of /predict and /explain in the OpenAPI schema (the handlers parse it themselves)."""
    rows, images = RowsBody.model_json_schema(), ImagesBody.model_json_schema()
    csv_doc = "regressor only: a header with the training columns (any order), then one row per line"
    return {
        "required": True,
        "content": {
            JSON: {"schema": {"oneOf": [rows, images]}},
            CSV: {"schema": {"type": "string", "description": csv_doc}},
        },
    }


def metadata(settings: Any, loaded: Any) -> dict[str, Any]:
    """The body of ``GET /metadata`` for a :class:`~pipeline.serve_app.ServeSettings` and what it ``Loaded``."""
    out: dict[str, Any] = {
        "run_id": loaded.run_id,
        "run_dir": str(Path(settings.run_dir).resolve()),
        "manifest_sha256": loaded.manifest_sha256,
        "which": settings.which,
        "engine": settings.engine,
        "limits": {
            "max_rows": settings.max_rows,
            "max_body_bytes": settings.max_body_bytes,
            "explain_max_rows": settings.explain_max_rows,
        },
        "library_versions": library_versions(),
        "models": {},
    }
    for name, m in loaded.models.items():
        s = m.served
        if s.task == "regression":
            schema = {
                "content_types": [JSON, CSV],
                "json": '{"rows": [{column: number, ...}, ...]}',
                "columns": list(s.feature_names),
                "units": "raw, as in the training data (the run's standardisation is applied by the server)",
                "missing_values": "null / empty cell imputed with the train-split medians"
                if s.preprocessing.get("imputed_medians") is not None
                else "refused (the run was not trained with data.nan_policy='impute')",
            }
            output = {"predictions": f"float, original units of the target {s.target_name!r}"}
        else:
            schema = {
                "content_types": [JSON],
                "json": '{"images": [image, ...]} with each image (H, W) or (C, H, W) nested lists',
                "image_shape": list(s.input_shape),
                "units": "raw pixel values, as in the training data",
            }
            output = {
                "predictions": "int, index of the most probable class",
                "label_names": "class name of each prediction",
                "probabilities": f"softmax probabilities over {list(s.class_names)}",
            }
        e = m.explainer
        out["models"][name] = {
            "task": s.task,
            "which": s.which,
            "weights": s.weights,
            "weights_sha256": m.weights_sha256,
            "graph": s.onnx_file if m.session is not None else None,
            "artifacts_loaded": dict(sorted(s.artifacts.items())),
            "input_schema": schema,
            "output": output,
            "privacy": s.privacy,
            "explanation": {
                "method": e.method,
                "source": e.note,
                "background": {"split": "public", "rows": len(e.background)},
            }
            if e is not None
            else {"unavailable": m.explain_unavailable},
        }
    out["config_sha256"] = next(iter(loaded.models.values())).served.artifacts.get(CONFIG, "")
    return out
