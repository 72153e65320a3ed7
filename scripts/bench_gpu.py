"""One-run GPU check: the default pipeline per stage on CUDA, and DP vs non-DP throughput per engine.

    PYTHONPATH=$PWD MPLBACKEND=Agg python scripts/bench_gpu.py            # on the GPU machine
    python scripts/bench_gpu.py --quick                                   # fewer engines/batches
    python scripts/bench_gpu.py --compile                                 # also a torch.compile'd non-DP epoch

Prints, in one run:
0. each stage's device decision (auditml_core.placement) for the default config, non-DP and DP: on this
   machine, and as if CUDA were present;
1. the default pipeline (``python -m pipeline``, non-DP and ``dp.enabled=true``) with
   ``--device auto`` (the per-stage decision) and ``--device cuda`` (everything forced there): wall
   time, device and reason per stage from each run's manifest, or the error that stopped it;
2. 60k synthetic 28x28 images, CNN [32, 64]: non-DP and DP samples/s and their ratio at equal
   batch (256 and 1024), for each engine (hooks, ew, functorch, ghost, bk), with peak GPU memory;
3. with ``--compile``: the non-DP epoch of that workload with the model under ``torch.compile``
   (on a CPU-only machine: a small CPU version, or the error that stopped it).

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
        cells = ", ".join(
            f"{n} {s.get('seconds', float('nan')):.1f}s ({s.get('status')}"
            + (f", {s['device']['device']}" if isinstance(s.get("device"), dict) else "")
            + ")"
            for n, s in stages.items()
        )
        print(f"pipeline [{label}] on {device}: exit {proc.returncode}, {wall:.1f} s wall; {cells}")
        if proc.returncode != 0:
            print("  last error lines:\n  " + "\n  ".join(proc.stderr.strip().splitlines()[-6:]))
        for n, st in stages.items():
            if isinstance(st.get("device"), dict):
                print(f"  {n}: {st['device']['device']} ({st['device']['reason']})")


def device_decisions(overrides: list[str], *, cuda_available: bool | None) -> None:
    """Print each model-running stage's :class:`auditml_core.placement.Placement` for the config ``overrides``."""
    from auditml_core import config as config_mod
    from auditml_core import models, placement
    from auditml_core.seeds import stage_seed
    from auditml_core.teacher import model_specs
    from pipeline import runner

    cfg = config_mod.load_config(None, overrides)
    data = runner.stage_module("data").run(cfg, {}, seed=stage_seed(cfg.seed, "data"))
    specs = model_specs(cfg, data)
    builders = {n: (lambda spec=specs[n]: models.build(spec)) for n in models.MODELS}
    label = " ".join(overrides) or "default"
    where = "this machine" if cuda_available is None else f"CUDA {'present' if cuda_available else 'absent'}"
    print(f"device decisions [{label}] ({where}, train.device={cfg.train.device}):")
    for stage in placement.STAGES:
        p = runner.stage_module(stage).device_placement(cfg, data, builders, cuda_available=cuda_available)
        print(f"  {stage:<9} {p.device:<5} {p.reason}")


def compiled_epochs(*, n: int, batch_sizes: list[int], reps: int, device: torch.device) -> None:
    """Non-DP epochs of the 28x28 CNN [32, 64], eager and under ``torch.compile``; prints samples/s or the error."""
    import bench_dp_engines

    from auditml_core import models, seeds

    g = seeds.make_generator("cpu", 0)
    x = torch.randn(n, 1, 28, 28, generator=g).to(device)
    y = torch.randint(0, 10, (n,), generator=g).to(device)

    def build() -> torch.nn.Module:
        return models.build_cnn(input_shape=(1, 28, 28), n_classes=10, channels=(32, 64), hidden=64)

    for batch in batch_sizes:
        for label, make in (("eager", build), ("torch.compile", lambda: torch.compile(build()))):
            t0 = time.perf_counter()
            try:
                secs = bench_dp_engines.epoch_seconds(
                    engine=None, build=make, x=x, y=y, batch_size=batch, reps=reps, device=device
                )
            except Exception as exc:  # a benchmark reports what failed (no compiler, unsupported op) and goes on
                print(f"  {label:<14} batch {batch}: failed: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}")
                continue
            total = time.perf_counter() - t0
            print(
                f"  {label:<14} batch {batch}: {secs:.3f} s/epoch, {n / secs:,.0f} samples/s "
                f"(warm-up included, all epochs: {total:.1f} s)"
            )


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="batch 256 only, engines ew, ghost and bk")
    ap.add_argument("--n", type=int, default=60_000, help="synthetic 28x28 images per epoch")
    ap.add_argument("--reps", type=int, default=2, help="timed epochs per figure (fastest kept)")
    ap.add_argument("--pipeline-timeout", type=int, default=240, help="seconds allowed per pipeline run")
    ap.add_argument("--skip-pipeline", action="store_true")
    ap.add_argument("--compile", action="store_true", help="also time the non-DP epoch under torch.compile")
    ap.add_argument("--cpu-compile-n", type=int, default=2048, help="images for the --compile check without CUDA")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    warnings.filterwarnings("ignore", message="Full backward hook is firing", category=UserWarning)
    warnings.filterwarnings("ignore", message="Secure RNG turned off", category=UserWarning)
    print(f"torch {torch.__version__}, CUDA available: {torch.cuda.is_available()}")
    for overrides in ([], ["dp.enabled=true"]):
        device_decisions(overrides, cuda_available=None)
        if not torch.cuda.is_available():
            device_decisions(overrides, cuda_available=True)
    if not torch.cuda.is_available():
        print("no CUDA device: skipping the CUDA pipeline runs and the CUDA throughput table")
        if args.compile:
            print(f"torch.compile check on the CPU ({args.cpu_compile_n} images, 1 timed epoch):")
            torch.set_num_threads(1)
            compiled_epochs(n=args.cpu_compile_n, batch_sizes=[256], reps=1, device=torch.device("cpu"))
        return
    print(f"device: {torch.cuda.get_device_name(0)}")
    if not args.skip_pipeline:
        for overrides in ([], ["dp.enabled=true"]):
            for device in ("auto", "cuda"):
                pipeline_stages(overrides, device=device, timeout_s=args.pipeline_timeout)

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
    if args.compile:
        print(f"torch.compile, non-DP epoch, {args.n} 28x28 images, CNN [32, 64]:")
        compiled_epochs(n=args.n, batch_sizes=batches, reps=args.reps, device=device)


if __name__ == "__main__":
    main()
