"""Subgroup error tables of the evaluate stage: groups partition the split and reproduce the overall error."""

import numpy as np

from auditml_core.data import Dataset
from pipeline.evaluate import N_AGE_BANDS, subgroup_metrics


def _table(n=90, seed=0):
    rng = np.random.default_rng(seed)
    sex = rng.choice([-0.04, 0.05], size=n)
    age = rng.normal(size=n)
    other = rng.normal(size=n)
    x_mean, x_std = np.array([0.01, 0.0, 0.0]), np.array([0.05, 1.0, 1.0])
    x = ((np.column_stack([sex, age, other]) - x_mean) / x_std).astype(np.float32)  # standardised, as prepared
    ds = Dataset(
        name="tabular",
        task="regression",
        x={"test": x},
        y={"test": np.zeros(n, dtype=np.float32)},
        index={"test": np.arange(n)},
        feature_names=("sex", "age", "bmi"),
        preprocessing={"x_mean": x_mean.tolist(), "x_std": x_std.tolist(), "y_mean": 0.0, "y_std": 1.0},
    )
    return ds, sex, age, rng


def test_groups_partition_the_split_and_errors_are_exact():
    ds, sex, age, rng = _table()
    y = rng.normal(size=len(sex)) * 50 + 150
    pred = y + np.where(sex > 0, 10.0, -2.0)  # the model is worse, and biased up, for one sex
    out = subgroup_metrics(ds, "test", y, pred, seed=0)
    assert set(out) == {"sex", "age"}
    by_sex = {g["group"]: g for g in out["sex"]["groups"]}
    assert set(by_sex) == {"sex = -0.04", "sex = 0.05"}  # values in dataset units, not standardised ones
    assert by_sex["sex = 0.05"]["mae"] == np.float64(10.0) and by_sex["sex = 0.05"]["bias"] == 10.0
    assert abs(by_sex["sex = -0.04"]["bias"] + 2.0) < 1e-9 and abs(out["sex"]["mae_gap"] - 8.0) < 1e-9
    ages = out["age"]["groups"]
    assert len(ages) == N_AGE_BANDS and sum(g["n"] for g in ages) == len(age)
    overall = np.mean(np.abs(y - pred))
    assert abs(sum(g["n"] * g["mae"] for g in ages) / len(age) - overall) < 1e-9
    for g in out["sex"]["groups"] + ages:
        lo, hi = g["mae_ci95"]  # a percentile bootstrap interval need not contain the estimate; it is ordered
        assert 0 <= lo <= hi <= 10.0 + 1e-9  # and inside the range of the group's absolute errors (2 or 10)


def test_a_table_without_those_features_has_no_subgroups():
    ds, sex, _, _ = _table()
    renamed = Dataset(**{**ds.__dict__, "feature_names": ("a", "b", "c")})
    assert subgroup_metrics(renamed, "test", np.zeros(len(sex)), np.zeros(len(sex)), seed=0) == {}
