"""Every metric the tool reports, in one place (in the style of ``sklearn.metrics``).

Plain numpy, no torch. Conventions: ``gold`` and ``pred`` are ``[N, K]`` (N essays, K rubrics),
``ranges`` K ``(lo, hi)`` pairs; a rubric's QWK is over its full range.

Agreement
    :func:`qwk` (Cohen's quadratic kappa; sklearn's ``cohen_kappa_score(weights="quadratic")``
    with explicit labels, 0.0 where that is nan), :func:`rubric_qwks`, :func:`mean_qwk` (the
    "average" of every table: the mean over rubrics), :func:`agreement` (mean QWK, exact and
    adjacent agreement, MAE), :func:`mcrmse` (mean columnwise RMSE in the corpus's units).
Many resamples at once
    :func:`kappa_from_moments` (quadratic kappa from five sums), :func:`batched_mean_qwk`.
Selective scoring and calibration
    :func:`risk_curve`, :func:`aurc` (area under the risk-coverage curve, risk = MAE),
    :func:`auroc` (of low confidence for an error), :func:`reliability_bins`,
    :func:`expected_calibration_error`.
Intervals
    :func:`hierarchical_bootstrap` and :func:`seed_essay_interval`: resample the training seeds,
    then the essays, so an interval covers both.
"""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

from modules.checks import as_int_array, rubric_bounds

__all__ = ["qwk", "rubric_qwks", "mean_qwk", "agreement", "mcrmse", "kappa_from_moments", "batched_mean_qwk",
           "confidence_order", "risk_curve", "aurc", "auroc", "reliability_bins", "expected_calibration_error",
           "hierarchical_bootstrap", "seed_essay_interval", "N_BINS"]

N_BINS = 10  # equal-width bins of the reliability diagram and ECE

BatchedMetric = Callable[[np.ndarray, np.ndarray], np.ndarray]


# ----------------------------------------------------------------------------- agreement

def qwk(y_true, y_pred, min_rating: int, max_rating: int) -> float:
    """Quadratic weighted kappa over the labels min_rating..max_rating.

    Same value as sklearn's ``cohen_kappa_score(..., weights="quadratic", labels=range)``,
    except 0.0 instead of nan where kappa is undefined (every item got one and the same score
    from both raters).  Values outside the range, empty or mismatched inputs raise ValueError.
    """
    t = as_int_array(y_true, "y_true").ravel()
    p = as_int_array(y_pred, "y_pred").ravel()
    lo, hi = int(min_rating), int(max_rating)
    if lo > hi:
        raise ValueError(f"min_rating {lo} > max_rating {hi}")
    if t.size != p.size:
        raise ValueError(f"y_true and y_pred differ in length: {t.size} vs {p.size}")
    if t.size == 0:
        raise ValueError("qwk needs at least one rating pair")
    for name, a in (("y_true", t), ("y_pred", p)):
        out = (a < lo) | (a > hi)
        if out.any():
            i = int(np.flatnonzero(out)[0])
            raise ValueError(f"{name}[{i}] = {int(a[i])} is outside the rating range {lo}..{hi}")
    L = hi - lo + 1
    confusion = np.bincount((t - lo) * L + (p - lo), minlength=L * L).reshape(L, L).astype(np.float64)
    rows = confusion.sum(axis=1)   # y_true histogram
    cols = confusion.sum(axis=0)   # y_pred histogram
    expected = np.outer(rows, cols) / confusion.sum()
    grid = np.arange(L, dtype=np.float64)
    weights = (grid[:, None] - grid[None, :]) ** 2
    denominator = float((weights * expected).sum())
    if denominator == 0.0:
        return 0.0
    return float(1.0 - (weights * confusion).sum() / denominator)


def rubric_qwks(gold, pred, ranges) -> list[float]:
    """QWK of each rubric k on its full range, ``qwk(gold[:, k], pred[:, k], lo_k, hi_k)``;
    continuous ``pred`` (expected scores) is rounded to the nearest integer first."""
    gold, pred = np.asarray(gold), np.rint(np.asarray(pred)).astype(np.int64)
    lo, hi = rubric_bounds(ranges, gold.shape[1])
    return [qwk(gold[:, k], pred[:, k], lo[k], hi[k]) for k in range(gold.shape[1])]


