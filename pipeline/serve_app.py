"""The FastAPI application of ``python -m pipeline serve``: endpoints, API key, metrics, access log.

:func:`load_models` verifies the run and loads its models exactly as ``predict`` does
(:func:`pipeline.predict_model.load_served`, read-only, hash-checked); :func:`create_app` builds the
application around them, so tests and ``uvicorn`` workers build the same thing. Predictions go
through :func:`pipeline.predict_model.predict_raw`, explanations through
:class:`pipeline.predict_explain.Explainer`: the service answers with ``predict``'s numbers.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import hmac
import json
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from auditml_core import models, training
from auditml_core.errors import ConfigError, DataError, RunDirError
from pipeline import predict_explain, predict_model, serve_docs
from pipeline.predict_explain import Explainer
from pipeline.predict_model import ServedModel
from pipeline.rundir import RunDir
from pipeline.serve_inputs import (
    CSV,
    JSON,
    BadInput,
    images_from_json,
    media_type,
    parse_json,
    read_limited,
    rows_from_csv,
    rows_from_json,
)
from pipeline.serve_observe import Metrics, Observe, setup_access_log


@dataclass(frozen=True)
class ServeSettings:
    """What one server process serves and its limits (JSON-serialisable: workers receive it by environment)."""

    run_dir: str
    which: str = "student"  # "student" or "teacher"
    engine: str = "onnx"  # "onnx" (the run's exported graphs) or "torch"
    device: str = "cpu"  # "auto", "cpu" or "cuda"
    max_rows: int = 10_000  # rows (or images) per /predict request
    max_body_bytes: int = 8 * 1024 * 1024  # larger bodies get a 413 before they are read
    explain_max_rows: int = 16  # rows (or images) per /explain request
    api_key_file: str | None = None  # when set, /predict, /explain, /metadata, /metrics need this key
    manifest_sha256: str | None = None  # the manifest the parent verified; a worker refuses another
    seed: int = 0  # explainer seed (sampling explainers)


@dataclass
class LoadedModel:
    """One served model with its engine and explainer."""

    served: ServedModel
    session: Any  # ONNX Runtime session, or None on the torch engine
    explainer: Explainer | None  # None when the run has no public background
    explain_unavailable: str  # why, when explainer is None
    lock: threading.Lock  # explanations run one at a time in a worker thread, on their own copy of the model

    @property
    def weights_sha256(self) -> str:
        return self.served.artifacts[self.served.weights]


@dataclass
class Loaded:
    """Everything :func:`load_models` verified and loaded."""

    run_id: str
    manifest_sha256: str
    models: dict[str, LoadedModel]
    device: str  # "cpu" or "cuda" ("auto" resolved)


def load_models(settings: ServeSettings) -> Loaded:
    """Verify the run as ``predict`` does and load every model of ``settings.which``, read-only.

    Raises
    ------
    RunDirError
        The run is incomplete for these models, damaged, or changed while loading (or differs
        from ``settings.manifest_sha256``).
    ConfigError
        An unknown ``which`` or ``engine``.
    """
    if settings.engine not in predict_model.ENGINES:
        raise ConfigError(
            f"--engine {settings.engine!r} is not valid; choose one of: {', '.join(predict_model.ENGINES)}"
        )
    device = training.resolve_device(settings.device, num_threads=1)
    before = RunDir.open(settings.run_dir).manifest_sha256()
    if settings.manifest_sha256 and before != settings.manifest_sha256:
        raise RunDirError(
            f"run {settings.run_dir} changed after the server verified it (manifest sha256 {before[:12]}..., "
            f"expected {settings.manifest_sha256[:12]}...); restart the server"
        )
    loaded: dict[str, LoadedModel] = {}
    for name in models.MODELS:
        served = predict_model.load_served(settings.run_dir, name=name, which=settings.which)  # verifies the run
        run = RunDir.open(settings.run_dir)
        session = predict_model.open_onnx(run, served, device=device, threads=1) if settings.engine == "onnx" else None
        explainer, why = None, ""
        try:
            explainer = Explainer(
                run,
                dataclasses.replace(served, model=copy.deepcopy(served.model)),  # never the model that predicts
                max_rows=settings.explain_max_rows,
                seed=settings.seed,
            )
        except DataError as exc:
            why = str(exc)
        loaded[name] = LoadedModel(served, session, explainer, why, threading.Lock())
    after = RunDir.open(settings.run_dir).manifest_sha256()
    if after != before:
        raise RunDirError(f"run {settings.run_dir} changed while the server loaded it; restart the server")
    first = next(iter(loaded.values())).served
    return Loaded(run_id=first.run_id, manifest_sha256=before, models=loaded, device=str(device))


# --------------------------------------------------------------------------- the application


def read_key(path: str) -> bytes:
    """SHA-256 of the API key in ``path`` (one token of at least 16 characters).

    Raises
    ------
    ConfigError
        An unreadable file, or a key too short or with spaces.
    """
    try:
        key = Path(path).read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"--api-key-file {path!r} cannot be read ({exc}); pass a readable UTF-8 file") from None
    if len(key) < 16 or any(c.isspace() for c in key):
        raise ConfigError(
            f"--api-key-file {path!r} must hold one key of at least 16 characters without spaces; "
            "make one with: python -c 'import secrets; print(secrets.token_urlsafe(32))'"
        )
    return hashlib.sha256(key.encode()).digest()


def _model_for(loaded: Loaded, request: Request, name: str) -> LoadedModel:
    if name not in loaded.models:
        raise BadInput(404, f"no model {name[:40]!r} here; choose one of: {', '.join(loaded.models)}")
    request.state.model = name
    return loaded.models[name]


async def _raw_inputs(
    settings: ServeSettings, request: Request, m: LoadedModel, *, explain: bool = False
) -> np.ndarray:
    """The request body's rows or images in raw units, validated by predict's own functions (4xx otherwise)."""
    max_rows, flag = (settings.explain_max_rows, "--explain-max-rows") if explain else (settings.max_rows, "--max-rows")
    task = m.served.task
    kind = media_type(request.headers.get("content-type"), accepted=(JSON, CSV) if task == "regression" else (JSON,))
    body = await read_limited(
        request.stream(), content_length=request.headers.get("content-length"), limit=settings.max_body_bytes
    )
    if kind == CSV:
        return rows_from_csv(body, m.served, max_rows=max_rows, limit_flag=flag)
    obj = parse_json(body)
    if task == "regression":
        return rows_from_json(obj, m.served, max_rows=max_rows, limit_flag=flag)
    return images_from_json(obj, m.served, max_rows=max_rows, limit_flag=flag)


def _outputs(loaded: Loaded, m: LoadedModel, raw: np.ndarray) -> np.ndarray:
    """predict's numbers for ``raw``; a non-finite output is a 422 naming the row, as predict refuses it."""
    y = predict_model.predict_raw(m.served, raw, session=m.session, device=loaded.device)
    ids = None if m.served.task == "regression" else list(range(len(raw)))
    try:
        predict_model.check_outputs(y, ids=ids, first_row=0, where=f"the {m.served.which} {m.served.name}")
    except DataError as exc:
        raise BadInput(422, str(exc)) from None
    return y


