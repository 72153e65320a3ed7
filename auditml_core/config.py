"""The configuration tree: frozen, typed dataclasses with defaults in code.

Load order: defaults -> TOML file -> dotted overrides (``cnn.fit.epochs=3``).
An unknown key, a wrong type or an impossible value raises :class:`ConfigError`
naming the key and what is valid, before any work starts.
"""

from __future__ import annotations

import dataclasses
import math
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Mapping, NamedTuple

import tomli_w

from auditml_core import config_checks as checks
from auditml_core.config_checks import MAX_DP_EPOCHS, check, check_ranges
from auditml_core.errors import ConfigError

Scalar = bool | int | float | str


@dataclass(frozen=True)
class DataConfig:
    tabular_csv: str = ""  # CSV file for the regressor; "" = scikit-learn's embedded diabetes table
    target: str = ""  # target column of tabular_csv (required when tabular_csv is set)
    images: str = ""  # .npz (x, y) or folder of class sub-folders of PNGs; "" = embedded 8x8 digits
    nan_policy: Literal["error", "drop", "impute"] = "error"  # NaN/inf rows: fail, drop them, or impute train medians
    test_fraction: float = 0.2  # share of rows held out for the final test metrics, (0, 0.5]
    val_fraction: float = 0.1  # share of rows for validation / early stopping, (0, 0.5]
    public_fraction: float = 0.1  # share declared public (explanation backgrounds, distillation), [0, 0.5]
    ignore_columns: tuple[str, ...] = ()  # table columns kept out of the features (ids); cf. predict --ignore-columns
    identifier_check: bool = True  # refuse likely row ids (named id/uuid/index/row, or unique integers in row order)
    codebook: str = ""  # data dictionary (.json/.toml): column -> {codes = {value = label}, units = "..."}; "" = none


@dataclass(frozen=True)
class FitConfig:
    epochs: int = 30  # passes over the training split, >= 1
    batch_size: int = 32  # rows per batch, >= 1; under DP: Poisson rate q = 1/ceil(n/B), expected batch n/ceil(n/B)
    lr: float = 1e-3  # learning rate, > 0
    optimizer: Literal["adam", "sgd"] = "adam"  # torch optimizer
    momentum: float = 0.9  # SGD momentum, [0, 1)
    weight_decay: float = 0.0  # L2 penalty, >= 0
    max_grad_norm: float = 1.0  # DP only: per-sample gradient clipping norm C, > 0
    augment_shift: int = 0  # images only: random translation by up to this many pixels per sample and step, >= 0
    ema_decay: float = 0.0  # release the EMA of the iterates (DP: post-processing, no extra ε); 0 = off, [0, 1)


@dataclass(frozen=True)
class ScheduleConfig:
    """One model's federated schedule (``<model>.federated``): rounds x local epochs, and the same under DP.

    ``federated.rounds`` / ``federated.local_epochs`` (and their ``dp_`` keys), when set above 0, override these
    for every model. Read them through :func:`federated_schedule`, which applies that override.
    """

    rounds: int = 40  # federated rounds of this model, >= 1 (under DP, unless set: dp_rounds)
    local_epochs: int = 3  # epochs each client trains per round, >= 1 (under DP, unless set: dp_local_epochs)
    # Under DP σ is planned for the whole schedule: a longer one needs more noise per step at the same ε. These
    # are the defaults of rounds / local_epochs when dp.enabled or client_dp.enabled and they are not set.
    dp_rounds: int = 10  # rounds under DP (either level) when rounds is not set, >= 1
    dp_local_epochs: int = 1  # local epochs under DP (either level) when local_epochs is not set, >= 1


@dataclass(frozen=True)
class RegressorConfig:
    hidden_sizes: tuple[int, ...] = (32,)  # widths of the MLP's hidden layers
    activation: Literal["relu", "tanh"] = "relu"  # hidden activation
    ridge_alpha: float = 1.0  # L2 strength of the scikit-learn Ridge baseline, >= 0
    fit: FitConfig = field(default_factory=lambda: FitConfig(epochs=200, batch_size=32, lr=3e-3, weight_decay=1e-2))
    dp_fit: FitConfig = field(  # training settings used instead of `fit` when dp.enabled
        default_factory=lambda: FitConfig(epochs=30, batch_size=128, lr=5e-3, max_grad_norm=1.0)
    )
    # Its federated schedule (train.mode=federated). 13 x 4: the regressor overfits its ~53-row clients in longer
    # ones (40 x 3 gave R² 0.438 under Dirichlet 0.5 against 0.463 central); figures in federated/README.md.
    federated: ScheduleConfig = field(default_factory=lambda: ScheduleConfig(rounds=13, local_epochs=4))


