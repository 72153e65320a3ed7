"""The served model: one trained teacher or student of a run, loaded, verified and applied to raw inputs.

The run directory is the source of truth. Before a model is loaded the run must have completed the
stages the model needs, every recorded artifact must still hash to what the manifest says
(``RunDir.verify``), and every file actually loaded is read through :meth:`RunDir.read` (hash-checked
again). Weights are safetensors, statistics JSON: nothing is unpickled. ``predict`` and ``serve`` both
load and apply models through here, so both give the same numbers.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
from torch import nn

from auditml_core import models, training
from auditml_core.artifacts import read_json, read_state_dict
from auditml_core.errors import DataError, RunDirError, UserError
from pipeline import distill
from pipeline.rundir import CONFIG, RunDir

WHICH = ("student", "teacher")
ENGINES = ("torch", "onnx")


@dataclass(frozen=True)
class ServedModel:
    """One trained model of a run, loaded and verified, with everything needed to serve it."""

    run_id: str
    name: str  # registry name: "regressor" or "cnn"
    which: str  # "teacher" or "student"
    task: str  # "regression" or "classification"
    dataset: str  # "tabular" or "images"
    model: nn.Module  # plain eval-mode module on standardised inputs
    input_shape: tuple[int, ...]  # (F,) or (C, H, W)
    preprocessing: Mapping[str, Any]  # data/<dataset>.json "preprocessing"
    feature_names: tuple[str, ...] = ()
    class_names: tuple[str, ...] = ()
    target_name: str = ""
    codebook: Mapping[str, Any] = field(default_factory=dict)  # the run's data.codebook (units, coded values)
    artifacts: dict[str, str] = field(default_factory=dict)  # every file loaded -> its verified SHA-256
    privacy: dict[str, Any] = field(default_factory=dict)  # the guarantee the predictions carry

    @property
    def weights(self) -> str:
        """Run-relative path of the weights file."""
        return f"{'students' if self.which == 'student' else 'models'}/{self.name}.safetensors"

    @property
    def onnx_file(self) -> str:
        """Run-relative path of the served ONNX graph (preprocessing inside)."""
        return f"{'students' if self.which == 'student' else 'models'}/{self.name}.onnx"


# --------------------------------------------------------------------------- the run directory


def _require_complete(run: RunDir, stages: tuple[str, ...]) -> None:
    for stage in stages:
        status = run.stage_status(stage)
        if status != "complete":
            raise RunDirError(
                f"run {run.path} is incomplete: stage {stage!r} is {status}; finish it with "
                f"`python -m pipeline --run-dir {run.path}`"
            )


def _check_intact(run: RunDir) -> None:
    """Refuse a run whose recorded artifacts or config no longer match the manifest."""
    problems = [p for p in run.verify() if not p.startswith("extra:")]
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise RunDirError(
            f"run {run.path} is damaged: {problems[0]}{more}; see `python -m pipeline verify {run.path}` "
            "and re-run the stage that wrote it"
        )


def _privacy(run: RunDir, which: str, teacher_training: Mapping[str, Any], student_record: Mapping | None) -> dict:
    config = tomllib.loads((run.path / CONFIG).read_text(encoding="utf-8"))  # hash checked by _check_intact
    dp_enabled = bool(config.get("dp", {}).get("enabled", False))
    tp = teacher_training.get("privacy") or {}
    post = (
        "These predictions are post-processing of the released model and keep its guarantee; "
        "predicting reads no private training data."
    )
    if which == "teacher":
        if dp_enabled and isinstance(tp.get("epsilon"), (int, float)) and isinstance(tp.get("delta"), (int, float)):
            return {
                "guarantee": "differential privacy",
                "epsilon": tp.get("epsilon"),
                "delta": tp.get("delta"),
                "unit_of_privacy": tp.get("unit_of_privacy", "one training record"),
                "statement": f"The teacher was trained with (ε={tp.get('epsilon'):.4g}, δ={tp.get('delta'):.3g})-DP "
                f"on its private training split. {post}",
            }
        if dp_enabled:  # DP was configured but no (ε, δ) was recorded: claim nothing
            return {"guarantee": "unknown", "statement": "DP was configured but the teacher's record holds no (ε, δ)."}
        return {"guarantee": "none", "statement": "The teacher was trained without differential privacy."}
    sp = (student_record or {}).get("privacy") or {}
    delta = sp.get("delta", tp.get("delta"))
    if sp.get("guarantee") in ("inherited", "composed") and all(
        isinstance(v, (int, float)) for v in (sp.get("epsilon"), delta)
    ):
        return {
            "guarantee": f"differential privacy ({sp['guarantee']})",
            "epsilon": sp["epsilon"],
            "delta": delta,
            "statement": f"The student carries (ε={sp['epsilon']:.4g}, δ={delta:.3g})-DP ({sp['guarantee']}: "
            f"{sp.get('reason', '')}). {post}",
        }
    if sp.get("guarantee", "none") != "none":  # a guarantee without a recorded (ε, δ): claim nothing
        return {"guarantee": "unknown", "statement": f"The student's record holds no (ε, δ): {sp.get('reason', '')}"}
    return {
        "guarantee": "none",
        "statement": f"The student carries no differential-privacy guarantee: {sp.get('reason', 'none recorded')}.",
    }


def load_served(run_dir: str | Path, *, name: str, which: str = "student") -> ServedModel:
    """Open ``run_dir``, verify it, and load one model with its preprocessing.

    Parameters
    ----------
    run_dir : a run directory written by ``python -m pipeline``.
    name : registry name of the model (:data:`auditml_core.models.MODELS`).
    which : ``"teacher"`` or ``"student"`` (the distilled model).

    Raises
    ------
    RunDirError
        If the run is incomplete for this model, or any recorded file was edited or is missing.
    """
    if which not in WHICH:
        raise UserError(f"--model {which!r} is not valid; choose one of: {', '.join(WHICH)}")
    try:
        entry = models.model_entry(name)
    except ValueError as exc:
        raise UserError(str(exc)) from None
    run = RunDir.open(run_dir)
    _require_complete(run, ("data", "train") + (("distill",) if which == "student" else ()))
    _check_intact(run)
    loaded: dict[str, str] = {}

    def read(rel: str) -> bytes:
        data = run.read(rel)  # hash-checked against the manifest
        loaded[rel] = run.manifest["artifacts"][rel]["sha256"]
        return data

    loaded[CONFIG] = run.manifest["config"]["sha256"]
    meta = read_json(read(f"data/{entry.dataset}.json"))
    teacher_meta = read_json(read(f"models/{name}.json"))
    student_record = None
    if which == "student":
        student_meta = read_json(read(f"students/{name}.json"))
        spec, student_record = student_meta["spec"], student_meta["record"]
        state = read_state_dict(read(f"students/{name}.safetensors"))
    else:
        spec = teacher_meta["spec"]
        state = read_state_dict(read(f"models/{name}.safetensors"))
    model = models.build(spec)
    model.load_state_dict(state)
    kwargs = spec["kwargs"]
    shape = tuple(kwargs["input_shape"]) if "input_shape" in kwargs else (int(kwargs["n_features"]),)
    return ServedModel(
        run_id=str(run.manifest.get("run_id", run.path.name)),
        name=name,
        which=which,
        task=entry.task,
        dataset=entry.dataset,
        model=model.eval(),
        input_shape=shape,
        preprocessing=meta["preprocessing"],
        feature_names=tuple(meta.get("feature_names") or ()),
        class_names=tuple(meta.get("class_names") or ()),
        target_name=meta.get("target_name", ""),
        codebook=meta.get("codebook") or {},
        artifacts=loaded,
        privacy=_privacy(run, which, teacher_meta.get("training", {}), student_record),
    )


# --------------------------------------------------------------------------- predicting


def standardise(served: ServedModel, raw: np.ndarray) -> np.ndarray:
    """Raw inputs -> the model's inputs, with the same float64 arithmetic as :mod:`auditml_core.data` (then float32)."""
    p = served.preprocessing
    # C order: a column-major chunk (pandas) would take another BLAS path and differ in the last float32 bit.
    raw = np.ascontiguousarray(raw, dtype=np.float64)
    if served.task == "regression":
        return np.ascontiguousarray(((raw - np.asarray(p["x_mean"])) / np.asarray(p["x_std"])).astype(np.float32))
    mean, std = np.asarray(p["channel_mean"]), np.asarray(p["channel_std"])
    return np.ascontiguousarray(((raw - mean[None, :, None, None]) / std[None, :, None, None]).astype(np.float32))


