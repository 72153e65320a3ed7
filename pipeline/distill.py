"""Stage ``distill``: compress each teacher into a small student and measure how faithful it is.

- CNN teacher -> student CNN (>= 10x fewer parameters) trained on the temperature-softened
  KL divergence to the teacher, scaled by T^2 (Hinton et al.), optionally mixed with the label loss.
- MLP teacher -> small MLP student on the teacher's predictions, and an interpretable
  decision-tree student whose fidelity to the teacher is reported.

Privacy rule: a student inherits its teacher's (ε, δ) only by post-processing, i.e. when its
training touches nothing private except the DP teacher's outputs. Under DP the default transfer
set is therefore the split declared public (plus, for tables, synthetic jitter of it; for images,
teacher-labelled augmentations and mixups of public images, ``distill.augment_*`` / ``mixup_*``)
with no private labels. Choosing private transfer data either trains the student with its own DP-SGD
(budgets add) or leaves it with no DP guarantee; the record says which.
"""

from __future__ import annotations

import dataclasses
import io
import logging
import time
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import numpy as np
import torch
from sklearn.tree import DecisionTreeRegressor, export_text
from torch import nn

from auditml_core import models, placement, training
from auditml_core.artifacts import json_bytes, read_json, read_state_dict, state_dict_bytes
from auditml_core.config import Config
from auditml_core.data import Dataset
from auditml_core.errors import DataError, TrainingDivergedError
from auditml_core.privacy import dp_sgd as privacy
from auditml_core.seeds import derive_seed
from auditml_core.teacher import TrainedModel, planned_builders
from explain import compare_variants
from pipeline.evaluate import bootstrap_cis, r2
from pipeline.explain_stage import primary_method
from pipeline.train import diverged

log = logging.getLogger(__name__)


