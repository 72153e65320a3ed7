"""The valid range of each config key: one table per section, which :func:`auditml_core.config.validate` applies.

A row is ``(key in its section, a test of its value, what is valid)``. The rows run in order and the first that
fails raises a :class:`ConfigError` naming the key, its value and that text. Rules relating two keys (the split
fractions' sum, ``min_clients`` against ``n_clients``, SecAgg+'s ranges) are code, beside the loader in
:mod:`auditml_core.config`.
"""

from __future__ import annotations

import math
from typing import Any, Callable

from auditml_core.errors import ConfigError

Rule = tuple[str, Callable[[Any], bool], str]  # (key in its section, ok(value), what is valid)

# Upper bounds of the DP numbers. Opacus adds noise of std sigma * C in float32 and the accountants
# integrate over sigma, q and the step count: beyond these bounds a plan is either meaningless
# (C = 1e300 clips nothing, sigma * C overflows float32 to inf) or the accountant cannot bound it.
MAX_GRAD_NORM = 1e6  # clipping norm C
MAX_NOISE_MULTIPLIER = 1e4  # sigma
MAX_EPSILON = 1e3  # a budget above this guarantees nothing worth reporting
MAX_DP_EPOCHS = 100_000  # accountant steps grow with epochs; PRV's cost grows with them
MAX_CLIP_SIGMAS = (
    64.0  # client_dp.clip_sigmas: the clip chance is already ~1e-890 there; more only widens SecAgg+'s range
)


def check(ok: bool, key: str, value: Any, valid: str) -> None:
    """Raise a :class:`ConfigError` naming ``key``, its ``value`` and the ``valid`` range unless ``ok``."""
    if not ok:
        raise ConfigError(f"config key {key!r} = {value!r} is out of range; it must be {valid}")


def check_ranges(section: object, prefix: str, rules: tuple[Rule, ...]) -> None:
    """Apply ``rules`` to the config dataclass ``section`` (keys ``prefix.name``) in order; raise at the first miss."""
    for name, ok, valid in rules:
        value = getattr(section, name)
        check(ok(value), f"{prefix}.{name}", value, valid)


def is_host_port(address: str) -> bool:
    """Whether ``address`` reads as ``HOST:PORT`` with a port in [1, 65535] and no spaces."""
    host, sep, port = address.strip().rpartition(":")
    return bool(sep and host and port.isdigit() and 0 < int(port) < 65536 and " " not in address)


def _channel_counts(values: tuple[int, ...]) -> bool:
    return len(values) >= 1 and all(c >= 1 for c in values)


def _at_least(minimum: int, keys: tuple[str, ...], valid: str) -> tuple[Rule, ...]:
    return tuple((key, lambda v: v >= minimum, valid) for key in keys)


FIT: tuple[Rule, ...] = (
    ("epochs", lambda v: v >= 1, ">= 1"),
    ("batch_size", lambda v: v >= 1, ">= 1"),
    ("lr", lambda v: v > 0 and math.isfinite(v), "a finite number > 0"),
    ("momentum", lambda v: 0 <= v < 1, "in [0, 1)"),
    ("weight_decay", lambda v: v >= 0, ">= 0"),
    (
        "max_grad_norm",
        lambda v: 0 < v <= MAX_GRAD_NORM,
        f"in (0, {MAX_GRAD_NORM:g}] (a finite clipping norm: without one DP-SGD guarantees nothing)",
    ),
    ("augment_shift", lambda v: v >= 0, ">= 0"),
    ("ema_decay", lambda v: 0 <= v < 1, "in [0, 1) (0 = off)"),
)

DATA: tuple[Rule, ...] = (
    ("test_fraction", lambda v: 0 < v <= 0.5, "in (0, 0.5]"),
    ("val_fraction", lambda v: 0 < v <= 0.5, "in (0, 0.5]"),
    ("public_fraction", lambda v: 0 <= v <= 0.5, "in [0, 0.5]"),
)

REGRESSOR: tuple[Rule, ...] = (
    ("hidden_sizes", lambda v: all(h >= 1 for h in v), "positive widths"),
    ("ridge_alpha", lambda v: v >= 0, ">= 0"),
)

