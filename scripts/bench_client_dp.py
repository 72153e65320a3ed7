"""Accuracy vs user-level ε (DP-FedAvg) next to sample-level DP-SGD at the same ε, on embedded digits.

A light simulation (no Flower, no Ray: one process, seconds) of the same mechanisms the
federated app runs: :func:`auditml_core.privacy.user_level.dp_fedavg_aggregate` with Poisson client
sampling and the σ :func:`auditml_core.privacy.user_level.plan_user_dp` plans; for sample-level DP each
client runs DP-SGD (per-example clipping, Poisson batches) with σ planned by Opacus for all
its steps over all rounds. The model is multinomial logistic regression on the 64 pixel
features (per-example gradients are analytic), so the figures compare the mechanisms, not
the project's CNN.

    PYTHONPATH=$PWD .venv/bin/python scripts/bench_client_dp.py [--rounds 30] [--clients 10 100 1000]

Digits has 1,437 training rows: below 10 rows per client (1,000 clients: 1.4) the row uses generated
data instead, ``make_classification`` with 64 features, 10 classes and ``--rows-per-client``
rows per client (plus a 20 % test set), so every client holds a realistic handful of records.

User-level DP runs twice: server noise (σ·C on the sum) and client noise as the SecAgg+ path
adds it (:func:`auditml_core.privacy.client_noise.noisy_upload` on every client, sampled or not, std σ·C/√t with
``t`` the federation's default minimum of uploads, :func:`federated.app.secagg.min_survivors`;
no dropouts, SecAgg+'s quantisation, ~1e-6 per coordinate, not simulated).

Prints one table: clients, data, ε, accuracy of user-level DP (server noise, client noise),
sample-level DP, and the non-private FedAvg accuracy.
"""

from __future__ import annotations

import argparse
import functools
import logging
import time

import numpy as np
from opacus.accountants.utils import get_noise_multiplier
from sklearn.datasets import load_digits, make_classification

from auditml_core.config import ClientDPConfig, load_config
from auditml_core.privacy.client_noise import noisy_upload
from auditml_core.privacy.user_level import dp_fedavg_aggregate, plan_user_dp, poisson_sample
from federated.app.secagg import min_survivors

log = logging.getLogger("bench_client_dp")
LR, BATCH, LOCAL_EPOCHS = 0.5, 8, 1


MIN_DIGITS_ROWS = 10  # below this many digits rows per client (1,000 clients: 1.4) a row uses generated data


def _data(seed: int, n_clients: int = 1, rows_per_client: int = 30):
    """(x_train, y_train, x_test, y_test) and the data's name: digits, or generated when it is too small."""
    x, y = load_digits(return_X_y=True)
    x = x / 16.0
    if 0.8 * len(y) / n_clients < MIN_DIGITS_ROWS:
        n = int(n_clients * rows_per_client / 0.8)
        x, y = make_classification(
            n_samples=n,
            n_features=64,
            n_informative=24,
            n_redundant=8,
            n_classes=10,
            n_clusters_per_class=2,
            class_sep=1.5,
            random_state=seed,
        )
        x = (x - x.mean(0)) / x.std(0) / 4.0  # digits-like scale
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


def _client_noise_round(w, plan, t, parts, xtr, ytr, rng):
    """One round as the SecAgg+ path runs it under client noise: every client uploads clip(update) or 0, + noise."""
    chosen = set(poisson_sample(list(range(len(parts))), sample_rate=plan.sample_rate, rng=rng))
    std = plan.noise_multiplier * plan.clipping_norm / np.sqrt(t)
    total = np.zeros_like(w)
    for c in range(len(parts)):
        local = [_local(w, xtr[parts[c]], ytr[parts[c]], rng)] if c in chosen else None
        upload, _ = noisy_upload([w], local, clipping_norm=plan.clipping_norm, noise_std=std, rng=rng)
        total += upload[0]
    return w + total / plan.expected_clients


def run(n_clients: int, eps: float | None, level: str, rounds: int, seed: int = 0, rows_per_client: int = 30) -> float:
    xtr, ytr, xte, yte = _data(seed, n_clients, rows_per_client)
    rng = np.random.default_rng(seed + 1)
    parts = np.array_split(rng.permutation(len(ytr)), n_clients)
    w = np.zeros((65, 10))
    q_user = 1.0 if n_clients <= 10 else 0.1
    delta_user = 0.1 / n_clients
    if level in ("user", "user-client"):
        plan = plan_user_dp(
            ClientDPConfig(enabled=True, target_epsilon=eps, delta=delta_user, sample_rate=q_user, clipping_norm=0.5),
            rounds=rounds,
            n_clients=n_clients,
        )
    for _ in range(rounds):
        if level == "user-client":
            w = _client_noise_round(w, plan, _t(n_clients), parts, xtr, ytr, rng)
            continue
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


@functools.lru_cache(maxsize=None)
def _t(n_clients: int) -> int:
    """The federation's default minimum of uploads per round (SecAgg+ threshold, federated.min_clients)."""
    cfg = load_config(
        None, ["train.mode=federated", f"federated.n_clients={n_clients}", "federated.secure_aggregation=true"]
    )
    return min_survivors(cfg)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--clients", type=int, nargs="+", default=[10, 100, 1000])
    ap.add_argument("--eps", type=float, nargs="+", default=[1.0, 3.0, 8.0])
    ap.add_argument("--rows-per-client", type=int, default=30, help="generated data: rows per client")
    ap.add_argument("--no-client-noise", action="store_true", help="skip the client-noise column")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    print(f"softmax regression, {args.rounds} rounds, 1 local epoch, batch {BATCH}, lr {LR}")
    print("user-level: C=0.5 on the update, q=1.0 (N<=10) or 0.1 (N>10), δ=0.1/N, RDP; sample-level: C=1, δ=1e-5, RDP")
    print("client noise: every client adds σC/√t, t = the default minimum of uploads (SecAgg+ threshold 0.5·N)")
    print(
        f"{'clients':>7} {'data':>10} {'t':>5} {'eps':>5} {'user (server noise)':>20} {'user (client noise)':>20} "
        f"{'sample-level':>13} {'non-private':>12} {'s':>6}"
    )
    for n in args.clients:
        t0 = time.time()
        data = "digits" if 0.8 * len(load_digits().target) / n >= MIN_DIGITS_ROWS else f"gen {args.rows_per_client}/cl"
        plain = run(n, None, "none", args.rounds, rows_per_client=args.rows_per_client)
        for eps in args.eps:
            user = run(n, eps, "user", args.rounds, rows_per_client=args.rows_per_client)
            client = (
                float("nan")
                if args.no_client_noise
                else run(n, eps, "user-client", args.rounds, rows_per_client=args.rows_per_client)
            )
            sample = run(n, eps, "sample", args.rounds, rows_per_client=args.rows_per_client)
            print(
                f"{n:>7} {data:>10} {_t(n):>5} {eps:>5g} {user:>20.3f} {client:>20.3f} {sample:>13.3f} "
                f"{plain:>12.3f} {time.time() - t0:>6.1f}",
                flush=True,
            )


if __name__ == "__main__":
    main()