@dataclass(frozen=True)
class CNNConfig:
    channels: tuple[int, ...] = (32, 64)  # output channels of each conv -> activation -> pool block
    kernel_size: int = 3  # odd conv kernel size, padded to keep the spatial size
    hidden: int = 64  # width of the hidden linear layer before the head (0 = none)
    activation: Literal["relu", "tanh"] = "relu"  # activation after every conv and hidden layer
    fit: FitConfig = field(default_factory=lambda: FitConfig(epochs=120, batch_size=32, lr=1e-3, augment_shift=1))
    dp_fit: FitConfig = field(  # training settings used instead of `fit` when dp.enabled
        default_factory=lambda: FitConfig(epochs=40, batch_size=256, lr=3e-3, max_grad_norm=1.0)
    )
    # Its federated schedule (train.mode=federated). 88 x 3: under Dirichlet 0.5 label skew the CNN needs ~2x the
    # rounds of IID data to reach central accuracy (40 x 3 gave 0.961 against 0.992); federated/README.md.
    federated: ScheduleConfig = field(default_factory=lambda: ScheduleConfig(rounds=88, local_epochs=3))
    dp_activation: Literal["relu", "tanh", "same"] = "tanh"  # activation under DP ("same" = activation)
    architecture: Literal["cnn", "scatter"] = "cnn"  # cnn: trained conv blocks; scatter: fixed Gabor filters + head
    # architecture under DP ("same" = architecture). "scatter" reaches 0.88/0.95/0.97 at ε=1/3/8 without public
    # data (scripts/dp_no_public.py) but its students are ~4.5x smaller, not 10x, and DeepExplainer cannot explain it.
    dp_architecture: Literal["cnn", "scatter", "same"] = "same"
    scatter_orientations: int = 8  # scatter: filter orientations per wavelength, in [1, 64]
    scatter_wavelengths: tuple[float, ...] = (3.0, 6.0)  # scatter: Gabor wavelengths in pixels, each >= 2
    scatter_kernel_size: int = 5  # scatter: odd filter side in pixels, in [1, 63]
    scatter_pool: int = 2  # scatter: side of the average pooling of the filter responses, in [1, 64]
    scatter_norm_groups: int = 6  # scatter: per-image GroupNorm groups over the features (0 = none; divides channels)
    scatter_hidden: int = 0  # scatter: hidden width of the trainable head (0 = linear head), <= 100000


@dataclass(frozen=True)
class TrainConfig:
    mode: Literal["central", "federated"] = "central"  # where training runs
    patience: int = 15  # early stopping: epochs without validation improvement (0 = off; off under DP)
    device: Literal["auto", "cpu", "cuda"] = "auto"  # auto: CUDA per stage when its work is large (core/placement)
    num_threads: int = 1  # torch CPU threads per process (1 is fastest for these small models), >= 1
    checkpoint_every_s: float = 5.0  # seconds between training checkpoints (always one after the last epoch), >= 0
    processes: int = 1  # central training: ranks on this host started with torch's launcher (torchrun), in [1, 256]


@dataclass(frozen=True)
class DPConfig:
    enabled: bool = False  # train with DP-SGD (Opacus)
    target_epsilon: float = 3.0  # privacy budget epsilon for the whole training of each model, > 0
    delta: float = 1e-5  # delta, in (0, 1); keep it well below 1/n_train
    noise_multiplier: float = 0.0  # sigma; 0 = derive it from target_epsilon (refused if it would overspend)
    accountant: Literal["prv", "rdp", "gdp"] = "prv"  # Opacus accountant
    reproducible_noise: bool = (
        False  # seed DP sampling and noise from the run seed: DP then holds only while it is secret
    )
    grad_sample_mode: Literal["hooks", "functorch", "ew", "ghost", "bk"] = (
        "bk"  # clipping engine; bk = book-keeping, one backward pass (auditml_core/privacy/bk.py; fastest: bench_dp_engines)
    )
    public_pretrain_epochs: int = (
        60  # epochs of non-private pretraining on the public split before DP-SGD (0 = off), >= 0
    )
    pretrain_non_private: bool = False  # also pretrain non-DP runs likewise (like-with-like privacy-utility plots)


# --- user-level DP (issue 14) ---------------------------------------------------------------
@dataclass(frozen=True)
class ClientDPConfig:
    enabled: bool = False  # user-level DP-FedAvg (federated only): clip each client's update, Gaussian noise on the sum
    clipping_norm: float = 1.0  # L2 bound C on one client's model update (its weights minus the global weights), > 0
    noise_placement: Literal["server", "client"] = (
        "server"  # who adds the noise: the server, or each client (needs federated.secure_aggregation=true)
    )
    clip_sigmas: float = 8.0  # k (client noise): SecAgg+ clipping range C + k·(client noise std); clip chance <= 2Φ(-k) per coordinate, >= 4
    target_epsilon: float = 3.0  # user-level budget: ε for a whole client's data over all rounds, > 0
    delta: float = 1e-3  # user-level δ, in (0, 1); keep it well below 1/federated.n_clients
    sample_rate: float = 1.0  # q: each client takes part in a round independently with this probability, (0, 1]
    noise_multiplier: float = 0.0  # σ (noise std / C on the sum); 0 = plan it from target_epsilon
    accountant: Literal["prv", "rdp", "gdp"] = "rdp"  # Opacus accountant for the subsampled Gaussian over rounds


# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SecAggConfig:
    # --- SecAgg+ (issue 14; federated/app/secagg.py). Each client uploads (n_i/max_n)·weights: with max_n the largest
    # client's row count that factor is <= 1, so clipping_range bounds the weights themselves.
    num_shares: int = 0  # key shares per client (SecAgg+ neighbours); 0 = every client (cost ~n²), else odd >= 3
    reconstruction_threshold: float = 0.5  # fraction of num_shares that must survive to unmask, in (0, 1]
    clipping_range: float = 8.0  # each uploaded coordinate is clipped to ±this before quantisation (counted, recorded)
    quantization_range: int = 4194304  # integer levels over [-clipping_range, clipping_range]; n_clients·this < 2^32


