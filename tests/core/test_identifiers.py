"""Identifier columns are refused with a one-line fix; data.ignore_columns leaves columns out of the features."""

import dataclasses

import numpy as np
import pandas as pd
import pytest

from auditml_core import data
from auditml_core.config import load_config
from auditml_core.datasets import likely_identifiers, load_table
from auditml_core.errors import DataError


def _visits(tmp_path, n=60, seed=0, **extra):
    rng = np.random.default_rng(seed)
    frame = pd.DataFrame({"age": rng.integers(20, 80, n), "bmi": rng.normal(27, 4, n).round(1)})
    frame["outcome"] = 2 * frame["age"] + 3 * frame["bmi"] + rng.normal(0, 1, n)
    for name, values in extra.items():
        frame.insert(0, name, values)
    path = tmp_path / "visits.csv"
    frame.to_csv(path, index=False)
    return str(path)


def test_a_row_number_column_is_refused_naming_it_and_the_fix(tmp_path):
    path = _visits(tmp_path, id=np.arange(1, 61), visit=np.arange(1000, 1060))
    with pytest.raises(DataError) as info:
        load_table(path, "outcome")
    msg = str(info.value)
    assert "\n" not in msg
    assert "'id' (named like an identifier)" in msg and "'visit' (unique integers in row order)" in msg
    assert 'data.ignore_columns=\'["visit", "id"]\'' in msg  # the fix, ready to paste
    raw = load_table(path, "outcome", ignore_columns=("id", "visit"))
    assert raw.feature_names == ("age", "bmi") and raw.x.shape == (60, 2)
    assert raw.provenance["ignored_columns"] == ["id", "visit"]
    kept = load_table(path, "outcome", identifier_check=False)  # a real feature can be kept on purpose
    assert kept.feature_names == ("visit", "id", "age", "bmi")


@pytest.mark.parametrize("name", ["ID", "uuid", "index", "row", "patient_id", "visitId", "Unnamed: 0"])
def test_identifier_names_are_flagged_whatever_their_values(name):
    shuffled = np.random.default_rng(1).permutation(50).astype(float)[:, None]
    assert likely_identifiers(shuffled, [name]) == [(name, "named like an identifier")]


def test_ordinary_columns_are_not_flagged():
    from sklearn.datasets import load_diabetes

    for scaled in (True, False):
        bunch = load_diabetes(scaled=scaled)
        assert likely_identifiers(bunch.data, list(bunch.feature_names)) == []
    rng = np.random.default_rng(0)
    columns = {
        "shuffled_counter": rng.permutation(50).astype(float),  # unique integers, not in row order
        "sorted_floats": np.sort(rng.normal(size=50)),  # monotone but not integers
        "repeated_steps": np.repeat(np.arange(10), 5).astype(float),  # monotone but not unique
        "valid": np.arange(50.0)[::-1] * 0 + 1,  # a name ending in "id" that is not an id word
    }
    assert likely_identifiers(np.column_stack(list(columns.values())), list(columns)) == []


def test_ignore_columns_is_checked_and_reaches_the_prepared_data(tmp_path):
    path = _visits(tmp_path, id=np.arange(60))
    with pytest.raises(DataError, match="'nope', not a column"):
        load_table(path, "outcome", ignore_columns=("nope",))
    with pytest.raises(DataError, match="names the target column"):
        load_table(path, "outcome", ignore_columns=("id", "outcome"))
    cfg = load_config(None, [f'data.tabular_csv="{path}"', 'data.target="outcome"', 'data.ignore_columns=["id"]'])
    assert cfg.data.ignore_columns == ("id",)
    ds = data.prepare(cfg, seed=0)["tabular"]
    assert ds.feature_names == ("age", "bmi") and ds.provenance["ignored_columns"] == ["id"]
    # The embedded table takes the same setting.
    base = load_config(None, ['data.ignore_columns=["sex"]'])
    assert "sex" not in data.prepare(base, seed=0)["tabular"].feature_names
    with pytest.raises(DataError, match="not a column of the embedded"):
        load_table("", "", ignore_columns=("id",))
    assert dataclasses.replace(cfg.data, identifier_check=False).identifier_check is False


def test_an_ignored_text_column_is_not_refused_as_non_numeric(tmp_path):
    path = _visits(tmp_path, uuid=[f"u-{i:04x}" for i in range(60)])
    with pytest.raises(DataError, match="not numeric; .*data.ignore_columns"):
        load_table(path, "outcome")
    assert load_table(path, "outcome", ignore_columns=("uuid",)).feature_names == ("age", "bmi")