def _json_response(payload: dict[str, Any], status: int = 200) -> Response:
    return Response(json.dumps(payload, separators=(",", ":")), status_code=status, media_type=JSON)


def _predict_payload(settings: ServeSettings, m: LoadedModel, raw: np.ndarray, y: np.ndarray) -> dict[str, Any]:
    s = m.served
    payload: dict[str, Any] = {
        "model": s.name,
        "which": s.which,
        "engine": settings.engine,
        "run_id": s.run_id,
        "model_sha256": m.weights_sha256,
        "rows": len(raw),
    }
    if s.task == "regression":
        payload |= {"predictions": y.tolist(), "units": f"original units of the target {s.target_name!r}"}
    else:
        labels = y.argmax(axis=1)
        payload |= {
            "predictions": labels.tolist(),
            "label_names": [s.class_names[k] for k in labels],
            "probabilities": y.tolist(),
            "units": f"softmax probabilities over classes {list(s.class_names)}",
        }
    return payload | {"privacy_guarantee": s.privacy.get("guarantee", "unknown")}


def _explain_payload(
    m: LoadedModel, y: np.ndarray, values: np.ndarray, base: np.ndarray | None, targets: np.ndarray | None
) -> dict[str, Any]:
    e = m.explainer
    assert e is not None
    payload: dict[str, Any] = {"model": m.served.name, "method": e.method, "source": e.note}
    if m.served.task == "regression":
        err = float(np.max(np.abs(base + values.sum(axis=1) - y))) if base is not None else None
        return payload | {
            "exactness": predict_explain.exactness(e.method, err, "original target units"),
            "explained_output": "prediction in the target's original units",
            "shap_values": values.tolist(),
            "base_values": base.tolist() if base is not None else None,
            "feature_names": list(m.served.feature_names),
            "predictions": y.tolist(),
            "additivity_max_abs_error": err,
        }
    return payload | {
        "exactness": predict_explain.exactness(e.method, None, "logits"),
        "explained_output": "logit of the predicted class",
        "shap_values": values.tolist(),  # (N, C, H, W) per-pixel attributions
        "targets": targets.tolist() if targets is not None else None,
        "predictions": y.argmax(axis=1).tolist(),
    }