@dataclass(frozen=True)
class FederatedConfig:
    n_clients: int = 5  # simulated clients, >= 1
    # Each model has its own schedule (<model>.federated.*, measured in federated/README.md); these four, when set
    # above 0, override it for every model (config files from before the per-model schedules keep their meaning).
    rounds: int = 0  # rounds of every model in either mode, >= 0; 0 = each model's <model>.federated.rounds
    local_epochs: int = 0  # local epochs of every model in either mode, >= 0; 0 = each model's own
    dp_rounds: int = 0  # under DP, rounds of every model whose rounds are not set, >= 0; 0 = each model's dp_rounds
    dp_local_epochs: int = 0  # likewise for local epochs under DP, >= 0; 0 = each model's dp_local_epochs
    strategy: Literal["fedavg", "fedprox", "fedadam"] = "fedavg"  # Flower strategy
    partitioner: Literal["iid", "dirichlet", "quantity"] = "iid"  # how rows are split between clients
    dirichlet_alpha: float = 0.5  # label skew of the dirichlet partitioner, > 0
    min_clients: int = 2  # a round goes on with at least this many clients replying, >= 1
    proximal_mu: float = 0.01  # FedProx proximal weight mu, >= 0
    server_lr: float = 0.01  # FedAdam server learning rate eta, > 0
    secure_aggregation: bool = False  # SecAgg+: the server learns only the sum of the clients' uploads (FedAvg only)
    ray_address: str = ""  # simulation on an existing Ray cluster ("HOST:PORT"); "" = a private Ray on this machine
    client_cpus: int = 1  # CPUs Ray reserves per simulated client (clients at a time = cluster CPUs / this), >= 1
    client_gpus: float = 0.0  # GPUs Ray reserves per simulated client (0.5 = two clients per GPU), >= 0
    secagg: SecAggConfig = field(default_factory=SecAggConfig)


@dataclass(frozen=True)
class DistillConfig:
    cnn_channels: tuple[int, ...] = (10, 20)  # student CNN conv blocks (teacher: cnn.channels)
    cnn_hidden: int = 0  # student CNN hidden linear width (0 = none)
    regressor_hidden: tuple[int, ...] = (3,)  # student MLP hidden widths (teacher: regressor.hidden_sizes)
    tree_depth: int = 4  # depth of the interpretable decision-tree student of the regressor, >= 1
    transfer: Literal["auto", "public", "private"] = (
        "auto"  # student inputs; auto = public split under DP, else train+public
    )
    synthetic_per_row: int = 20  # tabular: jittered copies of each transfer row, labelled by the teacher, >= 0
    synthetic_noise: float = 0.3  # std of that jitter in standardised feature units, >= 0
    temperature: float = 4.0  # softening temperature T of the distillation loss (scaled by T^2), > 0
    label_weight: float = 0.0  # weight of the hard-label loss in [0, 1]; private labels void DP inheritance
    student_dp: bool = False  # with private transfer data under DP: train the student with its own DP-SGD
    augment_per_row: int = 10  # images under DP: teacher-labelled augmented copies of each public image, >= 0
    augment_shift: float = 1.0  # max translation of those copies in pixels (sub-pixel, bilinear), >= 0
    augment_rotation: float = 10.0  # max rotation of those copies in degrees, [0, 180]
    augment_scale: float = 0.1  # max relative zoom of those copies (scale in [1 - s, 1 + s]), [0, 0.5]
    augment_noise: float = 0.1  # std of Gaussian pixel noise on those copies (standardised units), >= 0
    mixup_per_row: int = 10  # images under DP: teacher-labelled mixups of two public images per public image, >= 0
    mixup_alpha: float = 0.4  # mixing weight λ ~ Beta(α, α) of those mixups, > 0
    augmented_epochs: int = 60  # distill.fit.epochs for a transfer set with those images (it is larger), >= 1
    # 60 epochs (150 before), 40% of the steps: regressor student fidelity R² unchanged (0.989-0.991 at 150, 60 or 20
    # epochs); CNN student top-1 agreement with the teacher 0.4 points lower on average (14 seeds: mean 0.9845 at
    # 150 epochs, 0.9805 at 60; lowest seed 0.9777 vs 0.9638; 80-100 epochs did no better than 60).
    fit: FitConfig = field(default_factory=lambda: FitConfig(epochs=60, batch_size=64, lr=3e-3, augment_shift=1))