CNN: tuple[Rule, ...] = (
    ("channels", _channel_counts, "one or more positive channel counts"),
    ("kernel_size", lambda v: v >= 1 and v % 2 == 1, "an odd integer >= 1"),
    ("hidden", lambda v: v >= 0, ">= 0"),
    ("scatter_orientations", lambda v: 1 <= v <= 64, "in [1, 64]"),
    (
        "scatter_wavelengths",
        lambda v: len(v) >= 1 and all(w >= 2 for w in v),
        "one or more wavelengths >= 2 pixels (the Nyquist limit)",
    ),
    ("scatter_kernel_size", lambda v: 1 <= v <= 63 and v % 2 == 1, "an odd integer in [1, 63]"),
    ("scatter_pool", lambda v: 1 <= v <= 64, "in [1, 64]"),
    ("scatter_hidden", lambda v: 0 <= v <= 100_000, "in [0, 100000]"),
)

TRAIN: tuple[Rule, ...] = (
    ("patience", lambda v: v >= 0, ">= 0"),
    ("num_threads", lambda v: v >= 1, ">= 1"),
    ("checkpoint_every_s", lambda v: v >= 0, ">= 0"),
    ("processes", lambda v: 1 <= v <= 256, "in [1, 256]"),
)

STAGES: tuple[Rule, ...] = (("workers", lambda v: 0 <= v <= 64, "in [0, 64] (0 = one per CPU, 1 = one at a time)"),)

DP: tuple[Rule, ...] = (
    ("target_epsilon", lambda v: v > 0 and math.isfinite(v), "a finite number > 0"),
    ("target_epsilon", lambda v: v <= MAX_EPSILON, f"<= {MAX_EPSILON:g}"),
    ("delta", lambda v: 0 < v < 1, "in (0, 1), typically well below 1/n_train"),
    ("public_pretrain_epochs", lambda v: v >= 0, ">= 0"),
    (
        "noise_multiplier",
        lambda v: 0 <= v <= MAX_NOISE_MULTIPLIER,
        f"in [0, {MAX_NOISE_MULTIPLIER:g}] (0 = derive from dp.target_epsilon)",
    ),
)

DISTILL: tuple[Rule, ...] = (
    ("tree_depth", lambda v: v >= 1, ">= 1"),
    ("synthetic_per_row", lambda v: v >= 0, ">= 0"),
    ("synthetic_noise", lambda v: 0 <= v <= 100, "in [0, 100] (standardised units)"),
    ("temperature", lambda v: 0 < v <= 1000, "in (0, 1000]"),
    ("augment_per_row", lambda v: v >= 0, ">= 0"),
    ("augment_shift", lambda v: 0 <= v <= 100, "in [0, 100] pixels"),
    ("augment_rotation", lambda v: 0 <= v <= 180, "in [0, 180] degrees"),
    ("augment_scale", lambda v: 0 <= v <= 0.5, "in [0, 0.5]"),
    ("augment_noise", lambda v: 0 <= v <= 100, "in [0, 100] (standardised units)"),
    ("mixup_per_row", lambda v: v >= 0, ">= 0"),
    ("mixup_alpha", lambda v: 0 < v <= 100, "in (0, 100]"),
    ("augmented_epochs", lambda v: 1 <= v <= MAX_DP_EPOCHS, f"in [1, {MAX_DP_EPOCHS}]"),
    ("label_weight", lambda v: 0 <= v <= 1, "in [0, 1]"),
    ("cnn_channels", _channel_counts, "one or more positive channel counts"),
)

AUDIT: tuple[Rule, ...] = (
    ("n_eval", lambda v: v >= 10, ">= 10"),
    ("n_shadows", lambda v: v >= 2 and v % 2 == 0, "an even number >= 2"),
    ("shadow_epochs", lambda v: v >= 0, ">= 0 (0 = the audited model's epochs)"),
    ("control_rows", lambda v: v >= 4, ">= 4"),
    ("control_epochs", lambda v: v >= 1, ">= 1"),
    ("bootstrap", lambda v: v >= 100, ">= 100"),
    ("canaries", lambda v: v == 0 or 20 <= v <= 100_000, "0 (off) or in [20, 100000]"),
    ("mutant_noise", lambda v: 0 < v < 1, "in (0, 1) (0.1 = the σ/10 mutant)"),
)

