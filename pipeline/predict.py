"""``python -m pipeline predict``: apply a run's trained teacher or student to new data.

The run directory is the source of truth. Before anything is predicted the run must have
completed the stages the model needs, every recorded artifact must still hash to what the
manifest says (``RunDir.verify``), and every file actually loaded is read through
:meth:`RunDir.read` (hash-checked again). Weights are safetensors, statistics JSON, arrays
``.npz`` without pickles: nothing is unpickled.

Inputs are raw, in the units of the training data: a CSV with the training columns for the
regressor, a ``.npz`` / ``.npy`` array or a folder of images for the CNN. They are read in
chunks (``--chunk-rows``) and the output is streamed to a temporary file that replaces
``--out`` only when everything succeeded, so memory is bounded by the chunk size, not by the
input. Beside the output, ``<out>.provenance.json`` ties every prediction to the run, the
model's hash, the input's hash and the library versions, and states what privacy guarantee the
predictions carry.
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import gzip
import hashlib
import itertools
import logging
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Iterable, Iterator, Mapping

import numpy as np
import torch
from torch import nn

from auditml_core import models, training
from auditml_core.artifacts import (
    disk_full,
    json_bytes,
    npz_bytes,
    read_json,
    read_npz,
    read_state_dict,
)
from auditml_core.codebook import units
from auditml_core.datasets import IMAGE_SUFFIXES, decode_image
from auditml_core.errors import DataError, DiskFullError, RunDirError, UserError
from explain import get_explainer
from pipeline import distill
from pipeline.outputs import OutputSet, check_output_paths
from pipeline.rundir import CONFIG, RunDir, library_versions, sha256_file

log = logging.getLogger(__name__)

WHICH = ("student", "teacher")
ENGINES = ("torch", "onnx")
DEFAULT_CHUNK_ROWS = 65_536  # rows (or images) read, predicted and written at a time
EXPLAIN_FILE = "explain/metrics.json"
DEFAULT_SHAP = {"regression": "shap-deep", "classification": "shap-deep"}  # when the run has no explain stage


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


def _frame(served: ServedModel, ids: np.ndarray | list, out: np.ndarray, *, id_column: str):
    import pandas as pd

    if served.task == "regression":
        return pd.DataFrame({id_column: ids, "prediction": out})
    label = out.argmax(axis=1)
    cols = {id_column: ids, "label": label, "label_name": np.asarray(served.class_names, dtype=object)[label]}
    cols.update({f"p_{c}": out[:, k] for k, c in enumerate(served.class_names)})
    return pd.DataFrame(cols)


# --------------------------------------------------------------------------- reading inputs


def check_columns(
    header: list[str], served: ServedModel, *, where: str, ignore: tuple[str, ...] = (), extra_fix: str = ""
) -> None:
    """Refuse a table whose header lacks a training column or has one the model was not trained on.

    ``where`` names the table in the message (a quoted path, or "the request body");
    ``extra_fix`` replaces the default advice for extra columns (``--ignore-columns``).

    Raises
    ------
    DataError
        Naming the missing or unexpected columns and the fix.
    """
    features = list(served.feature_names)
    missing = [f for f in features if f not in header]
    if missing:
        raise DataError(
            f"{where} lacks training column(s) {', '.join(map(repr, missing))}; "
            f"the {served.name} needs: {', '.join(features)}"
        )
    extra = [c for c in header if c not in features and c not in ignore]
    if extra:
        raise DataError(
            f"{where} has column(s) the model was not trained on: {', '.join(map(repr, extra[:5]))}; "
            + (extra_fix or f"drop them or name them with --ignore-columns {','.join(extra[:5])}")
        )


def table_values(chunk: Any, served: ServedModel, *, where: str, offset: int = 0) -> np.ndarray:
    """(n, F) float64 of a pandas chunk's training columns, in training order, validated.

    Empty or non-finite cells take the run's recorded train-split medians when it was trained
    with ``data.nan_policy='impute'``; otherwise they are refused. ``offset`` is the number of
    data rows before this chunk (messages count data rows from 1).

    Raises
    ------
    DataError
        A non-numeric value, an empty/non-finite one without imputation, or one too large to
        standardise (1e308: it would give an empty prediction), naming the column and the data row.
    """
    import pandas as pd

    features = list(served.feature_names)
    for col in features:
        values = chunk[col]
        if pd.api.types.is_bool_dtype(values) or not pd.api.types.is_numeric_dtype(values):
            bad = pd.to_numeric(values, errors="coerce").isna() & values.notna()
            if pd.api.types.is_bool_dtype(values) or bad.any():
                i = int(np.flatnonzero(bad.to_numpy())[0]) if bad.any() else 0
                raise DataError(
                    f"column {col!r} of {where} is not numeric: data row {offset + i + 1} holds "
                    f"{values.iloc[i]!r}; encode it as a number as in training"
                )
    x = chunk[features].apply(pd.to_numeric, errors="coerce").to_numpy(dtype=np.float64)
    return finite_table(x, served, where=where, offset=offset)


def finite_table(x: np.ndarray, served: ServedModel, *, where: str, offset: int = 0) -> np.ndarray:
    """(n, F) float64 raw rows in training column order, validated as :func:`table_values` does after parsing.

    For callers that hold numbers already (``serve``'s JSON rows): no pandas on the way.

    Raises
    ------
    DataError
        An empty/non-finite value without imputation, or one too large to standardise, naming the
        column and the data row.
    """
    features = list(served.feature_names)
    nan = ~np.isfinite(x)
    if nan.any():
        medians = served.preprocessing.get("imputed_medians")
        if medians is None:
            r, c = map(int, np.argwhere(nan)[0])
            raise DataError(
                f"column {features[c]!r} of {where} is empty or not finite at data row {offset + r + 1}; "
                "fill it (the run was not trained with data.nan_policy='impute')"
            )
        x = np.where(nan, np.asarray(medians)[None, :], x)  # the run's recorded train-split medians
    p = served.preprocessing
    with np.errstate(over="ignore", invalid="ignore"):  # detected below, by name
        scaled = ((x - np.asarray(p["x_mean"])) / np.asarray(p["x_std"])).astype(np.float32)
    overflow = ~np.isfinite(scaled)
    if overflow.any():
        r, c = map(int, np.argwhere(overflow)[0])
        raise DataError(
            f"column {features[c]!r} of {where} holds {x[r, c]:g} at data row {offset + r + 1}, too large for the model "
            f"once standardised (training: mean {p['x_mean'][c]:.4g}, spread {p['x_std'][c]:.4g}); check the value "
            "and its units"
        )
    return x


def iter_table(
    path: Path, served: ServedModel, *, ignore: tuple[str, ...] = (), chunk_rows: int = DEFAULT_CHUNK_ROWS
) -> Iterator[np.ndarray]:
    """Yield (n, F) float64 chunks of a CSV's training columns, in training order.

    Raises
    ------
    DataError
        A training column missing, an unexpected column not named in ``ignore``, a non-numeric
        or empty value (naming the column and the data row), or an unparsable file.
    """
    import pandas as pd

    try:
        header = [str(c) for c in pd.read_csv(path, nrows=0).columns]
    except (pd.errors.EmptyDataError, pd.errors.ParserError, UnicodeDecodeError) as exc:
        raise DataError(f"{str(path)!r} cannot be read as CSV ({str(exc).splitlines()[0]}); check the file") from None
    check_columns(header, served, where=repr(str(path)), ignore=ignore)
    with _open_text(path) as fh:
        check_field_counts(fh, where=repr(str(path)))
    offset = 0
    try:
        reader = pd.read_csv(path, usecols=list(served.feature_names), chunksize=chunk_rows)
        for chunk in reader:
            x = table_values(chunk, served, where=repr(str(path)), offset=offset)
            offset += len(x)
            yield x
    except pd.errors.ParserError as exc:
        raise DataError(f"{str(path)!r} cannot be parsed near data row {offset + 1} ({exc}); check the file") from None


def check_field_counts(lines: Iterable[str], *, where: str) -> None:
    """Refuse a CSV whose data rows have more or fewer fields than its header (ragged rows).

    pandas reads the training columns by name (``usecols``), and a row with one field too many
    would be read with its values shifted by one column; one with too few gets empty cells that
    imputation would silently fill. Blank lines are skipped, as pandas does. Lines without a
    quote are checked by counting commas (about twice as fast as the csv module on a million
    rows); from the first quote on, the csv module reads the rest (a quoted field may hold commas
    or line breaks).

    Raises
    ------
    DataError
        Naming the first ragged row's line number (1 = the header), its field count and the header's.
    """
    rest = iter(lines)
    header = next(rest, None)
    if header is None:
        return
    if '"' in header:
        _check_quoted_fields(itertools.chain([header], rest), where=where, expected=None, first_line=1)
        return
    expected = header.count(",") + 1
    for number, line in enumerate(rest, start=2):
        if '"' in line:
            _check_quoted_fields(itertools.chain([line], rest), where=where, expected=expected, first_line=number)
            return
        body = line.rstrip("\r\n")
        if body and body.count(",") + 1 != expected:
            raise _ragged(where, number, body.count(",") + 1, expected)


def _check_quoted_fields(lines: Iterable[str], *, where: str, expected: int | None, first_line: int) -> None:
    """:func:`check_field_counts` by the csv module, from line ``first_line`` on (``expected`` None: a header first)."""
    reader = csv.reader(lines)
    if expected is None:
        expected = len(next(reader, []))
    for row in reader:
        if row and len(row) != expected:
            raise _ragged(where, first_line - 1 + reader.line_num, len(row), expected)


def _ragged(where: str, line: int, fields: int, expected: int) -> DataError:
    return DataError(
        f"line {line} of {where} has {fields} fields but the header has {expected}; a missing or stray delimiter "
        "shifts every value after it: fix that row"
    )


def _open_text(path: Path) -> IO[str]:
    """``path`` as text for the csv module (gzip when it ends in .gz, as pandas infers)."""
    if path.suffix.lower() == ".gz":
        return gzip.open(path, "rt", newline="", encoding="utf-8", errors="replace")
    return path.open("r", newline="", encoding="utf-8", errors="replace")


def check_images(x: np.ndarray, served: ServedModel, *, what: str, first_index: int | None = 0) -> np.ndarray:
    """Images of the training shape: (N, H, W) gets its channel axis when the model has one channel.

    Returns (N, C, H, W) float64 pixels, validated as the training images were: real numbers (no
    complex, boolean or object arrays), finite (NaN/inf pixels take the run's train-split channel
    mean when it was trained with ``data.nan_policy='impute'``, as training did; otherwise they are
    refused), and small enough to standardise. ``first_index`` is the index of ``x[0]`` in the
    whole input, for messages (None: a single named image).

    Raises
    ------
    DataError
        ``what`` (the images' name in the message) has another (C, H, W) than training, is not real
        numbers, or has a non-finite or overflowing pixel (naming the image index).
    """
    want = tuple(served.input_shape)
    if x.ndim == 3 and want[0] == 1:
        x = x[:, None]
    if x.ndim != 4 or tuple(x.shape[1:]) != want:
        raise DataError(
            f"{what} has shape {tuple(x.shape)}; the {served.name} was trained on (N, {', '.join(map(str, want))}) "
            f"images ({want[0]} channel(s), {want[1]}x{want[2]} pixels): convert and resize them first"
        )
    if x.dtype.kind not in "iuf":
        raise DataError(f"{what} has dtype {x.dtype}; images must be real numbers (integer or float), as in training")
    x = np.asarray(x, dtype=np.float64)
    p = served.preprocessing
    mean, std = np.asarray(p["channel_mean"]), np.asarray(p["channel_std"])

    def image(i: int) -> str:
        return what if first_index is None else f"{what}, image {first_index + i} (counting from 0)"

    finite = np.isfinite(x)
    if not finite.all():
        bad = np.flatnonzero(~finite.reshape(len(x), -1).all(axis=1))
        if p.get("nan_policy") != "impute":
            raise DataError(
                f"{image(int(bad[0]))} has NaN or inf pixels ({len(bad)} such image(s) here); replace them "
                "(the run was not trained with data.nan_policy='impute')"
            )
        x = np.where(finite, x, mean[None, :, None, None])  # as training filled them: the train-split channel mean
    with np.errstate(over="ignore", invalid="ignore"):  # detected below, by name
        scaled = ((x - mean[None, :, None, None]) / std[None, :, None, None]).astype(np.float32)
    overflow = ~np.isfinite(scaled)
    if overflow.any():
        i, c, h, w = map(int, np.argwhere(overflow)[0])
        raise DataError(
            f"{image(i)} has pixel value {x[i, c, h, w]:g}, too large for the model once standardised (training: "
            f"channel mean {mean[c]:.4g}, spread {std[c]:.4g}); rescale the images as in training"
        )
    return x


def iter_images(
    path: Path, served: ServedModel, *, chunk_rows: int = DEFAULT_CHUNK_ROWS, digest: Any = None
) -> Iterator[tuple[list, np.ndarray]]:
    """Yield ``(ids, (n, C, H, W) float64)`` chunks from an .npz (array ``x``), .npy or a folder of images.

    ``.npy`` files are memory-mapped; image folders are decoded chunk by chunk (files sorted by
    relative path, sub-folders included); ``digest`` (a hashlib object) is fed the folder's bytes.

    Raises
    ------
    DataError
        An unreadable file, a missing ``x`` array, or images whose (C, H, W) differ from training.
    """
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise DataError(f"folder {str(path)!r} holds no {'/'.join(IMAGE_SUFFIXES)} images")
        for i in range(0, len(files), chunk_rows):
            ids, arrays = [], []
            for f in files[i : i + chunk_rows]:
                rel, data = f.relative_to(path).as_posix(), f.read_bytes()
                if digest is not None:
                    digest.update(rel.encode() + b"\0" + data)
                ids.append(rel)
                arrays.append(
                    check_images(
                        decode_image(data, name=str(f))[None], served, what=f"image {rel!r}", first_index=None
                    )[0]
                )
            yield ids, np.stack(arrays)
        return
    if path.suffix not in (".npz", ".npy"):
        raise DataError(f"{str(path)!r} is not an .npz/.npy array or a folder of images; save images with numpy.savez")
    try:
        if path.suffix == ".npy":
            x = np.load(path, mmap_mode="r", allow_pickle=False)
        else:
            with np.load(path, allow_pickle=False) as archive:
                if "x" not in archive.files:
                    raise DataError(
                        f"{str(path)!r} has no array 'x' (it has: {', '.join(archive.files) or 'none'}); save the images as x"
                    )
                x = archive["x"]
    except (ValueError, OSError) as exc:
        raise DataError(f"{str(path)!r} is not a readable array file without pickles ({exc})") from None
    what = f"x in {str(path)!r}"
    check_images(x[:0], served, what=what)  # shape and dtype, before any chunk (a memory-mapped .npy is not read)
    for i in range(0, len(x), chunk_rows):
        yield (
            list(range(i, min(i + chunk_rows, len(x)))),
            check_images(x[i : i + chunk_rows], served, what=what, first_index=i),
        )


# --------------------------------------------------------------------------- explanations


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
                record["exactness"] = _exactness(self.method, err, "original target units")
        else:
            target = out.with_suffix(".shap.npz")
            arrays = {"values": values}  # (N, C, H, W) per-pixel attributions
            if base is not None:
                arrays["base_values"] = base
            if self.targets:
                arrays["targets"] = np.concatenate(self.targets)
            data = npz_bytes(arrays)
            record["explained_output"] = "logit of the predicted class"
            record["exactness"] = _exactness(self.method, None, "logits")
        record["file"] = target.name
        record["sha256"] = hashlib.sha256(data).hexdigest()
        return target, data, record


def _exactness(method: str, err: float | None, units: str) -> str:
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


# --------------------------------------------------------------------------- the command


def _input_kind(path: Path) -> str:
    if path.is_dir() or path.suffix in (".npz", ".npy"):
        return "images"
    if path.suffix.lower() in (".csv", ".txt", ".gz"):
        return "tabular"
    raise DataError(f"{str(path)!r}: give a .csv (tables), an .npz/.npy array or a folder of images")


def _choose_model(path: Path, task: str | None) -> str:
    if task:
        return task
    if not path.exists():
        raise DataError(f"input {str(path)!r} does not exist")
    kind = _input_kind(path)
    names = [n for n, e in models.MODELS.items() if e.dataset == kind]
    if len(names) != 1:
        raise UserError(f"several models read {kind} inputs ({', '.join(names)}); choose one with --task")
    return names[0]


def predict_file(
    run_dir: str | Path,
    input_path: str | Path,
    *,
    out: str | Path,
    which: str = "student",
    task: str | None = None,
    engine: str = "torch",
    device: str | torch.device = "cpu",
    ignore_columns: tuple[str, ...] = (),
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
    explain: bool = False,
    explain_max: int = 1000,
    seed: int = 0,
) -> dict[str, Any]:
    """Predict every row/image of ``input_path`` with one model of ``run_dir``; write ``out`` and its provenance.

    Returns
    -------
    The provenance record (also written to ``<out>.provenance.json``).

    Raises
    ------
    RunDirError, DataError, UserError
        Damaged or incomplete run, inputs that do not match the training schema or shape.
    """
    t0 = time.perf_counter()
    path, out = Path(input_path), Path(out)
    if not path.exists():
        raise DataError(f"input {str(path)!r} does not exist")
    if engine not in ENGINES:
        raise UserError(f"--engine {engine!r} is not valid; choose one of: {', '.join(ENGINES)}")
    name = _choose_model(path, task)
    served = load_served(run_dir, name=name, which=which)
    run = RunDir.open(run_dir)
    expected = "images" if served.dataset == "images" else "tabular"
    if _input_kind(path) != expected:
        raise DataError(
            f"the {name} reads {expected} inputs, but {str(path)!r} is not one; pass --task or another file"
        )
    explain_file = out.with_suffix(".shap.csv" if served.task == "regression" else ".shap.npz")
    check_output_paths(
        [out, out.with_name(out.name + ".provenance.json")] + ([explain_file] if explain else []),
        inputs=[path, Path(run_dir)],
    )
    id_column = "file" if path.is_dir() else "row"
    session = open_onnx(run, served, device=device) if engine == "onnx" else None
    explainer = Explainer(run, served, max_rows=explain_max, seed=seed) if explain else None
    folder_digest = hashlib.sha256() if path.is_dir() else None
    if served.task == "regression":
        chunks = ((None, x) for x in iter_table(path, served, ignore=ignore_columns, chunk_rows=chunk_rows))
    else:
        chunks = iter_images(path, served, chunk_rows=chunk_rows, digest=folder_digest)
    provenance = out.with_name(out.name + ".provenance.json")
    try:
        with OutputSet() as files:
            record = _predict_into(
                files,
                served,
                chunks,
                out=out,
                session=session,
                device=device,
                explainer=explainer,
                id_column=id_column,
                source=repr(str(path)),
            )
            n = record["input"]["rows"]
            record.update(created=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), run_id=served.run_id)
            record["run_dir"] = str(Path(run_dir).resolve())
            record["model"] = {
                "name": name,
                "which": which,
                "task": served.task,
                "weights": served.weights,
                "weights_sha256": served.artifacts[served.weights],
                "engine": engine,
                "device": str(device),
            }
            record["artifacts_loaded"] = dict(sorted(served.artifacts.items()))
            record["input"] |= {
                "path": str(path.resolve()),
                "sha256": folder_digest.hexdigest() if folder_digest is not None else sha256_file(path),
                "hash_of": "relative path + NUL + bytes of each image, sorted"
                if folder_digest is not None
                else "file bytes",
                "ignored_columns": list(ignore_columns),
            }
            target_units = units(served.codebook, served.target_name)
            record["output"] |= {
                "path": str(out.resolve()),
                "columns": f"row, prediction (original units of {served.target_name!r}"
                + (f": {target_units})" if target_units else ")")
                if served.task == "regression"
                else "row|file, label, label_name, p_<class> (softmax probabilities)",
            }
            if served.codebook:  # the run's data dictionary: what the input's coded values and units mean
                record["data_dictionary"] = served.codebook
            record.update(privacy=served.privacy, library_versions=library_versions())
            record["seconds"] = round(time.perf_counter() - t0, 3)
            files.write(provenance, json_bytes(record))
            # The previous provenance goes first and the new one arrives last: a kill at any point leaves
            # no record beside predictions it does not describe (each record carries its files' SHA-256).
            files.commit(record=provenance, remove=_stale_side_files(provenance, keep=record))
    except OSError as exc:
        if (full := disk_full(exc)) is None:
            raise
        raise DiskFullError(
            f"{full}; nothing was written ({out} and its provenance are as they were): free space and run predict again"
        ) from None
    log.info("%d predictions by the %s %s written to %s", n, which, name, out)
    return record


def _predict_into(
    files: OutputSet,
    served: ServedModel,
    chunks: Iterable[tuple[Any, np.ndarray]],
    *,
    out: Path,
    session: Any,
    device: str | torch.device,
    explainer: Explainer | None,
    id_column: str,
    source: str,
) -> dict[str, Any]:
    """Predict every chunk into ``out``'s staged file (and the SHAP file); the record's rows and hashes so far."""
    n, first = 0, True
    explained_preds: list[np.ndarray] = []
    with files.open(out) as fh:
        for ids, raw in chunks:
            y = predict_raw(served, raw, session=session, device=device)
            check_outputs(y, ids=ids, first_row=n, where=f"the {served.which} {served.name}")
            ids = np.arange(n, n + len(raw)) if ids is None else ids
            fh.write(_frame(served, ids, y, id_column=id_column).to_csv(index=False, header=first).encode("utf-8"))
            if explainer is not None:
                explainer.add(raw)
                explained_preds.append(y)
            n, first = n + len(raw), False
        if n == 0:
            raise DataError(f"{source} holds no rows to predict")
    record: dict[str, Any] = {"input": {"rows": n}, "output": {"sha256": sha256_file(files.staged(out))}}
    if explainer is not None:
        preds = np.concatenate(explained_preds) if served.task == "regression" else None
        target, data, record["explanations"] = explainer.encode(out, preds)
        files.write(target, data)
    return record


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


def _stale_side_files(provenance: Path, *, keep: Mapping[str, Any]) -> list[Path]:
    """The SHAP file the previous provenance at this path listed, unless the new record lists the same file."""
    try:
        old = read_json(provenance.read_bytes())
        name = old["explanations"]["file"]
    except (OSError, ValueError, KeyError, TypeError):
        return []
    if not isinstance(name, str) or Path(name).name != name or name == keep.get("explanations", {}).get("file"):
        return []
    return [provenance.with_name(name)]


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m pipeline predict",
        description="Apply a run's trained teacher or student to new raw data (hash-checked run, streamed, with provenance).",
    )
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.add_argument("--input", required=True, metavar="FILE", help="a .csv (regressor), .npz/.npy or image folder (CNN)")
    p.add_argument("--model", choices=WHICH, default="student", help="the distilled student (default) or the teacher")
    p.add_argument("--out", default="predictions.csv", metavar="FILE.csv", help="output CSV (default: predictions.csv)")
    p.add_argument("--task", choices=list(models.MODELS), help="which model, when the input could fit several")
    p.add_argument("--ignore-columns", default="", metavar="A,B", help="CSV columns to ignore (e.g. the target)")
    p.add_argument("--engine", choices=ENGINES, default="torch", help="torch (default) or the run's ONNX graph")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--chunk-rows", type=int, default=DEFAULT_CHUNK_ROWS, help="rows/images per chunk (memory bound)")
    p.add_argument("--explain", action="store_true", help="also write SHAP values (<out>.shap.csv / .shap.npz)")
    p.add_argument("--explain-max", type=int, default=1000, help="refuse --explain beyond this many rows")
    p.add_argument("--quiet", action="store_true", help="warnings and errors only")
    return p


def cmd_predict(argv: list[str]) -> int:
    """``python -m pipeline predict``; returns the exit code (errors are UserErrors: exit 2 for data/run)."""
    args = parser().parse_args(argv)
    if args.chunk_rows < 1:
        raise UserError(f"--chunk-rows={args.chunk_rows}; give a positive number of rows")
    device = training.resolve_device(args.device, num_threads=1)
    record = predict_file(
        args.run_dir,
        args.input,
        out=args.out,
        which=args.model,
        task=args.task,
        engine=args.engine,
        device=device,
        ignore_columns=tuple(c.strip() for c in args.ignore_columns.split(",") if c.strip()),
        chunk_rows=args.chunk_rows,
        explain=args.explain,
        explain_max=args.explain_max,
    )
    print(f"{record['input']['rows']} predictions: {args.out} (provenance: {args.out}.provenance.json)")
    return 0