@dataclass(frozen=True)
class ExplainConfig:
    n_rows: int = 100  # test-split table rows explained (all if the split is smaller), >= 1
    n_images: int = 100  # test-split images explained (all if the split is smaller), >= 1
    background_split: Literal["public", "train"] = (
        "public"  # reference data; "train" reads private records (not covered by DP)
    )
    background_size: int = (
        50  # background rows/images drawn from background_split (all if fewer); SHAP cost grows with it, >= 1
    )
    min_background: int = 10  # fewest background rows accepted; fewer fails (raise data.public_fraction), >= 1
    regressor_methods: tuple[str, ...] = (
        "shap-exact",
        "lime-tabular",
    )  # explainers of the MLP (explain.available_explainers()); the first SHAP one is primary; agreement per pair
    cnn_methods: tuple[str, ...] = (
        "shap-deep",
        "lime-image",
    )  # explainers of the CNN, likewise (shap-deep falls back to shap-gradient if DeepLIFT fails)
    reference_rows: int = 4  # table rows re-explained by a reference to measure the primary SHAP error, >= 0
    reference_images: int = 10  # images likewise (each costs reference_nsamples x background_size CNN passes), >= 0
    reference_nsamples: int = 200  # coalitions per image of the sampled Kernel SHAP reference (images), >= 100
    reference_noise_images: int = 2  # of those, images the reference re-explains with another seed (its noise), >= 0
    randomisation_rows: int = 10  # rows/images re-explained with re-initialised weights (sanity check), >= 1
    randomisation_seeds: int = 5  # random models (and other classes) per sanity check; >= 2 gives the null
    randomisation_threshold: float = 0.5  # a row survives randomisation above this |Spearman(trained, random)|, (0, 1]
    randomisation_max_fraction: float = 0.1  # a sanity check passes when at most this share of rows survive, [0, 1)
    lime_num_samples: int = 2000  # LIME perturbations per table row, >= 10
    lime_image_num_samples: int = 500  # LIME perturbations per image, >= 10
    lime_cell_size: int = 0  # side in pixels of LIME's grid segments (0 = min(H, W) // 4), >= 0
    top_k: int = 3  # features compared by SHAP-LIME agreement and LIME stability (tables), >= 1
    top_k_pixels: int = 8  # pixels compared likewise for images (per-pixel comparison only), >= 1
    agreement_cell_fraction: float = 0.25  # image pairs compared at LIME's cells: top-k = this share of cells, (0, 1]
    agreement_threshold: float = 0.5  # rows whose SHAP-LIME Spearman is below this are flagged (see next), [0, 1]
    agreement_noise_quantile: float = 0.05  # ... or this quantile of LIME's seed-vs-seed Spearman if lower, (0, 1)
    stability_seeds: int = 3  # LIME runs with different seeds compared for stability, >= 2
    stability_rows: int = 20  # first explained rows (and images) re-explained for stability, >= 1
    deletion_steps: int = 16  # steps of the deletion/insertion curves, >= 1
    deletion_random_orders: int = 3  # random feature orders averaged into their reference curve, >= 1
    n_waterfalls: int = 3  # table rows given a local waterfall plot, >= 0
    n_grid_images: int = 6  # images shown in the attribution grid, >= 1
    n_dependence_plots: int = 3  # top regressor features (by mean |SHAP|) given a dependence and a PDP/ICE plot, >= 0
    n_error_examples: int = 4  # misclassified test images shown per true class in the CNN error figure, >= 0


@dataclass(frozen=True)
class AuditConfig:
    enabled: bool = True  # run the membership-inference audit stage (false: the report says no audit was run)
    n_eval: int = 500  # members attacked per model, and as many non-members (capped by train/test sizes), >= 10
    n_shadows: int = (
        2  # LiRA shadows, each trained like the audited model on as many rows; even, >= 2 (16-64: thorough)
    )
    shadow_epochs: int = 0  # epochs of each shadow model (0 = as many as the audited model trained), >= 0
    control_rows: int = 64  # training rows of the deliberately overfit positive control (capped by test size), >= 4
    control_epochs: int = 200  # non-private epochs of the positive control (it must memorise its rows), >= 1
    bootstrap: int = 1000  # bootstrap resamples of each AUC confidence interval, >= 100
    canaries: int = 1000  # DP: gradient canaries of the one-run ε audit (certifies ε <= ~5.4 at 1000), 0 = off or >= 20
    mutant_noise: float = 0.1  # DP: the positive control adds this times its noise, recording the claimed ε, (0, 1)


@dataclass(frozen=True)
class CardConfig:
    """What a run cannot know about itself, for the model cards; an empty value is shown as "not stated"."""

    owner: str = ""  # person or team accountable for the models; "" = not stated
    contact: str = ""  # how to reach the owner (e-mail or URL); "" = not stated
    license: str = ""  # licence of the released models (an SPDX id such as "apache-2.0"); "" = not stated
    data_license: str = ""  # licence or terms of use of the training data; "" = not stated
    intended_users: str = ""  # who the models are for; "" = not stated
    sensitive_data: str = ""  # what personal or sensitive data a user's own files hold; "" = not stated
    citation: str = ""  # how to cite these models (free text or BibTeX, may span lines); "" = none given


@dataclass(frozen=True)
class TrackingConfig:
    """Logging a completed run to MLflow (docs/tracking.md); needs `pip install ".[mlflow]"`."""

    mlflow_uri: str = ""  # "" = off; sqlite:///FILE.db or file:DIR (an embedded store), http(s)://HOST:PORT (a server)
    experiment: str = "auditable-pipeline"  # MLflow experiment the run is logged in (created when missing)
    register: bool = False  # also register each teacher and student in MLflow's registry, with the run's provenance


@dataclass(frozen=True)
class ReportConfig:
    """The report stage's outputs beside report.html and report.json."""

    pdf: bool = True  # also print report.html to report.pdf (WeasyPrint: pip install ".[pdf]"; ~6 s CPU for 36 pages)


