"""MLflow tracking: log a completed run once, after its last stage, and record in the manifest what happened.

Off unless ``tracking.mlflow_uri`` is set; mlflow (an optional extra, ``pip install ".[mlflow]"``) is imported
only then. What one MLflow run holds (docs/tracking.md): the config as params (dotted keys), every test metric
with its confidence bounds, the students' scalar records, ε and δ per model (metrics and tags), stage times,
the report stage's files (report.html, report.json, report.pdf when present, the model cards), the config and
the manifest, and each teacher and student as an MLflow ONNX model (the graphs the distill stage exported,
with the preprocessing inside) with its input/output signature and its privacy statement. With
``tracking.register`` they are also registered, with the run's provenance (run id, manifest SHA-256).

What is logged is computed by :mod:`pipeline.tracking_content` from the run directory, read through
:meth:`RunDir.read` (hash-checked), never from memory, so MLflow shows exactly what ``verify`` vouches for. No
input example is logged: it would copy a training or test record out of the run.

A failure never fails or changes the run: one warning line, and the outcome (``off`` / ``skipped`` /
``logged`` / ``failed`` with its one-line reason) goes into the invocation's ``tracking`` entry of
``manifest.json``. The manifest SHA-256 tagged in MLflow is that of the final manifest (the one ``python -m
pipeline`` prints): the outcome is recorded first, the hash tags are set last.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import re
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

from auditml_core import config as config_mod
from auditml_core.artifacts import read_json
from auditml_core.config import Config
from auditml_core.errors import ConfigError
from auditml_core.models import MODELS
from pipeline import runner
from pipeline.rundir import MANIFEST, RunDir

if TYPE_CHECKING:  # predict and tracking_content load distill, explain, ONNX Runtime and scikit-learn (~2 s): they
    # are imported where a run is logged, so a run with tracking off (and a train.processes launcher) never pays
    from pipeline import predict_model

log = logging.getLogger(__name__)

INSTALL = 'pip install ".[mlflow]"'
WHICH = ("teacher", "student")
# MLflow's environment while logging, unless the user set these: its own defaults retry a request 7 times with
# exponential backoff (an unreachable server took 247 s to fail here, one warning per retry), and it draws a
# progress bar for every artifact it copies (one per registered model).
DEFAULTS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "30",
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
}


def check(cfg: Config) -> None:
    """Refuse, before any work, tracking that cannot happen: mlflow missing, or an embedded store's folder missing.

    Raises
    ------
    ConfigError
        One line naming the fix (install the extra, create the folder, or leave ``tracking.mlflow_uri`` empty).
    """
    uri = cfg.tracking.mlflow_uri
    if not uri:
        return
    if importlib.util.find_spec("mlflow") is None:
        raise ConfigError(
            f"tracking.mlflow_uri is set but mlflow is not installed: {INSTALL} (or leave tracking.mlflow_uri empty)"
        )
    if uri.startswith("sqlite:///"):
        folder = Path(uri[len("sqlite:///") :]).parent
        if not folder.is_dir():
            raise ConfigError(
                f"tracking.mlflow_uri={uri!r}: the folder {str(folder)!r} of the database does not exist; create it "
                "or name a database in an existing folder"
            )


@dataclass
class _Logged:
    """What phase one left in MLflow, for the record and the final tags."""

    experiment_id: str = ""
    run_id: str = ""
    models: dict[str, str] = field(default_factory=dict)  # "regressor-teacher" -> models:/m-...
    registered: dict[str, str] = field(default_factory=dict)  # registered name -> version
    versions: list[tuple[str, str, predict_model.ServedModel]] = field(default_factory=list)  # (name, version, model)


def record(cfg: Config, run: RunDir, *, verbose: bool = False) -> dict[str, Any]:
    """Log ``run`` (just completed by this invocation) to MLflow when tracking is on; record the outcome.

    The outcome goes into the last invocation entry of the manifest (saved here) and is returned. Never raises
    for a tracking failure: it warns once (one line) and records ``failed`` with the reason.
    """
    t = cfg.tracking
    invocations = run.manifest.setdefault("invocations", [])
    if not invocations:  # the CLI appends this invocation's entry first; a direct caller may not have
        invocations.append({})
    invocation = invocations[-1]
    if not t.mlflow_uri:
        return _save(run, invocation, {"status": "off"})
    where = {"uri": t.mlflow_uri, "experiment": t.experiment}
    missing = run.incomplete(list(runner.STAGES))
    if missing:
        reason = f"the run is not complete ({'; '.join(missing)}): only a completed run is logged"
        log.info("MLflow: nothing logged, %s", reason)
        return _save(run, invocation, {"status": "skipped", **where, "reason": reason})
    logged = _Logged()
    try:
        with _environment(t.mlflow_uri), _quiet(verbose):
            mlflow = _import_mlflow()
            where["mlflow_version"] = mlflow.__version__
            try:
                _log(mlflow, cfg, run, logged)
            except Exception:
                _end(mlflow, t.mlflow_uri, logged, "FAILED")
                raise
            outcome = {"status": "logged", **where, **_ids(logged)}
            _save(run, invocation, outcome)  # before the hash tags: they name the manifest that holds this record
            try:
                _finish(mlflow, t.mlflow_uri, run, logged)
            except Exception as exc:
                _end(mlflow, t.mlflow_uri, logged, "FAILED")
                raise _AfterLogging(exc) from exc
    except BaseException as exc:
        if not isinstance(exc, Exception):  # Ctrl-C / SIGTERM: record it, then let the CLI report it as usual
            if "mlflow" in sys.modules:
                _end(sys.modules["mlflow"], t.mlflow_uri, logged, "KILLED")
            _save(run, invocation, {"status": "failed", **where, **_ids(logged), "reason": "interrupted"})
            raise
        reason = _one_line(exc)
        log.warning(
            "MLflow tracking failed (%s); the run itself is complete and unchanged; the failure is recorded in %s",
            reason,
            run.path / MANIFEST,
        )
        return _save(run, invocation, {"status": "failed", **where, **_ids(logged), "reason": reason})
    log.info(
        "MLflow: logged run %s to experiment %r at %s (%d models%s)",
        logged.run_id,
        t.experiment,
        t.mlflow_uri,
        len(logged.models),
        f", {len(logged.registered)} registered" if logged.registered else "",
    )
    return outcome


class _AfterLogging(Exception):
    """A failure after everything was logged, while setting the manifest hash tags."""

    def __str__(self) -> str:
        return f"after logging, while tagging the manifest hash: {_one_line(self.__cause__)}"


def _ids(logged: _Logged) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if logged.experiment_id:
        out["experiment_id"] = logged.experiment_id
    if logged.run_id:
        out["mlflow_run_id"] = logged.run_id
    if logged.models:
        out["models"] = dict(logged.models)
    if logged.registered:
        out["registered"] = dict(logged.registered)
    return out


def _save(run: RunDir, invocation: dict[str, Any], outcome: dict[str, Any]) -> dict[str, Any]:
    invocation["tracking"] = outcome
    run.save_manifest()
    return outcome


def _one_line(exc: BaseException | None) -> str:
    if exc is None:
        return "unknown error"
    if isinstance(exc, _AfterLogging):
        return str(exc)
    text = " ".join(str(exc).split()) or "no message"
    return f"{type(exc).__name__}: {text[:300]}{'...' if len(text) > 300 else ''}"


# --------------------------------------------------------------------------- the library's settings


def _import_mlflow() -> Any:
    # MLflow 3 (3.17.2: mlflow/telemetry) sends anonymous usage telemetry from any process that imports it unless
    # told not to, decided at import: this pipeline sends nothing anywhere the user did not name (a user's own
    # MLFLOW_DISABLE_TELEMETRY=false wins).
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    import mlflow
    import mlflow.onnx  # noqa: F401 (the flavour)

    return mlflow


@contextlib.contextmanager
def _environment(uri: str) -> Iterator[None]:
    """MLflow's environment while logging (the user's own settings win); restored afterwards."""
    wanted = dict(DEFAULTS)
    if uri.startswith("file:"):
        # MLflow 3 keeps the file store in maintenance mode and refuses it without this opt-in: the user named one.
        wanted["MLFLOW_ALLOW_FILE_STORE"] = "true"
    added = [k for k in wanted if k not in os.environ]
    for key in added:
        os.environ[key] = wanted[key]
    try:
        yield
    finally:
        for key in added:
            os.environ.pop(key, None)


@contextlib.contextmanager
def _quiet(verbose: bool) -> Iterator[None]:
    """MLflow's INFO lines and urllib3's retry warnings only with -v: a failure is reported once, by :func:`record`.

    mlflow is imported first: its import sets up the ``mlflow`` logger (INFO, a handler of its own).
    """
    _import_mlflow()
    levels = {"mlflow": logging.WARNING, "urllib3": logging.ERROR, "alembic": logging.WARNING}
    before = {name: logging.getLogger(name).level for name in levels}
    if not verbose:
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)
    try:
        yield
    finally:
        for name, level in before.items():
            logging.getLogger(name).setLevel(level)


# --------------------------------------------------------------------------- what is logged


def _log(mlflow: Any, cfg: Config, run: RunDir, logged: _Logged) -> None:
    """Phase one: experiment, run, params, metrics, tags, artifacts, models (and their registration)."""
    from mlflow import MlflowClient
    from mlflow.entities import Metric, Param, RunTag

    from pipeline import tracking_content as content

    t = cfg.tracking
    client = MlflowClient(tracking_uri=t.mlflow_uri, registry_uri=t.mlflow_uri)
    experiment = client.get_experiment_by_name(t.experiment)
    if experiment is not None and experiment.lifecycle_stage == "deleted":
        raise ConfigError(f"MLflow experiment {t.experiment!r} is deleted; restore it or set tracking.experiment")
    if experiment is None:
        experiment_id = client.create_experiment(t.experiment, artifact_location=_artifact_location(t))
    logged.experiment_id = experiment.experiment_id if experiment else experiment_id
    run_id = str(run.manifest.get("run_id", run.path.name))
    report = read_json(run.read("report.json"))
    statement = str(report.get("privacy", {}).get("statement", ""))
    served = {(name, which): _served(run, name, which) for name in MODELS for which in WHICH}
    served = {key: s for key, s in served.items() if s is not None}
    tags = {
        "run_id": run_id,
        "run_dir": str(run.path.resolve()),
        "git_commit": str(run.manifest.get("git_commit")),
        "train.mode": cfg.train.mode,
        "dp.enabled": str(cfg.dp.enabled).lower(),
        "privacy_statement": content.fit(statement, "report.json privacy.statement"),
        "mlflow.note.content": content.fit(f"Run {run_id} of the auditable pipeline. {statement}", "report.json"),
    }
    for (name, which), s in served.items():
        tags.update({f"privacy.{name}.{which}.{k}": content.fit(str(v), "report.json") for k, v in s.privacy.items()})
    mrun = client.create_run(logged.experiment_id, run_name=run_id, tags={"run_id": run_id})
    logged.run_id = mrun.info.run_id
    params = [Param(k, content.param(v)) for k, v in config_mod.flatten(cfg).items()]
    for i in range(0, len(params), 100):  # MLflow's batch limits: 100 params, 1000 metrics, 100 tags
        client.log_batch(logged.run_id, params=params[i : i + 100])
    tag_list = [RunTag(k, v) for k, v in tags.items()]
    for i in range(0, len(tag_list), 100):
        client.log_batch(logged.run_id, tags=tag_list[i : i + 100])
    with tempfile.TemporaryDirectory(prefix="mlflow-") as tmp:
        folder = Path(tmp)
        content.stage_files(run, folder / "files")
        client.log_artifacts(logged.run_id, str(folder / "files"))
        cards = report.get("files", {}).get("model_cards", {})
        with _fluent(mlflow, t.mlflow_uri, logged.experiment_id):
            for (name, which), s in served.items():
                card = folder / "files" / "report" / str(cards.get(name, ""))
                info = _log_model(
                    mlflow, run, s, run_id=run_id, mlflow_run_id=logged.run_id, card=card if card.is_file() else None
                )
                logged.models[f"{name}-{which}"] = info.model_uri
                if t.register:
                    _register(client, t.experiment, s, info, run_id=run_id, mlflow_run_id=logged.run_id, logged=logged)
    # The metrics after the models: a model logged into a run copies every metric the run already has, one
    # history query each (~400 metrics x 4 models took 20 s of a 100 s logging here).
    now = int(time.time() * 1000)
    metrics = [Metric(k, v, now, 0) for k, v in content.metrics(run, served).items()]
    for i in range(0, len(metrics), 1000):
        client.log_batch(logged.run_id, metrics=metrics[i : i + 1000])


def _artifact_location(t: Any) -> str | None:
    """Where a new experiment in an sqlite store keeps its artifacts: ``mlruns/<experiment>/`` beside the database.

    MLflow's own default is ``./mlruns`` under whatever folder the command ran in; a server or a ``file:`` store
    decides for itself (None).
    """
    if not t.mlflow_uri.startswith("sqlite:///"):
        return None
    folder = Path(t.mlflow_uri[len("sqlite:///") :]).resolve().parent / "mlruns"
    return (folder / (re.sub(r"[^A-Za-z0-9_.\-]+", "-", t.experiment).strip("-.") or "experiment")).as_uri()


@contextlib.contextmanager
def _fluent(mlflow: Any, uri: str, experiment_id: str) -> Iterator[None]:
    """MLflow's global tracking URI and experiment, which its model flavours log through; restored afterwards.

    Both also set environment variables (for MLflow's subprocesses) that later commands would inherit.
    """
    from mlflow.tracking import fluent

    env = {key: os.environ.get(key) for key in ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_ID")}
    active = getattr(fluent, "_active_experiment_id", None)
    mlflow.set_tracking_uri(uri)
    mlflow.set_experiment(experiment_id=experiment_id)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(env["MLFLOW_TRACKING_URI"])  # None: MLflow's own resolution again
        fluent._active_experiment_id = active
        for key, value in env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _served(run: RunDir, name: str, which: str) -> predict_model.ServedModel | None:
    """The model as ``predict`` serves it (verified run, its privacy statement), or None if it has no ONNX graph."""
    from pipeline import predict_model

    folder = "students" if which == "student" else "models"
    if f"{folder}/{name}.onnx" not in run.manifest["artifacts"]:
        return None
    return predict_model.load_served(run.path, name=name, which=which)


def _log_model(
    mlflow: Any, run: RunDir, s: predict_model.ServedModel, *, run_id: str, mlflow_run_id: str, card: Path | None
) -> Any:
    """One served ONNX graph (raw inputs, preprocessing inside) as an MLflow ONNX model with its signature."""
    import onnx

    from pipeline import tracking_content as content

    data = run.read(s.onnx_file)
    sha = run.manifest["artifacts"][s.onnx_file]["sha256"]
    tags = {"run_id": run_id, "source": s.onnx_file, "source_sha256": sha, "which": s.which}
    tags |= {f"privacy.{k}": content.fit(str(v), "report.json") for k, v in s.privacy.items()}
    return mlflow.onnx.log_model(
        onnx.load_from_string(data),
        name=f"{s.name}-{s.which}",
        run_id=mlflow_run_id,
        signature=content.signature(s),
        # CPU: these graphs take microseconds; MLflow's default lists CUDA first and warns on every CPU load.
        onnx_execution_providers=["CPUExecutionProvider"],
        # Named, not inferred: inferring starts a Python process that re-imports the model (9 s per model here).
        pip_requirements=mlflow.onnx.get_default_pip_requirements(),
        metadata={"run_id": run_id, "source": s.onnx_file, "source_sha256": sha, "privacy": dict(s.privacy)},
        extra_files=[str(card)] if card is not None else None,
        tags=tags,
    )


def _register(
    client: Any,
    experiment: str,
    s: predict_model.ServedModel,
    info: Any,
    *,
    run_id: str,
    mlflow_run_id: str,
    logged: _Logged,
) -> None:
    """A registry version of one logged model, tagged with the run's provenance and privacy statement."""
    from mlflow.exceptions import MlflowException

    from pipeline import tracking_content as content

    name = registered_name(experiment, s.name, s.which)
    try:
        client.create_registered_model(
            name, description=f"{MODELS[s.name].title} ({s.which}) of the auditable pipeline"
        )
    except MlflowException as exc:
        if "ALREADY_EXISTS" not in str(getattr(exc, "error_code", "")):
            raise
    tags = {"run_id": run_id, "source": s.onnx_file, "privacy.guarantee": str(s.privacy.get("guarantee", ""))}
    tags["privacy.statement"] = content.fit(str(s.privacy.get("statement", "")), "report.json")
    version = client.create_model_version(
        name,
        source=info.model_uri,
        run_id=mlflow_run_id,
        tags=tags,
        description=_description(run_id, None, s),
        model_id=info.model_id,
    )
    logged.registered[name] = str(version.version)
    logged.versions.append((name, str(version.version), s))


def registered_name(experiment: str, name: str, which: str) -> str:
    """The registry name of a model: ``<experiment>-<model>-<teacher|student>`` in characters the registry takes."""
    return re.sub(r"[^A-Za-z0-9_.\-]+", "-", f"{experiment}-{name}-{which}").strip("-")


def _description(run_id: str, manifest_sha256: str | None, s: predict_model.ServedModel) -> str:
    anchor = f", manifest SHA-256 {manifest_sha256}" if manifest_sha256 else ""
    return f"From run {run_id}{anchor} ({s.onnx_file}). {s.privacy.get('statement', '')}"


def _finish(mlflow: Any, uri: str, run: RunDir, logged: _Logged) -> None:
    """Phase two, after the outcome is recorded: the final manifest, the hash tags, the run marked FINISHED.

    The run's ``manifest_sha256`` tag is set last, so MLflow never names a manifest that is not the final one.
    """
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    digest = run.manifest_sha256()
    client.log_artifact(logged.run_id, str(run.path / MANIFEST))
    for name, version, s in logged.versions:
        client.set_model_version_tag(name, version, "manifest_sha256", digest)
        client.update_model_version(name, version, description=_description(s.run_id, digest, s))
    client.set_terminated(logged.run_id, "FINISHED")
    client.set_tag(logged.run_id, "manifest_sha256", digest)


def _end(mlflow: Any, uri: str, logged: _Logged, status: str) -> None:
    """Mark a half-logged MLflow run FAILED (best effort: the server may be the thing that failed)."""
    if not logged.run_id:
        return
    with contextlib.suppress(Exception):
        mlflow.MlflowClient(tracking_uri=uri).set_terminated(logged.run_id, status)
