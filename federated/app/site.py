"""Per-site data: each SuperNode reads only its own file; the server never loads a row or a label.

A SuperNode becomes a *site* when its node config names its data (``app.sites=true`` in the
run-config tells the ServerApp to expect sites)::

    flower-supernode ... --node-config 'partition-id=0 num-partitions=3 data-path="/data/site0.csv" target="y" ledger-path="/data/ledger"'

============== ============================================================================
node config    meaning
============== ============================================================================
partition-id   the site's number in [0, num-partitions): its seeds and its key in the record
data-path      a CSV (regressor) or an ``.npz`` / image folder (CNN), read with ``auditml_core.datasets``
target         the CSV's target column (default: ``data.target`` of the run-config)
ledger-path    folder of the site's privacy ledger (``<model>.json``), default
               ``<data folder>/privacy-ledger``: the site's authority on its ε, outside the server's reach
============== ============================================================================

Protocol, before the first round (:func:`agree`): the server sends every site a ``query.schema``
message; each site reads its file once per process (:func:`local_data`), splits it into
train/val/test locally (seeded, ``data.*_fraction``; no public split: public data is not a
site's), and replies with its schema (columns, dtypes, target, image shape, class list, row
counts), the moments of its training split (count, sums, centred sums of squares: see
:mod:`federated.app.schema`) and, without DP, its training class counts. The server refuses
disagreeing sites (:func:`federated.app.schema.compare_schemas`), pools the moments into the
standardisation and builds the model spec from the agreed shape. Every train and evaluate
message then carries the standardisation and the spec (:func:`message_config`); each site
scales its own rows with them. The server evaluates the global model by asking the sites
(``evaluate`` messages, :func:`evaluate_at_sites`), which reply with sufficient statistics so
that the pooled loss, R² and accuracy are exact.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict

from auditml_core import data as core_data
from auditml_core import models, seeds, training
from auditml_core.config import Config
from auditml_core.data import Dataset
from auditml_core.datasets import load_images, load_table
from auditml_core.errors import ConfigError, DataError, UserError
from auditml_core.teacher import model_spec
from federated.app import schema
from federated.app.strategies import node_of_reply

log = logging.getLogger(__name__)

DATA_KEY, TARGET_KEY, LEDGER_KEY = "data-path", "target", "ledger-path"
SCHEMA_QUERY = "query.schema"  # message type of the server's schema / moments question
LOCAL_SPLITS = ("train", "val", "test")
EVAL_TIMEOUT_S = 600.0  # seconds the server waits for the sites' evaluation replies each round
EVAL_SPLITS_KEY = "eval-splits"  # evaluate message config: the splits to evaluate ("val" each round, "test" at the end)


def is_site(node_config: Mapping[str, Any]) -> bool:
    """Whether this SuperNode was started with its own data (``data-path`` in its node config)."""
    return bool(node_config.get(DATA_KEY))


@dataclass(frozen=True)
class LocalData:
    """One site's own rows, split locally, not yet standardised (they never leave the site)."""

    kind: str  # "table" or "images"
    x: Mapping[str, np.ndarray]  # split -> raw float64 rows / images
    y: Mapping[str, np.ndarray]  # split -> float64 target / int64 classes
    feature_names: tuple[str, ...]
    target_name: str
    class_names: tuple[str, ...]
    dtypes: tuple[str, ...]

    def schema(self) -> dict[str, Any]:
        """What the site tells the server about its data (no row, no label)."""
        return {
            "kind": self.kind,
            "feature_names": list(self.feature_names),
            "dtypes": list(self.dtypes),
            "target": self.target_name,
            "input_shape": list(self.x["train"].shape[1:]),
            "class_names": list(self.class_names),
            "rows": int(sum(len(v) for v in self.y.values())),
            **{f"rows_{s}": int(len(self.y[s])) for s in LOCAL_SPLITS},
        }

    def moments(self) -> dict[str, Any]:
        """Count, sums and centred sums of squares of the training split (for federated standardisation)."""
        x = self.x["train"]
        if self.kind == "images":  # per channel, over every pixel of every training image
            return {"x": schema.local_moments(np.moveaxis(x, 1, -1).reshape(-1, x.shape[1])).to_json()}
        return {
            "x": schema.local_moments(x).to_json(),
            "y": schema.local_moments(self.y["train"][:, None]).to_json(),
        }


_LOCAL: dict[tuple, LocalData] = {}  # per process: a site reads its file once (keyed by path, size, mtime, settings)


