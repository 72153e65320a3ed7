"""Per-group metrics through Fairlearn's MetricFrame (issue 27 item 2).

Each number is checked against the hand-written arithmetic the evaluate stage used before Fairlearn (masks and
means from first principles, the same bootstrap), a biased model must show its gap (positive control) and an
even one must not (null).
"""

import numpy as np
import pytest

from auditml_core.config import DataConfig
from auditml_core.data import dump, load, prepare_images
from auditml_core.datasets import MAX_GROUPS, load_images
from auditml_core.errors import DataError
from pipeline.evaluate import (
    N_BOOTSTRAP,
    _metrics,
    bootstrap_ci,
    bootstrap_cis,
    classification_group_metrics,
    mae,
    subgroup_metrics,
)
from tests.pipeline.test_evaluate_subgroups import _table


def _hand_written(y, pred, masks, seed):
    """The evaluate stage's subgroup arithmetic before MetricFrame (commit 7783cd7), one mask per group."""
    rows = []
    for mask in masks:
        yy, pp = y[mask], pred[mask]
        rows.append(
            {
                "n": int(mask.sum()),
                "mae": float(np.mean(np.abs(yy - pp))),
                "mae_ci95": bootstrap_ci(mae, yy, pp, seed=seed),
                "rmse": float(np.sqrt(np.mean((yy - pp) ** 2))),
                "bias": float(np.mean(pp - yy)),
            }
        )
    return rows


def test_metricframe_equals_the_hand_written_subgroup_arithmetic():
    ds, sex, age, rng = _table(n=150, seed=3)
    y = rng.normal(size=len(sex)) * 50 + 150
    pred = y + rng.normal(size=len(sex)) * 20 + np.where(sex > 0, 6.0, -1.0)
    out = subgroup_metrics(ds, "test", y, pred, seed=5)
    edges = np.quantile(age, np.linspace(0, 1, 4))
    band = np.clip(np.searchsorted(edges, age, side="right") - 1, 0, 2)
    for feat, masks in (("sex", [sex < 0, sex > 0]), ("age", [band == b for b in range(3)])):
        want, got = _hand_written(y, pred, masks, seed=5), out[feat]["groups"]
        assert len(got) == len(want)
        for g, w in zip(got, want):
            assert g["n"] == w["n"] and g["mae_ci95"] == w["mae_ci95"]  # the same bootstrap, bit for bit
            for k in ("mae", "rmse", "bias"):
                assert g[k] == pytest.approx(w[k], rel=1e-12, abs=1e-12)
        for k in ("mae", "rmse", "bias"):  # MetricFrame.difference: largest minus smallest group value
            values = [w[k] for w in want]
            assert out[feat]["differences"][k] == pytest.approx(max(values) - min(values), rel=1e-12, abs=1e-12)
        for k in ("mae", "rmse"):  # MetricFrame.ratio: smallest over largest
            values = [w[k] for w in want]
            assert out[feat]["ratios"][k] == pytest.approx(min(values) / max(values), rel=1e-12)
        assert out[feat]["mae_gap"] == out[feat]["differences"]["mae"]  # the key the report reads
        assert "bias" not in out[feat]["ratios"]  # a ratio of signed biases means nothing
        assert "MetricFrame" in out[feat]["method"]


def test_each_group_has_intervals_for_its_metrics_from_the_same_resamples():
    ds, sex, _, rng = _table(n=120, seed=4)
    y = rng.normal(size=len(sex)) * 50 + 150
    pred = y + rng.normal(size=len(sex)) * 15
    for g in subgroup_metrics(ds, "test", y, pred, seed=2)["sex"]["groups"]:
        mask = (sex < 0) if "-0.04" in g["group"] else (sex > 0)
        err = pred[mask] - y[mask]
        want = bootstrap_cis(lambda idx, e=err: {"rmse": np.sqrt(np.mean(e[idx] ** 2, axis=-1))}, len(err), seed=2)
        assert g["rmse_ci95"] == want["rmse"]
        assert g["bias_ci95"][0] < g["bias"] < g["bias_ci95"][1]  # 15-unit noise, 60 rows: the estimate is inside


