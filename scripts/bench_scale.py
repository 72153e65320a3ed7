"""Time and peak memory per stage as the data grows: is the pipeline linear in rows?

    python scripts/bench_scale.py                       # all steps up to 1e6 rows / 6e4 32x32x3 images
    python scripts/bench_scale.py --steps 3             # the first three steps only
    python scripts/bench_scale.py --processes 1,2       # training samples/s on 60,000 28x28 images, 1 vs 2 processes

Each step generates a table (rows x 10 numeric features + target, written as CSV) and an
image set (``.npz``), then runs the stages data -> train (1 tiny epoch, non-DP) -> evaluate
(bootstrap CIs on the whole test split) -> explain (a small sample), one fresh process per
size, and prints wall time and peak resident memory (sampled every 5 ms) per stage; a stage's
peak includes what earlier stages of that size still hold. It
also loads the CSV alone (auditml_core.datasets.load_table) and reports its peak memory as a
multiple of the CSV's size. A benchmark, not a test: it asserts nothing.

``--processes 1,2`` instead times central training as 1, 2, ... processes (``train.processes``, torch's
launcher, gloo): the default CNN ([32, 64], hidden 64) on 60,000 synthetic 1x28x28 images, non-DP and DP
(the default engine, no public pretraining), at one batch size for both (``--batch``), ``--epochs`` epochs.
Samples/s = training rows x epochs / the summed epoch times of rank 0's record (the steps only: not the data
stage, the start of the ranks or the validation after each epoch); scaling efficiency = samples/s of N
processes / (N x samples/s of 1). The load average is printed beside every figure: on a shared machine other
work distorts them.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

STEPS = [  # (table rows, image count, image shape (C, H, W))
    (1_000, 1_000, (1, 8, 8)),
    (10_000, 5_000, (1, 16, 16)),
    (100_000, 20_000, (1, 28, 28)),
    (1_000_000, 60_000, (3, 32, 32)),
]
TINY = [
    "regressor.hidden_sizes=[16]",
    "regressor.fit.epochs=1",
    "cnn.channels=[8]",
    "cnn.hidden=16",
    "cnn.fit.epochs=1",
    "cnn.fit.batch_size=256",
    "cnn.fit.augment_shift=0",
    "train.patience=0",
    "explain.n_rows=5",
    "explain.n_images=2",
    "explain.lime_num_samples=50",
    "explain.lime_image_num_samples=30",
    "explain.stability_rows=2",
    "explain.deletion_steps=3",
    "explain.n_waterfalls=1",
    "explain.n_grid_images=2",
    "explain.background_size=20",
]


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakRSS:
    """Peak resident memory of this process while the block runs (sampled in a thread)."""

    def __enter__(self):
        self.peak, self._stop = _rss_bytes(), threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, _rss_bytes())

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss_bytes())


def generate(workdir: Path, rows: int, n_images: int, shape: tuple[int, int, int]) -> tuple[Path, Path]:
    """A linear-plus-noise CSV table and a 10-class image set whose classes differ in mean brightness."""
    import numpy as np

    rng = np.random.default_rng(0)
    csv = workdir / f"table_{rows}.csv"
    if not csv.exists():
        x = rng.normal(size=(rows, 10)).astype(np.float32)
        y = x @ rng.normal(size=10).astype(np.float32) + rng.normal(scale=0.5, size=rows).astype(np.float32)
        header = ",".join([f"f{i}" for i in range(10)] + ["target"])
        np.savetxt(csv, np.column_stack([x, y]), delimiter=",", header=header, comments="", fmt="%.6g")
    npz = workdir / f"images_{n_images}_{'x'.join(map(str, shape))}.npz"
    if not npz.exists():
        labels = rng.integers(0, 10, size=n_images)
        images = rng.normal(size=(n_images, *shape)).astype(np.float32) + labels[:, None, None, None] * 0.3
        np.savez(npz, x=images, y=labels)
    return csv, npz


def run_step(csv: str, npz: str, batch_size: str) -> dict:
    """In this (fresh) process: every stage's wall time and peak RSS, and load_table's peak alone."""
    import torch

    from auditml_core.config import load_config
    from auditml_core.datasets import load_table
    from auditml_core.seeds import stage_seed
    from pipeline import data, evaluate, explain_stage, train

    torch.set_num_threads(1)
    out: dict = {}
    base = _rss_bytes()
    with PeakRSS() as mem:
        t0 = time.perf_counter()
        table = load_table(csv, "target")
        out["load_table"] = {"seconds": time.perf_counter() - t0, "peak_mb": (mem.peak - base) / 2**20}
    out["csv_mb"] = os.path.getsize(csv) / 2**20
    out["table_array_mb"] = (table.x.nbytes + table.y.nbytes) / 2**20
    del table
    cfg = load_config(
        None,
        [
            *TINY,
            f"regressor.fit.batch_size={batch_size}",
            f'data.tabular_csv="{csv}"',
            'data.target="target"',
            f'data.images="{npz}"',
        ],
    )
    inputs: dict = {}
    for name, stage in (("data", data), ("train", train), ("evaluate", evaluate), ("explain", explain_stage)):
        with PeakRSS() as mem:
            t0 = time.perf_counter()
            result = stage.run(cfg, inputs, seed=stage_seed(cfg.seed, name))
            secs = time.perf_counter() - t0
        inputs[name] = result
        out[name] = {"seconds": secs, "peak_rss_mb": mem.peak / 2**20}
    return out


PROCESS_IMAGES = (60_000, (1, 28, 28))  # the training-throughput benchmark of --processes


def train_throughput(npz: Path, *, processes: int, dp: bool, batch: int, epochs: int) -> dict:
    """Samples/s of the CNN's training as ``processes`` ranks (``python -m pipeline --stages data,train``)."""
    section = "cnn.dp_fit" if dp else "cnn.fit"
    overrides = [
        f'data.images="{npz}"',
        f"train.processes={processes}",
        f"dp.enabled={'true' if dp else 'false'}",
        "dp.public_pretrain_epochs=0",
        "dp.target_epsilon=8",
        f"{section}.batch_size={batch}",
        f"{section}.epochs={epochs}",
        "train.patience=0",
        "regressor.fit.epochs=1",
        "regressor.dp_fit.epochs=1",
    ]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MPLBACKEND": "Agg"}
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as out:
        proc = subprocess.run(
            [sys.executable, "-m", "pipeline", "--stages", "data,train", "--quiet", "--out", out, *overrides],
            capture_output=True,
            text=True,
            env=env,
            cwd=ROOT,
        )
        if proc.returncode != 0:
            return {"error": (proc.stderr.strip().splitlines() or ["?"])[-1]}
        run = next(Path(out).iterdir())
        record = json.loads((run / "models" / "cnn.json").read_text())["training"]
    seconds = sum(row["seconds"] for row in record["history"])
    return {
        "samples_per_s": record["n_train"] * record["epochs_run"] / seconds,
        "seconds": seconds,
        "n_train": record["n_train"],
        "world_size": record["world_size"],
        "load": (load_before, os.getloadavg()[0]),
    }