EXPLAIN: tuple[Rule, ...] = (
    *_at_least(
        1,
        (
            "n_rows",
            "n_images",
            "background_size",
            "min_background",
            "top_k",
            "top_k_pixels",
            "stability_rows",
            "deletion_steps",
            "deletion_random_orders",
            "n_grid_images",
            "randomisation_rows",
        ),
        ">= 1",
    ),
    *_at_least(10, ("lime_num_samples", "lime_image_num_samples"), ">= 10"),
    ("lime_cell_size", lambda v: v >= 0, ">= 0 (0 = automatic)"),
    ("agreement_threshold", lambda v: 0 <= v <= 1, "in [0, 1]"),
    ("stability_seeds", lambda v: v >= 2, ">= 2 (stability compares seeds)"),
    *_at_least(0, ("n_waterfalls", "n_dependence_plots", "n_error_examples"), ">= 0"),
    *_at_least(0, ("reference_rows", "reference_images"), ">= 0 (0 = no reference check)"),
    ("reference_nsamples", lambda v: v >= 100, ">= 100"),
    ("reference_noise_images", lambda v: v >= 0, ">= 0"),
    ("randomisation_threshold", lambda v: 0 < v <= 1, "in (0, 1]"),
    ("randomisation_seeds", lambda v: v >= 1, ">= 1 (>= 2 for a null)"),
    ("randomisation_max_fraction", lambda v: 0 <= v < 1, "in [0, 1)"),
    ("agreement_cell_fraction", lambda v: 0 < v <= 1, "in (0, 1]"),
    ("agreement_noise_quantile", lambda v: 0 < v < 1, "in (0, 1)"),
)

FEDERATED: tuple[Rule, ...] = (
    ("n_clients", lambda v: v >= 1, ">= 1"),
    *_at_least(0, ("rounds", "local_epochs", "dp_rounds", "dp_local_epochs"), ">= 0 (0 = each model's own)"),
    ("dirichlet_alpha", lambda v: v > 0, "> 0"),
    ("proximal_mu", lambda v: v >= 0, ">= 0"),
    ("server_lr", lambda v: v > 0, "> 0"),
    ("client_cpus", lambda v: v >= 1, ">= 1 (Ray reserves whole CPUs per client)"),
    ("client_gpus", lambda v: 0 <= v <= 64 and math.isfinite(v), "in [0, 64] (0.5 = two clients share a GPU)"),
    (
        "ray_address",
        lambda v: v == "" or is_host_port(v),
        '"" (a private Ray) or HOST:PORT of a running Ray cluster\'s head (its GCS port, 6379 by default)',
    ),
)

# A model's federated schedule (<model>.federated, auditml_core.config.ScheduleConfig).
SCHEDULE: tuple[Rule, ...] = _at_least(1, ("rounds", "local_epochs", "dp_rounds", "dp_local_epochs"), ">= 1")

# Every number has an upper bound too (the same as sample-level DP's): an unbounded one hangs the σ search
# (target_epsilon=1e300) or overflows the noise σ·C into a NaN model (clipping_norm=1e300).
CLIENT_DP: tuple[Rule, ...] = (
    (
        "clipping_norm",
        lambda v: 0 < v <= MAX_GRAD_NORM,
        f"in (0, {MAX_GRAD_NORM:g}] (a finite bound on one client's update)",
    ),
    (
        "target_epsilon",
        lambda v: 0 < v <= MAX_EPSILON,
        f"in (0, {MAX_EPSILON:g}] (a larger budget guarantees nothing worth reporting)",
    ),
    ("delta", lambda v: 0 < v < 1, "in (0, 1), well below 1/federated.n_clients"),
    ("sample_rate", lambda v: 0 < v <= 1, "in (0, 1]"),
    (
        "noise_multiplier",
        lambda v: 0 <= v <= MAX_NOISE_MULTIPLIER,
        f"in [0, {MAX_NOISE_MULTIPLIER:g}] (0 = plan it)",
    ),
    (
        "clip_sigmas",
        lambda v: 4 <= v <= MAX_CLIP_SIGMAS,
        f"in [4, {MAX_CLIP_SIGMAS:g}] (8 keeps the clip chance ~1e-15)",
    ),
)