def test_a_biased_regressor_shows_its_gap_and_an_even_one_does_not():
    ds, sex, _, rng = _table(n=400, seed=1)
    y = rng.normal(size=len(sex)) * 50 + 150
    noise = rng.normal(size=len(sex)) * 10
    biased = subgroup_metrics(ds, "test", y, y + noise + np.where(sex > 0, 25.0, 0.0), seed=0)["sex"]
    even = subgroup_metrics(ds, "test", y, y + noise, seed=0)["sex"]
    lo_group, hi_group = sorted(biased["groups"], key=lambda g: g["bias"])
    assert hi_group["bias_ci95"][0] > lo_group["bias_ci95"][1]  # positive control: intervals apart
    assert biased["differences"]["bias"] == pytest.approx(25.0, abs=3.0) and biased["ratios"]["mae"] < 0.5
    a, b = even["groups"]
    assert a["bias_ci95"][0] < b["bias_ci95"][1] and b["bias_ci95"][0] < a["bias_ci95"][1]  # null: they overlap
    assert even["differences"]["bias"] < 3.0 and even["ratios"]["mae"] > 0.8


def _classifier_rows(n=600, seed=0, wrong_in_b=0.0):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 4, size=n)
    groups = np.where(rng.random(n) < 0.5, "a", "b")
    pred = np.where(rng.random(n) < 0.1, (y + 1) % 4, y)  # 10% errors everywhere
    flip = (groups == "b") & (rng.random(n) < wrong_in_b)
    return y, np.where(flip, (y + 2) % 4, pred), groups


def test_classifier_groups_equal_first_principles():
    y, pred, groups = _classifier_rows(wrong_in_b=0.3)
    out = classification_group_metrics(y, pred, groups, seed=3)
    assert [g["group"] for g in out["groups"]] == ["a", "b"]
    for g in out["groups"]:
        m = groups == g["group"]
        assert g["n"] == int(m.sum())
        assert g["accuracy"] == pytest.approx(np.mean(y[m] == pred[m]), rel=1e-12)
        recalls = [np.mean(pred[m][y[m] == c] == c) for c in np.unique(y[m])]
        assert g["macro_recall"] == pytest.approx(np.mean(recalls), rel=1e-12)
        # the vectorised bootstrap against a plain loop over the same resample indices
        rng = np.random.default_rng(3)
        idx = rng.integers(0, int(m.sum()), size=(N_BOOTSTRAP, int(m.sum())))
        yy, pp = y[m], pred[m]
        slow = [np.mean([np.mean(pp[i][yy[i] == c] == c) for c in np.unique(yy[i])]) for i in idx]
        assert g["macro_recall_ci95"] == pytest.approx(list(np.percentile(slow, [2.5, 97.5])), rel=1e-12)
        assert g["accuracy_ci95"] == pytest.approx(
            list(np.percentile(np.mean(yy[idx] == pp[idx], axis=1), [2.5, 97.5]))
        )
    acc = [g["accuracy"] for g in out["groups"]]
    assert out["differences"]["accuracy"] == pytest.approx(max(acc) - min(acc))
    assert out["ratios"]["accuracy"] == pytest.approx(min(acc) / max(acc))
    assert out["accuracy_gap"] == out["differences"]["accuracy"]


def test_a_classifier_worse_on_one_group_shows_the_gap_and_an_even_one_does_not():
    biased = classification_group_metrics(*_classifier_rows(wrong_in_b=0.4), seed=0)
    a, b = biased["groups"]
    assert b["accuracy_ci95"][1] < a["accuracy_ci95"][0]  # positive control: group b clearly worse
    assert biased["differences"]["accuracy"] > 0.25 and biased["differences"]["macro_recall"] > 0.25
    even = classification_group_metrics(*_classifier_rows(wrong_in_b=0.0), seed=0)
    a, b = even["groups"]
    assert a["accuracy_ci95"][0] < b["accuracy_ci95"][1] and b["accuracy_ci95"][0] < a["accuracy_ci95"][1]
    assert even["differences"]["accuracy"] < 0.06


def _npz(tmp_path, n=80, **extra):
    rng = np.random.default_rng(0)
    path = tmp_path / "imgs.npz"
    np.savez(path, x=rng.random((n, 6, 6)), y=np.arange(n) % 2, **extra)
    return path


def test_an_image_group_array_reaches_the_classifier_metrics(tmp_path):
    n = 80
    groups = np.where(np.arange(n) % 4 == 0, "site-1", "site-2")
    raw = load_images(str(_npz(tmp_path, n=n, group=groups)))
    ds = prepare_images(raw, DataConfig(), seed=0)
    assert sum(len(ds.groups[s]) for s in ds.groups) == n and set(ds.groups["test"]) <= {"site-1", "site-2"}
    for s in ds.groups:  # each split's labels are those of its own rows
        assert (ds.groups[s] == groups[ds.index[s]]).all()
    again = load(lambda rel: dump({"images": ds, "tabular": ds})[rel])["images"]
    assert all((again.groups[s] == ds.groups[s]).all() for s in ds.groups)
    logits = np.eye(2)[ds.y["test"]]  # a perfect classifier
    out = _metrics(ds, "test", logits, seed=0)["subgroups"]["group"]  # where the report reads group tables
    assert {g["group"] for g in out["groups"]} <= {"site-1", "site-2"} and out["differences"]["accuracy"] == 0.0
    assert ds.summary()["group_counts"]["test"] == dict(zip(*np.unique(ds.groups["test"], return_counts=True)))
    plain = prepare_images(load_images(str(_npz(tmp_path, n=n))), DataConfig(), seed=0)  # no group array
    assert plain.groups == {} and "subgroups" not in _metrics(plain, "test", logits, seed=0)


