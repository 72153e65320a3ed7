"""Membership-inference attacks and the statistics an empirical privacy audit reports.

The attacks score candidate records; a higher score means "more likely a training member":

- :func:`loss_scores`: the loss-threshold attack (Yeom et al., 2018): score = −loss of the record.
- :func:`lira_scores`: the *online* likelihood-ratio attack (LiRA, Carlini et al., 2022) with a fixed
  (global) variance, the variant the paper recommends for few shadow models: every candidate is in the
  training set of exactly half of the shadow models; its score is the Gaussian log-likelihood ratio of
  the target's logit-scaled confidence under the "in" and "out" shadow distributions.

The statistics turn (scores, membership labels) into what an auditor reads: ROC-AUC with a bootstrap
interval, TPR at a fixed FPR with a Clopper–Pearson interval, the (ε, δ)-DP bound on TPR at that FPR,
and an empirical ε lower bound. Nothing here knows of stages or Flower; the shadow models are trained
by the caller (the pipeline's ``audit`` stage uses :func:`auditml_core.training.fit`).
"""

from __future__ import annotations

import functools
import math
from typing import Any

import numpy as np
from scipy.special import betaincinv
from sklearn.metrics import roc_auc_score

# --------------------------------------------------------------------------- per-record signals


def per_record_loss(outputs: np.ndarray, y: np.ndarray, *, task: str) -> np.ndarray:
    """Loss of every record: squared error (regression, outputs (N,)) or cross-entropy (logits (N, K))."""
    if task == "regression":
        return (np.asarray(outputs, dtype=np.float64) - np.asarray(y, dtype=np.float64)) ** 2
    logits = np.asarray(outputs, dtype=np.float64)  # (N, K)
    top = logits.max(axis=1, keepdims=True)
    log_z = top[:, 0] + np.log(np.exp(logits - top).sum(axis=1))
    return log_z - logits[np.arange(len(y)), np.asarray(y, dtype=np.int64)]


def confidence_logit(outputs: np.ndarray, y: np.ndarray, *, task: str) -> np.ndarray:
    """LiRA's per-record statistic φ, roughly Gaussian across models.

    Classification: ``log p_y − log(1 − p_y)`` computed stably from the logits (Carlini et al.).
    Regression: ``−log(squared error + 1e-12)`` (the log of a squared residual is close to Gaussian,
    the residual itself is not).
    """
    if task == "regression":
        return -np.log(per_record_loss(outputs, y, task=task) + 1e-12)
    logits = np.asarray(outputs, dtype=np.float64)  # (N, K)
    idx = np.arange(len(y))
    y = np.asarray(y, dtype=np.int64)
    true = logits[idx, y]
    others = logits.copy()
    others[idx, y] = -np.inf
    top = others.max(axis=1)
    log_rest = top + np.log(np.exp(others - top[:, None]).sum(axis=1))
    return true - log_rest


def loss_scores(outputs: np.ndarray, y: np.ndarray, *, task: str) -> np.ndarray:
    """Loss-threshold attack (Yeom et al. 2018): score = −loss (members tend to have lower loss)."""
    return -per_record_loss(outputs, y, task=task)


