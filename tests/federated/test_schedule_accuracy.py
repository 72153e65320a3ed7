"""The default federated schedules reach central training's test metrics (issue 25 item 8), at one seed.

Central: the train stage's own central path. Federated: the real ServerApp and ClientApps of the train stage's
federation (both models, the default 5 clients and schedules), driven in-process through the tests' grid instead
of Flower's simulation engine: the same messages, seeds and aggregation (the pipeline's Flower simulation gives
the same test metrics: federated/README.md), without Ray's start-up. Tolerances: the issue's, 0.5 points (of
accuracy, or of R² x 100) on an IID partition and 1.5 points on a Dirichlet α = 0.5 label skew (the regressor's
target binned into quantiles). A federated model above central passes.
"""

import dataclasses

import pytest
from fed_helpers import InProcessGrid, server_context

from auditml_core import data as core_data
from auditml_core import models, seeds, training
from auditml_core.config import load_config
from auditml_core.teacher import model_specs
from federated.app.run_config import to_run_config
from federated.app.server_app import main
from federated.app.workdir import read_result, write_inputs

SEED = 0
TOLERANCE = {"iid": 0.005, "dirichlet": 0.015}
METRIC = {"regressor": "r2", "cnn": "accuracy"}


def _config(*overrides):
    return load_config(None, [f"seed={SEED}", *overrides])


@pytest.fixture(scope="module")
def central():
    from pipeline import train as train_stage

    cfg = _config()
    datasets = core_data.prepare(cfg, seed=seeds.stage_seed(cfg.seed, "data"))
    trained = train_stage.run(cfg, {"data": datasets}, seed=seeds.stage_seed(cfg.seed, "train")).models
    out = {}
    for name, model in trained.items():
        ds = datasets[models.model_entry(name).dataset]
        out[name] = training.evaluate(model.build(), ds.x["test"], ds.y["test"], task=ds.task)[METRIC[name]]
    return out


def federated_test_metrics(tmp_path, cfg, *, datasets=None, names=tuple(models.MODELS)) -> dict[str, float]:
    """Each model's test metric after the train stage's federation (of ``names``, one run) under ``cfg``, on
    ``datasets`` (default: the split of ``cfg.seed``)."""
    datasets = datasets or core_data.prepare(cfg, seed=seeds.stage_seed(cfg.seed, "data"))
    specs = model_specs(cfg, datasets)
    for name in names:
        write_inputs(tmp_path, name=name, dataset=datasets[models.model_entry(name).dataset], spec=specs[name])
    rc = to_run_config(cfg, work_dir=str(tmp_path), model=",".join(names), node_wait_s=2.0)
    main(InProcessGrid(rc, cfg.federated.n_clients), server_context(rc))
    return {name: read_result(tmp_path, name)[1]["final_metrics"][f"test_{METRIC[name]}"] for name in names}


@pytest.mark.slow
@pytest.mark.parametrize("partitioner", ["iid", "dirichlet"])
def test_the_default_schedules_reach_central(tmp_path, central, partitioner):
    cfg = _config("train.mode=federated", f"federated.partitioner={partitioner}", "federated.dirichlet_alpha=0.5")
    assert dataclasses.replace(cfg.federated, partitioner="iid", dirichlet_alpha=0.5) == _config().federated
    federated = federated_test_metrics(tmp_path, cfg)
    gaps = {name: round(federated[name] - central[name], 4) for name in federated}
    assert all(gap >= -TOLERANCE[partitioner] for gap in gaps.values()), (partitioner, central, federated, gaps)


def _paired_regressor_gap(tmp_path, *overrides: str, split: int, training_seeds: range) -> tuple[float, list[float]]:
    """The regressor's federated-minus-central test R² (points), per training seed, on the data split of seed
    ``split``: both sides start from the same seed (``seed=N`` moves the initialisation, batches and partition)."""
    from pipeline import train as train_stage

    gaps = []
    for s in training_seeds:
        cfg = load_config(None, [f"seed={s}", "train.mode=federated", *overrides])
        datasets = core_data.prepare(cfg, seed=seeds.stage_seed(split, "data"))
        ds = datasets[models.model_entry("regressor").dataset]
        central = train_stage.run_part(cfg, {"data": datasets}, "regressor", seed=seeds.stage_seed(s, "train"))
        r2 = training.evaluate(central.model.build(), ds.x["test"], ds.y["test"], task=ds.task)["r2"]
        work = tmp_path / f"{'-'.join(overrides) or 'default'}-{s}"
        work.mkdir()
        fed = federated_test_metrics(work, cfg, datasets=datasets, names=("regressor",))["regressor"]
        gaps.append(100 * (fed - r2))
    return sum(gaps) / len(gaps), gaps


@pytest.mark.slow
def test_the_federated_regressor_reaches_central_on_average_where_one_seed_fell_short(tmp_path):
    """Issue 25 item 8, the regressor on IID at the seed where one comparison fell short (seed 1: -0.99 points).

    One central training differs from another by its initialisation alone by 1.2-2.0 points of R² (the standard
    deviation over 8 initialisations on each of the splits of seeds 0-2; scripts/bench_schedule.py --data-seed),
    so a single pair cannot resolve a 0.5-point tolerance. Paired over 8 training seeds on that split, the default
    schedule's mean gap is within it; 5 rounds instead of 13 (the control) must not be.
    """
    mean, gaps = _paired_regressor_gap(tmp_path, split=1, training_seeds=range(8))
    assert mean >= -TOLERANCE["iid"] * 100, (mean, gaps)
    short, short_gaps = _paired_regressor_gap(
        tmp_path, "regressor.federated.rounds=5", split=1, training_seeds=range(8)
    )
    assert short < -TOLERANCE["iid"] * 100, (short, short_gaps)
