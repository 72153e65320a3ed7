"""The pipeline driven as a user drives it: ``python -m pipeline`` in a subprocess."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from pipeline.rundir import RunDir, sha256_file

ROOT = Path(__file__).resolve().parents[2]


def cli(*args, cwd=None, check=False):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, "-m", "pipeline", *args], capture_output=True, text=True, cwd=cwd or ROOT, env=env, timeout=600
    )
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


def _run_dir(proc) -> Path:
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("run directory:")][-1]
    return Path(line.split(":", 1)[1].strip())


def test_end_to_end_run_directory(tmp_path, tiny_overrides):
    proc = cli("--out", str(tmp_path), "--quiet", *tiny_overrides, check=True)
    run = _run_dir(proc)
    manifest = json.loads((run / "manifest.json").read_text())
    assert {s: manifest["stages"][s]["status"] for s in ("data", "train", "evaluate")} == dict.fromkeys(
        ("data", "train", "evaluate"), "complete"
    )
    for rel, entry in manifest["artifacts"].items():
        assert sha256_file(run / rel) == entry["sha256"], rel
        assert entry["stage"] in manifest["stages"]
    assert manifest["library_versions"]["torch"] and manifest["device"] in ("cpu", "cuda")
    placed = {s: manifest["stages"][s]["device"] for s in ("train", "evaluate", "explain", "distill", "audit")}
    for stage, where in placed.items():  # every model-running stage records its device and why
        assert where["stage"] == stage and where["device"] in ("cpu", "cuda") and where["reason"], where
    assert placed["explain"]["device"] == "cpu"  # no CUDA path
    report_json = json.loads((run / "report.json").read_text())
    assert report_json["reproducibility"]["stage_devices"]["train"].startswith(placed["train"]["device"])
    assert (run / "config.toml").read_text().count("[cnn.fit]") == 1
    metrics = json.loads((run / "metrics" / "evaluation.json").read_text())
    assert 0 <= metrics["cnn"]["test"]["accuracy"] <= 1 and len(metrics["cnn"]["test"]["confusion_matrix"]) == 10
    assert metrics["ridge"]["test"]["r2"] > 0.3  # the baseline on diabetes
    assert RunDir.open(run).verify() == []
    # Weights load without unpickling anything.
    from safetensors.torch import load_file

    assert not any(k.startswith("_module.") for k in load_file(run / "models" / "cnn.safetensors"))


@pytest.mark.slow  # a whole pipeline run: the default tier keeps one (test_end_to_end_run_directory)
def test_dp_run_records_the_guarantee(tmp_path, tiny_overrides):
    proc = cli("--out", str(tmp_path), "--quiet", *tiny_overrides, "dp.enabled=true", "dp.target_epsilon=2", check=True)
    run = _run_dir(proc)
    for name in ("regressor", "cnn"):
        rec = json.loads((run / "models" / f"{name}.json").read_text())["training"]["privacy"]
        assert 0 < rec["epsilon"] <= 2.0 and rec["delta"] == 1e-5
        for key in (
            "noise_multiplier",
            "max_grad_norm",
            "sample_rate",
            "total_steps",
            "accountant",
            "opacus_version",
            "noise_source",
        ):
            assert key in rec
        assert rec["noise_source"] == "os-csprng" and "secure_mode" not in rec
        pre = json.loads((run / "models" / f"{name}.json").read_text())["training"]["public_pretraining"]
        arrays = np.load(run / "data" / ("tabular.npz" if name == "regressor" else "images.npz"))
        assert pre["split"] == "public" and pre["epochs"] == 2 and pre["rows"] == len(arrays["y_public"]) > 0
        card = (run / f"model_card_{name}.md").read_text()
        assert "Public pretraining: before DP-SGD, the weights were first fitted WITHOUT differential privacy" in card


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["cnn.fit.epoch=3"], "unknown config key 'cnn.fit.epoch'"),
        (["dp.delta=5"], "dp.delta"),
        (['data.images="/no/such.npz"'], "does not exist"),
        (["dp.enabled=true", "dp.noise_multiplier=0.1"], "budget"),
        (["--from", "train"], "--run-dir"),
        (["--stages", "train"], "needs the output of 'data'"),
    ],
)
def test_bad_input_exits_2_with_one_line(tmp_path, args, fragment):
    proc = cli("--out", str(tmp_path), "--quiet", "regressor.fit.epochs=1", "cnn.fit.epochs=1", *args)
    assert proc.returncode == 2, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and fragment in errors[0]  # (library warnings may precede it)
    assert "Traceback" not in proc.stderr


def test_config_command_prints_loadable_toml(tmp_path):
    proc = cli("config", "cnn.fit.epochs=7", check=True)
    path = tmp_path / "c.toml"
    path.write_text(proc.stdout)
    from auditml_core.config import load_config

    assert load_config(path).cnn.fit.epochs == 7


def test_help_lists_stages_and_sections():
    out = cli("--help", check=True).stdout
    for word in ("data", "train", "evaluate", "[dp]", "[cnn]", "verify"):
        assert word in out


@pytest.mark.slow  # a whole pipeline run: the default tier keeps one (test_end_to_end_run_directory)
def test_killed_run_resumes_from_checkpoint(tmp_path, tiny_overrides):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    args = [
        sys.executable,
        "-m",
        "pipeline",
        "--out",
        str(tmp_path),
        "--quiet",
        *tiny_overrides,
        "cnn.fit.epochs=400",
        "train.patience=0",
        "train.checkpoint_every_s=0",
    ]
    proc = subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    run = None
    while time.time() < deadline:
        runs = list(tmp_path.glob("*/manifest.json"))
        if runs:
            run = runs[0].parent
            manifest = json.loads(runs[0].read_text() or "{}") if runs[0].stat().st_size else {}
            if "checkpoints/cnn.pt" in manifest.get("artifacts", {}):
                break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert run is not None
    killed = RunDir.open(run)
    assert killed.stage_status("train") == "running"  # never looks finished
    assert killed.stage_status("evaluate") == "pending"
    resumed = cli("--run-dir", str(run), "--quiet", check=True)
    assert _run_dir(resumed) == run
    final = RunDir.open(run)
    assert final.stage_status("evaluate") == "complete" and final.manifest["stages"]["train"]["attempt"] == 2
    cnn = json.loads((run / "models" / "cnn.json").read_text())["training"]
    assert cnn["resumed_from_epoch"] > 0 and cnn["epochs_run"] == 400
    assert final.verify() == []


@pytest.mark.slow  # a whole pipeline run: the default tier keeps one (test_end_to_end_run_directory)
def test_from_reruns_a_slice_and_verify_catches_edits(tmp_path, tiny_overrides):
    run = _run_dir(cli("--out", str(tmp_path), "--quiet", *tiny_overrides, check=True))
    before = json.loads((run / "manifest.json").read_text())
    cli("--run-dir", str(run), "--from", "evaluate", "--quiet", check=True)
    after = json.loads((run / "manifest.json").read_text())
    assert after["stages"]["evaluate"]["attempt"] == 2 and after["stages"]["train"] == before["stages"]["train"]
    assert cli("verify", str(run)).returncode == 0
    (run / "metrics" / "evaluation.json").write_text("{}")
    (run / "models" / "ridge.json").unlink()
    (run / "extra.txt").write_text("x")
    proc = cli("verify", str(run))
    assert proc.returncode == 1
    assert (
        "edited: metrics/evaluation.json" in proc.stdout
        and "missing: models/ridge.json" in proc.stdout
        and "extra: extra.txt" in proc.stdout
    )
    # A later stage refuses inputs that were edited.
    proc = cli("--run-dir", str(run), "--stages", "evaluate", "--quiet")
    assert proc.returncode == 2 and "ridge.json" in proc.stderr
