"""Settings that change nothing under the current switches: which keys count only when, and the check.

``python -m pipeline dp.target_epsilon=3`` runs without DP: the key is valid, but it counts only
with ``dp.enabled=true``. Such a key is a silent mistake, so the CLI warns once per key, naming the
switch that would make it count, and ``--strict`` refuses it.

:data:`CONDITIONAL` declares, as data, which keys (glob patterns over dotted names) count only under
which switch. A key added later to a listed section (``federated.*``, ``audit.*``, ``client_dp.*``,
``*.dp_fit.*``) is covered by its section's pattern without code; a key that always counts needs no
entry. A key matched by several entries counts only when all of them hold.

Which keys a user *gave*: every command-line override, and every key of a ``--config`` file whose
value differs from the default (``python -m pipeline config > my.toml`` writes every key, most of
them untouched).
"""

from __future__ import annotations

import fnmatch
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

from auditml_core.config import Config, _flat_tree, _parse_scalar, flatten


@dataclass(frozen=True)
class CountsOnlyIf:
    """Keys matching ``keys`` (fnmatch patterns, minus ``except_keys``) change nothing unless ``when(cfg)``."""

    keys: tuple[str, ...]
    when: Callable[[Config], bool]
    switch: str  # what to set so that they count, as the user would write it
    except_keys: tuple[str, ...] = ()

    def matches(self, key: str) -> bool:
        """Whether ``key`` is one of this entry's keys."""
        return key not in self.except_keys and any(fnmatch.fnmatchcase(key, p) for p in self.keys)


def _scatter_in_use(cfg: Config) -> bool:
    arch = cfg.cnn.dp_architecture if cfg.dp.enabled and cfg.cnn.dp_architecture != "same" else cfg.cnn.architecture
    return arch == "scatter"


