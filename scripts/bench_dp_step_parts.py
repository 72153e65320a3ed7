"""Where a DP-SGD step's time goes, against the non-DP step at the same batch, on the CPU.

    python scripts/bench_dp_step_parts.py                   # the three workloads of bench_dp_engines
    python scripts/bench_dp_step_parts.py --engine ghost --workloads digits

Two tables, both in process CPU time (``time.process_time``, one thread), which a shared, loaded
machine disturbs less than wall time (the time the process waits for a core is not counted; cache
and memory-bandwidth contention still are), with the wall time beside it:

1. epochs: non-DP and DP epochs *interleaved* in one process (so load drifts hit both alike), the
   fastest of ``--reps`` each, and their ratio;
2. parts of one step on a fixed batch (fastest of ``--steps``): forward, backward, the clipped sum
   (``clip_and_accumulate``), Opacus' noise, scaling + accountant, the inner optimizer; and the
   page faults (fresh memory from the OS) of each step, mean.

Workloads are those of ``scripts/bench_dp_engines.py``. A benchmark, not a test: it asserts nothing.
"""

from __future__ import annotations

import argparse
import resource
import statistics
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

# name: (input shape, records, batch, conv channels or None for the MLP, hidden, activation)
WORKLOADS = {
    "cnn28": ((1, 28, 28), 2560, 256, (32, 64), 64, "relu"),
    "digits": ((1, 8, 8), 1293, 256, (32, 64), 64, "tanh"),
    "mlp": ((10,), 318, 128, None, (32,), "relu"),
}


def _build(shape, channels, hidden, activation) -> torch.nn.Module:
    torch.manual_seed(0)
    if channels is None:
        mlp = models.build_regressor(n_features=shape[0], hidden_sizes=hidden, activation=activation)
        mlp[-1] = torch.nn.Linear(mlp[-1].in_features, 10)
        return mlp
    return models.build_cnn(input_shape=shape, n_classes=10, channels=channels, hidden=hidden, activation=activation)


def _private(model, x, y, batch, engine, epochs):
    dp = DPConfig(enabled=True, noise_multiplier=1.0, target_epsilon=1e6, accountant="rdp")
    plan = privacy.plan(dp, n_samples=len(x), batch_size=batch, max_grad_norm=1.0, epochs=epochs)
    return privacy.make_private(
        model,
        torch.optim.Adam(model.parameters(), lr=1e-3),
        torch.utils.data.TensorDataset(x, y),
        plan=plan,
        sampling_generator=seeds.make_generator("cpu", 0),
        noise_generator=seeds.make_generator("cpu", 1),
        grad_sample_mode=engine,
        criterion=torch.nn.CrossEntropyLoss(),
    )


def epochs(name: str, engine: str, reps: int) -> dict[str, float]:
    """Fastest wall and CPU seconds of interleaved non-DP and DP epochs."""
    shape, n, batch, channels, hidden, activation = WORKLOADS[name]
    g = seeds.make_generator("cpu", 0)
    x, y = torch.randn(n, *shape, generator=g), torch.randint(0, 10, (n,), generator=g)
    plain = _build(shape, channels, hidden, activation)
    plain_opt = torch.optim.Adam(plain.parameters(), lr=1e-3)
    run = _private(_build(shape, channels, hidden, activation), x, y, batch, engine, epochs=1000)
    crit = run.criterion or torch.nn.CrossEntropyLoss()
    inner = 1 if n * shape[-1] > 10_000 else 50  # time tiny epochs 50 at a time

    def plain_epoch():
        order = training.shuffled_batches(n, batch, g)
        training.train_one_epoch(plain, plain_opt, ((x[i], y[i]) for i in order), task="classification")

    def dp_epoch():
        training.train_one_epoch(run.model, run.optimizer, run.batches(x, y), task="classification", criterion=crit)

    out = {"non-DP wall": float("inf"), "non-DP cpu": float("inf"), "DP wall": float("inf"), "DP cpu": float("inf")}
    for rep in range(reps + 1):
        for key, fn in (("non-DP", plain_epoch), ("DP", dp_epoch)):
            t, c = time.perf_counter(), time.process_time()
            for _ in range(inner):
                fn()
            if rep > 0:  # the first round warms up
                out[f"{key} wall"] = min(out[f"{key} wall"], (time.perf_counter() - t) / inner)
                out[f"{key} cpu"] = min(out[f"{key} cpu"], (time.process_time() - c) / inner)
    run.close()
    return out


