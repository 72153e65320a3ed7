"""Print the figures the pipeline core is judged by, on the embedded data with the default config.

    python scripts/bench_core.py            # everything (~5-10 min on 2 cores)
    python scripts/bench_core.py --quick    # skip the whole-pipeline run and the ε=1/8 rows

Figures: CNN and regressor test metrics without DP and at ε ∈ {1, 3, 8} (δ=1e-5),
Ridge baseline, DP/non-DP CNN epoch-time ratio, whole-pipeline wall time and peak memory.
A benchmark, not a test: it asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from auditml_core.config import load_config  # noqa: E402
from auditml_core.seeds import stage_seed  # noqa: E402
from pipeline import data, evaluate, train  # noqa: E402


def train_and_eval(overrides: list[str]) -> tuple[dict, dict]:
    cfg = load_config(None, overrides)
    datasets = data.run(cfg, {}, seed=stage_seed(cfg.seed, "data"))
    t0 = time.perf_counter()
    trained = train.run(cfg, {"data": datasets}, seed=stage_seed(cfg.seed, "train"))
    wall = time.perf_counter() - t0
    metrics = evaluate.run(cfg, {"data": datasets, "train": trained}, seed=0)
    return trained, {"metrics": metrics, "train_seconds": wall}


def row(label: str, trained, result) -> str:
    m = result["metrics"]
    cnn, reg = trained.models["cnn"].training, trained.models["regressor"].training
    eps_c = cnn["privacy"]["epsilon"] if cnn["privacy"] else float("nan")
    eps_r = reg["privacy"]["epsilon"] if reg["privacy"] else float("nan")
    return (
        f"{label:<10} cnn acc {m['cnn']['test']['accuracy']:.4f} (ε={eps_c:.2f}, {cnn['seconds_per_epoch']:.3f} s/epoch, "
        f"{cnn['epochs_run']} epochs)   regressor R² {m['regressor']['test']['r2']:.4f} (ε={eps_r:.2f})   "
        f"ridge R² {m['ridge']['test']['r2']:.4f}"
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    print("== non-private (default config)")
    trained, res = train_and_eval([])
    print(row("no DP", trained, res))
    base_cnn_epoch = trained.models["cnn"].training["seconds_per_epoch"]
    print("== DP-SGD, δ=1e-5 (dp_fit settings)")
    dp_epoch = None
    for eps in [3.0] if args.quick else [1.0, 3.0, 8.0]:
        trained_dp, res_dp = train_and_eval(["dp.enabled=true", f"dp.target_epsilon={eps}"])
        print(row(f"ε={eps:g}", trained_dp, res_dp))
        if eps == 3.0:
            dp_epoch = trained_dp["cnn"].training["seconds_per_epoch"]
            dp_batch = trained_dp["cnn"].training["fit"]["batch_size"]
    print("== CNN epoch time")
    print(
        f"DP (batch {dp_batch}) / non-DP (default batch) epoch time: {dp_epoch / base_cnn_epoch:.2f}x "
        f"({dp_epoch:.3f} s vs {base_cnn_epoch:.3f} s)"
    )
    same, _ = train_and_eval(
        [f"cnn.fit.batch_size={dp_batch}", "cnn.fit.epochs=5", "train.patience=0", "regressor.fit.epochs=1"]
    )
    same_epoch = same["cnn"].training["seconds_per_epoch"]
    print(
        f"DP / non-DP at the same batch size {dp_batch}: {dp_epoch / same_epoch:.2f}x ({dp_epoch:.3f} s vs {same_epoch:.3f} s)"
    )
    if args.quick:
        return
    print("== whole default pipeline (python -m pipeline)")
    with tempfile.TemporaryDirectory() as out:
        t0 = time.perf_counter()
        proc = subprocess.run(
            [sys.executable, "-m", "pipeline", "--out", out, "--quiet"], cwd=ROOT, capture_output=True, text=True
        )
        wall = time.perf_counter() - t0
        if proc.returncode != 0:
            print(proc.stderr)
            return
        manifest = json.loads(next(Path(out).glob("*/manifest.json")).read_text())
        inv = manifest["invocations"][-1]
        stages = {k: v.get("seconds") for k, v in manifest["stages"].items()}
        print(f"wall {wall:.1f} s (stages {inv['wall_seconds']} s: {stages}), peak RSS {inv['peak_rss_mb']} MB")


if __name__ == "__main__":
    main()