class DistillationLoss(nn.Module):
    """``(1 - w) * T^2 * KL(softmax(t/T) || softmax(s/T)) + w * CE(s, label)``.

    The target ``y`` is (B, K + 1): the teacher's logits and, in the last column, the label
    (ignored when ``label_weight`` is 0).
    """

    def __init__(self, *, temperature: float, label_weight: float = 0.0, reduction: str = "mean"):
        super().__init__()
        self.temperature, self.label_weight = temperature, label_weight
        self.reduction = reduction  # "mean" or "none" (per-sample losses, as ghost clipping asks)

    def forward(self, student_logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        t = self.temperature
        teacher_logits, labels = y[:, :-1], y[:, -1].long()
        kd = (
            nn.functional.kl_div(
                nn.functional.log_softmax(student_logits / t, dim=1),
                nn.functional.log_softmax(teacher_logits / t, dim=1),
                reduction="none",
                log_target=True,
            ).sum(dim=1)
            * t
            * t
        )  # (B,)
        if self.label_weight > 0:
            ce = nn.functional.cross_entropy(student_logits, labels, reduction="none")  # (B,)
            kd = (1 - self.label_weight) * kd + self.label_weight * ce
        return kd if self.reduction == "none" else kd.mean()


@dataclass(frozen=True)
class Transfer:
    """The student's training inputs and where they came from (for the privacy rule)."""

    x: np.ndarray
    source_index: np.ndarray  # row numbers in the source data of the real rows used
    splits: tuple[str, ...]
    labels: np.ndarray | None  # real labels, only when a label loss is used
    synthetic_rows: int
    synthetic_from: tuple[str, ...] = ()  # splits whose rows were jittered into the synthetic rows
    # (synthetic rows, 2) source-row numbers of each synthetic row's parent(s); -1 = no second parent
    synthetic_parents: np.ndarray | None = None
    synthetic_method: str = ""  # how the synthetic rows were made (for the record and the privacy statement)


def transfer_set(cfg: Config, ds: Dataset, *, seed: int) -> Transfer:
    """Choose the student's inputs according to ``distill.transfer`` and the teacher's privacy."""
    k = cfg.distill
    mode = k.transfer
    if mode == "auto":
        mode = "public" if cfg.dp.enabled else "private"
    splits = ("public",) if mode == "public" else ("train", "public")
    x = np.concatenate([ds.x[s] for s in splits])
    index = np.concatenate([ds.index[s] for s in splits])
    if len(x) == 0:
        raise DataError(
            "the public split is empty, so a student cannot be distilled without private data; raise data.public_fraction"
        )
    labels = np.concatenate([ds.y[s] for s in splits]) if k.label_weight > 0 else None
    synthetic, jittered = 0, ()
    if ds.task == "regression" and k.synthetic_per_row > 0:
        # Synthetic inputs: jittered copies of transfer rows, labelled later by the teacher only. When the
        # student's own DP-SGD reads private rows, jittered copies of a private row would enter DP-SGD as
        # independent records (group privacy of size 1 + synthetic_per_row, no per-record bound): only
        # public rows are jittered then.
        jittered = ("public",) if (mode == "private" and cfg.dp.enabled and k.student_dp) else splits
        base = np.concatenate([ds.x[s] for s in jittered])
        rng = np.random.default_rng(seed)
        jitter = np.repeat(base, k.synthetic_per_row, axis=0)
        jitter = (jitter + rng.normal(scale=k.synthetic_noise, size=jitter.shape)).astype(np.float32)
        synthetic = len(jitter)
        x = np.concatenate([x, jitter])
        if labels is not None:
            base_labels = np.concatenate([ds.y[s] for s in jittered])
            labels = np.concatenate([labels, np.repeat(base_labels, k.synthetic_per_row)])
    parents, method = None, ""
    if synthetic:
        base_index = np.concatenate([ds.index[s] for s in jittered])
        parents = np.stack([np.repeat(base_index, k.synthetic_per_row), np.full(synthetic, -1)], axis=1)
        method = f"Gaussian jitter (std {k.synthetic_noise:g}) of {', '.join(jittered)} rows"
    if ds.task == "classification" and cfg.dp.enabled and mode == "public":
        images = _image_augmentations(cfg, ds, seed=seed)
        if images is not None:
            x_aug, parents, method = images
            synthetic, jittered = len(x_aug), ("public",)
            x = np.concatenate([x, x_aug])
            if labels is not None:  # public labels of the parent(s): the first parent's
                labels = np.concatenate([labels, ds.y["public"][np.searchsorted(ds.index["public"], parents[:, 0])]])
    return Transfer(
        x=x.astype(np.float32),
        source_index=np.sort(index),
        splits=splits,
        labels=labels,
        synthetic_rows=synthetic,
        synthetic_from=tuple(jittered),
        synthetic_parents=parents,
        synthetic_method=method,
    )


def augment_images(
    x: np.ndarray,
    rng: np.random.Generator,
    *,
    per_row: int,
    shift: float,
    rotation: float,
    scale: float,
    noise: float,
) -> tuple[np.ndarray, np.ndarray]:
    """``per_row`` randomly shifted, rotated, zoomed and noised copies of each image of ``x`` (N, C, H, W).

    Each copy is computed from its parent image alone (a per-image affine warp, bilinear, the
    uncovered area filled with the image's own minimum, i.e. its background, plus Gaussian noise):
    nothing else, no dataset statistic, enters it.

    Returns
    -------
    ``(copies (N * per_row, C, H, W) float32, parent (N * per_row,) row numbers in x)``
    """
    parent = np.repeat(np.arange(len(x)), per_row)
    m = len(parent)
    if m == 0:
        return np.zeros((0, *x.shape[1:]), np.float32), parent
    _, c, h, w = x.shape
    angle = np.deg2rad(rng.uniform(-rotation, rotation, m))
    zoom = rng.uniform(1 - scale, 1 + scale, m)
    # translation in affine_grid's normalised coordinates (align_corners=False: the image spans [-1, 1])
    tx, ty = rng.uniform(-shift, shift, m) * 2 / w, rng.uniform(-shift, shift, m) * 2 / h
    cos, sin = np.cos(angle) / zoom, np.sin(angle) / zoom
    theta = torch.as_tensor(
        np.stack([np.stack([cos, -sin, tx], 1), np.stack([sin, cos, ty], 1)], 1), dtype=torch.float32
    )
    src = torch.as_tensor(x[parent], dtype=torch.float32)  # (M, C, H, W)
    floor = src.amin(dim=(1, 2, 3), keepdim=True)
    grid = nn.functional.affine_grid(theta, [m, c, h, w], align_corners=False)
    warped = nn.functional.grid_sample(src - floor, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    out = (
        (warped + floor).numpy() + rng.normal(scale=noise, size=(m, c, h, w)) if noise > 0 else (warped + floor).numpy()
    )
    return out.astype(np.float32), parent


def mixup_images(
    x: np.ndarray, rng: np.random.Generator, *, per_row: int, alpha: float
) -> tuple[np.ndarray, np.ndarray]:
    """``per_row * N`` mixups ``λ x_i + (1 - λ) x_j`` of random pairs of images of ``x``, λ ~ Beta(α, α).

    Returns
    -------
    ``(mixups (M, C, H, W) float32, parents (M, 2) row numbers in x)``
    """
    m = len(x) * per_row
    pairs = rng.integers(0, len(x), size=(m, 2)) if len(x) else np.zeros((0, 2), np.int64)
    lam = rng.beta(alpha, alpha, size=m)[:, None, None, None]
    return (lam * x[pairs[:, 0]] + (1 - lam) * x[pairs[:, 1]]).astype(np.float32), pairs


def _image_augmentations(cfg: Config, ds: Dataset, *, seed: int) -> tuple[np.ndarray, np.ndarray, str] | None:
    """Synthetic inputs for a DP teacher's image student, made from the public split only.

    The teacher labels them (post-processing of its DP weights), so the student still reads nothing
    the teacher's guarantee does not cover. Returns ``(images, parents (M, 2) source-row numbers,
    description)``, or None when none are configured.
    """
    k = cfg.distill
    if k.augment_per_row == 0 and k.mixup_per_row == 0:
        return None
    public, public_index = ds.x["public"], ds.index["public"]
    rng = np.random.default_rng(seed)
    x_aug, parent = augment_images(
        public,
        rng,
        per_row=k.augment_per_row,
        shift=k.augment_shift,
        rotation=k.augment_rotation,
        scale=k.augment_scale,
        noise=k.augment_noise,
    )
    x_mix, pairs = mixup_images(public, rng, per_row=k.mixup_per_row, alpha=k.mixup_alpha)
    parents = np.concatenate(
        [np.stack([public_index[parent], np.full(len(parent), -1)], axis=1), public_index[pairs].reshape(-1, 2)]
    ).astype(np.int64)
    parts = []
    if k.augment_per_row:
        parts.append(
            f"{len(x_aug)} augmentations (shift <= {k.augment_shift:g} px, rotation <= {k.augment_rotation:g} deg, "
            f"zoom <= {k.augment_scale:g}, pixel noise std {k.augment_noise:g})"
        )
    if k.mixup_per_row:
        parts.append(f"{len(x_mix)} mixups of two images (Beta({k.mixup_alpha:g}, {k.mixup_alpha:g}))")
    method = " and ".join(parts) + " of public images"
    return np.concatenate([x_aug, x_mix]), parents, method


def composed_privacy(cfg: Config, student: Mapping[str, Any], teacher: Mapping[str, Any] | None) -> dict[str, Any]:
    """The per-record guarantee of a student trained with its own DP-SGD on private rows.

    A private training record reaches the student twice: through the DP teacher's weights and as
    one record of the student's DP-SGD (each private row enters once; synthetic rows come from
    public rows only, see :func:`transfer_set`). Basic composition: ε and δ both add.
    """
    teacher = teacher or {}
    eps = float(student["epsilon"]) + float(teacher.get("epsilon", 0.0))
    delta = float(student["delta"]) + float(teacher.get("delta", 0.0))
    return {
        "guarantee": "composed",
        "student_epsilon": student["epsilon"],
        "student_delta": student["delta"],
        "teacher_epsilon": teacher.get("epsilon"),
        "teacher_delta": teacher.get("delta"),
        "epsilon": eps,
        "delta": delta,
        "composition": "basic (ε and δ add)",
        "target_epsilon": cfg.dp.target_epsilon,
        "over_budget": eps > cfg.dp.target_epsilon,
        "reason": "each private record is one row of the student's transfer set (synthetic rows are jittered from "
        "public rows only) and the student's own DP-SGD accounts every pass over it; its (ε, δ) adds to the "
        "teacher's (basic composition)",
    }


def transfer_provenance(transfer: Transfer) -> str:
    """Where the student's inputs came from, in words: "the public split + N teacher-labelled augmentations of it"."""
    what = " + ".join("the public split" if s == "public" else f"the {s} split" for s in transfer.splits)
    if not transfer.synthetic_rows:
        return what
    of_it = "it" if transfer.synthetic_from == transfer.splits else " + ".join(transfer.synthetic_from) + " rows"
    return f"{what} + {transfer.synthetic_rows} teacher-labelled synthetic rows made from {of_it} only: {transfer.synthetic_method}"


def tree_rows(
    cfg: Config, ds: Dataset, transfer: Transfer, teacher_privacy: Mapping[str, Any] | None
) -> tuple[np.ndarray, dict[str, Any]]:
    """Which transfer rows the decision-tree student may be fitted on, and the guarantee that leaves it.

    A tree's split thresholds are midpoints between its input values and it is fitted without
    DP, so under DP it sees only public rows (and synthetic rows jittered from public rows),
    labelled by the DP teacher: post-processing keeps the teacher's (ε, δ). Without DP it uses the
    whole transfer set. Rows of :func:`transfer_set` are [the real rows of ``splits`` in order,
    then the synthetic rows, whose source rows ``synthetic_parents`` records (-1: no parent)].
    """
    n = len(transfer.x)
    if not (cfg.dp.enabled and teacher_privacy):
        return np.ones(n, dtype=bool), {"guarantee": "none", "reason": "the teacher has no sample-level DP guarantee"}
    mask = np.zeros(n, dtype=bool)
    start = 0
    for split in transfer.splits:
        mask[start : start + len(ds.x[split])] = split == "public"
        start += len(ds.x[split])
    parents = transfer.synthetic_parents
    if transfer.synthetic_rows:  # a synthetic row is public when every parent it was made from is a public row
        if parents is None or len(parents) != n - start:
            raise AssertionError(f"transfer layout mismatch: {start} real rows and {transfer.synthetic_rows} synthetic")
        mask[start:] = np.all((parents == -1) | np.isin(parents, ds.index["public"]), axis=1)
        start = n
    if start != n:
        raise AssertionError(f"transfer layout mismatch: {start} rows accounted of {n}")
    return mask, {
        "guarantee": "inherited",
        "epsilon": teacher_privacy["epsilon"],
        "delta": teacher_privacy["delta"],
        "reason": "fitted without DP on public rows only (and synthetic rows jittered from them), labelled by the "
        "DP teacher: post-processing keeps the teacher's (ε, δ); private transfer rows are left out",
    }


def privacy_status(cfg: Config, transfer: Transfer, teacher: Mapping[str, Any]) -> dict[str, Any]:
    """What DP guarantee the student carries, and why."""
    teacher_privacy = teacher.get("privacy")
    private_inputs = "train" in transfer.splits
    if not cfg.dp.enabled or not teacher_privacy:
        if teacher.get("user_level_privacy"):  # federated DP-FedAvg only: a whole-client guarantee, no record-level one
            return {
                "guarantee": "none",
                "reason": "the teacher has only a user-level (whole-client, DP-FedAvg) guarantee and no sample-level "
                "one (dp.enabled = false); the student is not covered by it",
            }
        return {"guarantee": "none", "reason": "the teacher was trained without differential privacy"}
    if not private_inputs:  # public labels, if used, are public
        return {
            "guarantee": "inherited",
            "epsilon": teacher_privacy["epsilon"],
            "delta": teacher_privacy["delta"],
            "reason": f"the student saw only {transfer_provenance(transfer)}, labelled by the DP teacher: "
            "post-processing keeps the teacher's (ε, δ)",
        }
    if cfg.distill.student_dp:
        return {
            "guarantee": "composed",
            "reason": "the student read private records and was trained with its own DP-SGD; "
            "the budgets add (basic composition)",
        }
    return {
        "guarantee": "none",
        "reason": "the student read private training records (distill.transfer=private) "
        "without DP: it carries NO differential-privacy guarantee",
    }


def _latency_ms(fn, x: np.ndarray, *, repeats: int = 20) -> float:
    fn(x)  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn(x)
        times.append(time.perf_counter() - t0)
    return float(np.median(times) * 1000)


class ServedModel(nn.Module):
    """A trained network with its preprocessing inside: raw inputs in, served outputs out.

    - regressor: ``(N, F)`` raw features -> standardise -> model -> ``* y_std + y_mean`` -> ``(N,)``
      prediction in the target's original units;
    - CNN: ``(N, C, H, W)`` raw intensities -> per-channel standardise -> model -> softmax ->
      ``(N, K)`` class probabilities.

    The statistics are buffers (float32), so an ONNX export carries them and ONNX Runtime alone
    reproduces ``python -m pipeline predict``.
    """

    def __init__(self, model: nn.Module, *, task: str, preprocessing: Mapping[str, Any]):
        super().__init__()
        self.model, self.task = model.eval(), task
        p = preprocessing
        if task == "regression":
            mean, std = np.asarray(p["x_mean"]), np.asarray(p["x_std"])  # (F,)
            y_mean, y_std = float(p["y_mean"]), float(p["y_std"])
        else:
            mean = np.asarray(p["channel_mean"])[:, None, None]  # (C, 1, 1)
            std = np.asarray(p["channel_std"])[:, None, None]
            y_mean, y_std = 0.0, 1.0
        self.register_buffer("mean", torch.as_tensor(mean, dtype=torch.float32))
        self.register_buffer("std", torch.as_tensor(std, dtype=torch.float32))
        self.register_buffer("y_mean", torch.tensor(y_mean, dtype=torch.float32))
        self.register_buffer("y_std", torch.tensor(y_std, dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.model((x - self.mean) / self.std)
        if self.task == "regression":
            return out.squeeze(-1) * self.y_std + self.y_mean  # (N,)
        return torch.softmax(out, dim=1)  # (N, K)


# ONNX input / output names of the served graphs, by task
ONNX_NAMES = {"regression": ("features", "prediction"), "classification": ("images", "probabilities")}


def onnx_bytes(model: nn.Module, example: torch.Tensor, *, task: str) -> bytes:
    """Export a served model (:class:`ServedModel`) to ONNX with named inputs/outputs and a dynamic batch axis.

    The input is ``features`` (N, F) or ``images`` (N, C, H, W), raw float32; the output is
    ``prediction`` (N,) in original target units or ``probabilities`` (N, K).
    The TorchScript-based exporter is used (``dynamo=False``): the new one needs onnxscript,
    which this project does not depend on, and these Sequential models need nothing more.
    """
    name_in, name_out = ONNX_NAMES[task]
    buf = io.BytesIO()
    torch.onnx.export(
        model.eval(),
        example,
        buf,
        input_names=[name_in],
        output_names=[name_out],
        dynamic_axes={name_in: {0: "batch"}, name_out: {0: "batch"}},
        dynamo=False,
    )
    return buf.getvalue()


def onnx_session(data: bytes, *, device: str = "cpu", threads: int = 0):
    """An ONNX Runtime session over exported bytes (CUDA provider first when ``device`` is cuda and it is available).

    ``threads``: intra-op threads (0: ONNX Runtime's default, one per core; a server with one
    worker per core wants 1).
    """
    import onnxruntime as ort

    providers = ["CPUExecutionProvider"]
    if device == "cuda" and "CUDAExecutionProvider" in ort.get_available_providers():
        providers.insert(0, "CUDAExecutionProvider")
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    return ort.InferenceSession(data, sess_options=options, providers=providers)


def raw_inputs(ds: Dataset, split: str) -> np.ndarray:
    """The split's inputs back in raw units (inverse of the standardisation), float64."""
    p = ds.preprocessing
    if ds.task == "regression":
        return ds.x[split].astype(np.float64) * np.asarray(p["x_std"]) + np.asarray(p["x_mean"])
    std, mean = np.asarray(p["channel_std"])[None, :, None, None], np.asarray(p["channel_mean"])[None, :, None, None]
    return ds.x[split].astype(np.float64) * std + mean


def served_reference(model: nn.Module, ds: Dataset, x_scaled: np.ndarray) -> np.ndarray:
    """What ``predict`` serves for standardised inputs: original-unit predictions or softmax probabilities."""
    out = training.predict(model, x_scaled)
    if ds.task == "regression":
        return ds.target_to_original(out)
    return torch.softmax(torch.as_tensor(out), dim=1).numpy()


def export_served(model: nn.Module, ds: Dataset) -> tuple[bytes, float]:
    """ONNX bytes of ``model`` with ``ds``'s preprocessing inside, and its parity on the raw test split.

    Parity is the max abs difference between ONNX Runtime on raw test inputs and torch on the
    standardised ones (post-processed the same way): original target units or probabilities.
    """
    served = ServedModel(model, task=ds.task, preprocessing=ds.preprocessing)
    raw = raw_inputs(ds, "test").astype(np.float32)
    data = onnx_bytes(served, torch.as_tensor(raw[:1]), task=ds.task)
    onnx_out = onnx_session(data).run(None, {ONNX_NAMES[ds.task][0]: raw})[0]
    reference = served_reference(model, ds, ds.x["test"])
    return data, float(np.max(np.abs(onnx_out.reshape(reference.shape) - reference)))


def _speed(
    teacher: nn.Module, student: nn.Module, session, x_scaled: np.ndarray, x_raw: np.ndarray, *, input_name: str
) -> dict[str, Any]:
    out = {}
    for batch in (1, 256):
        xb = np.resize(x_scaled, (batch, *x_scaled.shape[1:])).astype(np.float32)
        rb = np.resize(x_raw, (batch, *x_raw.shape[1:])).astype(np.float32)  # the served graph takes raw inputs
        out[f"batch_{batch}"] = {
            "teacher_torch_ms": _latency_ms(lambda v: training.predict(teacher, v), xb),
            "student_torch_ms": _latency_ms(lambda v: training.predict(student, v), xb),
            "student_onnx_ms": _latency_ms(lambda v: session.run(None, {input_name: v}), rb),
        }
    return out


def _student_spec(cfg: Config, name: str, teacher_tm: TrainedModel) -> dict[str, Any]:
    """The student's architecture: the teacher's kind and input, the distill section's (smaller) widths."""
    k = cfg.distill
    if name != "cnn":
        return {"kind": "regressor", "kwargs": {**teacher_tm.spec["kwargs"], "hidden_sizes": list(k.regressor_hidden)}}
    t_kwargs = teacher_tm.spec["kwargs"]
    same_kind = teacher_tm.spec["kind"] == "cnn"  # a "scatter" teacher's kwargs describe its fixed filters
    return {
        "kind": "cnn",
        "kwargs": {
            "input_shape": list(t_kwargs["input_shape"]),
            "n_classes": int(t_kwargs["n_classes"]),
            "channels": list(k.cnn_channels),
            "kernel_size": t_kwargs["kernel_size"] if same_kind else cfg.cnn.kernel_size,
            "hidden": k.cnn_hidden,
            "activation": t_kwargs.get("activation", "relu"),
        },
    }


def _student_targets(cfg: Config, name: str, transfer, t_out: np.ndarray):
    """(targets, loss, task) of the student's fit: the teacher's outputs (and, for images, the labels column)."""
    if name != "cnn":
        return t_out.astype(np.float32), None, "regression"
    k = cfg.distill
    labels = transfer.labels if transfer.labels is not None else np.zeros(len(t_out))
    y = np.concatenate([t_out, labels[:, None]], axis=1).astype(np.float32)  # (N, K + 1)
    return y, DistillationLoss(temperature=k.temperature, label_weight=k.label_weight), "classification"


def _transfer_record(transfer) -> dict[str, Any]:
    return {
        "splits": list(transfer.splits),
        "real_rows": int(len(transfer.source_index)),
        "synthetic_rows": transfer.synthetic_rows,
        "synthetic_from": list(transfer.synthetic_from),
        "synthetic_method": transfer.synthetic_method,
        "provenance": transfer_provenance(transfer),
        "uses_private_labels": transfer.labels is not None and "train" in transfer.splits,
    }


def _onnx_record(name: str, ds: Dataset, teacher_onnx_diff: float) -> dict[str, Any]:
    return {
        "inputs": "raw (unstandardised) float32; standardisation"
        + (", inverse target scaling" if ds.task == "regression" else ", softmax")
        + " inside the graph",
        "input": ONNX_NAMES[ds.task][0],
        "output": ONNX_NAMES[ds.task][1],
        "teacher_file": f"models/{name}.onnx",
        "student_file": f"students/{name}.onnx",
        "teacher_max_abs_diff": teacher_onnx_diff,
    }


def _fidelity_record(
    cfg: Config, name: str, ds: Dataset, transfer, teacher_tm: TrainedModel, t_out, t_test, s_test, *, seed: int
) -> dict[str, Any]:
    """How well the student (and, for the regressor, the depth-limited tree) matches the teacher on test, with 95%
    bootstrap intervals over the test rows (the evaluate stage's resampling) for the report's students verdict."""
    boot_seed = derive_seed(seed, "bootstrap")
    if name == "cnn":
        y, t_pred, s_pred = np.asarray(ds.y["test"]), t_test.argmax(1), s_test.argmax(1)
        k_classes = t_test.shape[1]
        cis = bootstrap_cis(
            lambda idx: {
                "accuracy": np.mean(s_pred[idx] == y[idx], axis=-1),
                "agree": np.mean(t_pred[idx] == s_pred[idx], axis=-1),
            },
            len(y),
            seed=boot_seed,
        )
        p_t = np.bincount(t_pred, minlength=k_classes) / len(y)
        p_s = np.bincount(s_pred, minlength=k_classes) / len(y)
        return {
            "teacher_accuracy": float((t_pred == y).mean()),
            "student_accuracy": float((s_pred == y).mean()),
            "student_accuracy_ci95": cis["accuracy"],
            "top1_agreement": float((t_pred == s_pred).mean()),
            "top1_agreement_ci95": cis["agree"],
            # the agreement of two predictors that answer independently with these answer frequencies
            "top1_agreement_chance": float(np.dot(p_t, p_s)),
            "student_confusion_matrix": np.bincount(y * k_classes + s_pred, minlength=k_classes * k_classes)
            .reshape(k_classes, k_classes)
            .tolist(),
        }
    k = cfg.distill
    out = _regression_fidelity(ds, t_test, s_test, "student")
    y = ds.y["test"].astype(np.float64)
    cis = bootstrap_cis(
        lambda idx: {"r2": r2(y[idx], s_test[idx]), "fidelity": r2(t_test[idx], s_test[idx])}, len(y), seed=boot_seed
    )
    out["student_r2_ci95"], out["student_fidelity_r2_ci95"] = cis["r2"], cis["fidelity"]
    rows, tree_privacy = tree_rows(cfg, ds, transfer, teacher_tm.training.get("privacy"))
    tree = DecisionTreeRegressor(max_depth=k.tree_depth, random_state=seed).fit(transfer.x[rows], t_out[rows])
    out["tree_student"] = {
        "max_depth": k.tree_depth,
        "leaves": int(tree.get_n_leaves()),
        "fitted_on_rows": int(rows.sum()),
        "privacy": tree_privacy,
        **_regression_fidelity(ds, t_test, tree.predict(ds.x["test"]), "tree"),
        "rules": export_text(tree, feature_names=list(ds.feature_names), decimals=3),
    }
    return out


def _distill_one(
    cfg: Config, name: str, ds: Dataset, teacher_tm: TrainedModel, *, seed: int, device: torch.device | None = None
) -> dict[str, Any]:
    k = cfg.distill
    teacher = teacher_tm.build()
    transfer = transfer_set(cfg, ds, seed=seed)
    t_out = training.predict(teacher, transfer.x)  # (N,) or (N, K): the teacher's outputs are the only labels
    spec = _student_spec(cfg, name, teacher_tm)
    y, criterion, task = _student_targets(cfg, name, transfer, t_out)
    fit_cfg = k.fit
    if ds.task == "classification" and transfer.synthetic_rows:  # augmented images: (1 + copies per row)x more rows
        fit_cfg = dataclasses.replace(k.fit, epochs=k.augmented_epochs)
    torch.manual_seed(seed)
    student = models.build(spec)
    dp = cfg.dp if (cfg.dp.enabled and k.student_dp and "train" in transfer.splits) else None
    try:
        result = training.fit(
            student,
            x_train=transfer.x,
            y_train=y,
            x_val=None,
            y_val=None,
            task=task,
            fit_cfg=fit_cfg,
            dp=dp,
            device=device or torch.device("cpu"),
            seed=seed,
            criterion=criterion,
            desc=f"distill {name}",
        )
    except TrainingDivergedError as exc:
        raise diverged(exc, "distill.fit", fit_cfg) from None
    student.cpu().eval()  # measured, exported and timed on the CPU
    x_test = ds.x["test"]
    t_test, s_test = training.predict(teacher, x_test), training.predict(student, x_test)
    onnx, onnx_diff = export_served(student, ds)
    teacher_onnx, teacher_onnx_diff = export_served(teacher, ds)
    record: dict[str, Any] = {
        # all weights, fixed ones included: a fixed front-end is still part of what is served
        "teacher_parameters": models.n_parameters(teacher, trainable_only=False),
        "student_parameters": models.n_parameters(student, trainable_only=False),
        "transfer": _transfer_record(transfer),
        "privacy": privacy_status(cfg, transfer, teacher_tm.training)
        if dp is None or result.privacy is None
        else composed_privacy(cfg, result.privacy, teacher_tm.training.get("privacy")),
        "training": result.summary(),
        "onnx": _onnx_record(name, ds, teacher_onnx_diff),
        "onnx_max_abs_diff": onnx_diff,  # student graph on raw test inputs vs torch (served units)
        "latency": _speed(
            teacher, student, onnx_session(onnx), x_test, raw_inputs(ds, "test"), input_name=ONNX_NAMES[ds.task][0]
        ),
        "seed": seed,
    }
    record["compression_ratio"] = record["teacher_parameters"] / record["student_parameters"]
    record["explanation_similarity"] = _explanation_similarity(
        teacher, student, ds, task=task, seed=seed, method=primary_method(cfg.explain, ds)
    )
    record.update(_fidelity_record(cfg, name, ds, transfer, teacher_tm, t_out, t_test, s_test, seed=seed))
    return {
        "spec": spec,
        "state_dict": privacy.unwrap_state_dict(student),
        "record": record,
        "onnx": onnx,
        "teacher_onnx": teacher_onnx,
        "transfer_index": transfer.source_index,
    }


def _explanation_similarity(
    teacher: nn.Module, student: nn.Module, ds: Dataset, *, task: str, seed: int, method: str, n: int = 50
) -> dict[str, Any]:
    """Do teacher and student rely on the same features / pixels? SHAP on the same test rows, background
    from the public split (:func:`explain.compare_variants`), with ``method``: the explain stage's primary
    SHAP method for this model (exact enumeration for the default regressor, not DeepLIFT)."""
    background = ds.x["public"][:50] if len(ds.x["public"]) else ds.x["train"][:50]
    return compare_variants(
        teacher,
        student,
        ds.x["test"][:n],
        background=background,
        task=task,
        seed=seed,
        method=method,
        k=3 if task == "regression" else 8,
    ) | {"method_source": "the explain stage's primary SHAP method for this model (explain.*_methods)"}


def _regression_fidelity(ds: Dataset, teacher_pred: np.ndarray, student_pred: np.ndarray, who: str) -> dict[str, float]:
    y = ds.y["test"].astype(np.float64)

    def r2(a, b):
        return float(1 - np.sum((a - b) ** 2) / np.sum((a - a.mean()) ** 2))

    return {
        "teacher_r2": r2(y, teacher_pred),
        f"{who}_r2": r2(y, student_pred),
        f"{who}_fidelity_r2": r2(teacher_pred, student_pred),
    }


def device_placement(
    cfg: Config,
    datasets: Mapping[str, Dataset],
    builders: Mapping[str, Callable[[], nn.Module]],
    *,
    cuda_available: bool | None = None,
) -> placement.Placement:
    """Where the students train, from an upper bound of their work.

    The bound: the teacher's size (a student is >= 10x smaller), every row of the dataset and every
    synthetic copy, for the longer of the two epoch settings. ``builders`` build the teachers.
    """
    k = cfg.distill
    copies = 1 + k.synthetic_per_row + k.augment_per_row + k.mixup_per_row
    work = [
        (
            builders[name],
            tuple(datasets[entry.dataset].x["train"].shape[1:]),
            k.fit.batch_size,
            sum(len(v) for v in datasets[entry.dataset].y.values()) * copies * max(k.fit.epochs, k.augmented_epochs),
        )
        for name, entry in models.MODELS.items()
    ]
    return placement.stage_placement("distill", requested=cfg.train.device, work=work, cuda_available=cuda_available)


def run(cfg: Config, inputs: Mapping[str, Any], *, seed: int, runtime: Any = None) -> dict[str, Any]:
    """Distil both teachers.

    Returns
    -------
    ``{"cnn": {...}, "regressor": {...}}``: each with the student's ``spec``, ``state_dict``,
    ``record`` (metrics, privacy status, latency, ONNX parity), ``onnx`` / ``teacher_onnx`` bytes
    (served graphs: raw inputs, preprocessing inside; see :class:`ServedModel`) and the
    source-row indices of its real transfer rows.
    """
    return combine(cfg, {name: run_part(cfg, inputs, name, seed=seed, runtime=runtime) for name in parts(cfg)})


def parts(cfg: Config) -> tuple[str, ...]:
    """The stage's independent parts, one per teacher: the runner may run them in separate workers."""
    return tuple(models.MODELS)


def run_part(cfg: Config, inputs: Mapping[str, Any], name: str, *, seed: int, runtime: Any = None) -> dict[str, Any]:
    """Distil teacher ``name`` (one of :func:`parts`): its entry of :func:`run`'s output."""
    datasets, trained = inputs["data"], inputs["train"]
    where = device_placement(cfg, datasets, planned_builders(cfg, datasets))
    if runtime is not None:
        runtime.record_placement(where)
    ds = datasets[models.MODELS[name].dataset]
    return _distill_one(cfg, name, ds, trained.models[name], seed=derive_seed(seed, name), device=where.torch_device)


def combine(cfg: Config, done: Mapping[str, dict[str, Any]]) -> dict[str, Any]:
    """The stage output from every part, in :func:`parts` order."""
    return {name: done[name] for name in parts(cfg)}


def dump(out: Mapping[str, Any]) -> dict[str, bytes]:
    files = {}
    for name, o in out.items():
        files[f"students/{name}.safetensors"] = state_dict_bytes(o["state_dict"])
        files[f"students/{name}.onnx"] = o["onnx"]
        files[f"models/{name}.onnx"] = o["teacher_onnx"]  # the teacher's served graph: written here, with the student's
        files[f"students/{name}.json"] = json_bytes(
            {"spec": o["spec"], "record": o["record"], "transfer_index": o["transfer_index"]}
        )
    return files


def load(read) -> dict[str, Any]:
    out = {}
    for name in models.MODELS:
        meta = read_json(read(f"students/{name}.json"))
        out[name] = {
            "spec": meta["spec"],
            "record": meta["record"],
            "transfer_index": np.asarray(meta["transfer_index"]),
            "state_dict": read_state_dict(read(f"students/{name}.safetensors")),
            "onnx": read(f"students/{name}.onnx"),
            "teacher_onnx": read(f"models/{name}.onnx"),
        }
    return out
