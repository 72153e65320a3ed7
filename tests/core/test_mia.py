"""Membership-inference attacks and audit statistics (auditml_core.privacy.mia) on generated data."""

import math

import numpy as np
import pytest
import torch
from scipy.stats import beta

from auditml_core import models, training
from auditml_core.config import FitConfig
from auditml_core.privacy import mia


def _tail_bisection(k, n, confidence):
    """Clopper–Pearson by its definition, apart from mia's beta quantiles: the p at which a binomial tail sum
    (in log space, from math.lgamma) equals alpha, found by bisection to the last bit."""
    alpha = (1 - confidence) / 2

    def tail(ks, p):  # P(X in ks), X ~ Binomial(n, p), each tail summed directly (no 1 - cdf cancellation)
        logs = [
            math.lgamma(n + 1)
            - math.lgamma(i + 1)
            - math.lgamma(n - i + 1)
            + i * math.log(p)
            + (n - i) * math.log1p(-p)
            for i in ks
        ]
        top = max(logs)
        return math.exp(top) * math.fsum(math.exp(v - top) for v in logs)

    def solve(f):  # f increasing in p on (0, 1)
        lo, hi = 0.0, 1.0
        for _ in range(80):
            mid = 0.5 * (lo + hi)
            lo, hi = (mid, hi) if f(mid) < 0 else (lo, mid)
        return 0.5 * (lo + hi)

    lower = 0.0 if k == 0 else solve(lambda p: tail(range(k, n + 1), p) - alpha)  # P(X >= k) grows with p
    upper = 1.0 if k == n else solve(lambda p: alpha - tail(range(k + 1), p))  # P(X <= k) falls with p
    return lower, upper


