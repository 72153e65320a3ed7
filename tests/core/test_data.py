import hashlib
import os
from pathlib import Path

import numpy as np
import pytest

from auditml_core import data
from auditml_core.config import load_config
from auditml_core.datasets import load_images, load_table
from auditml_core.errors import DataError


def _csv(tmp_path, text, name="t.csv"):
    p = tmp_path / name
    p.write_text(text)
    return str(p)


def _table(rng, n=60, f=3):
    x = rng.normal(size=(n, f))
    y = x @ np.arange(1, f + 1) + rng.normal(scale=0.1, size=n)
    head = ",".join([f"f{i}" for i in range(f)] + ["target"])
    rows = "\n".join(",".join(map(str, [*r, t])) for r, t in zip(x, y))
    return head + "\n" + rows + "\n"


def _cfg(**kw):
    return load_config(None, [f"data.{k}={v!r}".replace("'", '"') for k, v in kw.items()]).data


def test_embedded_defaults_split_disjoint_and_stratified():
    ds = data.prepare(load_config(), seed=0)
    for d in ds.values():
        all_idx = np.concatenate([d.index[s] for s in data.SPLITS])
        assert len(np.unique(all_idx)) == len(all_idx)  # disjoint
        assert len(d.index["public"]) > 0
    img = ds["images"]
    frac = np.bincount(img.y["test"]) / np.bincount(np.concatenate([img.y[s] for s in data.SPLITS]))
    assert frac.min() > 0.15 and frac.max() < 0.25  # stratified ~0.2 per class
    # standardised on train only: train mean ~0, std ~1
    assert abs(img.x["train"].mean()) < 1e-4 and abs(img.x["train"].std() - 1) < 1e-3
    assert abs(ds["tabular"].y["train"].mean()) < 1e-5


def test_same_seed_same_split_other_seed_differs():
    cfg = load_config()
    a, b, c = (data.prepare(cfg, seed=s)["images"] for s in (1, 1, 2))
    assert np.array_equal(a.index["train"], b.index["train"])
    assert not np.array_equal(a.index["train"], c.index["train"])


def test_csv_loads_and_target_round_trips(tmp_path, rng):
    path = _csv(tmp_path, _table(rng))
    ds = data.prepare_table(load_table(path, "target"), _cfg(), seed=0)
    assert ds.feature_names == ("f0", "f1", "f2") and ds.target_name == "target"
    raw = np.loadtxt(path, delimiter=",", skiprows=1)[:, -1]
    assert np.allclose(ds.target_to_original(ds.y["test"]), raw[ds.index["test"]], atol=1e-4)


@pytest.mark.parametrize(
    "text, target, fragment",
    [
        ("a,b\n1,2\n", "y", "target column 'y' is not in"),
        ("a,b,y\n1,x,2\n" * 3, "y", "'b'"),
        ("", "y", "cannot be parsed"),
        ("a,y\n", "y", "no data rows"),
    ],
)
def test_bad_csv(tmp_path, text, target, fragment):
    with pytest.raises(DataError, match=fragment):
        load_table(_csv(tmp_path, text), target)


def test_missing_csv():
    with pytest.raises(DataError, match="does not exist"):
        load_table("/no/such.csv", "y")


def test_nan_policy(tmp_path, rng):
    text = _table(rng).splitlines()
    text[5] = "nan," + text[5].split(",", 1)[1]
    path = _csv(tmp_path, "\n".join(text) + "\n")
    raw = load_table(path, "target")
    with pytest.raises(DataError, match="NaN or inf.*nan_policy"):
        data.prepare_table(raw, _cfg(), seed=0)
    dropped = data.prepare_table(raw, _cfg(nan_policy="drop"), seed=0)
    assert sum(len(v) for v in dropped.y.values()) == 59
    imputed = data.prepare_table(raw, _cfg(nan_policy="impute"), seed=0)
    assert sum(len(v) for v in imputed.y.values()) == 60
    assert all(np.isfinite(v).all() for v in imputed.x.values())