def _install_error_handlers(app: FastAPI) -> None:
    """Every refusal is a 4xx with ``{"error": one line, "request_id": ...}``."""

    @app.exception_handler(BadInput)
    async def _bad_input(request: Request, exc: BadInput) -> Response:
        headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
        rid = request.state.request_id
        return JSONResponse({"error": exc.message, "request_id": rid}, status_code=exc.status, headers=headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> Response:
        message = " ".join(
            f"{exc.detail} ({request.method} {request.url.path[:80]})".split()
        )  # one line, whatever the path
        return JSONResponse({"error": message, "request_id": request.state.request_id}, status_code=exc.status_code)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> Response:
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()))
        message = f"{where}: {first.get('msg', 'invalid request')}"
        return JSONResponse(
            {"error": " ".join(message.split()), "request_id": request.state.request_id}, status_code=422
        )


ERROR_DOCS = {
    "400": {"model": serve_docs.ErrorResponse},
    "401": {"model": serve_docs.ErrorResponse},
    "404": {"model": serve_docs.ErrorResponse},
    "413": {"model": serve_docs.ErrorResponse},
    "415": {"model": serve_docs.ErrorResponse},
    "422": {"model": serve_docs.ErrorResponse},
    "409": {"model": serve_docs.ErrorResponse, "description": "/explain only: the run has no public background"},
}


def create_app(settings: ServeSettings, *, loaded: Loaded | None = None, multiprocess_metrics: bool = False) -> Any:
    """The ASGI application serving ``settings.run_dir`` (models loaded here unless ``loaded`` is given).

    Raises
    ------
    RunDirError, UserError
        As :func:`load_models`; an unreadable or too short API key file.
    """
    key_digest = read_key(settings.api_key_file) if settings.api_key_file else None
    served: Loaded = loaded or load_models(settings)
    hashes = {name: m.weights_sha256 for name, m in served.models.items()}
    metrics = Metrics(several_processes=multiprocess_metrics)
    setup_access_log()
    app = FastAPI(
        title="auditable-pipeline model server",
        version="1",
        description=f"Run {served.run_id}: the {settings.which} models on {settings.engine}. "
        "Every refusal is a 4xx with a one-line `error`.",
    )
    _install_error_handlers(app)
    protected = _key_dependency(key_digest)
    app.include_router(_info_routes(settings, served, metrics, protected))
    app.include_router(_model_routes(settings, served, protected))
    app.add_middleware(Observe, metrics=metrics, hashes=hashes)
    return app


