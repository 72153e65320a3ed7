"""The explain stage on tiny trained models: additivity, seeding, backgrounds from the public split, files."""

import dataclasses
import json
from types import SimpleNamespace

import numpy as np
import pytest

from auditml_core.config import load_config
from auditml_core.errors import ConfigError, DataError
from auditml_core.models import MODELS
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
    "explain.reference_rows=2",
    "explain.reference_images=1",
    "explain.reference_nsamples=200",
    "explain.randomisation_rows=4",
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
        # The defaults: exact enumeration for 10 features; DeepLIFT (additive, approximate) for 64 pixels, no fallback.
        assert shap_method == {"regressor": "shap-exact", "cnn": "shap-deep"}[name]
        assert me.metrics["quality"]["exactness"] == (
            "exact (enumeration of 2^10 coalitions)" if name == "regressor" else "approximate"
        )
        expl = me.explanations[shap_method]
        # Recomputed from a fresh model, not read back from the explanation.
        out = make_predict_fn(trained.models[name].build(), task=datasets[key].task)(expl.inputs.astype(np.float32))
        out = out if expl.targets is None else out[np.arange(expl.n), expl.targets]
        gap = np.abs(expl.base_values + expl.values.reshape(expl.n, -1).sum(axis=1) - out)
        assert gap.max() < 1e-4, name
        assert me.metrics["quality"]["additivity"]["max_abs_error"] < 1e-4


