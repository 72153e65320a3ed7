"""The explain stage on tiny trained models: additivity, seeding, backgrounds from the public split, files."""

import dataclasses
import json

import numpy as np
import pytest

from core.config import load_config
from core.errors import ConfigError, DataError
from core.models import MODELS
from explain import compare_variants, make_predict_fn
from pipeline import data, explain_stage, train
from tests.tiny import TRAIN as TINY  # noqa: E402

SMALL_EXPLAIN = [
    "explain.n_rows=12",
    "explain.n_images=6",
    "explain.lime_num_samples=200",
    "explain.lime_image_num_samples=100",
    "explain.stability_rows=4",
    "explain.deletion_steps=6",
    "explain.n_waterfalls=2",
    "explain.n_grid_images=2",
]


@pytest.fixture(scope="module")
def tiny():
    # background_size above the public split's size: the background is the whole public split.
    cfg = load_config(None, TINY + SMALL_EXPLAIN + ["explain.background_size=1000"])
    datasets = data.run(cfg, {}, seed=0)
    trained = train.run(cfg, {"data": datasets}, seed=1)
    result = explain_stage.run(cfg, {"data": datasets, "train": trained}, seed=2)
    return cfg, datasets, trained, result


def test_shap_values_add_up_to_the_model_output(tiny):
    _, datasets, trained, result = tiny
    for name, key in ((n, e.dataset) for n, e in MODELS.items()):
        me = result.models[name]
        shap_method = me.metrics["methods"]["shap"]
        assert shap_method == "shap-deep"  # exact on these nn.ReLU / MaxPool / Linear models; no fallback
        expl = me.explanations[shap_method]
        # Recomputed from a fresh model, not read back from the explanation.
        out = make_predict_fn(trained.models[name].build(), task=datasets[key].task)(expl.inputs.astype(np.float32))
        out = out if expl.targets is None else out[np.arange(expl.n), expl.targets]
        gap = np.abs(expl.base_values + expl.values.reshape(expl.n, -1).sum(axis=1) - out)
        assert gap.max() < 1e-4, name
        assert me.metrics["quality"]["additivity"]["max_abs_error"] < 1e-4


def test_same_seed_gives_identical_arrays_and_another_seed_changes_lime(tiny):
    cfg, datasets, trained, result = tiny
    for name, key in ((n, e.dataset) for n, e in MODELS.items()):
        again = explain_stage.explain_model(
            name, trained.models[name].build(), datasets[key], cfg.explain, seed=explain_stage.derive_seed(2, name)
        )
        for method, expl in result.models[name].explanations.items():
            np.testing.assert_array_equal(again.explanations[method].values, expl.values)
            if expl.base_values is not None:
                np.testing.assert_array_equal(again.explanations[method].base_values, expl.base_values)
    other = explain_stage.explain_model(
        "regressor", trained.models["regressor"].build(), datasets["tabular"], cfg.explain, seed=99
    )
    assert not np.array_equal(
        other.explanations["lime-tabular"].values, result.models["regressor"].explanations["lime-tabular"].values
    )


def test_backgrounds_are_exactly_the_public_split_and_explained_rows_the_test_split(tiny):
    _, datasets, _, result = tiny
    for name, key in ((n, e.dataset) for n, e in MODELS.items()):
        m, ds = result.models[name].metrics, datasets[key]
        assert m["background"]["split"] == "public" and not m["background"]["private"]
        np.testing.assert_array_equal(np.sort(m["background"]["index"]), np.sort(ds.index["public"]))
        assert not set(m["background"]["index"].tolist()) & set(ds.index["train"].tolist())
        np.testing.assert_array_equal(m["explained_index"], ds.index["test"][: m["n_explained"]])


