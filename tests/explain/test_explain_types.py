"""The Explanation result type and its JSON summary."""

from __future__ import annotations

import json

import numpy as np
import pytest

from explain import Explanation, json_safe


def _expl(n=3, shape=(4,), **kw):
    rng = np.random.default_rng(0)
    args = dict(
        method="shap-deep",
        values=rng.normal(size=(n, *shape)),
        base_values=np.zeros(n),
        inputs=rng.normal(size=(n, *shape)),
        outputs=rng.normal(size=n),
        targets=None,
        feature_names=None,
        seconds=0.5,
        extras={"seed": 1, "score": np.array([0.5, np.nan, 1.0])},
    )
    args.update(kw)
    return Explanation(**args)


def test_arrays_are_read_only_copies():
    values = np.ones((2, 3))
    e = _expl(n=2, shape=(3,), values=values, base_values=None, extras={})
    values[0, 0] = 5.0
    assert e.values[0, 0] == 1.0
    with pytest.raises(ValueError):
        e.values[0, 0] = 2.0


def test_to_dict_tabular_is_json_safe_and_summarises():
    e = _expl(feature_names=("a", "b", "c", "d"))
    d = json.loads(json.dumps(e.to_dict(), allow_nan=False))
    assert d["method"] == "shap-deep" and d["n"] == 3
    assert set(d["mean_abs_attribution"]) == {"a", "b", "c", "d"}
    assert d["mean_abs_attribution"]["a"] == pytest.approx(float(np.abs(e.values[:, 0]).mean()))
    assert d["extras"]["score"] == [0.5, None, 1.0]  # NaN becomes null
    assert d["max_abs_additivity_gap"] >= 0


def test_to_dict_image_summarises_by_channel_and_pixel():
    e = _expl(n=2, shape=(3, 8, 8), targets=np.array([1, 4]), extras={"segments": np.zeros((2, 16, 16))})
    d = json.loads(json.dumps(e.to_dict(), allow_nan=False))
    assert len(d["mean_abs_attribution_by_channel"]) == 3
    assert len(d["top_pixels"]) == 10
    assert d["target_counts"] == {"1": 1, "4": 1}
    assert d["extras"]["segments"] == {"shape": [2, 16, 16], "dtype": "float64"}  # large arrays summarised


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"values": np.zeros((3, 5))}, "values shape"),
        ({"outputs": np.zeros(2)}, "outputs has shape"),
        ({"base_values": np.zeros(4)}, "base_values has shape"),
        ({"targets": np.zeros(2, dtype=int)}, "targets has shape"),
        ({"feature_names": ("a",)}, "feature_names has 1 names"),
    ],
)
def test_inconsistent_shapes_raise(kw, match):
    with pytest.raises(ValueError, match=match):
        _expl(**kw)


def test_json_safe_handles_numpy_and_non_finite():
    assert json_safe({"a": np.float32(1.5), "b": np.int64(2), "c": float("inf"), "d": (np.bool_(True),)}) == {
        "a": 1.5,
        "b": 2,
        "c": None,
        "d": [True],
    }
