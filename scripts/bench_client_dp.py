"""Accuracy vs user-level ε (DP-FedAvg) next to sample-level DP-SGD at the same ε, on embedded digits.

A light simulation (no Flower, no Ray: one process, seconds) of the same mechanisms the
federated app runs: :func:`core.user_privacy.dp_fedavg_aggregate` with Poisson client
sampling and the σ :func:`core.user_privacy.plan_user_dp` plans; for sample-level DP each
client runs DP-SGD (per-example clipping, Poisson batches) with σ planned by Opacus for all
its steps over all rounds. The model is multinomial logistic regression on the 64 pixel
features (per-example gradients are analytic), so the figures compare the mechanisms, not
the project's CNN.

    PYTHONPATH=$PWD .venv/bin/python scripts/bench_client_dp.py [--rounds 30] [--clients 10 100]

Prints one table: clients, ε, accuracy of user-level DP, accuracy of sample-level DP, and
the non-private FedAvg accuracy.
"""

from __future__ import annotations

import argparse
import functools
import logging
import time

import numpy as np
from opacus.accountants.utils import get_noise_multiplier
from sklearn.datasets import load_digits

from core.config import ClientDPConfig
from core.user_privacy import dp_fedavg_aggregate, plan_user_dp, poisson_sample

log = logging.getLogger("bench_client_dp")
LR, BATCH, LOCAL_EPOCHS = 0.5, 8, 1


def _data(seed: int):
    x, y = load_digits(return_X_y=True)
    x = x / 16.0
    rng = np.random.default_rng(seed)
    idx = rng.permutation(len(y))
    cut = int(0.8 * len(y))
    return x[idx[:cut]], y[idx[:cut]], x[idx[cut:]], y[idx[cut:]]


@functools.lru_cache(maxsize=None)
def _sigma(eps: float, q: float, steps: int) -> float:
    return float(
        get_noise_multiplier(target_epsilon=eps, target_delta=1e-5, sample_rate=q, steps=steps, accountant="rdp")
    )


def _grads(w, x, y):  # per-example gradients of softmax regression: (B, 65, 10)
    xb = np.hstack([x, np.ones((len(x), 1))])
    z = xb @ w
    p = np.exp(z - z.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    p[np.arange(len(y)), y] -= 1.0
    return xb[:, :, None] * p[:, None, :]


def _local(w, x, y, rng, *, sigma=0.0, clip=None, q=None):
    """One local epoch: plain SGD, or DP-SGD (Poisson batches of expected size BATCH, clipping, noise)."""
    w = w.copy()
    steps = max(1, len(y) // BATCH)
    for _ in range(steps * LOCAL_EPOCHS):
        if clip is None:
            b = rng.choice(len(y), size=min(BATCH, len(y)), replace=False)
            w -= LR * _grads(w, x[b], y[b]).mean(0)
        else:
            b = np.flatnonzero(rng.random(len(y)) < q)
            g = _grads(w, x[b], y[b]) if len(b) else np.zeros((0, *w.shape))
            norms = np.sqrt((g**2).sum((1, 2)))
            g = g * np.minimum(1.0, clip / np.maximum(norms, 1e-12))[:, None, None]
            noisy = g.sum(0) + rng.normal(0, sigma * clip, w.shape)
            w -= LR * noisy / (q * len(y))
    return w


def _acc(w, x, y):
    return float(((np.hstack([x, np.ones((len(x), 1))]) @ w).argmax(1) == y).mean())


def run(n_clients: int, eps: float | None, level: str, rounds: int, seed: int = 0) -> float:
    xtr, ytr, xte, yte = _data(seed)
    rng = np.random.default_rng(seed + 1)
    parts = np.array_split(rng.permutation(len(ytr)), n_clients)
    w = np.zeros((65, 10))
    q_user = 1.0 if n_clients <= 10 else 0.1
    delta_user = 0.1 / n_clients
    if level == "user":
        plan = plan_user_dp(
            ClientDPConfig(enabled=True, target_epsilon=eps, delta=delta_user, sample_rate=q_user, clipping_norm=0.5),
            rounds=rounds,
            n_clients=n_clients,
        )
    for _ in range(rounds):
        if level == "user":
            chosen = poisson_sample(list(range(n_clients)), sample_rate=plan.sample_rate, rng=rng)
            updates = [[_local(w, xtr[parts[c]], ytr[parts[c]], rng)] for c in chosen]
            [w], _ = dp_fedavg_aggregate(
                [w],
                updates,
                clipping_norm=plan.clipping_norm,
                noise_multiplier=plan.noise_multiplier,
                expected_clients=plan.expected_clients,
                rng=rng,
            )
            continue
        new, sizes = [], []
        for c in range(n_clients):
            x, y = xtr[parts[c]], ytr[parts[c]]
            if level == "sample":
                q = min(1.0, BATCH / len(y))
                steps = max(1, len(y) // BATCH) * LOCAL_EPOCHS * rounds
                sigma = _sigma(eps, q, steps)
                new.append(_local(w, x, y, rng, sigma=sigma, clip=1.0, q=q))
            else:
                new.append(_local(w, x, y, rng))
            sizes.append(len(y))
        w = np.average(np.stack(new), axis=0, weights=sizes)
    return _acc(w, xte, yte)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--clients", type=int, nargs="+", default=[10, 100])
    ap.add_argument("--eps", type=float, nargs="+", default=[1.0, 3.0, 8.0, 30.0])
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    print(f"digits, softmax regression, {args.rounds} rounds, 1 local epoch, batch {BATCH}, lr {LR}")
    print("user-level: C=0.5 on the update, q=1.0 (N<=10) or 0.1 (N>10), δ=0.1/N, RDP; sample-level: C=1, δ=1e-5, RDP")
    print(f"{'clients':>7} {'eps':>6} {'user-level acc':>15} {'sample-level acc':>17} {'non-private':>12} {'s':>6}")
    for n in args.clients:
        t0 = time.time()
        plain = run(n, None, "none", args.rounds)
        for eps in args.eps:
            user = run(n, eps, "user", args.rounds)
            sample = run(n, eps, "sample", args.rounds)
            print(f"{n:>7} {eps:>6g} {user:>15.3f} {sample:>17.3f} {plain:>12.3f} {time.time() - t0:>6.1f}", flush=True)


if __name__ == "__main__":
    main()
