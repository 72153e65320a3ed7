"""DP/non-DP epoch-time ratio of each Opacus per-sample engine, at the SAME batch size.

    python scripts/bench_dp_engines.py                  # CPU, both workloads, every engine
    python scripts/bench_dp_engines.py --device cuda --n 60000 --batch 256 1024

Workloads: synthetic 28x28 images with the CNN [32, 64] (batch 256), and the default digits
config (8x8, CNN [32, 64], hidden 64, tanh as under DP, batch 256). Engines: hooks, ew,
functorch (Opacus' per-sample engines), ghost (Opacus' fast gradient clipping with this
project's Conv2d norm sampler, auditml_core/privacy/ghost_conv.py) and bk (book-keeping clipping, auditml_core/privacy/bk.py). Each figure is the fastest of ``--reps``
timed epochs after one warm-up epoch; data is resident on the device and batches are indexed
there, exactly as auditml_core.training.fit does. A benchmark, not a test: it asserts nothing.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from auditml_core import allocator, models, seeds, training  # noqa: E402
from auditml_core.config import DPConfig  # noqa: E402
from auditml_core.privacy import dp_sgd as privacy  # noqa: E402

ENGINES = ("hooks", "ew", "functorch", "ghost", "bk")
log = logging.getLogger("bench_dp_engines")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def epoch_seconds(
    *,
    engine: str | None,
    build,
    x: torch.Tensor,
    y: torch.Tensor,
    batch_size: int,
    reps: int,
    device: torch.device,
) -> float:
    """Fastest of ``reps`` epochs (after a warm-up epoch) of non-DP (``engine=None``) or DP-SGD training."""
    torch.manual_seed(0)
    model = build().to(device).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    generator = seeds.make_generator("cpu", 0)  # batch order (non-DP) and Poisson sampling (DP)
    run_model, run_opt, criterion, run = model, optimizer, torch.nn.CrossEntropyLoss(), None
    if engine is not None:
        dp = DPConfig(enabled=True, noise_multiplier=1.0, target_epsilon=1e6, accountant="rdp")
        the_plan = privacy.plan(dp, n_samples=len(x), batch_size=batch_size, max_grad_norm=1.0, epochs=reps + 1)
        noise_gen = seeds.make_generator(device, 1)  # the noise lives on the parameters' device
        run = privacy.make_private(
            model,
            optimizer,
            torch.utils.data.TensorDataset(x, y),
            plan=the_plan,
            sampling_generator=generator,
            noise_generator=noise_gen,
            grad_sample_mode=engine,
            criterion=criterion,
        )
        run_model, run_opt, criterion = run.model, run.optimizer, run.criterion or criterion
    best = float("inf")
    for rep in range(reps + 1):
        if run is not None:
            batches = run.batches(x, y)
        else:
            order = training.shuffled_batches(len(x), batch_size, generator, device=x.device)  # one copy per epoch
            batches = ((x[i], y[i]) for i in order)
        _sync(device)
        t0 = time.perf_counter()
        training.train_one_epoch(run_model, run_opt, batches, task="classification", criterion=criterion)
        _sync(device)
        if rep > 0:
            best = min(best, time.perf_counter() - t0)
    if run is not None:
        run.close()
    return best


def bench(name: str, *, shape, n: int, batch_sizes, channels, hidden, activation, reps, device, engines) -> list[dict]:
    """Rows ``{workload, batch, engine, seconds, ratio, samples_per_s}`` for one workload.

    ``channels=None`` benchmarks the MLP (``hidden`` = its hidden sizes) on ``shape = (n_features,)``
    as a 10-class classifier (the regressor's layers; the loss does not change the engines' cost).
    """
    g = seeds.make_generator("cpu", 0)
    x = torch.randn(n, *shape, generator=g).to(device)
    y = torch.randint(0, 10, (n,), generator=g).to(device)

    def build():
        if channels is None:
            mlp = models.build_regressor(n_features=shape[0], hidden_sizes=hidden, activation=activation)
            mlp[-1] = torch.nn.Linear(mlp[-1].in_features, 10)
            return mlp
        return models.build_cnn(
            input_shape=shape, n_classes=10, channels=channels, hidden=hidden, activation=activation
        )

    def timed(engine, batch):
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        try:
            secs = epoch_seconds(engine=engine, build=build, x=x, y=y, batch_size=batch, reps=reps, device=device)
        except Exception as exc:  # a benchmark reports a failing engine and goes on
            log.warning("%s batch %d engine %s failed: %s: %s", name, batch, engine, type(exc).__name__, exc)
            secs = float("nan")
        peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else float("nan")
        return secs, peak

    rows = []
    for batch in batch_sizes:
        base, peak = timed(None, batch)
        rows.append({"workload": name, "batch": batch, "engine": "non-DP", "seconds": base, "peak_mb": peak})
        for engine in engines:
            secs, peak = timed(engine, batch)
            rows.append({"workload": name, "batch": batch, "engine": engine, "seconds": secs, "peak_mb": peak})
        for r in rows[-len(engines) - 1 :]:
            r["samples_per_s"] = n / r["seconds"]
            r["ratio"] = r["seconds"] / base
    return rows


def print_table(rows: list[dict]) -> None:
    gpu = any(r["peak_mb"] == r["peak_mb"] for r in rows)  # NaN on the CPU
    print(
        f"{'workload':<28} {'batch':>5} {'engine':<10} {'s/epoch':>9} {'samples/s':>11} {'DP/non-DP':>9}"
        + (f" {'peak GPU MB':>11}" if gpu else "")
    )
    for r in rows:
        print(
            f"{r['workload']:<28} {r['batch']:>5} {r['engine']:<10} {r['seconds']:>9.3f} "
            f"{r['samples_per_s']:>11.0f} {r['ratio']:>8.2f}x" + (f" {r['peak_mb']:>11.0f}" if gpu else "")
        )


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--n", type=int, default=2560, help="images per epoch for the 28x28 workload")
    ap.add_argument("--batch", type=int, nargs="+", default=[256], help="batch sizes (DP: expected Poisson batch)")
    ap.add_argument("--reps", type=int, default=2, help="timed epochs per figure (fastest is kept)")
    ap.add_argument("--engines", nargs="+", default=list(ENGINES), choices=ENGINES)
    ap.add_argument("--skip-digits", action="store_true", help="only the 28x28 workload")
    ap.add_argument(
        "--default-allocator",
        action="store_true",
        help="leave glibc's malloc as it comes (the pipeline keeps freed memory: auditml_core.allocator)",
    )
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    warnings.filterwarnings("ignore", message="Full backward hook is firing", category=UserWarning)
    warnings.filterwarnings("ignore", message="Secure RNG turned off", category=UserWarning)
    device = torch.device(args.device)
    torch.set_num_threads(1)  # as the pipeline's default train.num_threads
    if not args.default_allocator:
        print(f"allocator keeps freed memory (auditml_core.allocator): {allocator.keep_freed_memory()}")
    rows = bench(
        "synthetic 28x28 CNN[32,64]",
        shape=(1, 28, 28),
        n=args.n,
        batch_sizes=args.batch,
        channels=(32, 64),
        hidden=64,
        activation="relu",
        reps=args.reps,
        device=device,
        engines=args.engines,
    )
    if not args.skip_digits:
        rows += bench(
            "digits-like 8x8 default",
            shape=(1, 8, 8),
            n=1293,  # the default digits training split
            batch_sizes=[256],
            channels=(32, 64),
            hidden=64,
            activation="tanh",
            reps=args.reps,
            device=device,
            engines=args.engines,
        )
        rows += bench(
            "diabetes-like MLP [32]",
            shape=(10,),
            n=318,  # the default diabetes training split
            batch_sizes=[128],
            channels=None,
            hidden=(32,),
            activation="relu",
            reps=args.reps,
            device=device,
            engines=args.engines,
        )
    print_table(rows)
    return rows


if __name__ == "__main__":
    main()
