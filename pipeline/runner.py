"""The ordered stage registry and the runner that executes a slice of it inside a run directory.

Stages are modules with ``run(cfg, inputs, *, seed, runtime)``, ``dump(outputs) -> {relpath: bytes}``
and ``load(read) -> outputs``. Only the runner touches files: it writes what ``dump``
returns into the run directory and, when a later stage needs an earlier stage's
output that this invocation did not compute, rebuilds it with ``load`` from the
recorded (hash-checked) files.
"""

from __future__ import annotations

import importlib
import logging
import time
from types import ModuleType
from typing import Any, Iterable

from pipeline.config import Config
from pipeline.errors import RunDirError, UserError
from pipeline.rundir import RunDir
from pipeline.runtime import Runtime, derive_seed

log = logging.getLogger(__name__)

# name -> module; order is execution order.
STAGES: dict[str, str] = {
    "data": "pipeline.data",
    "train": "pipeline.train",
    "evaluate": "pipeline.evaluate",
    "explain": "pipeline.explain_stage",
    "distill": "pipeline.distill",
    "report": "pipeline.report",
}
DESCRIPTIONS = {
    "data": "load, validate, split (train/val/test/public) and standardise both datasets",
    "train": "train the MLP regressor (+ Ridge baseline) and the CNN, central or federated, optionally DP",
    "evaluate": "test metrics with bootstrap confidence intervals",
    "explain": "SHAP and LIME for both models (public-split backgrounds) with additivity, faithfulness, agreement, stability",
    "distill": "compress each teacher into a >=10x smaller student (+ a decision tree for the regressor); fidelity, latency, ONNX",
    "report": "report.html, report.json (+ schema) and a model card per model, listing every earlier artifact's hash",
}


def stage_module(name: str) -> ModuleType:
    """The module implementing stage ``name``."""
    if name not in STAGES:
        raise UserError(f"unknown stage {name!r}; valid stages in order: {', '.join(STAGES)}")
    return importlib.import_module(STAGES[name])


def select_stages(*, stages: Iterable[str] | None = None, start: str | None = None) -> list[str]:
    """The stages to run, in registry order: an explicit list, everything from ``start``, or all."""
    names = list(STAGES)
    if stages:
        chosen = [s.strip() for s in stages if s.strip()]
        for s in chosen:
            stage_module(s)
        return [s for s in names if s in chosen]
    if start:
        stage_module(start)
        return names[names.index(start):]
    return names


class _Outputs(dict):
    """Stage outputs computed now, falling back to what the run directory recorded."""

    def __init__(self, run: RunDir):
        super().__init__()
        self.run = run

    def __missing__(self, name: str) -> Any:
        if self.run.stage_status(name) != "complete":
            raise RunDirError(
                f"stage {name!r} has not completed in {self.run.path}; re-run with --from {name} (or without --stages)"
            )
        value = stage_module(name).load(self.run.read)
        self[name] = value
        return value


def run_stages(cfg: Config, run: RunDir, names: list[str], *, progress: bool = False) -> dict[str, Any]:
    """Run ``names`` in order inside ``run``; later recorded stages become stale.

    Raises
    ------
    UserError
        From any stage; the failing stage is marked ``failed`` in the manifest first.
    """
    outputs = _Outputs(run)
    order = list(STAGES)
    first = order.index(names[0])
    for later in order[first:]:
        if later not in names and run.stage_status(later) == "complete":
            run.invalidate(later)  # its inputs are being recomputed
    for name in names:
        seed = derive_seed(cfg.seed, name)
        explicit_rerun = run.stage_status(name) == "complete"
        if explicit_rerun:
            run.invalidate(name)  # its checkpoints too: an explicit re-run starts afresh
        run.begin_stage(name, seed=seed)
        runtime = Runtime(progress=progress, checkpoint_every_s=cfg.train.checkpoint_every_s, save_bytes=lambda rel, data, n=name, s=seed: _save_intermediate(run, rel, data, n, s),
                          load_bytes=lambda rel: _load_intermediate(run, rel), manifest=run.manifest)
        log.info("stage %s: %s", name, DESCRIPTIONS.get(name, ""))
        t0 = time.perf_counter()
        module = stage_module(name)
        try:
            out = module.run(cfg, outputs, seed=seed, runtime=runtime)
            files = module.dump(out)
        except UserError as exc:
            run.fail_stage(name, str(exc))
            raise
        except BaseException as exc:
            run.fail_stage(name, f"{type(exc).__name__}: {exc}")
            raise
        run.complete_stage(name, files, seed=seed, seconds=time.perf_counter() - t0)
        outputs[name] = out
    return dict(outputs)


def _save_intermediate(run: RunDir, rel: str, data: bytes, stage: str, seed: int) -> None:
    run.write(rel, data, stage=stage, seed=seed, kind="checkpoint")
    run.save_manifest()


def _load_intermediate(run: RunDir, rel: str) -> bytes | None:
    if rel not in run.manifest["artifacts"]:
        return None
    return run.read(rel)