def mean_qwk(gold, pred, ranges) -> float:
    """The "average" QWK of every table: the mean over rubrics of :func:`rubric_qwks`."""
    return float(np.mean(rubric_qwks(gold, pred, ranges)))


def agreement(gold, pred, ranges) -> dict[str, float]:
    """``qwk`` (:func:`mean_qwk`), ``exact`` (share of essay-rubric pairs with pred = gold),
    ``adjacent`` (share with |pred - gold| <= 1) and ``mae`` (mean |pred - gold|)."""
    gold, pred = np.asarray(gold), np.asarray(pred)
    diff = np.abs(pred - gold)
    return {"qwk": mean_qwk(gold, pred, ranges), "exact": float((diff == 0).mean()),
            "adjacent": float((diff <= 1).mean()), "mae": float(diff.mean())}


def mcrmse(gold, pred, scales: Sequence[float]) -> float:
    """Mean columnwise RMSE in the corpus's units: mean_k sqrt(mean_i ((pred_ik - gold_ik) / scale_k)^2).

    Scores are stored as value * scale (ELL: 1.0-5.0 in halves stored 2-10, scale 2), so dividing
    by the scale gives the competition's units; ``pred`` may be continuous (weighted expected scores).
    """
    gold, pred = np.asarray(gold, dtype=np.float64), np.asarray(pred, dtype=np.float64)
    diff = (pred - gold) / np.asarray(scales, dtype=np.float64)
    return float(np.mean(np.sqrt(np.mean(diff ** 2, axis=0))))


# ----------------------------------------------------------------------------- many resamples at once

def kappa_from_moments(n, g1, g2, p1, p2, x):
    """Quadratic kappa from moments (exact integers held in float64), broadcasting.

    n pairs; g1 = sum gold, g2 = sum gold^2, p1 = sum pred, p2 = sum pred^2, x = sum gold*pred.
    sum_ij (i-j)^2 O_ij = g2 - 2x + p2 and sum_ij (i-j)^2 E_ij = g2 + p2 - 2 g1 p1 / n, so
    kappa = 1 - n (g2 - 2x + p2) / (n g2 + n p2 - 2 g1 p1); 0/0 -> 0.0 as in :func:`qwk`.
    """
    num = n * (g2 - 2.0 * x + p2)
    den = n * (g2 + p2) - 2.0 * g1 * p1
    ok = den != 0
    kappa = 1.0 - num / np.where(ok, den, 1.0)
    return np.where(ok, kappa, 0.0)


def batched_mean_qwk(gold: np.ndarray, pred: np.ndarray) -> np.ndarray:
    """:func:`mean_qwk` of each of B resamples, ``gold``, ``pred`` [B, N, K] -> [B], from the
    moments per rubric (:func:`kappa_from_moments`): thousands of resamples at once."""
    g, p = np.asarray(gold, dtype=np.float64), np.asarray(pred, dtype=np.float64)
    kappa = kappa_from_moments(g.shape[1], g.sum(1), (g * g).sum(1), p.sum(1), (p * p).sum(1), (g * p).sum(1))
    return kappa.mean(axis=1)


# ----------------------------------------------------------------------------- selective scoring

def confidence_order(confidence) -> np.ndarray:
    """Essay indices, most confident first; ties keep file order (stable sort)."""
    return np.argsort(-np.asarray(confidence, dtype=np.float64), kind="stable")


def risk_curve(confidence, gold, pred) -> np.ndarray:
    """float [N]: entry k-1 is the MAE over the essay-rubric pairs of the k most confident essays."""
    per_essay = np.abs(np.asarray(pred) - np.asarray(gold)).mean(axis=1)[confidence_order(confidence)]
    return np.cumsum(per_essay) / np.arange(1, per_essay.size + 1)


def aurc(confidence, gold, pred) -> float:
    """Area under the risk-coverage curve: (1/N) sum_{k=1..N} MAE(k most confident essays)."""
    return float(risk_curve(confidence, gold, pred).mean())


def _average_ranks(x: np.ndarray) -> np.ndarray:
    """float [N]: 1-based ranks of x ascending, tied values sharing the mean of their ranks."""
    _, inverse, counts = np.unique(np.asarray(x, dtype=np.float64), return_inverse=True, return_counts=True)
    last = np.cumsum(counts)
    return (last - (counts - 1) / 2.0)[inverse.ravel()]