@pytest.mark.parametrize(
    ("group", "message"),
    [
        (np.zeros(79), "expected (80,)"),
        (np.arange(80), f"at most {MAX_GROUPS} groups"),
        (np.zeros(80, dtype=complex), "complex dtype"),
    ],
)
def test_a_bad_group_array_is_refused_in_one_line(tmp_path, group, message):
    with pytest.raises(DataError, match=message.replace("(", r"\(").replace(")", r"\)")) as err:
        load_images(str(_npz(tmp_path, group=group)))
    assert "\n" not in str(err.value)


def test_the_report_shows_a_classifiers_groups_and_its_subgroup_verdict_reads_them():
    from pipeline.report import html_page
    from pipeline.report.verdicts import subgroups as subgroup_verdict

    y, pred, groups = _classifier_rows(wrong_in_b=0.4)
    groups = np.where(groups == "a", "<b>site a</b>", groups)  # a user's label is text, never markup
    metrics = {"test": {"subgroups": {"group": classification_group_metrics(y, pred, groups, seed=0)}}}
    env = html_page._environment()
    html = env.from_string('{% from "models.html.j2" import subgroups with context %}{{ subgroups(m, False, "cnn") }}')
    page = html.render(m=metrics, c={"models": {}, "summary": {"verdicts": []}})
    assert "Test accuracy by <code>group</code>" in page and "&lt;b&gt;site a&lt;/b&gt;" in page and "<b>" not in page
    assert "Largest accuracy gap between groups" in page and "MAE" not in page
    content = {"models": {"cnn": {"title": "CNN classifier", "metrics": metrics}}}
    assert subgroup_verdict(content)["status"] == "failed"  # group b's interval lies below group a's
    even = classification_group_metrics(*_classifier_rows(wrong_in_b=0.0), seed=0)
    even_content = {"models": {"cnn": {"title": "CNN classifier", "metrics": {"test": {"subgroups": {"group": even}}}}}}
    assert subgroup_verdict(even_content)["status"] == "holds with caveat"


@pytest.mark.slow  # a tiny pipeline run through the report: ~40-90 s on a loaded 2-core machine
def test_a_run_with_an_image_group_array_reports_the_cnns_groups(tmp_path):
    import json

    from sklearn.datasets import load_digits

    from auditml_core import config as config_mod
    from auditml_core.config import load_config
    from pipeline import runner
    from pipeline.rundir import RunDir
    from tests.tiny import EXPLAIN, TRAIN

    digits = load_digits()
    site = np.where(np.arange(len(digits.target)) % 3 == 0, "scanner-1", "scanner-2")
    np.savez(tmp_path / "digits.npz", x=digits.images, y=digits.target, group=site)
    overrides = [*TRAIN, *EXPLAIN, f'data.images="{tmp_path / "digits.npz"}"']
    cfg = load_config(None, overrides)
    run = RunDir.create(tmp_path / "runs", config_toml=config_mod.to_toml(cfg), command=["test"], device="cpu")
    runner.run_stages(cfg, run, ["data", "train", "evaluate", "explain", "report"])
    test = json.loads(run.read("metrics/evaluation.json"))["cnn"]["test"]
    groups = test["subgroups"]["group"]
    assert [g["group"] for g in groups["groups"]] == ["scanner-1", "scanner-2"]
    assert sum(g["n"] for g in groups["groups"]) == test["n"]  # the groups partition the test split
    overall = sum(g["n"] * g["accuracy"] for g in groups["groups"]) / test["n"]
    assert overall == pytest.approx(test["accuracy"], abs=1e-12)
    html = run.read("report.html").decode()
    assert "Test accuracy by <code>group</code>" in html and "scanner-1" in html
    card = run.read("model_card_cnn.md").decode()
    assert "the data's `group` array" in card and "not recorded in the data" not in card
    verdict = next(v for v in json.loads(run.read("report.json"))["summary"]["verdicts"] if v["area"] == "subgroups")
    assert verdict["status"] in ("failed", "holds with caveat")
