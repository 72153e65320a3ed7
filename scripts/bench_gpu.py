"""One-run GPU check: the default pipeline per stage on CUDA, and DP vs non-DP throughput per engine.

    PYTHONPATH=$PWD MPLBACKEND=Agg python scripts/bench_gpu.py            # on the GPU machine
    python scripts/bench_gpu.py --quick                                   # fewer engines/batches

Prints, in one run:
1. the default pipeline (``python -m pipeline``, non-DP and ``dp.enabled=true``) on CUDA: wall
   time per stage from each run's manifest, or the error that stopped it;
2. 60k synthetic 28x28 images, CNN [32, 64]: non-DP and DP samples/s and their ratio at equal
   batch (256 and 1024), for each engine (hooks, ew, functorch, ghost, bk), with peak GPU memory.

It asserts nothing. On a machine without CUDA it says so, skips the CUDA parts and exits 0.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

import torch  # noqa: E402


def pipeline_stages(overrides: list[str], *, device: str, timeout_s: int) -> None:
    """Run ``python -m pipeline`` on ``device`` and print each stage's seconds from the manifest."""
    label = " ".join(overrides) or "default"
    with tempfile.TemporaryDirectory() as out:
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [os.environ.get("PYTHONPATH"), str(ROOT)]))}
        env.setdefault("MPLBACKEND", "Agg")
        t0 = time.perf_counter()
        try:
            proc = subprocess.run(
                [sys.executable, "-m", "pipeline", "--out", out, "--device", device, "--quiet", *overrides],
                capture_output=True,
                text=True,
                env=env,
                cwd=ROOT,
                timeout=timeout_s,
            )
        except subprocess.TimeoutExpired:
            print(f"pipeline [{label}] on {device}: still running after {timeout_s} s, stopped")
            return
        wall = time.perf_counter() - t0
        manifests = sorted(Path(out).glob("*/manifest.json"))
        stages = json.loads(manifests[-1].read_text())["stages"] if manifests else {}
        cells = ", ".join(f"{n} {s.get('seconds', float('nan')):.1f}s ({s.get('status')})" for n, s in stages.items())
        print(f"pipeline [{label}] on {device}: exit {proc.returncode}, {wall:.1f} s wall; {cells}")
        if proc.returncode != 0:
            print("  last error lines:\n  " + "\n  ".join(proc.stderr.strip().splitlines()[-6:]))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="batch 256 only, engines ew, ghost and bk")
    ap.add_argument("--n", type=int, default=60_000, help="synthetic 28x28 images per epoch")
    ap.add_argument("--reps", type=int, default=2, help="timed epochs per figure (fastest kept)")
    ap.add_argument("--pipeline-timeout", type=int, default=240, help="seconds allowed per pipeline run")
    ap.add_argument("--skip-pipeline", action="store_true")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    warnings.filterwarnings("ignore", message="Full backward hook is firing", category=UserWarning)
    warnings.filterwarnings("ignore", message="Secure RNG turned off", category=UserWarning)
    print(f"torch {torch.__version__}, CUDA available: {torch.cuda.is_available()}")
    if not torch.cuda.is_available():
        print("no CUDA device: skipping the CUDA pipeline runs and the CUDA throughput table")
        return
    print(f"device: {torch.cuda.get_device_name(0)}")
    if not args.skip_pipeline:
        for overrides in ([], ["dp.enabled=true"]):
            pipeline_stages(overrides, device="cuda", timeout_s=args.pipeline_timeout)

    import bench_dp_engines  # scripts/ sibling: the same loop the CPU table uses

    device = torch.device("cuda")
    batches = [256] if args.quick else [256, 1024]
    engines = ["ew", "ghost", "bk"] if args.quick else list(bench_dp_engines.ENGINES)
    rows = bench_dp_engines.bench(
        "synthetic 28x28 CNN[32,64]",
        shape=(1, 28, 28),
        n=args.n,
        batch_sizes=batches,
        channels=(32, 64),
        hidden=64,
        activation="relu",
        reps=args.reps,
        device=device,
        engines=engines,
    )
    bench_dp_engines.print_table(rows)


if __name__ == "__main__":
    main()
