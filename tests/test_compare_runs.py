"""scripts/compare_runs.py, which backs every "behaviour unchanged" claim of a refactor: it must find nothing
between two copies of a run (the null), and must find a changed weight byte, a changed report number and a
changed record string (the positive controls), while a timing that differs is counted as ignored, not missed."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def compare_runs():
    spec = importlib.util.spec_from_file_location("compare_runs", ROOT / "scripts" / "compare_runs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run(path: Path) -> Path:
    (path / "models").mkdir(parents=True)
    (path / "models" / "cnn.safetensors").write_bytes(bytes(range(256)) * 4)
    (path / "models" / "cnn.json").write_text(json.dumps({"training": {"epsilon": 2.97, "optimizer": "adam"}}))
    report = {"models": {"cnn": {"accuracy": 0.9916, "interval": [0.98, 1.0]}}, "stages": {"train_seconds": 4.1}}
    (path / "report.json").write_text(json.dumps(report))
    return path


def _edit_json(path: Path, edit) -> None:
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


def test_two_copies_of_a_run_compare_identical(compare_runs, tmp_path, capsys):
    before = _run(tmp_path / "before")
    after = tmp_path / "after"
    shutil.copytree(before, after)
    assert compare_runs.compare(before, after) == []
    assert compare_runs.main([str(before), str(after)]) == 0


def test_a_changed_byte_number_or_string_is_found_and_a_timing_is_ignored(compare_runs, tmp_path, capsys):
    before = _run(tmp_path / "before")
    after = tmp_path / "after"
    shutil.copytree(before, after)
    _edit_json(after / "report.json", lambda r: r["stages"].update(train_seconds=9.9))  # a timing: ignored
    assert compare_runs.compare(before, after) == []
    assert "1 run-specific values" in capsys.readouterr().out

    weights = bytearray((after / "models" / "cnn.safetensors").read_bytes())
    weights[100] ^= 1
    (after / "models" / "cnn.safetensors").write_bytes(bytes(weights))
    _edit_json(after / "report.json", lambda r: r["models"]["cnn"].update(accuracy=0.9917))
    _edit_json(after / "models" / "cnn.json", lambda r: r["training"].update(optimizer="sgd"))
    problems = compare_runs.compare(before, after)
    assert any("cnn.safetensors: bytes differ" in p for p in problems)
    assert any("report.json models.cnn.accuracy" in p for p in problems)
    assert any("models/cnn.json training.optimizer" in p for p in problems)
    assert len(problems) == 3
    assert compare_runs.main([str(before), str(after)]) == 1
