"""A DP run interrupted in training and resumed with ``--run-dir`` records everything a fresh run does (#23 item 3).

Before: the resumed models skipped public pretraining and recorded ``public_pretraining: null``, so the
model card lost its "pretrained WITHOUT DP" line and the public-only baseline disappeared.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterator

from auditml_core.runtime import Runtime
from pipeline.__main__ import main
from tests.tiny import TRAIN

ARGS = [*TRAIN, "dp.enabled=true", "dp.accountant=rdp", "train.checkpoint_every_s=0"]
STAGES = "data,train,evaluate"


def _keys(obj: Any, path: str = "") -> Iterator[str]:
    """Every key path of a JSON tree (list items share one path ``[]``), values aside."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield f"{path}/{k}"
            yield from _keys(v, f"{path}/{k}")
    elif isinstance(obj, list):
        for v in obj:
            yield from _keys(v, f"{path}[]")


def _records(run: Path) -> dict[str, set[str]]:
    return {
        p.relative_to(run).as_posix(): set(_keys(json.loads(p.read_text())))
        for folder in ("models", "metrics")
        for p in sorted((run / folder).glob("*.json"))
    }


def _run_dir(out: Path) -> Path:
    (run,) = [p.parent for p in out.glob("*/manifest.json")]
    return run


def _interrupt_at_the_first_cnn_checkpoint(monkeypatch) -> None:
    real = Runtime.save_checkpoint

    def save_then_die(self, name, ck):
        real(self, name, ck)
        if name == "cnn":  # the regressor is finished (its last checkpoint says done); the cnn is mid-training
            raise KeyboardInterrupt

    monkeypatch.setattr(Runtime, "save_checkpoint", save_then_die)


def test_a_resumed_dp_run_records_every_key_a_fresh_run_records(tmp_path, monkeypatch):
    assert main(["--out", str(tmp_path / "fresh"), "--quiet", "--stages", STAGES, *ARGS]) == 0
    fresh = _run_dir(tmp_path / "fresh")

    with monkeypatch.context() as m:
        _interrupt_at_the_first_cnn_checkpoint(m)
        assert main(["--out", str(tmp_path / "resumed"), "--quiet", "--stages", STAGES, *ARGS]) == 130
    resumed = _run_dir(tmp_path / "resumed")
    assert main(["--run-dir", str(resumed), "--quiet", "--stages", "train,evaluate"]) == 0

    a, b = _records(fresh), _records(resumed)
    assert sorted(a) == sorted(b)  # the same record files (models/*_public_only.safetensors' records too)
    for rel in a:
        assert a[rel] == b[rel], (
            f"{rel}: missing after resume {sorted(a[rel] - b[rel])}, extra {sorted(b[rel] - a[rel])}"
        )
    assert sorted(p.name for p in (fresh / "models").iterdir()) == sorted(
        p.name for p in (resumed / "models").iterdir()
    )
    artifacts = [sorted(json.loads((r / "manifest.json").read_text())["artifacts"]) for r in (fresh, resumed)]
    assert artifacts[0] == artifacts[1]  # the same files recorded (checkpoints and public pretraining included)
    for name in ("regressor", "cnn"):
        training = json.loads((resumed / "models" / f"{name}.json").read_text())["training"]
        assert training["resumed_from_epoch"] >= 1, name  # really resumed from a checkpoint
        pre = training["public_pretraining"]
        fresh_pre = json.loads((fresh / "models" / f"{name}.json").read_text())["training"]["public_pretraining"]
        assert pre is not None and pre["rows"] == fresh_pre["rows"] and pre["epochs"] == fresh_pre["epochs"]
        metrics = json.loads((resumed / "metrics" / "evaluation.json").read_text())[name]
        assert "public_only" in metrics, name  # the public-only baseline is evaluated again


def test_public_pretraining_is_saved_before_any_private_step(tmp_path, monkeypatch):
    """The record and weights of public pretraining reach the run directory before DP-SGD's first checkpoint."""
    seen: list[bool] = []
    real = Runtime.save_checkpoint

    def spy(self, model, ck):
        seen.append(self.load_public_pretraining(model) is not None)
        real(self, model, ck)
        raise KeyboardInterrupt

    monkeypatch.setattr(Runtime, "save_checkpoint", spy)
    assert main(["--out", str(tmp_path), "--quiet", "--stages", "data,train", *ARGS]) == 130
    assert seen == [True]