def test_same_seed_gives_identical_arrays_and_another_seed_changes_lime(tiny):
    cfg, datasets, trained, result = tiny
    # The explanations are made before any check or figure: the re-runs skip the figures and the reference.
    lean = dataclasses.replace(
        cfg.explain, reference_rows=0, reference_images=0, n_waterfalls=0, n_dependence_plots=0, n_error_examples=0
    )
    for name, key in ((n, e.dataset) for n, e in MODELS.items()):
        again = explain_stage.explain_model(
            name, trained.models[name].build(), datasets[key], lean, seed=explain_stage.derive_seed(2, name)
        )
        for method, expl in result.models[name].explanations.items():
            np.testing.assert_array_equal(again.explanations[method].values, expl.values)
            if expl.base_values is not None:
                np.testing.assert_array_equal(again.explanations[method].base_values, expl.base_values)
    other = explain_stage.explain_model(
        "regressor", trained.models["regressor"].build(), datasets["tabular"], lean, seed=99
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
        assert set(q) - {"class_randomisation"} == {
            "additivity",
            "exactness",
            "reference",
            "randomisation",
            "deletion_insertion",
            "agreement",
            "stability",
            "lime_fidelity",
        }
        assert set(q["deletion_insertion"]) == set(me.explanations)
        methods = me.metrics["methods"]["run"]
        assert list(q["agreement"]) == [f"{a} vs {b}" for i, a in enumerate(methods) for b in methods[i + 1 :]]
        for a in q["agreement"].values():
            assert 0 <= a["mean_topk"] <= 1 and a["resolution"]
        lime = me.metrics["methods"]["lime"]
        assert 0 <= q["stability"][lime]["mean"] <= 1
        assert len(q["stability"][lime]["seeds"]) == 3 and len(q["stability"][lime]["per_row"]) == 4
        assert len(me.metrics["flagged"]) == sum(len(a["flagged"]) for a in q["agreement"].values())
        r = q["randomisation"]
        assert (
            r["n"] == 4 and -1 <= r["spearman_signed"] <= 1 and r["passed_signed"] == (abs(r["spearman_signed"]) < 0.5)
        )
        assert ("class_randomisation" in q) == (name == "cnn")  # a classifier only
        gap = q["lime_fidelity"][lime]["per_row_abs_error_at_row"]
        assert len(gap) == me.metrics["n_explained"] and min(gap) >= 0
        assert me.metrics["seconds"]["total"] > 0
    ref = result.models["regressor"].metrics["quality"]["reference"]
    # shap-exact against shap's KernelExplainer over every coalition: two exact computations agree.
    assert ref["reference_exact"] and ref["n"] == 2 and ref["max_rel_error"] < 1e-4
    ref = result.models["cnn"].metrics["quality"]["reference"]
    assert not ref["reference_exact"] and ref["n"] == 1 and "sampled" in ref["reference_description"]
    cnn_agree = next(iter(result.models["cnn"].metrics["quality"]["agreement"].values()))
    assert cnn_agree["k_unit"] == "cells" and "pixel_level" in cnn_agree
    reg_plots = set(result.models["regressor"].plots)
    assert {"regressor_beeswarm.png", "regressor_importance_bar.png", "regressor_deletion_insertion.png"} <= reg_plots
    assert sum("waterfall" in p for p in reg_plots) == 2  # explain.n_waterfalls
    assert "cnn_image_grid.png" in result.models["cnn"].plots


def test_image_rows_show_misclassified_first_then_worst_agreement(tiny):
    _, datasets, _, result = tiny
    expl = result.models["cnn"].explanations["shap-deep"]
    truth = np.asarray(datasets["images"].y["test"][: expl.n])
    agree = SimpleNamespace(topk=tuple(np.linspace(1, 0, expl.n)))  # the last row agrees worst
    rows, why = explain_stage.image_rows(expl, truth, agree, expl.n)
    wrong = [i for i in range(expl.n) if expl.targets[i] != truth[i]]
    assert rows[: len(wrong)] == wrong and all(w == "misclassified" for w in why[: len(wrong)])
    rest = [i for i in range(expl.n - 1, -1, -1) if i not in wrong]
    assert rows[len(wrong) :] == rest


def test_a_new_method_in_the_list_reaches_every_pair(tiny):
    cfg, datasets, trained, _ = tiny
    ecfg = dataclasses.replace(cfg.explain, regressor_methods=("shap-exact", "lime-tabular", "shap-deep"))
    me = explain_stage.explain_model(
        "regressor", trained.models["regressor"].build(), datasets["tabular"], ecfg, seed=3
    )
    assert set(me.explanations) == {"shap-exact", "lime-tabular", "shap-deep"}
    assert set(me.metrics["quality"]["agreement"]) == {
        "shap-exact vs lime-tabular",
        "shap-exact vs shap-deep",
        "lime-tabular vs shap-deep",
    }
    bad = dataclasses.replace(cfg.explain, regressor_methods=("shap-exact", "shap-tree"))
    with pytest.raises(ValueError, match="Unknown explainer 'shap-tree'"):
        explain_stage.explain_model("regressor", trained.models["regressor"].build(), datasets["tabular"], bad, seed=3)


def test_dump_and_load_round_trip(tiny):
    _, _, _, result = tiny
    files = explain_stage.dump(result)
    assert (
        "explain/metrics.json" in files
        and "explain/regressor_shap-exact.npz" in files
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


def test_a_table_wider_than_exact_enumeration_is_explained_by_permutation_with_its_error_measured():
    """Issue 24 item 10: 16 features crashed shap-exact (capped at 14) after training; now the method follows F."""
    import torch
    from torch import nn

    from auditml_core.data import prepare_table
    from auditml_core.datasets import RawTable
    from explain import get_explainer, reference_error

    rng = np.random.default_rng(0)
    n, f = 300, 16
    x = rng.normal(size=(n, f))
    raw = RawTable(
        x=x,
        y=x @ rng.normal(size=f) + 0.1 * rng.normal(size=n),
        feature_names=tuple(f"f{i}" for i in range(f)),
        target_name="y",
        provenance={"source": "generated"},
    )
    fast = ["explain.background_size=10", "explain.n_waterfalls=0", "explain.n_dependence_plots=0"]
    cfg = load_config(None, SMALL_EXPLAIN + fast + ["explain.n_rows=8", "explain.stability_rows=2"])
    ds = prepare_table(raw, cfg.data, seed=0)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(f, 8), nn.ReLU(), nn.Linear(8, 1)).eval()
    me = explain_stage.explain_model("regressor", model, ds, cfg.explain, seed=3)
    m, q = me.metrics, me.metrics["quality"]
    assert m["methods"]["requested"] == ["shap-exact", "lime-tabular"]
    assert m["methods"]["run"] == ["shap-permutation", "lime-tabular"] and m["methods"]["primary"] == "shap-permutation"
    assert any("16 features" in note and "shap-permutation" in note for note in m["notes"])  # the report's caveat
    assert q["exactness"] == "approximate" and q["additivity"]["max_abs_error"] < 1e-4  # additive by construction
    ref = q["reference"]
    assert ref["n"] == 2 and not ref["reference_exact"] and "KernelExplainer" in ref["reference_description"]
    assert np.isfinite(ref["max_rel_error"]) and "shap-permutation" in q["stability"]
    # Checked against something the stage did not use: every one of the 2^16 coalitions, same rows and background.
    public = dict(zip(ds.index["public"].tolist(), ds.x["public"]))
    bg = np.stack([public[int(i)] for i in m["background"]["index"]])
    expl = me.explanations["shap-permutation"]
    exact = get_explainer("shap-exact")(
        model, expl.inputs[:2], background=bg, task="regression", seed=0, max_features=f
    )
    assert reference_error(expl, exact, k=3, rows=np.arange(2)).max_rel_error < 0.15
    reversed_ = dataclasses.replace(expl, values=expl.values[:, ::-1].copy())  # positive control: wrong attributions
    assert reference_error(reversed_, exact, k=3, rows=np.arange(2)).max_rel_error >= 0.15
