import numpy as np
import pytest

from auditml_core.errors import ConfigError, DataError
from federated.app.partition import PARTITIONERS, label_histograms, partition

N = 1000


@pytest.fixture
def labels(rng):
    return rng.integers(0, 10, size=N)


def _skew(y, parts, n_classes=10):
    """Mean total-variation distance between each client's label distribution and the global one."""
    overall = np.bincount(y, minlength=n_classes) / len(y)
    hists = np.array(label_histograms(y, parts, n_classes), dtype=float)
    dists = hists / hists.sum(axis=1, keepdims=True)
    return float(np.mean(0.5 * np.abs(dists - overall).sum(axis=1)))


@pytest.mark.parametrize("method", sorted(PARTITIONERS))
def test_parts_are_disjoint_and_cover_every_row(labels, method):
    parts = partition(labels, n_clients=5, method=method, alpha=0.5, seed=1)
    assert len(parts) == 5
    assert sum(len(p) for p in parts) == N
    assert np.array_equal(np.sort(np.concatenate(parts)), np.arange(N))


@pytest.mark.parametrize("method", sorted(PARTITIONERS))
def test_same_seed_same_parts_other_seed_other_parts(labels, method):
    a = partition(labels, n_clients=5, method=method, alpha=0.5, seed=1)
    b = partition(labels, n_clients=5, method=method, alpha=0.5, seed=1)
    c = partition(labels, n_clients=5, method=method, alpha=0.5, seed=2)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c))


def test_iid_sizes_differ_by_at_most_one(labels):
    sizes = [len(p) for p in partition(labels, n_clients=7, method="iid", seed=0)]
    assert max(sizes) - min(sizes) <= 1


def test_dirichlet_skew_is_measurable_and_grows_as_alpha_shrinks(labels):
    iid = _skew(labels, partition(labels, n_clients=5, method="iid", seed=0))
    skew_05 = _skew(labels, partition(labels, n_clients=5, method="dirichlet", alpha=0.5, seed=0))
    skew_01 = _skew(labels, partition(labels, n_clients=5, method="dirichlet", alpha=0.1, seed=0))
    assert iid < 0.1  # sampling noise only
    assert skew_05 > iid + 0.15
    assert skew_01 > skew_05


def test_quantity_skew_varies_sizes_but_not_labels(labels):
    parts = partition(labels, n_clients=5, method="quantity", alpha=0.5, seed=0)
    sizes = np.array([len(p) for p in parts])
    assert sizes.std() / sizes.mean() > 0.3
    big = [p for p in parts if len(p) >= 100]
    assert big and _skew(labels, big) < 0.1


def test_regression_targets_get_label_skew_through_quantile_bins(rng):
    y = rng.normal(size=N).astype(np.float32)
    parts = partition(y, n_clients=4, method="dirichlet", alpha=0.1, seed=0)
    means = [float(y[p].mean()) for p in parts]
    assert sum(len(p) for p in parts) == N
    assert max(means) - min(means) > 0.5  # clients see different target ranges


def test_a_part_below_the_batch_size_is_a_one_line_error_naming_the_key(labels):
    with pytest.raises(DataError) as err:
        partition(labels, n_clients=50, method="iid", seed=0, min_size=32, min_size_key="cnn.fit.batch_size")
    message = str(err.value)
    assert "\n" not in message
    assert "cnn.fit.batch_size=32" in message and "federated.n_clients" in message


def test_unknown_method_lists_the_valid_ones(labels):
    with pytest.raises(ConfigError, match="iid, dirichlet, quantity"):
        partition(labels, n_clients=2, method="shards", seed=0)