def _expected_kind(model: str) -> str:
    return "table" if models.model_entry(model).dataset == "tabular" else "images"


def local_data(node_config: Mapping[str, Any], cfg: Config, *, model: str) -> LocalData:
    """This site's data: its own file, read with ``auditml_core.datasets`` and split locally (cached per process).

    Raises
    ------
    DataError
        For a missing or unusable file (the reader's message), or too few rows to split.
    """
    path = Path(str(node_config[DATA_KEY]))
    target = str(node_config.get(TARGET_KEY) or cfg.data.target)
    try:
        st = path.stat()
        stamp = (st.st_size, st.st_mtime_ns)
    except OSError:
        stamp = None
    key = (
        str(path),
        stamp,
        target,
        model,
        cfg.seed,
        cfg.data.val_fraction,
        cfg.data.test_fraction,
        cfg.data.nan_policy,
        cfg.data.ignore_columns,
        cfg.data.identifier_check,
    )
    if key in _LOCAL:
        return _LOCAL[key]
    seed = seeds.stage_seed(cfg.seed, "data")
    split_cfg = dataclasses.replace(cfg.data, public_fraction=0.0)  # public data is not a site's
    if _expected_kind(model) == "table":
        d = cfg.data
        raw = load_table(str(path), target, ignore_columns=d.ignore_columns, identifier_check=d.identifier_check)
        x, y, _ = core_data.finite_rows(raw.x, raw.y, cfg.data.nan_policy, f"site file {str(path)!r}")
        if cfg.data.nan_policy == "impute" and not np.isfinite(x).all():
            raise DataError(
                f"site file {str(path)!r} has missing feature values; data.nan_policy='impute' is not supported with "
                "per-site data (imputing needs statistics across sites): clean the file or use 'drop'"
            )
        split = core_data.split_indices(len(y), split_cfg, seed=seed, stratify=None)
        import pandas as pd

        dtypes = tuple(str(t) for t in pd.read_csv(path, nrows=200).dtypes[list(raw.feature_names)])
        out = LocalData(
            kind="table",
            x={s: x[split[s]] for s in LOCAL_SPLITS},
            y={s: y[split[s]] for s in LOCAL_SPLITS},
            feature_names=raw.feature_names,
            target_name=raw.target_name,
            class_names=(),
            dtypes=dtypes,
        )
    else:
        raw = load_images(str(path))
        x, yf, _ = core_data.finite_rows(
            raw.x, raw.y.astype(np.float64), cfg.data.nan_policy, f"site file {str(path)!r}"
        )
        if not np.isfinite(x).all():
            raise DataError(f"site file {str(path)!r} has non-finite pixels; clean them or set data.nan_policy='drop'")
        y = yf.astype(np.int64)
        split = core_data.split_indices(len(y), split_cfg, seed=seed, stratify=y)
        out = LocalData(
            kind="images",
            x={s: x[split[s]] for s in LOCAL_SPLITS},
            y={s: y[split[s]] for s in LOCAL_SPLITS},
            feature_names=(),
            target_name="",
            class_names=raw.class_names,
            dtypes=(str(raw.x.dtype),),
        )
    _LOCAL.clear()  # one site, one file: keep only the newest
    _LOCAL[key] = out
    return out


def standardise(local: LocalData, std: Mapping[str, Any], split: str) -> tuple[np.ndarray, np.ndarray]:
    """``split`` of the site's rows scaled with the federation's standardisation (as ``auditml_core.data`` scales)."""
    x, y = local.x[split], local.y[split]
    if local.kind == "images":
        mean = np.asarray(std["channel_mean"])[None, :, None, None]
        sd = np.asarray(std["channel_std"])[None, :, None, None]
        return ((x - mean) / sd).astype(np.float32), y
    xs = ((x - np.asarray(std["x_mean"])) / np.asarray(std["x_std"])).astype(np.float32)
    ys = ((y - float(std["y_mean"])) / float(std["y_std"])).astype(np.float32)
    return xs, ys


def ledger_file(node_config: Mapping[str, Any], model: str) -> Path:
    """The site's own privacy-ledger file for ``model`` (never under the server's work folder)."""
    folder = node_config.get(LEDGER_KEY)
    base = Path(str(folder)) if folder else Path(str(node_config[DATA_KEY])).resolve().parent / "privacy-ledger"
    return base / f"{model}.json"


# ------------------------------------------------------------------------------------- site side