def test_constant_target_and_too_few_rows(tmp_path):
    with pytest.raises(DataError, match="constant"):
        data.prepare_table(load_table(_csv(tmp_path, "a,y\n" + "1,3\n2,3\n" * 10), "y"), _cfg(), seed=0)
    with pytest.raises(DataError, match="at least 10"):
        data.prepare_table(load_table(_csv(tmp_path, "a,y\n1,3\n2,4\n"), "y"), _cfg(), seed=0)


def test_fewer_rows_than_batch_size(tmp_path, rng):
    path = _csv(tmp_path, _table(rng, n=40))
    cfg = load_config(None, [f'data.tabular_csv="{path}"', 'data.target="target"', "regressor.fit.batch_size=64"])
    with pytest.raises(DataError, match="regressor.fit.batch_size"):
        data.prepare(cfg, seed=0)


def _npz(tmp_path, **arrays):
    p = tmp_path / "img.npz"
    np.savez(p, **arrays)
    return str(p)


@pytest.mark.parametrize("shape", [(40, 8, 8), (40, 1, 16, 16), (40, 3, 28, 28)])
def test_npz_shapes(tmp_path, rng, shape):
    y = np.repeat(["cat", "dog"], 20)
    ds = data.prepare_images(load_images(_npz(tmp_path, x=rng.random(shape), y=y)), _cfg(), seed=0)
    assert ds.class_names == ("cat", "dog")
    assert ds.input_shape == ((1,) + shape[1:] if len(shape) == 3 else shape[1:])


@pytest.mark.parametrize(
    "arrays, fragment",
    [
        ({"x": np.zeros((10, 8, 8))}, "lacks array"),
        ({"x": np.zeros((10, 8)), "y": np.zeros(10)}, "expected \\(N, H, W\\)"),
        ({"x": np.zeros((10, 8, 8)), "y": np.zeros(9)}, "differ in length"),
        ({"x": np.zeros((10, 8, 8)), "y": np.zeros((10, 2))}, "expected \\(N,\\) labels"),
        ({"x": np.zeros((10, 2, 8, 8)), "y": np.zeros(10)}, "channels"),
    ],
)
def test_bad_npz(tmp_path, arrays, fragment):
    with pytest.raises(DataError, match=fragment):
        load_images(_npz(tmp_path, **arrays))