def shadow_assignment(n_records: int, n_shadows: int, *, seed: int) -> np.ndarray:
    """(n_shadows, n_records) boolean: record j is in shadow i's training set.

    Shadows come in pairs that split the records into complementary random halves: every record is
    in exactly half of the shadows and every shadow trains on exactly ``n_records // 2`` of them (the
    first of a pair gets the odd one out). The balanced design of Carlini et al. (2022), with equal
    shadow sizes so that a shadow can be trained on as many rows as the audited model.
    """
    if n_shadows < 2 or n_shadows % 2:
        raise ValueError(f"n_shadows={n_shadows}; LiRA needs an even number of shadow models >= 2")
    rng = np.random.default_rng(seed)
    mask = np.zeros((n_shadows, n_records), dtype=bool)
    for pair in range(n_shadows // 2):
        half = rng.permutation(n_records) < (n_records + 1) // 2  # (N,) this pair's random half
        mask[2 * pair], mask[2 * pair + 1] = half, ~half
    return mask


def lira_scores(target_phi: np.ndarray, shadow_phi: np.ndarray, in_mask: np.ndarray) -> np.ndarray:
    """Online LiRA with a fixed variance.

    Parameters
    ----------
    target_phi : (N,) the target model's φ (:func:`confidence_logit`) per candidate record.
    shadow_phi : (S, N) every shadow model's φ on the same records.
    in_mask : (S, N) whether the record was in that shadow's training set.

    Returns
    -------
    (N,) log N(φ; μ_in, σ_in) − log N(φ; μ_out, σ_out), with per-record means and the variances
    pooled over all records (per-record variances from two observations are too noisy).
    """
    shadow_phi = np.asarray(shadow_phi, dtype=np.float64)
    in_mask = np.asarray(in_mask, dtype=bool)
    if shadow_phi.shape != in_mask.shape or shadow_phi.shape[1] != len(target_phi):
        raise ValueError(
            f"shapes disagree: target {np.shape(target_phi)}, shadows {shadow_phi.shape}, mask {in_mask.shape}"
        )
    if not (in_mask.any(axis=0).all() and (~in_mask).any(axis=0).all()):
        raise ValueError("every record needs at least one 'in' and one 'out' shadow model (use shadow_assignment)")
    n_in, n_out = in_mask.sum(axis=0), (~in_mask).sum(axis=0)
    mu_in = np.where(in_mask, shadow_phi, 0.0).sum(axis=0) / n_in
    mu_out = np.where(~in_mask, shadow_phi, 0.0).sum(axis=0) / n_out
    dev_in = np.where(in_mask, shadow_phi - mu_in, 0.0)
    dev_out = np.where(~in_mask, shadow_phi - mu_out, 0.0)
    sd_in = math.sqrt(float((dev_in**2).sum()) / max(int(n_in.sum() - len(n_in)), 1)) + 1e-6
    sd_out = math.sqrt(float((dev_out**2).sum()) / max(int(n_out.sum() - len(n_out)), 1)) + 1e-6
    phi = np.asarray(target_phi, dtype=np.float64)
    log_in = -0.5 * ((phi - mu_in) / sd_in) ** 2 - math.log(sd_in)
    log_out = -0.5 * ((phi - mu_out) / sd_out) ** 2 - math.log(sd_out)
    return log_in - log_out


# --------------------------------------------------------------------------- statistics


@functools.lru_cache(maxsize=64)
def _log_factorials(n: int) -> np.ndarray:
    """log(i!) for i = 0..n (read-only: cached, as every binomial pmf of one n reads it)."""
    out = np.array([math.lgamma(i + 1) for i in range(n + 1)])
    out.flags.writeable = False
    return out


def _log_binom_pmf(k: np.ndarray, n: int, p: float) -> np.ndarray:
    if p <= 0.0:
        return np.where(k == 0, 0.0, -np.inf)
    if p >= 1.0:
        return np.where(k == n, 0.0, -np.inf)
    lg = _log_factorials(n)
    return lg[n] - lg[k] - lg[n - k] + k * math.log(p) + (n - k) * math.log1p(-p)


def clopper_pearson(k: int, n: int, *, confidence: float = 0.95) -> tuple[float, float]:
    """Exact (Clopper–Pearson) two-sided interval for a binomial proportion k/n.

    The textbook beta-quantile form (``scipy.special.betaincinv``, the inverse regularised incomplete beta
    function): ~1,000x faster than bisecting binomial tail sums, which the tests keep as an independent
    reference (agreement to 1e-12). Each side holds with probability ≥ (1 + confidence) / 2.

    Raises
    ------
    ValueError
        If not ``0 <= k <= n``, ``n >= 1`` and ``0 < confidence < 1``.
    """
    if n < 1 or not 0 <= k <= n or not 0 < confidence < 1:
        raise ValueError(f"clopper_pearson needs 0 <= k <= n, n >= 1, 0 < confidence < 1; got k={k}, n={n}")
    return _clopper_pearson(int(k), int(n), float(confidence))


@functools.lru_cache(maxsize=65536)
def _clopper_pearson(k: int, n: int, confidence: float) -> tuple[float, float]:
    alpha = (1.0 - confidence) / 2
    # lower: the p with P(X >= k | p) = alpha, the alpha quantile of Beta(k, n - k + 1)
    lower = 0.0 if k == 0 else float(betaincinv(k, n - k + 1, alpha))
    # upper: the p with P(X <= k | p) = alpha, the 1 - alpha quantile of Beta(k + 1, n - k)
    upper = 1.0 if k == n else float(betaincinv(k + 1, n - k, 1.0 - alpha))
    return lower, upper


def roc_auc(scores: np.ndarray, members: np.ndarray) -> float:
    """Area under the ROC curve of a membership score (0.5 = chance)."""
    return float(roc_auc_score(np.asarray(members, dtype=bool), np.asarray(scores, dtype=np.float64)))


def auc_bootstrap_ci(scores: np.ndarray, members: np.ndarray, *, seed: int, n_resamples: int = 1000) -> list[float]:
    """95% percentile-bootstrap interval of the AUC, resampling members and non-members separately.

    Each resample's AUC is the Mann–Whitney statistic of the resampled records, computed from how many
    times each record was drawn: ``counts_members · W · counts_non_members / (P·N)`` with ``W[i, j]`` = 1
    when member ``i`` outscores non-member ``j`` (1/2 on a tie), which is what ``roc_auc_score`` of the
    resampled records returns (the tests compare the two), at a thousandth of the cost.
    """
    rng = np.random.default_rng(seed)
    members = np.asarray(members, dtype=bool)
    scores = np.asarray(scores, dtype=np.float64)
    pos, neg = np.flatnonzero(members), np.flatnonzero(~members)
    sp, sn = scores[pos][:, None], scores[neg][None, :]
    wins = (sp > sn) + 0.5 * (sp == sn)  # (P, N)
    count_pos = np.empty((n_resamples, len(pos)))  # (R, P) how often each member is drawn
    count_neg = np.empty((n_resamples, len(neg)))  # (R, N)
    # The same draws, in the same order, as resampling the records themselves; rng.integers(0, n, n) draws exactly
    # what rng.choice(n, n) draws (tests/core/test_mia.py) without choice's per-call argument checks (~5x faster).
    for b in range(n_resamples):
        count_pos[b] = np.bincount(rng.integers(0, len(pos), len(pos)), minlength=len(pos))
        count_neg[b] = np.bincount(rng.integers(0, len(neg), len(neg)), minlength=len(neg))
    values = np.einsum("rn,rn->r", count_pos @ wins, count_neg) / (len(pos) * len(neg))  # (R,)
    lo, hi = np.percentile(values, [2.5, 97.5])
    return [float(lo), float(hi)]


def _counts(scores: np.ndarray, members: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, int, int]:
    """For every distinct threshold t (predict "member" when score >= t): (t, TP, FP, n_members, n_non)."""
    scores = np.asarray(scores, dtype=np.float64)
    members = np.asarray(members, dtype=bool)
    thresholds = np.concatenate([np.unique(scores)[::-1], [np.inf]])  # descending, plus "nobody is a member"
    order = np.sort(scores[members])
    order_non = np.sort(scores[~members])
    tp = len(order) - np.searchsorted(order, thresholds, side="left")
    fp = len(order_non) - np.searchsorted(order_non, thresholds, side="left")
    return thresholds, tp, fp, len(order), len(order_non)


def tpr_at_fpr(scores: np.ndarray, members: np.ndarray, fpr: float, *, confidence: float = 0.95) -> dict[str, Any]:
    """TPR at the most permissive threshold whose empirical FPR is <= ``fpr``, with Clopper–Pearson intervals.

    The threshold is chosen on the same records it is evaluated on (the usual way of reporting TPR
    at low FPR); with n non-members, FPRs below 1/n can only be met with zero false positives.
    """
    thresholds, tp, fp, n_mem, n_non = _counts(scores, members)
    ok = fp <= fpr * n_non
    i = int(np.flatnonzero(ok)[np.argmax(tp[ok])])
    return {
        "target_fpr": fpr,
        "fpr": float(fp[i] / n_non),
        "fpr_ci95": list(clopper_pearson(int(fp[i]), n_non, confidence=confidence)),
        "tpr": float(tp[i] / n_mem),
        "tpr_ci95": list(clopper_pearson(int(tp[i]), n_mem, confidence=confidence)),
        "true_positives": int(tp[i]),
        "false_positives": int(fp[i]),
        "resolution_limited": bool(fpr * n_non < 1),
    }


def dp_tpr_bound(fpr: float, *, epsilon: float, delta: float) -> float:
    """The highest TPR any membership test can reach at ``fpr`` against an (ε, δ)-DP mechanism.

    ``min(1, e^ε·FPR + δ, 1 − e^−ε·(1 − δ − FPR))`` (Kairouz et al. 2015's hypothesis-testing region).
    """
    return float(min(1.0, math.exp(epsilon) * fpr + delta, 1.0 - math.exp(-epsilon) * (1.0 - delta - fpr)))


def _eps_lb_at(tp: int, fp: int, n_mem: int, n_non: int, *, delta: float, confidence: float) -> float:
    """ε lower bound at one threshold from Clopper–Pearson bounds, both directions of the test."""
    tpr_lo, _ = clopper_pearson(tp, n_mem, confidence=confidence)
    _, fpr_hi = clopper_pearson(fp, n_non, confidence=confidence)
    fnr_hi, tnr_lo = 1.0 - tpr_lo, 1.0 - fpr_hi
    best = 0.0
    if tpr_lo - delta > 0 and fpr_hi > 0:
        best = max(best, math.log((tpr_lo - delta) / fpr_hi))
    if tnr_lo - delta > 0 and fnr_hi > 0:
        best = max(best, math.log((tnr_lo - delta) / fnr_hi))
    return best


def _point_eps(tp: np.ndarray, fp: np.ndarray, n_mem: int, n_non: int, delta: float) -> np.ndarray:
    """The point-estimate ε at every threshold (used only to choose a threshold)."""
    tpr, fpr = tp / n_mem, fp / n_non
    floor = 0.5 / max(n_mem, n_non)  # keeps zero counts finite
    a = np.log(np.maximum(tpr - delta, floor) / np.maximum(fpr, floor))
    b = np.log(np.maximum(1 - fpr - delta, floor) / np.maximum(1 - tpr, floor))
    return np.maximum(a, b)


def empirical_epsilon(
    scores: np.ndarray, members: np.ndarray, *, delta: float, seed: int, confidence: float = 0.95
) -> dict[str, Any]:
    """An empirical lower bound on ε from a membership attack's (FPR, TPR).

    ε ≥ log((TPR_lo − δ) / FPR_hi) (and the same for the complementary test) holds with the stated
    confidence *at a threshold fixed in advance*. So the records are split in two seeded halves
    (members and non-members each): the threshold maximising the point estimate is chosen on the
    first half and the Clopper–Pearson bound is computed on the second (``epsilon_lower_bound``).
    The maximum over all thresholds on all records is also returned, labelled optimistic: it is
    not a valid lower bound at the stated confidence (multiple comparisons).
    """
    scores = np.asarray(scores, dtype=np.float64)
    members = np.asarray(members, dtype=bool)
    rng = np.random.default_rng(seed)
    half = np.zeros(len(scores), dtype=bool)
    for group in (np.flatnonzero(members), np.flatnonzero(~members)):
        half[rng.permutation(group)[: len(group) // 2]] = True
    thr_a, tp_a, fp_a, nm_a, nn_a = _counts(scores[half], members[half])
    best_t = float(thr_a[int(np.argmax(_point_eps(tp_a, fp_a, nm_a, nn_a, delta)))])
    s_b, m_b = scores[~half], members[~half]
    tp_b, fp_b = int((s_b[m_b] >= best_t).sum()), int((s_b[~m_b] >= best_t).sum())
    n_mem_b, n_non_b = int(m_b.sum()), int((~m_b).sum())
    held_out = _eps_lb_at(tp_b, fp_b, n_mem_b, n_non_b, delta=delta, confidence=confidence)
    thr, tp, fp, n_mem, n_non = _counts(scores, members)
    optimistic = max(
        _eps_lb_at(t, f, n_mem, n_non, delta=delta, confidence=confidence) for t, f in _undominated(tp, fp)
    )
    return {
        "epsilon_lower_bound": held_out,
        "method": "threshold chosen on a random half of the records, Clopper–Pearson bound on the other half",
        "confidence": confidence,
        "threshold": best_t,
        "held_out_counts": {"tp": tp_b, "fp": fp_b, "members": int(m_b.sum()), "non_members": int((~m_b).sum())},
        "optimistic_max_over_thresholds": optimistic,
        "certifiable_epsilon": certifiable_epsilon(n_mem_b, n_non_b, delta=delta, confidence=confidence),
        "delta": delta,
    }


def _undominated(tp: np.ndarray, fp: np.ndarray) -> list[tuple[int, int]]:
    """The (TP, FP) pairs no other pair beats with at least as many TP and at most as many FP.

    :func:`_eps_lb_at` never decreases with TP and never increases with FP (both Clopper–Pearson bounds are
    monotone in their count), so its maximum over all thresholds is its maximum over these: tens of pairs
    instead of one per distinct score (2,040 thresholds took ~20 s for 40 + 2,000 records when each interval was a bisection).
    """
    out: list[tuple[int, int]] = []
    best_tp = -1
    for f, t in sorted(set(zip(fp.tolist(), tp.tolist())), key=lambda p: (p[0], -p[1])):
        if t > best_tp:  # the most TP at this FP, and more than any smaller FP reaches
            out.append((int(t), int(f)))
            best_tp = t
    return out


def certifiable_epsilon(n_members: int, n_non_members: int, *, delta: float, confidence: float = 0.95) -> float:
    """The largest ε the held-out threshold bound can certify with these counts: a perfect attack's bound.

    Every held-out member above the threshold and no non-member (or the reverse): with ``n`` records
    per side, ``log((CP_lower(n, n) − δ) / CP_upper(0, n))``. A claimed ε above it cannot be refuted by
    this audit whatever the model leaks (issue #23: 44 + 44 held-out records certify at most 2.44).
    """
    if n_members < 1 or n_non_members < 1:
        return 0.0
    return _eps_lb_at(n_members, 0, n_members, n_non_members, delta=delta, confidence=confidence)


def attack_summary(
    scores: np.ndarray,
    members: np.ndarray,
    *,
    delta: float,
    seed: int,
    epsilon: float | None = None,
    fprs: tuple[float, ...] = (0.01, 0.001),
    n_resamples: int = 1000,
) -> dict[str, Any]:
    """Everything the report shows for one attack on one model.

    Parameters
    ----------
    scores, members : attack scores and true membership of the candidate records.
    delta : δ used by the empirical ε bound (the run's ``dp.delta``).
    seed : seeds the bootstrap and the held-out split.
    epsilon : the claimed ε of a DP model (adds the DP bound at every FPR), or None.
    fprs : false-positive rates at which TPR is reported. Where one is below 1/n (n non-members), the result
        also holds ``tpr_at_lowest_resolvable_fpr``: the TPR at FPR <= 1/n with the DP bound at 1/n.
    n_resamples : bootstrap resamples of the AUC interval.
    """
    scores = np.asarray(scores, dtype=np.float64)
    members = np.asarray(members, dtype=bool)
    out: dict[str, Any] = {
        "n_members": int(members.sum()),
        "n_non_members": int((~members).sum()),
        "auc": roc_auc(scores, members),
        "auc_ci95": auc_bootstrap_ci(scores, members, seed=seed, n_resamples=n_resamples),
        "tpr_at_fpr": [],
        "empirical_epsilon": empirical_epsilon(scores, members, delta=delta, seed=seed + 1),
    }
    for f in fprs:
        out["tpr_at_fpr"].append(_with_dp_bound(tpr_at_fpr(scores, members, f), epsilon=epsilon, delta=delta))
    n_non = out["n_non_members"]
    if n_non and any(f * n_non < 1 for f in fprs):
        # An FPR below 1/n cannot be measured with n non-members: a TPR "at FPR 0.001" from 40 non-members is the
        # TPR with no false positive, and printed beside the DP bound at 0.001 it reads like a breach. The lowest
        # FPR these records resolve is 1/n: the TPR there, with the DP bound at 1/n, is what can be compared.
        out["tpr_at_lowest_resolvable_fpr"] = _with_dp_bound(
            tpr_at_fpr(scores, members, 1.0 / n_non), epsilon=epsilon, delta=delta
        )
    return out


def _with_dp_bound(row: dict[str, Any], *, epsilon: float | None, delta: float) -> dict[str, Any]:
    """``row`` (a :func:`tpr_at_fpr` result) with the DP bound at its target FPR, when a DP claim is audited."""
    if epsilon is not None:
        row["dp_bound"] = dp_tpr_bound(row["target_fpr"], epsilon=epsilon, delta=delta)
        # A violation is claimed only when even the lower TPR bound beats the DP bound at the upper FPR
        # bound: the true FPR of the chosen threshold is only known up to its interval.
        row["dp_bound_at_fpr_upper"] = dp_tpr_bound(row["fpr_ci95"][1], epsilon=epsilon, delta=delta)
        row["exceeds_dp_bound"] = bool(row["tpr_ci95"][0] > row["dp_bound_at_fpr_upper"])
    return row