def test_a_smaller_background_is_a_seeded_subset_of_the_public_split(tiny):
    cfg, datasets, _, _ = tiny
    ecfg = dataclasses.replace(cfg.explain, background_size=10)
    ds = datasets["tabular"]
    x, idx = explain_stage.background_rows(ds, ecfg, size=10, seed=5)
    x2, idx2 = explain_stage.background_rows(ds, ecfg, size=10, seed=5)
    assert len(idx) == 10 and set(idx.tolist()) <= set(ds.index["public"].tolist())
    np.testing.assert_array_equal(idx, idx2)
    rows = {int(i): r for i, r in zip(ds.index["public"], ds.x["public"])}
    np.testing.assert_array_equal(x, np.stack([rows[int(i)] for i in idx]))


def test_too_small_public_split_fails_with_the_fix_unless_train_is_chosen(tiny):
    cfg, datasets, _, _ = tiny
    ds = datasets["tabular"]
    empty = dataclasses.replace(
        ds, x={**ds.x, "public": ds.x["public"][:0]}, index={**ds.index, "public": ds.index["public"][:0]}
    )
    with pytest.raises(DataError, match=r"data\.public_fraction.*background_split"):
        explain_stage.background_rows(empty, cfg.explain, size=50, seed=0)
    train_cfg = dataclasses.replace(cfg.explain, background_split="train")
    _, idx = explain_stage.background_rows(empty, train_cfg, size=50, seed=0)
    assert set(idx.tolist()) <= set(ds.index["train"].tolist())
    with pytest.raises(ConfigError, match="explain.background_split"):
        load_config(None, ["explain.background_split=private"])
    with pytest.raises(ConfigError, match="explain.stability_seeds"):
        load_config(None, ["explain.stability_seeds=1"])


def test_quality_metrics_are_computed_and_in_range(tiny):
    _, _, _, result = tiny
    for name, me in result.models.items():
        q = me.metrics["quality"]
        assert set(q) == {"additivity", "deletion_insertion", "agreement", "lime_stability", "lime_fidelity"}
        assert set(q["deletion_insertion"]) == set(me.explanations)
        assert 0 <= q["agreement"]["mean_topk"] <= 1 and 0 <= q["lime_stability"]["mean"] <= 1
        assert len(q["lime_stability"]["seeds"]) == 3 and len(q["lime_stability"]["per_row"]) == 4
        assert len(me.metrics["flagged"]) == len(q["agreement"]["flagged"])
        assert me.metrics["seconds"]["total"] > 0
    reg_plots = set(result.models["regressor"].plots)
    assert {"regressor_beeswarm.png", "regressor_importance_bar.png", "regressor_deletion_insertion.png"} <= reg_plots
    assert sum("waterfall" in p for p in reg_plots) == 2  # explain.n_waterfalls
    assert "cnn_image_grid.png" in result.models["cnn"].plots


def test_dump_and_load_round_trip(tiny):
    _, _, _, result = tiny
    files = explain_stage.dump(result)
    assert (
        "explain/metrics.json" in files
        and "explain/regressor_shap-deep.npz" in files
        and "explain/cnn_lime-image.npz" in files
    )
    pngs = [rel for rel in files if rel.endswith(".png")]
    assert pngs and all(files[rel].startswith(b"\x89PNG") for rel in pngs)
    json.loads(files["explain/metrics.json"])
    back = explain_stage.load(files.__getitem__)
    for name, me in result.models.items():
        for method, expl in me.explanations.items():
            got = back.models[name].explanations[method]
            np.testing.assert_array_equal(got.values, expl.values)
            np.testing.assert_array_equal(got.outputs, expl.outputs)
            assert got.feature_names == expl.feature_names
        assert back.models[name].plots == me.plots


def test_compare_variants_of_one_model_is_identity(tiny):
    _, datasets, trained, _ = tiny
    ds = datasets["tabular"]
    model = trained.models["regressor"].build()
    d = compare_variants(
        model,
        trained.models["regressor"].build(),
        ds.x["test"][:8],
        background=ds.x["public"],
        task="regression",
        seed=0,
        k=3,
    )
    assert (
        d["global_topk"] == 1.0
        and d["global_l1"] == pytest.approx(0, abs=1e-9)
        and d["labels"] == ["teacher", "student"]
    )