def schema_reply(msg: Message, context: Context, cfg: Config, *, model: str, partition_id: int) -> Message:
    """The site's answer to :data:`SCHEMA_QUERY`: its schema, training moments and (without DP) class counts."""
    local = local_data(context.node_config, cfg, model=model)
    report: dict[str, Any] = {"partition-id": partition_id, "schema": local.schema(), "moments": local.moments()}
    if local.kind == "images" and not cfg.dp.enabled:
        report["class_counts"] = np.bincount(local.y["train"], minlength=len(local.class_names)).tolist()
    return Message(RecordDict({"site": ConfigRecord({"report": json.dumps(report)})}), reply_to=msg)


def message_config(task) -> dict[str, str]:
    """What every train / evaluate message carries in per-site mode: the standardisation and the model spec."""
    if task.sites is None:
        return {}
    return {
        "site-standardisation": json.dumps(task.sites["standardisation"]),
        "site-spec": json.dumps(dict(task.spec), sort_keys=True),
    }


@dataclass(frozen=True)
class Shard:
    """The rows one client trains on, and where its ledger lives."""

    x: np.ndarray
    y: np.ndarray
    spec: Mapping[str, Any]
    ledger: Path


def train_shard(task, context: Context, config: Mapping[str, Any]) -> Shard:
    """This site's standardised training rows (per-site mode)."""
    local = local_data(context.node_config, task.cfg, model=task.name)
    std, spec = _from_config(config)
    x, y = standardise(local, std, "train")
    return Shard(x=x, y=y, spec=spec, ledger=ledger_file(context.node_config, task.name))


