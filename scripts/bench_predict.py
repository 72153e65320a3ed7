"""Throughput of serving a run's models: teacher vs student, torch vs ONNX Runtime; and streaming a big CSV.

    python scripts/bench_predict.py RUN_DIR                       # 1e6 rows, 1e5 images, CPU
    python scripts/bench_predict.py RUN_DIR --rows 100000 --images 20000 --device cuda --csv-rows 1000000

Inputs are synthetic raw data drawn from the run's recorded preprocessing statistics (the
values do not change the speed), processed in chunks exactly as ``python -m pipeline predict``
does (``--chunk-rows``): torch includes the float64 standardisation and the output scaling or
softmax; ONNX runs the served graph (preprocessing inside). ``--csv-rows`` also writes a CSV of
that many rows and times the whole command in a fresh process, with its peak memory.
A benchmark, not a test: it asserts nothing.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from auditml_core import models, training  # noqa: E402
from pipeline import distill, predict_inputs, predict_model  # noqa: E402
from pipeline.rundir import RunDir  # noqa: E402


def synthetic(served: predict_model.ServedModel, n: int, rng: np.random.Generator) -> np.ndarray:
    p = served.preprocessing
    if served.task == "regression":
        return rng.normal(np.asarray(p["x_mean"]), np.asarray(p["x_std"]), size=(n, *served.input_shape))
    mean, std = np.asarray(p["channel_mean"])[:, None, None], np.asarray(p["channel_std"])[:, None, None]
    return rng.normal(mean, std, size=(n, *served.input_shape))


def throughput(fn, chunk: np.ndarray, total: int) -> float:
    """Inputs per second over ``total`` inputs processed ``len(chunk)`` at a time (after one warm-up chunk)."""
    fn(chunk[:256])
    done, t0 = 0, time.perf_counter()
    while done < total:
        part = chunk[: min(len(chunk), total - done)]
        fn(part)
        done += len(part)
    return total / (time.perf_counter() - t0)


def bench_models(run_dir: str, *, rows: int, images: int, chunk: int, device: torch.device) -> list[tuple]:
    rng = np.random.default_rng(0)
    run = RunDir.open(run_dir)
    out = []
    for name in models.MODELS:
        for which in ("teacher", "student"):
            served = predict_model.load_served(run_dir, name=name, which=which)
            total = rows if served.task == "regression" else images
            x = synthetic(served, min(chunk, total), rng)
            torch_rate = throughput(lambda v: predict_model.predict_torch(served, v, device=device), x, total)
            session = distill.onnx_session(run.read(served.onnx_file), device=device.type)
            key = distill.ONNX_NAMES[served.task][0]
            x32 = x.astype(np.float32)
            onnx_rate = throughput(lambda v: session.run(None, {key: v}), x32, total)
            out.append((name, which, models.n_parameters(served.model), total, torch_rate, onnx_rate))
    return out


def bench_csv(run_dir: str, n: int, *, chunk: int, device: str) -> tuple[float, float, float]:
    """Seconds, rows/s and peak RSS (MB) of ``python -m pipeline predict`` on an ``n``-row CSV (student)."""
    served = predict_model.load_served(run_dir, name="regressor", which="student")
    rng = np.random.default_rng(1)
    with tempfile.TemporaryDirectory() as tmp:
        csv = Path(tmp) / "x.csv"
        with csv.open("w") as fh:
            fh.write(",".join(served.feature_names) + "\n")
            for start in range(0, n, 100_000):
                np.savetxt(fh, synthetic(served, min(100_000, n - start), rng), delimiter=",", fmt="%.6g")
        size_mb = csv.stat().st_size / 2**20
        argv = ["predict", run_dir, "--input", str(csv), "--out", str(Path(tmp) / "p.csv")]
        argv += ["--device", device, "--chunk-rows", str(chunk), "--quiet"]
        # Peak RSS measured inside the child (RUSAGE_SELF): RUSAGE_CHILDREN can count the parent's pages at fork.
        code = (
            "import resource, sys, time; from pipeline.__main__ import main; t = time.perf_counter(); "
            f"rc = main({argv!r}); wall = time.perf_counter() - t; "
            "print(wall, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024); sys.exit(rc)"
        )
        proc = subprocess.run(
            [sys.executable, "-c", code],
            check=True,
            capture_output=True,
            text=True,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
            cwd=ROOT,
        )
        wall, peak = map(float, proc.stdout.split()[-2:])
    print(f"CSV input: {n} rows, {size_mb:.0f} MB")
    return wall, n / wall, peak


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir")
    p.add_argument("--rows", type=int, default=1_000_000, help="tabular rows per measurement")
    p.add_argument("--images", type=int, default=100_000, help="images per measurement")
    p.add_argument("--chunk-rows", type=int, default=predict_inputs.DEFAULT_CHUNK_ROWS)
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (ONNX Runtime uses its default)")
    p.add_argument("--csv-rows", type=int, default=0, help="also time the CLI on a CSV of this many rows")
    args = p.parse_args()
    device = training.resolve_device(args.device, num_threads=args.threads)
    print(
        f"device {device}, torch {torch.__version__}, torch threads {torch.get_num_threads()}, chunk {args.chunk_rows}"
    )
    print("| model | served | parameters | inputs | torch inputs/s | ONNX inputs/s |")
    print("|---|---|---:|---:|---:|---:|")
    for name, which, n_par, total, tr, orate in bench_models(
        args.run_dir, rows=args.rows, images=args.images, chunk=args.chunk_rows, device=device
    ):
        print(f"| {name} | {which} | {n_par:,} | {total:,} | {tr:,.0f} | {orate:,.0f} |")
    if args.csv_rows:
        wall, rate, peak = bench_csv(args.run_dir, args.csv_rows, chunk=args.chunk_rows, device=device.type)
        print(
            f"CLI predict (student regressor, torch, imports excluded): {wall:.1f} s, {rate:,.0f} rows/s, peak RSS {peak:.0f} MB"
        )


if __name__ == "__main__":
    main()