def test_unreadable_npz_files_get_one_line_errors(tmp_path):
    good = Path(_npz(tmp_path, x=np.zeros((10, 8, 8)), y=np.arange(10) % 2)).read_bytes()
    lone_npy = tmp_path / "lone.npy"
    np.save(lone_npy, np.zeros((10, 8, 8)))
    cases = {
        "empty.npz": (b"", "not a readable .npz"),
        "lone.npz": (lone_npy.read_bytes(), "one .npy array"),
        "truncated.npz": (good[: len(good) // 2], "not a readable .npz"),
        "text.npz": (b"x,y\n1,2\n", "not a readable .npz"),
    }
    for name, (content, fragment) in cases.items():
        (tmp_path / name).write_bytes(content)
        with pytest.raises(DataError, match=fragment):
            load_images(str(tmp_path / name))


def test_nan_labels_are_refused_not_made_a_class(tmp_path, rng):
    y = np.where(np.arange(60) % 3 == 0, np.nan, np.arange(60) % 2)
    with pytest.raises(DataError, match="20 NaN/inf label\\(s\\) \\(first: row 0\\)"):
        load_images(_npz(tmp_path, x=rng.random((60, 8, 8)), y=y))


def test_npz_changed_while_read_is_refused(monkeypatch, tmp_path, rng):
    # the recorded sha256 is of the file as hashed; the arrays come from a second read of it
    path = _npz(tmp_path, x=rng.random((10, 8, 8)), y=np.arange(10) % 2)
    real_load = np.load

    def load_then_touch(*args, **kwargs):
        out = real_load(*args, **kwargs)
        os.utime(path, ns=(1, 1))  # another writer between the hash and the read
        return out

    monkeypatch.setattr(np, "load", load_then_touch)
    with pytest.raises(DataError, match="changed while it was being read"):
        load_images(path)
    monkeypatch.setattr(np, "load", real_load)
    assert load_images(path).provenance["sha256"] == hashlib.sha256(Path(path).read_bytes()).hexdigest()


def test_one_class_and_nan_images(tmp_path, rng):
    raw = load_images(_npz(tmp_path, x=rng.random((30, 8, 8)), y=np.zeros(30)))
    with pytest.raises(DataError, match="only one class"):
        data.prepare_images(raw, _cfg(), seed=0)
    x = rng.random((30, 8, 8))
    x[3, 2, 2] = np.nan
    raw = load_images(_npz(tmp_path, x=x, y=np.arange(30) % 2))
    with pytest.raises(DataError, match="NaN"):
        data.prepare_images(raw, _cfg(), seed=0)
    assert np.isfinite(data.prepare_images(raw, _cfg(nan_policy="impute"), seed=0).x["train"]).all()


@pytest.mark.parametrize("nan_policy", ["error", "impute"])
def test_image_standardisation_in_blocks_matches_numpy(monkeypatch, tmp_path, rng, nan_policy):
    # per-channel mean/std on the train split and the scaled splits, computed block by block, against
    # numpy on whole copies; one block gives numpy's figures bit for bit, several agree to rounding
    x = rng.normal(3.0, 2.0, size=(90, 3, 6, 5)) * np.array([1.0, 10.0, 0.1])[None, :, None, None]
    if nan_policy == "impute":
        x[4, 1, 2, 2] = np.nan
    raw = load_images(_npz(tmp_path, x=x, y=np.arange(90) % 3))
    one = data.prepare_images(raw, _cfg(nan_policy=nan_policy), seed=0)
    filled = raw.x.copy()
    train = filled[one.index["train"]]
    mean = np.nan_to_num(np.nanmean(train, axis=(0, 2, 3)))
    filled = np.where(np.isnan(filled), mean[None, :, None, None], filled)
    train = filled[one.index["train"]]
    assert one.preprocessing["channel_mean"] == mean.tolist()
    std = train.std(axis=(0, 2, 3))
    assert one.preprocessing["channel_std"] == std.tolist()
    for split, index in one.index.items():
        want = ((filled[index] - mean[None, :, None, None]) / std[None, :, None, None]).astype(np.float32)
        np.testing.assert_array_equal(one.x[split], want)
    monkeypatch.setattr(data, "_BLOCK_ELEMENTS", 7 * 90)  # 7 images a block: the train split in several
    many = data.prepare_images(raw, _cfg(nan_policy=nan_policy), seed=0)
    np.testing.assert_allclose(many.preprocessing["channel_mean"], mean, rtol=1e-12)
    np.testing.assert_allclose(many.preprocessing["channel_std"], std, rtol=1e-12)
    for split in one.x:
        np.testing.assert_allclose(many.x[split], one.x[split], rtol=1e-6, atol=1e-6)


def test_image_folder(tmp_path, rng):
    from PIL import Image

    for label in ("a", "b"):
        (tmp_path / "imgs" / label).mkdir(parents=True)
        for i in range(12):
            Image.fromarray((rng.random((16, 16)) * 255).astype(np.uint8)).save(tmp_path / "imgs" / label / f"{i}.png")
    raw = load_images(str(tmp_path / "imgs"))
    assert raw.x.shape == (24, 1, 16, 16) and raw.class_names == ("a", "b")
    Image.fromarray(np.zeros((8, 8), dtype=np.uint8)).save(tmp_path / "imgs" / "a" / "odd.png")
    with pytest.raises(DataError, match="resize"):
        load_images(str(tmp_path / "imgs"))


def test_dump_load_round_trip():
    ds = data.prepare(load_config(), seed=0)
    files = data.dump(ds)
    back = data.load(files.__getitem__)
    for key in ds:
        for s in data.SPLITS:
            assert np.array_equal(ds[key].x[s], back[key].x[s]) and np.array_equal(ds[key].index[s], back[key].index[s])
        assert ds[key].summary() == back[key].summary()