def step_parts(name: str, engine: str, steps: int) -> dict[str, tuple[float, float]]:
    """``{part: (fastest CPU ms, mean page faults)}`` of one non-DP and one DP step on a fixed batch."""
    shape, n, batch, channels, hidden, activation = WORKLOADS[name]
    g = seeds.make_generator("cpu", 0)
    x, y = torch.randn(n, *shape, generator=g), torch.randint(0, 10, (n,), generator=g)
    crit = torch.nn.CrossEntropyLoss()
    plain = _build(shape, channels, hidden, activation)
    plain_opt = torch.optim.Adam(plain.parameters(), lr=1e-3)
    run = _private(_build(shape, channels, hidden, activation), x, y, batch, engine, epochs=10_000)
    model, opt, dp_crit = run.model, run.optimizer, run.criterion or crit
    xb, yb = x[:batch], y[:batch]
    cpu: dict[str, list[float]] = {}
    faults: dict[str, list[int]] = {}

    def mark():
        return time.process_time(), resource.getrusage(resource.RUSAGE_SELF).ru_minflt

    def timed(prefix: str, parts) -> None:
        """Run ``parts`` (``(name, fn)``, in order) and record each one's CPU time and faults, and their sum."""
        marks = [mark()]
        for _, fn in parts:
            fn()
            marks.append(mark())
        for (part, _), (c0, f0), (c1, f1) in zip(parts, marks, marks[1:]):
            cpu.setdefault(f"{prefix} {part}", []).append(c1 - c0)
            faults.setdefault(f"{prefix} {part}", []).append(f1 - f0)
        cpu.setdefault(f"{prefix} step", []).append(marks[-1][0] - marks[0][0])
        faults.setdefault(f"{prefix} step", []).append(marks[-1][1] - marks[0][1])

    state: dict = {}

    def forward(m, o, criterion):
        o.zero_grad(set_to_none=True)
        state["loss"] = criterion(m(xb), yb)

    def scale_and_account():
        opt.scale_grad()
        if opt.step_hook:
            opt.step_hook(opt)

    backward = ("backward", lambda: state["loss"].backward())
    for _ in range(steps + 2):
        timed("non-DP", [("forward", lambda: forward(plain, plain_opt, crit)), backward, ("optimizer", plain_opt.step)])
        timed(
            "DP",
            [
                ("forward", lambda: forward(model, opt, dp_crit)),
                backward,
                ("clipped sum", opt.clip_and_accumulate),
                ("noise", opt.add_noise),
                ("scale + accountant", scale_and_account),
                ("optimizer", opt.original_optimizer.step),
            ],
        )
    run.close()
    return {k: (min(v[2:]) * 1e3, statistics.mean(faults[k][2:])) for k, v in cpu.items()}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--engine", default="bk", help="dp.grad_sample_mode to measure (default bk)")
    ap.add_argument("--workloads", nargs="+", default=list(WORKLOADS), choices=list(WORKLOADS))
    ap.add_argument("--reps", type=int, default=5, help="interleaved timed epochs of each (fastest kept)")
    ap.add_argument("--steps", type=int, default=10, help="timed steps for the parts (fastest kept)")
    ap.add_argument(
        "--default-allocator",
        action="store_true",
        help="leave glibc's malloc as it comes (the pipeline keeps freed memory: auditml_core.allocator)",
    )
    args = ap.parse_args(argv)
    warnings.filterwarnings("ignore", message="Full backward hook is firing", category=UserWarning)
    torch.set_num_threads(1)
    if not args.default_allocator:
        print(f"allocator keeps freed memory (auditml_core.allocator): {allocator.keep_freed_memory()}")
    with open("/proc/loadavg") as f:
        print(f"load average at start: {' '.join(f.read().split()[:3])}")
    print(f"{'workload':<8} {'non-DP cpu ms':>13} {'DP cpu ms':>10} {'ratio cpu':>9} {'ratio wall':>10}")
    for name in args.workloads:
        e = epochs(name, args.engine, args.reps)
        print(
            f"{name:<8} {e['non-DP cpu'] * 1e3:>13.2f} {e['DP cpu'] * 1e3:>10.2f} "
            f"{e['DP cpu'] / e['non-DP cpu']:>8.2f}x {e['DP wall'] / e['non-DP wall']:>9.2f}x"
        )
    for name in args.workloads:
        print(f"\n{name}: one step, batch {WORKLOADS[name][2]} ({args.engine})")
        for part, (ms, faults) in step_parts(name, args.engine, args.steps).items():
            print(f"  {part:<24} {ms:>9.3f} ms cpu  {faults:>8.0f} page faults")


if __name__ == "__main__":
    main()