def _from_config(config: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    if "site-standardisation" not in config:
        raise ConfigError(
            "this SuperNode has data-path in its node config but the run is not in per-site mode; "
            "run with app.sites=true (python -m federated.launch.deploy --site-data ...) or drop data-path"
        )
    return json.loads(str(config["site-standardisation"])), json.loads(str(config["site-spec"]))


def evaluate_reply(msg: Message, context: Context, task, *, partition_id: int) -> Message:
    """Evaluate the global model on this site's val and test splits; reply with pooled-exact statistics."""
    local = local_data(context.node_config, task.cfg, model=task.name)
    std, spec = _from_config(msg.content["config"])
    model = models.build(spec)
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    metrics: dict[str, float | int] = {"partition-id": partition_id}
    # Every round asks for "val" only (the curve, any selection); "test" once, after the last round.
    splits = str(msg.content["config"].get(EVAL_SPLITS_KEY, "val,test")).split(",")
    metrics.update({"val-n": 0, "test-n": 0})
    for split in (s for s in ("val", "test") if s in splits):
        x, y = standardise(local, std, split)
        n = len(y)
        metrics[f"{split}-n"] = n
        if n == 0:
            continue
        m = training.evaluate(model, x, y, task="regression" if local.kind == "table" else "classification")
        metrics[f"{split}-loss-sum"] = m["loss"] * n
        if local.kind == "table":
            yd = np.asarray(y, dtype=np.float64)
            metrics[f"{split}-y-sum"], metrics[f"{split}-y-sumsq"] = float(yd.sum()), float((yd**2).sum())
        else:
            metrics[f"{split}-correct"] = float(m["accuracy"] * n)
    metrics["num-examples"] = metrics["val-n"]
    return Message(RecordDict({"metrics": MetricRecord(metrics)}), reply_to=msg)


# ------------------------------------------------------------------------------------- server side


def _ask(
    grid, node_ids: list[int], content_of, message_type: str, timeout: float
) -> tuple[dict[int, Message], dict[int, str]]:
    msgs = [Message(content_of(), dst_node_id=nid, message_type=message_type) for nid in node_ids]
    replies, errors = {}, {}
    got = list(grid.send_and_receive(msgs, timeout=timeout))
    addressed = node_of_reply(msgs)  # after the push: the grid gives the messages their ids
    for rep in got:
        nid = addressed(rep)
        if rep.has_error():
            errors[nid] = str(rep.error.reason).strip().splitlines()[-1][:300] if rep.error.reason else "error"
        else:
            replies[nid] = rep
    for nid in node_ids:
        if nid not in replies and nid not in errors:
            errors[nid] = f"no reply within {timeout:.0f} s"
    return replies, errors


def refuse_unsupported(cfg: Config) -> None:
    """Refuse, before anything starts, what per-site mode cannot do yet (the launchers and the ServerApp call it).

    Raises
    ------
    ConfigError
        For ``federated.secure_aggregation`` or ``client_dp.enabled`` with per-site data.
    """
    asked = [
        k
        for k, on in (
            ("federated.secure_aggregation", cfg.federated.secure_aggregation),
            ("client_dp.enabled", cfg.client_dp.enabled),
        )
        if on
    ]
    if asked:
        raise ConfigError(
            f"per-site data (app.sites=true, --site-data) does not support {' or '.join(asked)} yet; "
            f"set {' and '.join(k + '=false' for k in asked)}, or use the simulation / --n-supernodes"
        )


def agree(grid, task, *, timeout: float):
    """Ask every connected site for its schema and moments; refuse disagreement; return the server's task.

    The returned task holds a row-less :class:`auditml_core.data.Dataset` (shapes, names, the federated
    standardisation), the model spec for the agreed shape, and ``sites``: what the sites
    reported and what the record must say about it.

    Raises
    ------
    SiteMismatchError
        Sites that disagree (naming the site and the difference), or a site that cannot report.
    """
    cfg = task.cfg
    n_sites = cfg.federated.n_clients
    refuse_unsupported(cfg)
    by_pid = _site_reports(grid, task.name, timeout=timeout)
    ref, sizes = _check_agreement(task, by_pid)
    standardisation = schema.pooled_standardisation(ref["kind"], [by_pid[p]["moments"] for p in range(n_sites)])
    shell = _row_less_dataset(ref, standardisation)
    spec = model_spec(cfg, task.name, shell)
    sites = _sites_record(cfg, by_pid, ref, standardisation=standardisation, sizes=sizes)
    log.info("%d sites agree on %s data; train rows per site %s", len(by_pid), ref["kind"], sizes)
    return dataclasses.replace(task, dataset=shell, spec=spec, sites=sites)


def _site_reports(grid, model_name: str, *, timeout: float) -> dict[int, dict[str, Any]]:
    """Every connected site's report (schema, moments, class counts) by partition id, with its ``node`` id.

    Raises
    ------
    SiteMismatchError
        A site that does not report, or two sites that say the same partition id.
    """
    node_ids = sorted(grid.get_node_ids())
    replies, errors = _ask(
        grid, node_ids, lambda: RecordDict({"config": ConfigRecord({"model": model_name})}), SCHEMA_QUERY, timeout
    )
    if errors:
        nid, why = next(iter(errors.items()))
        raise schema.SiteMismatchError(
            f"the site on node {nid} did not report its schema ({why}); check that SuperNode's data-path and its log"
        )
    reports = {nid: json.loads(str(rep.content["site"]["report"])) for nid, rep in replies.items()}
    by_pid: dict[int, dict[str, Any]] = {}
    for nid, rep in reports.items():
        pid = int(rep["partition-id"])
        if pid in by_pid:
            raise schema.SiteMismatchError(
                f"two sites (nodes {by_pid[pid]['node']} and {nid}) both say partition-id={pid}; give each site its own"
            )
        by_pid[pid] = {**rep, "node": nid}
    return by_pid


def _check_agreement(task, by_pid: dict[int, dict[str, Any]]) -> tuple[dict[str, Any], list[int]]:
    """Refuse sites whose schemas, data kind, partition ids or training rows do not fit the task.

    Returns
    -------
    (the agreed schema, each site's training rows in partition order)
    """
    f = task.cfg.federated
    names = {pid: f"site {pid} (node {r['node']})" for pid, r in by_pid.items()}
    schema.compare_schemas({names[pid]: r["schema"] for pid, r in by_pid.items()})
    ref = by_pid[min(by_pid)]["schema"]
    if ref["kind"] != _expected_kind(task.name):
        raise schema.SiteMismatchError(
            f"the sites hold {ref['kind']} data but app.model={task.name!r}; train the "
            f"{'regressor on CSV files' if ref['kind'] == 'table' else 'CNN on image data'} instead"
        )
    if sorted(by_pid) != list(range(f.n_clients)):
        raise schema.SiteMismatchError(
            f"the sites say partition-id {sorted(by_pid)}, but federated.n_clients={f.n_clients} needs 0..{f.n_clients - 1}"
        )
    sizes = [int(by_pid[p]["schema"]["rows_train"]) for p in range(f.n_clients)]
    min_rows = 1 if task.cfg.dp.enabled else task.fit_cfg.batch_size
    for p, n in enumerate(sizes):
        if n < min_rows:
            raise DataError(
                f"{names[p]} has {n} training row(s), fewer than {task.fit_key}.batch_size={task.fit_cfg.batch_size}; "
                "lower the batch size or give that site more rows"
            )
    return ref, sizes


def _sites_record(
    cfg: Config,
    by_pid: dict[int, dict[str, Any]],
    ref: dict[str, Any],
    *,
    standardisation: dict[str, Any],
    sizes: list[int],
) -> dict[str, Any]:
    """What the record says about the sites: their counts and schema, and what the server learnt without DP."""
    n_sites = cfg.federated.n_clients
    not_protected = [
        "each site's row counts (total, train, val, test) and its schema (column names, dtypes, image shape, classes)",
        "each site's per-"
        + ("feature" if ref["kind"] == "table" else "channel")
        + " training count, sum and centred sum of squares (federated standardisation: exact, not DP-noised)",
        "each site's validation/test evaluation statistics (loss sums, correct counts, target sums) per round",
    ]
    label_histograms = None
    if ref["kind"] == "images":
        if cfg.dp.enabled:
            not_protected.append("training label histograms: left out (under DP the sites do not send them)")
        else:
            label_histograms = [by_pid[p].get("class_counts") for p in range(n_sites)]
            not_protected.append("each site's training class counts (label histograms in the record)")
    return {
        "mode": "per-site data: each SuperNode reads its own file; the server holds no row and no label",
        "sites": [
            {
                "partition_id": p,
                "node_id": by_pid[p]["node"],
                **{k: v for k, v in by_pid[p]["schema"].items() if k.startswith("rows")},
                "dtypes": by_pid[p]["schema"]["dtypes"],
            }
            for p in range(n_sites)
        ],
        "schema": {k: ref[k] for k in schema.AGREED},
        "standardisation": standardisation,
        "train_sizes": sizes,
        "label_histograms": label_histograms,
        "not_dp_protected": not_protected,
        "evaluation": "global model evaluated by the sites on their own val/test splits; pooled exactly from their sums",
        "public_pretraining": "none: the server holds no public split in per-site mode",
    }


class AdmittedSites:
    """The grid the strategy and the evaluation see in per-site mode: only nodes of agreed sites.

    A site whose SuperNode comes back (restarted with the same node config) connects under a new
    node id that took no part in :func:`agree`. Before it may train, it is asked for its schema and
    admitted only if it names an agreed ``partition-id`` that has no connected node now and reports
    that site's schema and row counts unchanged (the federation's standardisation was computed
    from them); anything else is left out, logged and listed in ``refused``. A site whose old node
    is still listed (the SuperLink declares a dead node offline only after two missed heartbeats)
    waits in ``waiting`` and is asked again at the next round. Everything but ``get_node_ids`` goes
    to the wrapped grid.
    """

    def __init__(self, grid, task, *, timeout: float):
        self._grid, self._task, self._timeout = grid, task, timeout
        self._agreed = {int(s["partition_id"]): s for s in task.sites["sites"]}
        self.admitted: dict[int, int] = {int(s["node_id"]): int(s["partition_id"]) for s in task.sites["sites"]}
        self.rejoined: list[dict[str, Any]] = []  # site, new node, the node it had, when
        self.refused: dict[int, str] = {}  # node id -> why it may not train
        self.waiting: dict[int, str] = {}  # node id -> why it may not train yet (asked again next time)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grid, name)

    @property
    def replaced_nodes(self) -> set[int]:
        """Node ids whose site came back under another one (the strategy no longer counts them missing)."""
        return {int(r["previous_node_id"]) for r in self.rejoined if r["previous_node_id"] is not None}

    def get_node_ids(self) -> list[int]:
        """Connected nodes of agreed sites (newcomers are checked first)."""
        connected = [int(n) for n in self._grid.get_node_ids()]
        new = [n for n in connected if n not in self.admitted and n not in self.refused]
        if new:
            self._admit(new, connected)
        return [n for n in connected if n in self.admitted]

    def _admit(self, nodes: list[int], connected: list[int]) -> None:
        query = lambda: RecordDict({"config": ConfigRecord({"model": self._task.name})})  # noqa: E731
        replies, errors = _ask(self._grid, nodes, query, SCHEMA_QUERY, self._timeout)
        self.refused.update({nid: f"did not report its schema: {why}" for nid, why in errors.items()})
        for nid, rep in replies.items():
            report = json.loads(str(rep.content["site"]["report"]))
            pid = int(report["partition-id"])
            live = {p for n, p in self.admitted.items() if n in connected}
            why = None
            if pid not in self._agreed:
                why = f"partition-id={pid} is not a site of this federation (agreed: {sorted(self._agreed)})"
            elif pid in live:
                if nid not in self.waiting:
                    log.warning("node %d waits: site %d is still connected as another node", nid, pid)
                self.waiting[nid] = f"partition-id={pid} is already connected as another node"
                continue
            else:
                agreed = self._agreed[pid]
                rows = {k: v for k, v in report["schema"].items() if k.startswith("rows")}
                try:
                    schema.compare_schemas(
                        {"agreed schema": self._task.sites["schema"], f"site {pid} (node {nid})": report["schema"]}
                    )
                except schema.SiteMismatchError as exc:
                    why = str(exc)
                if why is None and rows != {k: v for k, v in agreed.items() if k.startswith("rows")}:
                    why = f"its row counts {rows} differ from those agreed at the start (the standardisation used them)"
            if why is not None:
                self.refused[nid] = why
                log.warning("node %d may not train: %s", nid, why)
                continue
            previous = next((n for n, p in self.admitted.items() if p == pid), None)
            self.waiting.pop(nid, None)
            self.admitted[nid] = pid
            self.rejoined.append(
                {"partition_id": pid, "node_id": nid, "previous_node_id": previous, "unix": time.time()}
            )
            log.warning("site %d rejoined as node %d (was node %s)", pid, nid, previous)


def _row_less_dataset(ref: Mapping[str, Any], standardisation: Mapping[str, Any]) -> Dataset:
    shape = tuple(int(s) for s in ref["input_shape"])
    table = ref["kind"] == "table"
    empty_x = np.zeros((0, *shape), dtype=np.float32)
    empty_y = np.zeros(0, dtype=np.float32 if table else np.int64)
    return Dataset(
        name="tabular" if table else "images",
        task="regression" if table else "classification",
        x={s: empty_x for s in core_data.SPLITS},
        y={s: empty_y for s in core_data.SPLITS},
        index={s: np.zeros(0, dtype=np.int64) for s in core_data.SPLITS},
        feature_names=tuple(ref["feature_names"]),
        class_names=tuple(ref["class_names"]),
        target_name=str(ref["target"]),
        preprocessing=dict(standardisation),
        provenance={"source": "per-site data: the rows stay at the sites"},
    )


def evaluate_at_sites(
    grid, task, arrays: ArrayRecord, *, splits: tuple[str, ...] = ("val",), timeout: float = EVAL_TIMEOUT_S
) -> dict[str, float]:
    """Loss and R² or accuracy of ``arrays`` on ``splits`` over every site that answers, pooled exactly."""
    node_ids = sorted(grid.get_node_ids())
    config = ConfigRecord({**message_config(task), EVAL_SPLITS_KEY: ",".join(splits)})
    t0 = time.perf_counter()
    replies, errors = _ask(
        grid, node_ids, lambda: RecordDict({"arrays": arrays, "config": config}), "evaluate", timeout
    )
    out: dict[str, float] = {}
    rows = [rep.content["metrics"] for rep in replies.values()]
    for split in ("val", "test"):
        n = sum(int(m[f"{split}-n"]) for m in rows)
        if n == 0:
            continue
        present = [m for m in rows if int(m[f"{split}-n"]) > 0]
        out[f"{split}_loss"] = sum(float(m[f"{split}-loss-sum"]) for m in present) / n
        if task.dataset.task == "regression":
            sse = out[f"{split}_loss"] * n
            s, ss = sum(float(m[f"{split}-y-sum"]) for m in present), sum(float(m[f"{split}-y-sumsq"]) for m in present)
            sst = ss - s * s / n
            out[f"{split}_r2"] = 1.0 - sse / sst if sst > 0 else float("nan")
        else:
            out[f"{split}_accuracy"] = sum(float(m[f"{split}-correct"]) for m in present) / n
    out["sites_evaluated"] = float(len(replies))
    if errors:
        log.warning("evaluation: %d site(s) did not answer: %s", len(errors), errors)
    log.debug("site evaluation took %.2f s", time.perf_counter() - t0)
    return out


def require_site_mode_data(node_config: Mapping[str, Any], sites: bool) -> None:
    """Refuse a site started for per-site data in an emulated run, and the reverse (no silent fallback)."""
    if sites and not is_site(node_config):
        raise UserError(
            "the run is in per-site mode (app.sites=true) but this SuperNode has no data-path in its node config; "
            "start it with --node-config 'data-path=\"FILE\" ...'"
        )