# Which keys count only under which switch. Read by the code that uses each key: pipeline/train.py,
# auditml_core/teacher.py (dp_fit, public pretraining), auditml_core/training.py (patience: off under DP and
# without a validation split, i.e. federated), pipeline/distill.py (augmentation, student_dp), federated/.
CONDITIONAL: tuple[CountsOnlyIf, ...] = (
    CountsOnlyIf(("data.target",), lambda c: bool(c.data.tabular_csv), 'data.tabular_csv="FILE.csv"'),
    CountsOnlyIf(
        ("dp.*", "*.dp_fit.*", "cnn.dp_activation", "cnn.dp_architecture"),
        lambda c: c.dp.enabled,
        "dp.enabled=true",
        except_keys=("dp.enabled", "dp.pretrain_non_private", "dp.public_pretrain_epochs"),
    ),
    CountsOnlyIf(
        ("dp.public_pretrain_epochs",),
        lambda c: c.dp.enabled or c.dp.pretrain_non_private,
        "dp.enabled=true or dp.pretrain_non_private=true",
    ),
    CountsOnlyIf(
        ("dp.pretrain_non_private",),
        lambda c: not c.dp.enabled,
        "dp.enabled=false (under DP the public pretraining always runs)",
    ),
    CountsOnlyIf(("cnn.scatter_*",), _scatter_in_use, "cnn.architecture=scatter (or cnn.dp_architecture=scatter)"),
    CountsOnlyIf(
        ("train.patience",),
        lambda c: c.train.mode == "central" and not c.dp.enabled,
        "train.mode=central and dp.enabled=false (early stopping reads private validation data)",
    ),
    CountsOnlyIf(
        ("federated.*", "client_dp.*", "*.federated.*"), lambda c: c.train.mode == "federated", "train.mode=federated"
    ),
    CountsOnlyIf(
        ("federated.dp_rounds", "federated.dp_local_epochs", "*.federated.dp_rounds", "*.federated.dp_local_epochs"),
        lambda c: c.dp.enabled or c.client_dp.enabled,
        "dp.enabled=true or client_dp.enabled=true",
    ),
    # federated.rounds / local_epochs above 0 set every model's schedule in both modes (auditml_core.config)
    CountsOnlyIf(
        ("*.federated.rounds", "*.federated.dp_rounds", "federated.dp_rounds"),
        lambda c: c.federated.rounds == 0,
        "federated.rounds=0 (above 0 it sets every model's rounds)",
    ),
    CountsOnlyIf(
        ("*.federated.local_epochs", "*.federated.dp_local_epochs", "federated.dp_local_epochs"),
        lambda c: c.federated.local_epochs == 0,
        "federated.local_epochs=0 (above 0 it sets every model's local epochs)",
    ),
    CountsOnlyIf(
        ("stages.workers",),
        lambda c: c.train.processes == 1,
        "train.processes=1 (a multi-process training runs its later stages in rank 0 alone)",
    ),
    CountsOnlyIf(("federated.proximal_mu",), lambda c: c.federated.strategy == "fedprox", "federated.strategy=fedprox"),
    CountsOnlyIf(("federated.server_lr",), lambda c: c.federated.strategy == "fedadam", "federated.strategy=fedadam"),
    CountsOnlyIf(
        ("federated.dirichlet_alpha",),
        lambda c: c.federated.partitioner == "dirichlet",
        "federated.partitioner=dirichlet",
    ),
    CountsOnlyIf(
        ("federated.secagg.*",), lambda c: c.federated.secure_aggregation, "federated.secure_aggregation=true"
    ),
    CountsOnlyIf(
        ("client_dp.*",), lambda c: c.client_dp.enabled, "client_dp.enabled=true", except_keys=("client_dp.enabled",)
    ),
    CountsOnlyIf(
        ("client_dp.clip_sigmas",),
        lambda c: c.client_dp.noise_placement == "client",
        "client_dp.noise_placement=client",
    ),
    CountsOnlyIf(("audit.*",), lambda c: c.audit.enabled, "audit.enabled=true", except_keys=("audit.enabled",)),
    CountsOnlyIf(
        ("distill.augment_*", "distill.mixup_*", "distill.augmented_epochs"),
        lambda c: c.dp.enabled and c.distill.transfer != "private",
        "dp.enabled=true (they augment the public images a DP teacher labels)",
    ),
    CountsOnlyIf(
        ("distill.student_dp",),
        lambda c: c.dp.enabled and c.distill.transfer == "private",
        "dp.enabled=true and distill.transfer=private",
    ),
    CountsOnlyIf(
        ("tracking.*",),
        lambda c: bool(c.tracking.mlflow_uri),
        'tracking.mlflow_uri="sqlite:///mlruns.db" (or another MLflow store)',
        except_keys=("tracking.mlflow_uri",),
    ),
)


def inert_settings(cfg: Config, given: Iterable[str]) -> dict[str, str]:
    """The keys of ``given`` that change nothing under ``cfg``, each with the switch(es) that would make it count.

    Parameters
    ----------
    cfg : the resolved configuration.
    given : dotted keys the user set (:func:`given_keys`).

    Returns
    -------
    dict
        ``{key: "dp.enabled=true"}`` in the order of ``given``, one entry per key (several switches
        joined with "and"); empty when every given key counts.
    """
    out: dict[str, str] = {}
    for key in given:
        missing = [rule.switch for rule in CONDITIONAL if rule.matches(key) and not rule.when(cfg)]
        if missing and key not in out:
            out[key] = " and ".join(dict.fromkeys(missing))
    return out


def given_keys(path: str | Path | None, overrides: Iterable[str]) -> list[str]:
    """The dotted keys a user set: every override, and each key of the TOML file at ``path`` not at its default.

    Call it after :func:`auditml_core.config.load_config` accepted the same arguments (it does not re-validate).
    """
    defaults = flatten(Config())
    keys: list[str] = []
    if path is not None:
        tree = tomllib.loads(Path(path).read_text(encoding="utf-8"))
        keys += [k for k, v in _flat_tree(tree).items() if not _same(defaults.get(k), v)]
    for item in overrides:
        key, _, raw = item.partition("=")
        value = _parse_scalar(raw.strip())
        key = key.strip()
        keys += [f"{key}.{k}" for k in _flat_tree(value)] if isinstance(value, Mapping) else [key]
    return list(dict.fromkeys(keys))


def _same(default: Any, value: Any) -> bool:
    return default == (list(value) if isinstance(value, tuple) else value)