@dataclass(frozen=True)
class StagesConfig:
    """How the stages run (pipeline.stage_workers)."""

    # Stages that read only the recorded data and models (evaluate, explain, distill, audit) run at once in up to
    # this many forked worker processes; 0 = one per CPU this process may use (in one process on CUDA), 1 = one
    # after another in this process; in [0, 64]. Their outputs are the same either way.
    workers: int = 0


@dataclass(frozen=True)
class Config:
    seed: int = 0  # root seed; every stage and client derives its own from it
    data: DataConfig = field(default_factory=DataConfig)
    regressor: RegressorConfig = field(default_factory=RegressorConfig)
    cnn: CNNConfig = field(default_factory=CNNConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    dp: DPConfig = field(default_factory=DPConfig)
    federated: FederatedConfig = field(default_factory=FederatedConfig)
    client_dp: ClientDPConfig = field(default_factory=ClientDPConfig)
    explain: ExplainConfig = field(default_factory=ExplainConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    audit: AuditConfig = field(default_factory=AuditConfig)
    card: CardConfig = field(default_factory=CardConfig)  # model-card facts only the owner can give
    tracking: TrackingConfig = field(default_factory=TrackingConfig)  # MLflow tracking and registry (off by default)
    report: ReportConfig = field(default_factory=ReportConfig)  # report.pdf beside report.html
    stages: StagesConfig = field(default_factory=StagesConfig)  # independent stages side by side


# --------------------------------------------------------------------------- loading


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Build the configuration: defaults, then a TOML file, then ``key=value`` overrides.

    Parameters
    ----------
    path : TOML file, or None for the defaults only.
    overrides : dotted assignments such as ``"cnn.fit.epochs=3"``; values are parsed as TOML
        (``true``, ``3``, ``1e-5``, ``[16, 32]``), falling back to a plain string.

    Returns
    -------
    Config

    Raises
    ------
    ConfigError
        For a missing or malformed file, an unknown key, a wrong type or an impossible value.
    """
    tree: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {str(p)!r} does not exist; pass an existing TOML file to --config")
        try:
            tree = tomllib.loads(p.read_text(encoding="utf-8"))
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {str(p)!r} is not valid TOML ({exc}); fix the syntax") from None
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {item!r} is not KEY=VALUE; write e.g. cnn.fit.epochs=3")
        _set_dotted(tree, key.strip(), _parse_scalar(raw.strip()))
    cfg = _build(Config(), tree, prefix="")
    cfg = _resolve_dp_schedule(cfg, tree)
    validate(cfg)
    return cfg


# Keys of the federated schedule whose default differs under dp.enabled, and the key holding that default.
DP_SCHEDULE_KEYS = {"rounds": "dp_rounds", "local_epochs": "dp_local_epochs"}


class Schedule(NamedTuple):
    """The federated schedule one model trains with (:func:`federated_schedule`)."""

    rounds: int
    local_epochs: int


def schedule_sections(cfg: Config | None = None) -> tuple[str, ...]:
    """The config sections (one per model) that carry a federated schedule (``<section>.federated``)."""
    cfg = cfg if cfg is not None else Config()
    return tuple(
        f.name
        for f in dataclasses.fields(cfg)
        if isinstance(getattr(getattr(cfg, f.name), "federated", None), ScheduleConfig)
    )


def federated_schedule(cfg: Config, model: str) -> Schedule:
    """Rounds x local epochs model ``model`` trains federated with: ``<model>.federated``, unless
    ``federated.rounds`` / ``federated.local_epochs`` are set above 0 (then they hold for every model).

    Under DP the model's section already holds its DP schedule where none was set
    (:func:`load_config` resolves it), so this is the schedule of the run in both modes.

    Raises
    ------
    ValueError
        If ``model`` has no config section with a federated schedule.
    """
    if model not in schedule_sections(cfg):
        raise ValueError(f"no federated schedule for model {model!r}; models with one: {schedule_sections(cfg)}")
    own: ScheduleConfig = getattr(cfg, model).federated
    f = cfg.federated
    return Schedule(rounds=f.rounds or own.rounds, local_epochs=f.local_epochs or own.local_epochs)


def _resolve_dp_schedule(cfg: Config, tree: Mapping[str, Any]) -> Config:
    """Under DP, give each model's ``<model>.federated.rounds`` / ``local_epochs`` their DP defaults unless set.

    DP here is either level, sample-level (``dp.enabled``) or user-level (``client_dp.enabled``): both plan σ
    for the whole schedule. The DP default is ``federated.dp_rounds`` (every model) when above 0, else the
    model's own ``<model>.federated.dp_rounds`` (likewise local epochs). A value set in the TOML file or an
    override always wins, in both modes (and ``federated.rounds`` above 0 wins over all: :func:`federated_schedule`);
    the resolved config (what the run directory saves and Flower receives) holds the numbers actually used,
    so reading it back changes nothing.
    """
    if not (cfg.dp.enabled or cfg.client_dp.enabled):
        return cfg
    changes = {}
    for name in schedule_sections(cfg):
        section = tree.get(name, {})
        given = section.get("federated", {}) if isinstance(section, Mapping) else {}
        given = given if isinstance(given, Mapping) else {}
        own: ScheduleConfig = getattr(cfg, name).federated
        resolved = {
            key: getattr(cfg.federated, dp_key) or getattr(own, dp_key)
            for key, dp_key in DP_SCHEDULE_KEYS.items()
            if key not in given
        }
        if resolved:
            changes[name] = dataclasses.replace(getattr(cfg, name), federated=dataclasses.replace(own, **resolved))
    return dataclasses.replace(cfg, **changes) if changes else cfg


def _parse_scalar(raw: str) -> Any:
    try:
        return tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        return raw


def _set_dotted(tree: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    node = tree
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {key!r}: {part!r} is a value, not a section")
    node[parts[-1]] = value


def _build(default: Any, tree: Mapping[str, Any], prefix: str) -> Any:
    """Apply ``tree`` onto the ``default`` dataclass instance, checking keys and types."""
    cls = type(default)
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(tree) - set(names))
    if unknown:
        where = prefix.rstrip(".") or "the top level"
        raise ConfigError(f"unknown config key {prefix + unknown[0]!r}; valid keys in {where}: {', '.join(names)}")
    changes = {}
    for name, value in tree.items():
        key, current = prefix + name, getattr(default, name)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, Mapping):
                raise ConfigError(f"config key {key!r} is a section; set its keys, e.g. {key}.<name>=...")
            changes[name] = _build(current, value, key + ".")
        elif isinstance(value, Mapping):
            raise ConfigError(f"config key {key!r} is a value, not a section; write {key}=...")
        else:
            changes[name] = _coerce(value, hints[name], key)
    return dataclasses.replace(default, **changes)


def _coerce(value: Any, hint: Any, key: str) -> Any:
    origin = typing.get_origin(hint)
    if origin is Literal:
        choices = typing.get_args(hint)
        if value not in choices:
            raise ConfigError(
                f"config key {key!r} = {value!r} is not valid; choose one of: {', '.join(map(str, choices))}"
            )
        return value
    if origin is tuple:
        (item_type, _ellipsis) = typing.get_args(hint)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(
                f"config key {key!r} must be a list of {item_type.__name__}, e.g. [32, 64]; got {value!r}"
            )
        return tuple(_coerce(v, item_type, f"{key}[{i}]") for i, v in enumerate(value))
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"config key {key!r} must be true or false; got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"config key {key!r} must be an integer; got {value!r}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"config key {key!r} must be a number; got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"config key {key!r} must be a string; got {value!r}")
        return value
    raise TypeError(f"unsupported config type {hint!r} for {key}")  # a bug in this module, not user input


# --------------------------------------------------------------------------- validation


def _check_finite(cfg: Any, prefix: str = "") -> None:
    """Refuse NaN and ±inf in every float key: no setting of this pipeline means anything at infinity."""
    for key, value in flatten(cfg, prefix).items():
        values = value if isinstance(value, list) else [value]
        for v in values:
            if isinstance(v, float) and not math.isfinite(v):
                raise ConfigError(f"config key {key!r} = {v!r} is not a finite number; set it to a finite value")


def validate(cfg: Config) -> None:
    """Check value ranges and cross-field rules; raise ConfigError naming the key and the valid range.

    Each section's step applies its table of ranges (:mod:`auditml_core.config_checks`), then the rules that
    relate its keys to others; the first value out of range raises.
    """
    _check_finite(cfg)
    _validate_card(cfg.card)
    _validate_data(cfg.data)
    _validate_models(cfg)
    _validate_train(cfg.train)
    _validate_dp(cfg)
    _validate_distill(cfg.distill)
    check_ranges(cfg.audit, "audit", checks.AUDIT)
    _validate_explain(cfg.explain)
    _validate_federated(cfg.federated)
    _validate_client_dp(cfg)
    _validate_secagg(cfg)
    _validate_tracking(cfg.tracking)
    check_ranges(cfg.stages, "stages", checks.STAGES)


# The MLflow stores `tracking.mlflow_uri` may name (pipeline/tracking.py); a database URI MLflow also takes
# (postgresql://, mysql://) belongs behind an MLflow server, which the pipeline reaches over http(s).
TRACKING_SCHEMES = ("sqlite:///", "file:", "http://", "https://")


def _validate_tracking(t: TrackingConfig) -> None:
    uri = t.mlflow_uri
    check(
        uri == "" or (uri.startswith(TRACKING_SCHEMES) and len(uri) > 8 and not any(c.isspace() for c in uri)),
        "tracking.mlflow_uri",
        uri,
        '"" (off), sqlite:///FILE.db or file:DIR (an embedded store) or http(s)://HOST:PORT (an MLflow server)',
    )
    authority = uri.split("://", 1)[1].split("/", 1)[0] if uri.startswith(("http://", "https://")) else ""
    if ":" in authority.rpartition("@")[0]:
        raise ConfigError(
            "tracking.mlflow_uri carries a password, which would be saved in config.toml and logged as a param; "
            "drop it from the URI and set MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD instead"
        )
    check(
        0 < len(t.experiment) <= 500 and "\n" not in t.experiment,
        "tracking.experiment",
        t.experiment,
        "a name of one line, 1 to 500 characters",
    )


def _validate_card(card: CardConfig) -> None:
    for key, value in vars(card).items():
        check(
            len(value) <= 2000 and (key == "citation" or "\n" not in value),
            f"card.{key}",
            value[:40] + ("..." if len(value) > 40 else ""),
            "one line of at most 2000 characters (card.citation may span lines)",
        )


def _validate_data(d: DataConfig) -> None:
    check_ranges(d, "data", checks.DATA)
    total = d.test_fraction + d.val_fraction + d.public_fraction
    check(
        total < 0.9,
        "data.test_fraction + val_fraction + public_fraction",
        round(total, 4),
        "< 0.9 (leave rows to train on)",
    )
    if d.tabular_csv and not d.target:
        raise ConfigError(
            "data.tabular_csv is set but data.target is empty; set data.target to the CSV's target column"
        )


def _validate_models(cfg: Config) -> None:
    """The models' training settings, then their architectures."""
    for name, model in (("regressor", cfg.regressor), ("cnn", cfg.cnn)):
        check_ranges(model.fit, f"{name}.fit", checks.FIT)
        check_ranges(model.dp_fit, f"{name}.dp_fit", checks.FIT)
    for name in schedule_sections(cfg):
        check_ranges(getattr(cfg, name).federated, f"{name}.federated", checks.SCHEDULE)
    check_ranges(cfg.regressor, "regressor", checks.REGRESSOR)
    c = cfg.cnn
    check_ranges(c, "cnn", checks.CNN)
    n_scatter_channels = 2 + 4 * c.scatter_orientations * len(c.scatter_wavelengths)  # per input channel
    check(
        c.scatter_norm_groups >= 0 and (c.scatter_norm_groups == 0 or n_scatter_channels % c.scatter_norm_groups == 0),
        "cnn.scatter_norm_groups",
        c.scatter_norm_groups,
        f"0 or a divisor of the {n_scatter_channels} feature channels per input channel",
    )


def _validate_train(t: TrainConfig) -> None:
    check_ranges(t, "train", checks.TRAIN)
    if t.processes > 1 and t.mode != "central":
        raise ConfigError(
            f"train.processes={t.processes} is for central training; a federated simulation spreads its "
            "clients over Ray instead (federated.ray_address): set train.processes=1"
        )


def _validate_dp(cfg: Config) -> None:
    """Sample-level DP's numbers, and every schedule the accountant must be able to bound."""
    check_ranges(cfg.dp, "dp", checks.DP)
    dp_fits = [
        ("regressor.dp_fit", cfg.regressor.dp_fit),
        ("cnn.dp_fit", cfg.cnn.dp_fit),
        ("distill.fit", cfg.distill.fit),
    ]
    for key, fit in dp_fits:
        check(fit.epochs <= MAX_DP_EPOCHS, f"{key}.epochs", fit.epochs, f"<= {MAX_DP_EPOCHS} (the accountant's range)")
    f = cfg.federated
    for name in schedule_sections(cfg):  # each model's schedule as it runs (federated.* above 0 override it)
        own = getattr(cfg, name).federated
        for rounds_key, epochs_key in (("rounds", "local_epochs"), ("dp_rounds", "dp_local_epochs")):
            rounds, epochs = getattr(f, rounds_key) or getattr(own, rounds_key), getattr(f, epochs_key)
            epochs = epochs or getattr(own, epochs_key)
            check(
                rounds * epochs <= MAX_DP_EPOCHS,
                f"{name}.federated.{rounds_key} * {name}.federated.{epochs_key} (or federated.*)",
                rounds * epochs,
                f"<= {MAX_DP_EPOCHS} (the accountant's range)",
            )


def _validate_distill(k: DistillConfig) -> None:
    check_ranges(k.fit, "distill.fit", checks.FIT)
    check_ranges(k, "distill", checks.DISTILL)


def _validate_explain(e: ExplainConfig) -> None:
    check_ranges(e, "explain", checks.EXPLAIN)
    for key in ("regressor_methods", "cnn_methods"):
        methods = getattr(e, key)
        check(
            len(methods) >= 1 and len(set(methods)) == len(methods),
            f"explain.{key}",
            list(methods),
            'one or more distinct explainer names, e.g. ["shap-exact", "lime-tabular"]',
        )


def _validate_federated(f: FederatedConfig) -> None:
    check_ranges(f, "federated", checks.FEDERATED)
    check(
        1 <= f.min_clients <= f.n_clients,
        "federated.min_clients",
        f.min_clients,
        f"in [1, federated.n_clients={f.n_clients}]",
    )


def _validate_secagg(cfg: Config) -> None:
    """SecAgg+ settings (issue 14)."""
    f, a = cfg.federated, cfg.federated.secagg
    check(
        a.num_shares == 0 or (a.num_shares >= 3 and a.num_shares % 2 == 1),
        "federated.secagg.num_shares",
        a.num_shares,
        "0 (every sampled client) or an odd integer >= 3",
    )
    # Flower's SecAgg+ wraps the neighbour ring around the sampled clients: more shares than clients gives each
    # client only n_clients of them, while the threshold is taken of num_shares (a round halts, or the record
    # would overstate the dropouts it survives).
    check(
        a.num_shares <= f.n_clients,
        "federated.secagg.num_shares",
        a.num_shares,
        f"<= federated.n_clients = {f.n_clients} (0 = every client)",
    )
    check(
        0 < a.reconstruction_threshold <= 1,
        "federated.secagg.reconstruction_threshold",
        a.reconstruction_threshold,
        "in (0, 1]",
    )
    check(a.clipping_range > 0, "federated.secagg.clipping_range", a.clipping_range, "> 0")
    check(
        a.quantization_range >= 2 and f.n_clients * a.quantization_range < 2**32,
        "federated.secagg.quantization_range",
        a.quantization_range,
        f">= 2 and < 2^32 / federated.n_clients = {2**32 // f.n_clients} (the masked sum must not wrap around)",
    )
    if f.secure_aggregation:
        check(
            f.strategy == "fedavg",
            "federated.strategy",
            f.strategy,
            "'fedavg' when federated.secure_aggregation=true (SecAgg+ computes a weighted sum)",
        )
        check(f.n_clients >= 3, "federated.n_clients", f.n_clients, ">= 3 when federated.secure_aggregation=true")


def _validate_client_dp(cfg: Config) -> None:
    """User-level DP settings (issue 14)."""
    u = cfg.client_dp
    check_ranges(u, "client_dp", checks.CLIENT_DP)
    if u.enabled and u.noise_placement == "client" and not cfg.federated.secure_aggregation:
        raise ConfigError(
            "client_dp.noise_placement='client' needs federated.secure_aggregation=true (otherwise the server sees each "
            "client's weakly-noised update); set federated.secure_aggregation=true or client_dp.noise_placement='server'"
        )
    if u.enabled:
        check(
            cfg.federated.strategy == "fedavg",
            "federated.strategy",
            cfg.federated.strategy,
            "'fedavg' when client_dp.enabled (DP-FedAvg replaces the aggregation)",
        )


def check_pipeline_mode(cfg: Config) -> None:
    """Refuse ``client_dp.enabled=true`` for a central ``python -m pipeline`` run (``train.mode=central``).

    User-level DP is a federated mechanism: central training would ignore the switch and release a
    model without the guarantee asked for. Only the pipeline's entry point calls this; the Flower
    launchers (``federated.launch.deploy``, the ServerApp) train federated whatever ``train.mode`` says.

    Raises
    ------
    ConfigError
        If ``client_dp.enabled`` and ``train.mode`` is not ``federated``.
    """
    if cfg.client_dp.enabled and cfg.train.mode != "federated":
        raise ConfigError(
            f"client_dp.enabled=true is user-level DP for federated training, but train.mode={cfg.train.mode} trains "
            "centrally and would ignore it; set train.mode=federated, or use dp.enabled=true for central DP"
        )


# --------------------------------------------------------------------------- flat views and TOML


def flatten(cfg: Any, prefix: str = "") -> dict[str, Scalar | list[Scalar]]:
    """Flatten a config dataclass into dotted keys (the form of overrides and Flower's run-config)."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            out.update(flatten(value, prefix + f.name + "."))
        else:
            out[prefix + f.name] = list(value) if isinstance(value, tuple) else value
    return out


def from_flat(flat: Mapping[str, Any]) -> Config:
    """Inverse of :func:`flatten`: rebuild (and validate) a Config from dotted keys."""
    tree: dict[str, Any] = {}
    for key, value in flat.items():
        _set_dotted(tree, key, value)
    cfg = _build(Config(), tree, prefix="")
    validate(cfg)
    return cfg


def to_toml(cfg: Any) -> str:
    """Render a config as TOML that :func:`load_config` reads back to an equal Config.

    Every key and value is written by ``tomli_w`` (a real TOML writer: strings with quotes,
    backslashes, newlines or control characters survive); this function only adds the section
    headers, whose names are our own identifiers, and each key's documenting comment.

    Raises
    ------
    ConfigError
        If the rendered text does not read back to the same values (never expected; a guard
        so a run directory is never given a config it cannot resume from).
    """
    lines: list[str] = []
    _emit(cfg, "", lines)
    text = "\n".join(lines).strip() + "\n"
    if dataclasses.is_dataclass(cfg) and _flat_tree(tomllib.loads(text)) != flatten(cfg):
        raise ConfigError("the resolved config does not survive a TOML round trip; report this as a bug")
    return text


def _flat_tree(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            out.update(_flat_tree(value, prefix + key + "."))
        else:
            out[prefix + key] = value
    return out


def _emit(obj: Any, section: str, lines: list[str]) -> None:
    comments = _field_comments(type(obj))
    nested = []
    if section:
        lines.append(f"\n[{section}]")
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            nested.append((f.name, value))
            continue
        comment = f"  # {comments[f.name]}" if comments.get(f.name) else ""
        plain = list(value) if isinstance(value, tuple) else value
        lines.append(tomli_w.dumps({f.name: plain}).rstrip("\n") + comment)
    for name, value in nested:
        _emit(value, f"{section}.{name}" if section else name, lines)


def _field_comments(cls: type) -> dict[str, str]:
    """The trailing ``# comment`` of each field in the class source: one place for the docs."""
    import inspect

    try:
        source = inspect.getsource(cls)
    except (OSError, TypeError):
        return {}
    out = {}
    for line in source.splitlines():
        name, sep, rest = line.strip().partition(":")
        if sep and "#" in rest and name.isidentifier():
            out[name] = rest.split("#", 1)[1].strip()
    return out


def section_help() -> str:
    """One line per config section with its keys, for ``--help``."""
    parts = []
    for f in dataclasses.fields(Config):
        value = getattr(Config(), f.name)
        if dataclasses.is_dataclass(value):
            parts.append(f"  [{f.name}] " + ", ".join(flatten(value).keys()))
        else:
            parts.append(f"  {f.name}")
    return "\n".join(parts)