def auroc(confidence, errors) -> float | None:
    """AUROC of -confidence for the positive class ``errors`` (Mann-Whitney):
    (sum of the errors' ranks - P(P+1)/2) / (P * Q), P errors, Q others; None if either is 0."""
    errors = np.asarray(errors, dtype=bool)
    positives, negatives = int(errors.sum()), int((~errors).sum())
    if positives == 0 or negatives == 0:
        return None
    ranks = _average_ranks(-np.asarray(confidence, dtype=np.float64))
    return float((ranks[errors].sum() - positives * (positives + 1) / 2.0) / (positives * negatives))


# ----------------------------------------------------------------------------- calibration

def reliability_bins(confidence, correct, n_bins: int = N_BINS) -> list[dict]:
    """Equal-width bins over [0, 1] (bin b holds b/n <= p < (b+1)/n, the last one also p = 1):
    per bin ``lower``, ``upper``, ``count``, mean ``confidence`` and ``accuracy`` (None when empty)."""
    p = np.asarray(confidence, dtype=np.float64).ravel()
    hit = np.asarray(correct, dtype=np.float64).ravel()
    index = np.minimum(np.floor(p * n_bins).astype(np.int64), n_bins - 1)
    bins = []
    for b in range(n_bins):
        inside = index == b
        count = int(inside.sum())
        bins.append({"lower": b / n_bins, "upper": (b + 1) / n_bins, "count": count,
                     "confidence": float(p[inside].mean()) if count else None,
                     "accuracy": float(hit[inside].mean()) if count else None})
    return bins


def expected_calibration_error(confidence, correct, n_bins: int = N_BINS) -> float:
    """ECE = sum_b (n_b / n) * |accuracy_b - mean confidence_b| over the equal-width bins."""
    bins = reliability_bins(confidence, correct, n_bins)
    n = sum(b["count"] for b in bins)
    return float(sum(b["count"] / n * abs(b["accuracy"] - b["confidence"]) for b in bins if b["count"]))


# ----------------------------------------------------------------------------- intervals

def hierarchical_bootstrap(gold, a: Sequence, b: Sequence, metric: BatchedMetric, n: int,
                           seed: int = 0) -> tuple[float, float, float]:
    """Paired difference metric(A) - metric(B) over seeds and essays, as (point, lo, hi).

    ``gold``: [N, K], the test essays every seed scored; ``a``, ``b``: per seed [N, K] predictions
    of the two rows (seed s of A paired with seed s of B); ``metric`` maps gold and predictions
    [B, N, K] to [B] (e.g. :func:`batched_mean_qwk`). The point is the mean over seeds of the
    difference on all essays; the 95% interval is :func:`seed_essay_interval`'s.
    """
    if len(a) != len(b) or not len(a):
        raise ValueError(f"need the same, non-zero number of seeds on both sides, got {len(a)} and {len(b)}")
    gold = np.asarray(gold)
    a, b = np.stack([np.asarray(x) for x in a]), np.stack([np.asarray(x) for x in b])  # [S, N, K]
    seeds, essays = a.shape[:2]
    golds = np.broadcast_to(gold, a.shape)
    point = float(np.mean(metric(golds, a) - metric(golds, b)))
    lo, hi = seed_essay_interval(lambda s, idx: metric(gold[idx], a[s][idx]) - metric(gold[idx], b[s][idx]),
                                 seeds, essays, n, seed)
    return point, lo, hi


def seed_essay_interval(per_seed: Callable[[int, np.ndarray], np.ndarray], seeds: int, essays: int, n: int,
                        seed: int = 0) -> tuple[float, float]:
    """The 95% interval (2.5 and 97.5 percentiles) of a two-level bootstrap: each of the n
    resamples draws the seeds with replacement, then the essays (one draw shared by the seeds),
    and averages ``per_seed(s, idx)`` (seed s's statistic [B] on the essay resamples ``idx``
    [B, N]) over its drawn seeds. With one seed it covers the essays only."""
    rng = np.random.default_rng(seed)
    seed_draws = rng.integers(0, seeds, (n, seeds))
    idx = rng.integers(0, essays, (n, essays))
    per = np.stack([per_seed(s, idx) for s in range(seeds)])  # [S, B]
    diffs = per[seed_draws, np.arange(n)[:, None]].mean(axis=1)
    lo, hi = np.percentile(diffs, [2.5, 97.5])
    return float(lo), float(hi)
