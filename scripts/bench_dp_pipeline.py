"""DP/non-DP epoch time of the digits CNN in the pipeline itself, at the same batch size.

    python scripts/bench_dp_pipeline.py              # 8 interleaved pairs
    python scripts/bench_dp_pipeline.py --pairs 4

Each pair runs ``python -m pipeline --stages data,train`` twice in fresh processes: once with
``dp.enabled=true`` (the CNN's DP schedule: batch 256, 40 epochs, tanh), once without DP on the same
schedule (``cnn.fit`` set to ``cnn.dp_fit``'s values, tanh, no augmentation). The same batch size:
under DP a batch of 256 is a Poisson rate q = 1/ceil(n/256), so the expected batch is n·q (215.6 for
the 1,078 training digits, 5 steps an epoch); the non-DP run takes that size, rounded, unless
``--non-dp-batch`` names another. It prints each run's ``training.seconds_per_epoch`` from
``models/cnn.json``, each pair's ratio and the median. Pairs are interleaved so that a drift in the
machine's load hits both sides alike. A benchmark, not a test: it asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from auditml_core.config import CNNConfig  # noqa: E402

QUICK_REGRESSOR = ["regressor.fit.epochs=1", "regressor.dp_fit.epochs=1"]  # only the CNN is timed
DP_FIT, DP_ACTIVATION = CNNConfig().dp_fit, CNNConfig().dp_activation  # the DP schedule, from the config defaults
NON_DP = [
    f"cnn.activation={DP_ACTIVATION}",
    f"cnn.fit.epochs={DP_FIT.epochs}",
    f"cnn.fit.lr={DP_FIT.lr}",
    f"cnn.fit.augment_shift={DP_FIT.augment_shift}",
]


def cnn_training(overrides: list[str]) -> dict:
    """One fresh ``data,train`` run; the CNN's training record (``models/cnn.json``)."""
    with tempfile.TemporaryDirectory() as out:
        cmd = [sys.executable, "-m", "pipeline", "--quiet", "--out", out, "--stages", "data,train"]
        subprocess.run([*cmd, *QUICK_REGRESSOR, *overrides], cwd=ROOT, check=True, capture_output=True)
        (record,) = Path(out).glob("*/models/cnn.json")
        return json.loads(record.read_text())["training"]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pairs", type=int, default=8, help="interleaved (DP, non-DP) pairs")
    ap.add_argument("--non-dp-batch", type=int, default=0, help="non-DP batch size (default: the DP expected batch)")
    args = ap.parse_args(argv)
    with open("/proc/loadavg") as f:
        print(f"load average at start: {' '.join(f.read().split()[:3])}")
    print(f"{'pair':>4} {'DP ms/epoch':>12} {'non-DP ms/epoch':>16} {'batch':>6} {'ratio':>6}")
    ratios = []
    for i in range(1, args.pairs + 1):
        private = cnn_training(["dp.enabled=true"])
        n = int(private["n_train"])
        batch = args.non_dp_batch or round(n / math.ceil(n / DP_FIT.batch_size))
        plain = cnn_training([*NON_DP, f"cnn.fit.batch_size={batch}"])
        ratios.append(private["seconds_per_epoch"] / plain["seconds_per_epoch"])
        print(
            f"{i:>4} {private['seconds_per_epoch'] * 1e3:>12.1f} {plain['seconds_per_epoch'] * 1e3:>16.1f} "
            f"{batch:>6} {ratios[-1]:>5.2f}x"
        )
    print(f"ratio median {statistics.median(ratios):.2f}x, range {min(ratios):.2f}-{max(ratios):.2f}x")


if __name__ == "__main__":
    main()