def _key_dependency(key_digest: bytes | None) -> list[Any]:
    """The dependency that checks the API key (none without a key file: nothing to solve per request)."""
    if key_digest is None:
        return []
    bearer, header_key = HTTPBearer(auto_error=False), APIKeyHeader(name="X-API-Key", auto_error=False)

    async def require_key(
        credentials: HTTPAuthorizationCredentials | None = Depends(bearer), api_key: str | None = Depends(header_key)
    ) -> None:
        given = credentials.credentials if credentials is not None else api_key
        # Compare fixed-length digests in constant time: neither the key nor its length leaks by timing.
        if not given or not hmac.compare_digest(hashlib.sha256(given.encode()).digest(), key_digest):
            raise BadInput(401, "missing or wrong API key; send it as 'Authorization: Bearer KEY' or 'X-API-Key: KEY'")

    return [Depends(require_key)]


def _info_routes(settings: ServeSettings, served: Loaded, metrics: Metrics, protected: list[Any]) -> APIRouter:
    """/healthz, /readyz, /metadata and /metrics."""
    router = APIRouter()

    @router.get("/healthz", summary="the process is alive")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @router.get("/readyz", summary="the models are loaded and verified")
    async def readyz() -> dict[str, Any]:
        return {
            "ready": True,
            "models": list(served.models),
            "which": settings.which,
            "engine": settings.engine,
            "pid": os.getpid(),  # which worker answered (--workers N)
        }

    @router.get(
        "/metadata", dependencies=protected, summary="run, hashes, input schema, units, privacy, explanation method"
    )
    async def metadata() -> dict[str, Any]:
        return serve_docs.metadata(settings, served)

    @router.get("/metrics", dependencies=protected, summary="Prometheus text format")
    async def metrics_text() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return router


def _model_routes(settings: ServeSettings, served: Loaded, protected: list[Any]) -> APIRouter:
    """/predict/{model} and /explain/{model}."""
    router = APIRouter()

    @router.post(
        "/predict/{model}",
        dependencies=protected,
        response_model=serve_docs.PredictResponse,
        responses=ERROR_DOCS,  # type: ignore[arg-type]
        openapi_extra={"requestBody": serve_docs.body_doc()},
        summary="predictions with predict's numbers (JSON rows/images or a CSV body)",
    )
    async def predict_endpoint(model: str, request: Request) -> Response:
        m = _model_for(served, request, model)
        raw = await _raw_inputs(settings, request, m)
        y = _outputs(served, m, raw)
        request.state.rows = len(raw)
        return _json_response(_predict_payload(settings, m, raw, y) | {"request_id": request.state.request_id})

    @router.post(
        "/explain/{model}",
        dependencies=protected,
        response_model=serve_docs.ExplainResponse,
        responses=ERROR_DOCS,  # type: ignore[arg-type]
        openapi_extra={"requestBody": serve_docs.body_doc()},
        summary="SHAP values by the run's recorded method and public background (capped rows)",
    )
    async def explain_endpoint(model: str, request: Request) -> Response:
        m = _model_for(served, request, model)
        if m.explainer is None:
            raise BadInput(409, f"explanations are unavailable for the {m.served.name}: {m.explain_unavailable}")
        raw = await _raw_inputs(settings, request, m, explain=True)
        y = _outputs(served, m, raw)
        request.state.rows = len(raw)

        def explain() -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
            with m.lock:  # shap attaches hooks to its model: one explanation at a time
                return m.explainer.explain(raw)  # type: ignore[union-attr]

        values, base, targets = await run_in_threadpool(explain)
        payload = _explain_payload(m, y, values, base, targets)
        return _json_response(payload | {"request_id": request.state.request_id})

    return router
