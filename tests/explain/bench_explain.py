"""Benchmark: seconds per explained row/image for each explainer, and the whole explain step.

Run ``python tests/explain/bench_explain.py`` from the repository root. Trains
a ~14k-parameter digits CNN and a 10-feature diabetes MLP for a few seconds,
then explains 100 images and 100 rows with the default options and runs the
quality metrics the pipeline's explain stage would run. Prints figures; asserts nothing.
"""

from __future__ import annotations

import functools
import sys
import time
from pathlib import Path

import numpy as np
import torch
from sklearn.datasets import load_diabetes, load_digits
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from explain import agreement, deletion_insertion, get_explainer, make_predict_fn, stability  # noqa: E402

torch.set_num_threads(1)
N_EXPLAIN, N_BACKGROUND, N_STEPS, N_STABILITY = 100, 50, 16, 20


def _train(model, x, y, loss_fn, *, epochs, seed):
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    model.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(xt), generator=gen).split(64):
            opt.zero_grad()
            loss_fn(model(xt[idx]), yt[idx]).backward()
            opt.step()
    return model.eval()


def main() -> None:
    torch.manual_seed(0)  # script only: weight init of the benchmark models
    digits = load_digits()
    xi = (digits.images / 16.0).astype(np.float32)[:, None]  # (N, 1, 8, 8)
    cnn = nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(128, 64),
        nn.ReLU(),
        nn.Linear(64, 10),
    )
    cnn = _train(cnn, xi[:1500], digits.target[:1500], nn.CrossEntropyLoss(), epochs=8, seed=0)
    acc = (make_predict_fn(cnn, task="classification")(xi[1500:]).argmax(1) == digits.target[1500:]).mean()
    print(f"CNN: {sum(p.numel() for p in cnn.parameters())} params, test accuracy {acc:.3f}")

    diab = load_diabetes()
    xt = ((diab.data - diab.data.mean(0)) / diab.data.std(0)).astype(np.float32)
    yt = ((diab.target - diab.target.mean()) / diab.target.std()).astype(np.float32)[:, None]
    mlp = nn.Sequential(nn.Linear(10, 32), nn.ReLU(), nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 1))
    mlp = _train(mlp, xt[:300], yt[:300], nn.MSELoss(), epochs=60, seed=0)

    rng = np.random.default_rng(0)
    cases = {
        "images": (
            cnn,
            "classification",
            xi[1500 : 1500 + N_EXPLAIN],
            xi[rng.choice(1500, N_BACKGROUND, replace=False)],
            ["shap-deep", "shap-gradient", "lime-image"],
        ),
        "rows": (
            mlp,
            "regression",
            xt[300 : 300 + N_EXPLAIN],
            xt[rng.choice(300, N_BACKGROUND, replace=False)],
            ["shap-deep", "shap-gradient", "shap-kernel", "lime-tabular"],
        ),
    }
    for kind, (model, task, x, bg, methods) in cases.items():
        predict = make_predict_fn(model, task=task)
        step = time.perf_counter()
        expls = {}
        for name in methods:
            e = get_explainer(name)(model, x, background=bg, task=task, seed=0)
            expls[name] = e
            t0 = time.perf_counter()
            r = deletion_insertion(e, predict, baseline=bg.mean(axis=0), n_steps=N_STEPS, seed=0)
            t_del = time.perf_counter() - t0
            print(
                f"{kind:6s} {name:13s} {e.seconds / len(x) * 1e3:7.1f} ms/row  (deletion/insertion {t_del:5.2f} s: "
                f"del gain {r.deletion_gain:+.3f}, ins gain {r.insertion_gain:+.3f}, win {r.deletion_win_rate:.2f})"
            )
        lime = "lime-image" if kind == "images" else "lime-tabular"
        t0 = time.perf_counter()
        k = 8 if kind == "images" else 3
        a = agreement(expls["shap-deep"], expls[lime], k=k)
        explain_fn = functools.partial(get_explainer(lime), model, background=bg, task=task)
        s = stability(explain_fn, x[:N_STABILITY], seeds=(0, 1, 2), k=k)
        print(
            f"{kind:6s} agreement deep vs lime top-{k} {a.mean_topk:.2f}, spearman {a.mean_spearman:.2f}, "
            f"flagged {len(a.flagged)}; lime stability ({N_STABILITY} rows x 3 seeds) mean {s.mean:.2f} min {s.min:.2f} "
            f"[{time.perf_counter() - t0:.2f} s]"
        )
        print(f"{kind:6s} whole step ({len(x)} explained, all methods + metrics): {time.perf_counter() - step:.1f} s")


if __name__ == "__main__":
    main()