def processes_table(workdir: Path, processes: list[int], *, batch: int, epochs: int) -> None:
    """Print samples/s per process count, non-DP and DP, with the scaling efficiency and the load."""
    n, shape = PROCESS_IMAGES
    _, npz = generate(workdir, 10, n, shape)
    print(f"central CNN training, {n} images {'x'.join(map(str, shape))}, batch {batch}, {epochs} epoch(s), ", end="")
    print(f"{os.cpu_count()} CPUs, torch threads per process 1")
    print(
        f"{'mode':<7} {'processes':>9} {'samples/s':>10} {'efficiency':>10} {'train s':>8}  load average (before, after)"
    )
    for dp in (False, True):
        base = None
        for p in processes:
            r = train_throughput(npz, processes=p, dp=dp, batch=batch, epochs=epochs)
            mode = "DP" if dp else "non-DP"
            if "error" in r:
                print(f"{mode:<7} {p:>9} failed: {r['error']}", flush=True)
                continue
            base = r["samples_per_s"] if p == 1 else base
            eff = f"{r['samples_per_s'] / (p * base):>10.2f}" if base else f"{'?':>10}"
            load = f"({r['load'][0]:.1f}, {r['load'][1]:.1f})"
            print(f"{mode:<7} {p:>9} {r['samples_per_s']:>10.0f} {eff} {r['seconds']:>8.1f}  {load}", flush=True)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=len(STEPS), help="how many of the growing sizes to run")
    ap.add_argument("--workdir", default="", help="where generated data goes (default: a temporary folder)")
    ap.add_argument("--processes", default="", help="e.g. 1,2: time training as that many processes instead")
    ap.add_argument("--batch", type=int, default=256, help="--processes: batch size, DP and non-DP alike")
    ap.add_argument("--epochs", type=int, default=1, help="--processes: epochs per run")
    ap.add_argument("--_step", nargs=3, help=argparse.SUPPRESS)  # internal: run one step in this process
    args = ap.parse_args(argv)
    if args._step:
        print(json.dumps(run_step(*args._step)))
        return
    if args.processes:
        with tempfile.TemporaryDirectory() as tmp:
            workdir = Path(args.workdir or tmp)
            workdir.mkdir(parents=True, exist_ok=True)
            processes_table(workdir, [int(p) for p in args.processes.split(",")], batch=args.batch, epochs=args.epochs)
        return
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(args.workdir or tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        head = f"{'rows':>9} {'images':>14} {'csv MB':>7} {'load_table MB':>13} " + " ".join(
            f"{s + ' s':>10} {'MB':>6}" for s in ("data", "train", "evaluate", "explain")
        )
        print(head, flush=True)
        for rows, n_images, shape in STEPS[: args.steps]:
            csv, npz = generate(workdir, rows, n_images, shape)
            env = {**os.environ, "PYTHONPATH": str(ROOT), "MPLBACKEND": "Agg"}
            proc = subprocess.run(
                [sys.executable, __file__, "--_step", str(csv), str(npz), str(min(1024, rows // 10))],
                capture_output=True,
                text=True,
                env=env,
            )
            if proc.returncode != 0:
                print(f"{rows:>9} failed:\n{proc.stderr[-2000:]}", flush=True)
                break
            r = json.loads(proc.stdout.strip().splitlines()[-1])
            lt = r["load_table"]
            cells = " ".join(
                f"{r[s]['seconds']:>10.2f} {r[s]['peak_rss_mb']:>6.0f}"
                for s in ("data", "train", "evaluate", "explain")
            )
            print(
                f"{rows:>9} {n_images:>6}x{'x'.join(map(str, shape)):<7} {r['csv_mb']:>7.1f} "
                f"{lt['peak_mb']:>6.0f} ({lt['peak_mb'] / r['csv_mb']:.1f}x) {cells}",
                flush=True,
            )
        print("MB = peak resident memory of the process during the stage (includes earlier stages' data)")


if __name__ == "__main__":
    main()
