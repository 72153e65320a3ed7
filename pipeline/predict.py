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

The parts ``serve`` shares live beside this command: the served model (:mod:`pipeline.predict_model`),
the input checks (:mod:`pipeline.predict_inputs`) and the SHAP explanations (:mod:`pipeline.predict_explain`);
import them from there.
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import logging
import time
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np
import torch

from auditml_core import models, training
from auditml_core.artifacts import disk_full, json_bytes, read_json
from auditml_core.codebook import units
from auditml_core.errors import DataError, DiskFullError, UserError
from pipeline.outputs import OutputSet, check_output_paths
from pipeline.predict_explain import Explainer
from pipeline.predict_inputs import (
    DEFAULT_CHUNK_ROWS,
    iter_images,
    iter_table,
)
from pipeline.predict_model import (
    ENGINES,
    WHICH,
    ServedModel,
    check_outputs,
    load_served,
    open_onnx,
    predict_raw,
)
from pipeline.rundir import RunDir, library_versions, sha256_file

log = logging.getLogger(__name__)


def _frame(served: ServedModel, ids: np.ndarray | list, out: np.ndarray, *, id_column: str):
    import pandas as pd

    if served.task == "regression":
        return pd.DataFrame({id_column: ids, "prediction": out})
    label = out.argmax(axis=1)
    cols = {id_column: ids, "label": label, "label_name": np.asarray(served.class_names, dtype=object)[label]}
    cols.update({f"p_{c}": out[:, k] for k, c in enumerate(served.class_names)})
    return pd.DataFrame(cols)


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
    served, run = _model_for(run_dir, path, which=which, task=task, engine=engine)
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
            _describe(
                record,
                served,
                run_dir=run_dir,
                input_path=path,
                out=out,
                engine=engine,
                device=device,
                ignore_columns=ignore_columns,
                folder_digest=folder_digest,
            )
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
    log.info("%d predictions by the %s %s written to %s", record["input"]["rows"], which, served.name, out)
    return record


def _model_for(
    run_dir: str | Path, path: Path, *, which: str, task: str | None, engine: str
) -> tuple[ServedModel, RunDir]:
    """The verified model that reads ``path`` (``task``, or the one model of its kind) and its run.

    Raises
    ------
    DataError, UserError
        A missing input, an unknown engine, an input the model cannot read.
    """
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
    return served, run


def _describe(
    record: dict[str, Any],
    served: ServedModel,
    *,
    run_dir: str | Path,
    input_path: Path,
    out: Path,
    engine: str,
    device: str | torch.device,
    ignore_columns: tuple[str, ...],
    folder_digest: Any,
) -> None:
    """Complete the provenance record: the run, the model and its files, the input and output, the guarantee."""
    record.update(created=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), run_id=served.run_id)
    record["run_dir"] = str(Path(run_dir).resolve())
    record["model"] = {
        "name": served.name,
        "which": served.which,
        "task": served.task,
        "weights": served.weights,
        "weights_sha256": served.artifacts[served.weights],
        "engine": engine,
        "device": str(device),
    }
    record["artifacts_loaded"] = dict(sorted(served.artifacts.items()))
    record["input"] |= {
        "path": str(input_path.resolve()),
        "sha256": folder_digest.hexdigest() if folder_digest is not None else sha256_file(input_path),
        "hash_of": "relative path + NUL + bytes of each image, sorted" if folder_digest is not None else "file bytes",
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