@pytest.mark.parametrize("n", [1, 7, 44, 88, 359, 500])
def test_clopper_pearson_is_the_binomial_tail_definition(n):
    # Two implementations apart from mia's betaincinv: bisection on binomial tail sums (the definition) and scipy's
    # beta distribution; at the confidences the audit uses (0.95) and a stricter one.
    for confidence in (0.95, 0.999):
        for k in sorted({0, 1, 2, n // 3, n // 2, n - 2, n - 1, n}):
            if not 0 <= k <= n:
                continue
            lo, hi = mia.clopper_pearson(k, n, confidence=confidence)
            ref_lo, ref_hi = _tail_bisection(k, n, confidence)
            assert lo == pytest.approx(ref_lo, abs=1e-12) and hi == pytest.approx(ref_hi, abs=1e-12), (k, n)
            a = (1 - confidence) / 2
            exp_lo = 0.0 if k == 0 else beta.ppf(a, k, n - k + 1)
            exp_hi = 1.0 if k == n else beta.ppf(1 - a, k + 1, n - k)
            assert lo == pytest.approx(exp_lo, abs=1e-12) and hi == pytest.approx(exp_hi, abs=1e-12), (k, n)


def test_clopper_pearson_reference_catches_a_wrong_interval():
    # Positive control: the one-sided alpha used for both sides (a 90% interval called 95%) is far outside 1e-12
    # of the definition, so the comparison above would catch it.
    lo90, hi90 = mia.clopper_pearson(10, 88, confidence=0.90)
    ref_lo, ref_hi = _tail_bisection(10, 88, 0.95)
    assert abs(lo90 - ref_lo) > 1e-3 and abs(hi90 - ref_hi) > 1e-3


def test_clopper_pearson_rejects_impossible_counts():
    with pytest.raises(ValueError, match="0 <= k <= n"):
        mia.clopper_pearson(5, 4)


def test_dp_bound_is_the_hypothesis_testing_region():
    assert mia.dp_tpr_bound(0.01, epsilon=1.0, delta=1e-5) == pytest.approx(np.e * 0.01 + 1e-5)
    assert mia.dp_tpr_bound(0.5, epsilon=0.0, delta=0.0) == pytest.approx(0.5)  # ε = 0: no test beats chance
    assert mia.dp_tpr_bound(0.9, epsilon=5.0, delta=0.0) <= 1.0


def _mlp(n_features):
    return models.build_regressor(n_features=n_features, hidden_sizes=(64,), activation="relu")


def _fit(model, x, y, *, epochs, seed):
    fit = FitConfig(epochs=epochs, batch_size=64, lr=3e-2)  # full-batch steps on these small sets: fast
    training.fit(
        model,
        x_train=x,
        y_train=y,
        x_val=None,
        y_val=None,
        task="regression",
        fit_cfg=fit,
        dp=None,
        device=torch.device("cpu"),
        seed=seed,
    )
    return model.eval()


def _noise_data(rng, n, f=8):
    # Targets independent of the features: a model can only do well on the rows it memorised.
    return rng.normal(size=(n, f)).astype(np.float32), rng.normal(size=n).astype(np.float32)


def _both_attacks(target, x, y, members, *, epochs, n_shadows=4):
    in_mask = mia.shadow_assignment(len(x), n_shadows, seed=1)
    phis = []
    for i in range(n_shadows):
        torch.manual_seed(100 + i)
        shadow = _fit(_mlp(x.shape[1]), x[in_mask[i]], y[in_mask[i]], epochs=epochs, seed=100 + i)
        phis.append(mia.confidence_logit(training.predict(shadow, x), y, task="regression"))
    out = training.predict(target, x)
    loss = mia.loss_scores(out, y, task="regression")
    lira = mia.lira_scores(mia.confidence_logit(out, y, task="regression"), np.stack(phis), in_mask)
    return mia.roc_auc(loss, members), mia.roc_auc(lira, members)


def test_attacks_break_a_memorising_model(rng):
    x, y = _noise_data(rng, 128)
    members = np.r_[np.ones(64, bool), np.zeros(64, bool)]
    torch.manual_seed(0)
    target = _fit(_mlp(8), x[members], y[members], epochs=100, seed=0)
    auc_loss, auc_lira = _both_attacks(target, x, y, members, epochs=100)
    assert auc_loss > 0.8 and auc_lira > 0.8, (auc_loss, auc_lira)


def test_attacks_are_at_chance_on_a_model_that_never_saw_the_members(rng):
    x, y = _noise_data(rng, 400)
    x_third, y_third = _noise_data(rng, 64)  # the model trains on a third set from the same distribution
    members = np.r_[np.ones(200, bool), np.zeros(200, bool)]
    torch.manual_seed(0)
    target = _fit(_mlp(8), x_third, y_third, epochs=100, seed=0)
    auc_loss, auc_lira = _both_attacks(target, x, y, members, epochs=30, n_shadows=2)
    # The AUC of an uninformative score on 200 + 200 records has standard deviation ~0.029: 4 of them.
    assert abs(auc_loss - 0.5) < 0.12 and abs(auc_lira - 0.5) < 0.12, (auc_loss, auc_lira)


def test_empirical_epsilon_is_rarely_positive_for_an_uninformative_score():
    positives = 0
    for seed in range(20):
        r = np.random.default_rng(seed)
        scores, members = r.normal(size=200), np.r_[np.ones(100, bool), np.zeros(100, bool)]
        positives += mia.empirical_epsilon(scores, members, delta=1e-5, seed=seed)["epsilon_lower_bound"] > 0
    # A valid 95% bound is positive with probability <= 5% when ε = 0; P(Binomial(20, 0.05) > 3) ≈ 1.6%.
    assert positives <= 3


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_the_optimistic_bound_is_the_maximum_over_every_threshold(seed):
    # It is computed over the undominated (TP, FP) pairs only: the same maximum as over all thresholds.
    rng = np.random.default_rng(seed)
    members = rng.random(300) < 0.4
    scores = np.round(rng.normal(size=300) + 0.8 * members, 1)  # a leaky score, with ties
    thr, tp, fp, n_mem, n_non = mia._counts(scores, members)
    brute = max(mia._eps_lb_at(int(t), int(f), n_mem, n_non, delta=1e-5, confidence=0.95) for t, f in zip(tp, fp))
    got = mia.empirical_epsilon(scores, members, delta=1e-5, seed=seed)["optimistic_max_over_thresholds"]
    assert got == brute > 0  # the same float; positive: a maximum that could have been missed
    pairs = mia._undominated(tp, fp)
    assert len(pairs) < len(set(zip(tp.tolist(), fp.tolist())))  # fewer pairs are evaluated


def test_empirical_epsilon_of_a_perfect_attack_is_what_its_sample_size_can_certify():
    n = 100
    scores, members = np.r_[np.ones(n), np.zeros(n)], np.r_[np.ones(n, bool), np.zeros(n, bool)]
    e = mia.empirical_epsilon(scores, members, delta=0.0, seed=0)
    half = n // 2
    lo, _ = mia.clopper_pearson(half, half)
    _, hi = mia.clopper_pearson(0, half)
    assert e["epsilon_lower_bound"] == pytest.approx(np.log(lo / hi), rel=1e-9)
    assert e["optimistic_max_over_thresholds"] >= e["epsilon_lower_bound"]
    assert e["certifiable_epsilon"] == pytest.approx(e["epsilon_lower_bound"], rel=1e-12)  # a perfect attack's bound


def test_what_a_membership_audit_can_certify_is_bounded_by_its_sample_size():
    # Issue #23: 44 + 44 held-out records (the regressor's 88 + 88 halved) certify at most 2.44, 179/180 (the CNN's
    # 359 + 359) 3.88: whatever the model leaks, the held-out bound cannot refute a claim of ε = 3 on the regressor.
    lo = beta.ppf(0.025, 44, 1)
    hi = beta.ppf(0.975, 1, 44)
    assert mia.certifiable_epsilon(44, 44, delta=0.0) == pytest.approx(np.log(lo / hi), rel=1e-6)
    assert mia.certifiable_epsilon(44, 44, delta=1e-5) == pytest.approx(2.4366, abs=1e-3)
    assert mia.certifiable_epsilon(179, 180, delta=1e-5) == pytest.approx(3.8772, abs=1e-3)


@pytest.mark.parametrize("n_members", [30, 29])  # equal and unequal (odd) group sizes
def test_the_bootstrap_interval_is_the_one_of_resampling_the_records(n_members):
    # The vectorised Mann-Whitney bootstrap against resampling the records and calling scikit-learn, same draws.
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(3)
    scores = np.round(rng.normal(size=60), 1)  # ties included
    members = rng.permutation(np.r_[np.ones(n_members, bool), np.zeros(60 - n_members, bool)])
    draws = np.random.default_rng(5)
    pos, neg = np.flatnonzero(members), np.flatnonzero(~members)
    values = []
    for _ in range(200):
        i = np.concatenate([draws.choice(pos, len(pos)), draws.choice(neg, len(neg))])
        values.append(roc_auc_score(members[i], scores[i]))
    expected = np.percentile(values, [2.5, 97.5])
    assert mia.auc_bootstrap_ci(scores, members, seed=5, n_resamples=200) == pytest.approx(list(expected), abs=1e-12)


def test_tpr_at_fpr_respects_the_fpr_and_reports_resolution():
    scores = np.r_[np.arange(10, 20), np.arange(0, 10)].astype(float)
    members = np.r_[np.ones(10, bool), np.zeros(10, bool)]
    row = mia.tpr_at_fpr(scores, members, 0.01)
    assert row["tpr"] == 1.0 and row["fpr"] == 0.0 and row["resolution_limited"]
    row = mia.tpr_at_fpr(-scores, members, 0.1)  # a reversed score: one false positive allowed, no member found
    assert row["fpr"] <= 0.1 and row["tpr"] == 0.0


def _reader_study_scores(n_non):
    """40 members, 7 of them (TPR 0.175) scored above every non-member, and one more above all non-members but
    one; the other 32 below most non-members."""
    rng = np.random.default_rng(0)
    non = rng.random(n_non)  # in [0, 1)
    top2 = np.sort(non)[-2:]
    members = np.r_[np.full(7, 5.0), [top2.mean()], rng.random(32) * 0.5]
    return np.r_[members, non], np.r_[np.ones(40, bool), np.zeros(n_non, bool)]


def test_a_tpr_below_the_fpr_resolution_comes_with_the_lowest_resolvable_fpr_and_its_dp_bound():
    # Reader study: "TPR 0.175 (DP bound 0.02) at FPR 0.001" looked like a DP breach; with 40 non-members the
    # smallest non-zero FPR is 1/40, so the TPR is the one with no false positive, not one at FPR 0.001.
    scores, members = _reader_study_scores(40)
    out = mia.attack_summary(scores, members, delta=1e-5, seed=0, epsilon=3.0, n_resamples=50)
    at_001 = out["tpr_at_fpr"][1]
    assert at_001["target_fpr"] == 0.001 and at_001["resolution_limited"] and at_001["tpr"] == pytest.approx(0.175)
    assert at_001["tpr"] > at_001["dp_bound"]  # what the old row printed side by side
    low = out["tpr_at_lowest_resolvable_fpr"]
    assert low["target_fpr"] == pytest.approx(1 / 40) and not low["resolution_limited"]
    assert low["false_positives"] <= 1 and low["tpr"] == pytest.approx(0.2)  # the eighth member costs one FP
    assert low["dp_bound"] == pytest.approx(mia.dp_tpr_bound(1 / 40, epsilon=3.0, delta=1e-5))
    assert low["dp_bound"] == pytest.approx(min(1.0, np.exp(3.0) / 40 + 1e-5)) and not low["exceeds_dp_bound"]
    # null: 2000 non-members resolve FPR 0.001, so no extra row is needed
    scores, members = _reader_study_scores(2000)
    out = mia.attack_summary(scores, members, delta=1e-5, seed=0, epsilon=3.0, n_resamples=50)
    assert "tpr_at_lowest_resolvable_fpr" not in out and not out["tpr_at_fpr"][1]["resolution_limited"]


def test_shadow_assignment_is_balanced():
    mask = mia.shadow_assignment(50, 4, seed=0)
    assert mask.shape == (4, 50) and (mask.sum(axis=0) == 2).all()
    assert (mask.sum(axis=1) == 25).all()  # equal shadow sizes: each trains on as many rows as the audited model
    with pytest.raises(ValueError, match="even"):
        mia.shadow_assignment(10, 3, seed=0)