def predict_torch(served: ServedModel, raw: np.ndarray, *, device: torch.device | str = "cpu") -> np.ndarray:
    """Served outputs of the torch model for raw inputs.

    Returns
    -------
    (N,) float64 predictions in the target's original units, or (N, K) float32 class probabilities.
    """
    out = training.predict(served.model.to(device), standardise(served, raw), device=device)
    if served.task == "regression":
        p = served.preprocessing
        return out.astype(np.float64) * p["y_std"] + p["y_mean"]  # as Dataset.target_to_original
    return torch.softmax(torch.as_tensor(out), dim=1).numpy()


def open_onnx(run: RunDir, served: ServedModel, *, device: torch.device | str = "cpu", threads: int = 0) -> Any:
    """ONNX Runtime session over the run's hash-checked graph of ``served`` (its hash goes to ``served.artifacts``).

    ``threads``: ONNX Runtime's intra-op threads (0: its default, one per core).

    Raises
    ------
    RunDirError
        If the run did not export the graph.
    """
    if served.onnx_file not in run.manifest["artifacts"]:
        raise RunDirError(f"run {run.path} has no {served.onnx_file}; re-run it with --from distill to export it")
    session = distill.onnx_session(run.read(served.onnx_file), device=str(device), threads=threads)
    served.artifacts[served.onnx_file] = run.manifest["artifacts"][served.onnx_file]["sha256"]
    return session


def predict_raw(
    served: ServedModel, raw: np.ndarray, *, session: Any = None, device: torch.device | str = "cpu"
) -> np.ndarray:
    """Served outputs for raw inputs by ONNX Runtime (``session`` from :func:`open_onnx`) or, without one, torch."""
    if session is not None:
        return session.run(None, {distill.ONNX_NAMES[served.task][0]: raw.astype(np.float32)})[0]
    return predict_torch(served, raw, device=device)


def check_outputs(y: np.ndarray, *, ids: Any, first_row: int, where: str) -> None:
    """Refuse model outputs that are not finite (inputs far outside the training range can overflow the model).

    ``ids``: the chunk's image ids (None for table rows, counted from ``first_row``).

    Raises
    ------
    DataError
        Naming the first row or image whose prediction is NaN or inf.
    """
    bad = ~np.isfinite(np.asarray(y, dtype=np.float64).reshape(len(y), -1)).all(axis=1)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        which = f"data row {first_row + i + 1}" if ids is None else f"image {ids[i]!r}"
        raise DataError(
            f"{where} gives a NaN or infinite prediction for {which} ({int(bad.sum())} such in this chunk): its values "
            "are far outside the training range; check them and their units"
        )
