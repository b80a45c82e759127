"""Tests for modules.voting: votes, their tie and fallback rules, QWK and best m (SPEC §6, §10)."""
from __future__ import annotations

import warnings
from collections import Counter
from fractions import Fraction

import numpy as np
import pytest
from sklearn.metrics import cohen_kappa_score

from modules.voting import (
    average_vote,
    best_scores,
    default_fallback,
    majority_vote,
    qwk,
)


# ----------------------------------------------------------------------------- references

def ref_average(values, fallback):
    vals = [v for v in values if v != -1]
    if not vals:
        return fallback
    mean = Fraction(sum(vals), len(vals))
    return int((mean + Fraction(1, 2)) // 1)          # round half up


def ref_majority(values, fallback):
    vals = [v for v in values if v != -1]
    if not vals:
        return fallback
    counts = Counter(vals)
    top = max(counts.values())
    tied = [v for v, c in counts.items() if c == top]
    mean = Fraction(sum(vals), len(vals))
    return min(tied, key=lambda v: (abs(v - mean), v))


def ref_votes(fn, samples, fallback):
    N, _, K = samples.shape
    fb = np.broadcast_to(np.asarray(fallback), (K,))
    return np.array([[fn(list(samples[n, :, k]), int(fb[k])) for k in range(K)] for n in range(N)])


def sk_qwk(a, b, lo, hi):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        k = cohen_kappa_score(a, b, weights="quadratic", labels=list(range(lo, hi + 1)))
    return 0.0 if np.isnan(k) else float(k)



# ----------------------------------------------------------------------------- average vote

def test_average_vote_rounds_half_up():
    s = np.array([[[2], [3]], [[3], [4]], [[1], [2]], [[2], [2]]])       # means 2.5, 3.5, 1.5, 2
    assert average_vote(s, 0)[:, 0].tolist() == [3, 4, 2, 2]
    s = np.array([[[1], [1], [2]], [[2], [3], [3]]])                     # 4/3 -> 1, 8/3 -> 3
    assert average_vote(s, 0)[:, 0].tolist() == [1, 3]


def test_average_vote_ignores_invalid_and_falls_back():
    s = np.array([
        [[4, 1], [-1, -1], [-1, 2]],        # rubric 0: 4; rubric 1: 1.5 -> 2
        [[-1, -1], [-1, -1], [-1, -1]],     # nothing valid
        [[2, -1], [3, -1], [-1, -1]],       # rubric 0: 2.5 -> 3; rubric 1: nothing valid
    ])
    assert average_vote(s, 5).tolist() == [[4, 2], [5, 5], [3, 5]]
    assert average_vote(s, [6, 7]).tolist() == [[4, 2], [6, 7], [3, 7]]
    assert average_vote(s, np.array([6, 7])).dtype == np.int64


def test_average_vote_matches_exact_reference():
    rng = np.random.default_rng(0)
    for _ in range(20):
        N, M, K = rng.integers(1, 12), rng.integers(1, 9), rng.integers(1, 4)
        s = rng.integers(0, 10, size=(N, M, K))
        s[rng.random((N, M, K)) < 0.3] = -1
        fb = rng.integers(0, 10, size=K)
        assert average_vote(s, fb).tolist() == ref_votes(ref_average, s, fb).tolist()


# ----------------------------------------------------------------------------- majority vote

def test_majority_vote_clear_majority():
    s = np.array([[[3], [3], [5]], [[1], [9], [9]], [[7], [-1], [-1]]])
    assert majority_vote(s, 0)[:, 0].tolist() == [3, 9, 7]


def test_majority_vote_tie_goes_to_value_nearest_the_mean():
    s = np.array([[[2], [2], [5], [5], [4]]])           # 2 and 5 tied; mean 3.6 -> 5
    assert majority_vote(s, 0)[0, 0] == 5
    s = np.array([[[2], [2], [5], [5], [1]]])           # mean 3.0 -> 2 is nearer
    assert majority_vote(s, 0)[0, 0] == 2
    s = np.array([[[1], [5], [9]]])                     # three-way tie, mean 5
    assert majority_vote(s, 0)[0, 0] == 5


def test_majority_vote_equidistant_tie_goes_to_lower():
    s = np.array([[2, 2, 4, 4, -1, -1], [1, 3, -1, -1, -1, -1], [6, 8, 6, 8, 5, 9]])[:, :, None]
    # means 3, 2, 7: the tied values sit symmetrically around the mean
    assert majority_vote(s, 0)[:, 0].tolist() == [2, 1, 6]


def test_majority_vote_falls_back_without_valid_samples():
    s = np.array([[[-1, 3], [-1, 3]], [[2, -1], [-1, -1]]])
    assert majority_vote(s, 4).tolist() == [[4, 3], [2, 4]]
    assert majority_vote(s, [7, 8]).tolist() == [[7, 3], [2, 8]]
    assert majority_vote(np.full((2, 3, 2), -1), [7, 8]).tolist() == [[7, 8], [7, 8]]


def test_majority_vote_matches_exact_reference():
    rng = np.random.default_rng(1)
    for _ in range(40):
        N, M, K = rng.integers(1, 12), rng.integers(1, 9), rng.integers(1, 4)
        hi = int(rng.integers(1, 12))
        s = rng.integers(0, hi + 1, size=(N, M, K))
        s[rng.random((N, M, K)) < 0.25] = -1
        fb = rng.integers(0, hi + 1, size=K)
        assert majority_vote(s, fb).tolist() == ref_votes(ref_majority, s, fb).tolist()


def test_vote_shape_errors():
    with pytest.raises(ValueError):
        average_vote(np.zeros((3, 2)), 0)
    with pytest.raises(ValueError):
        majority_vote(np.zeros((2, 3, 2), int), [1, 2, 3])
    with pytest.raises(ValueError):
        average_vote(np.full((1, 2, 1), 2.5), 0)


def test_default_fallback_is_the_midpoint_rounded_down():
    assert default_fallback([(1, 9), (0, 3), (2, 2)]).tolist() == [5, 1, 2]


# ----------------------------------------------------------------------------- QWK

def test_qwk_matches_sklearn_with_explicit_labels():
    rng = np.random.default_rng(2)
    for _ in range(200):
        lo = int(rng.integers(-2, 3))
        hi = lo + int(rng.integers(0, 12))
        n = int(rng.integers(1, 40))
        # draw from a sub-range so that some labels are absent from both vectors
        a_lo = int(rng.integers(lo, hi + 1))
        a_hi = int(rng.integers(a_lo, hi + 1))
        t = rng.integers(a_lo, a_hi + 1, n)
        p = np.clip(t + rng.integers(-2, 3, n), lo, hi) if rng.random() < 0.5 else rng.integers(lo, hi + 1, n)
        assert qwk(t, p, lo, hi) == pytest.approx(sk_qwk(t, p, lo, hi), abs=1e-12)


def test_qwk_special_cases():
    assert qwk([1, 2, 3, 9], [1, 2, 3, 9], 1, 9) == 1.0
    assert qwk(np.array([[1, 5], [3, 7]]), np.array([[1, 5], [3, 7]]), 1, 9) == 1.0
    # sklearn returns nan here (0/0); we return 0.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert np.isnan(cohen_kappa_score([4, 4], [4, 4], weights="quadratic", labels=list(range(1, 10))))
    assert qwk([4, 4], [4, 4], 1, 9) == 0.0
    assert qwk([4, 4, 4], [4, 5, 4], 1, 9) == pytest.approx(sk_qwk([4, 4, 4], [4, 5, 4], 1, 9))
    assert qwk([1.0, 2.0], [2, 1], 1, 2) == pytest.approx(sk_qwk([1, 2], [2, 1], 1, 2))


def test_qwk_rejects_bad_input():
    with pytest.raises(ValueError, match="10"):
        qwk([1, 2, 3], [1, 2, 10], 1, 9)
    with pytest.raises(ValueError, match="y_true.*0"):
        qwk([0, 2, 3], [1, 2, 3], 1, 9)
    with pytest.raises(ValueError):
        qwk([], [], 1, 9)
    with pytest.raises(ValueError):
        qwk([1, 2], [1], 1, 9)
    with pytest.raises(ValueError):
        qwk([1.5], [1], 1, 9)


# ----------------------------------------------------------------------------- summaries

def test_best_scores_ties_pick_smallest_m():
    curves = {"ms": [1, 2, 3], "rubrics": ["r"],
              "overall_avg": [0.5, 0.7, 0.7], "overall_maj": [0.9, 0.1, 0.9],
              "avgk_avg": [0.1, 0.2, 0.3], "avgk_maj": [0.1, 0.2, 0.3],
              "per_rubric_avg": {"r": [0.1, 0.2, 0.3]}, "per_rubric_maj": {"r": [0.1, 0.2, 0.3]}}
    best = best_scores(curves)
    assert best["avg"]["best"]["m"] == 2 and best["maj"]["best"]["m"] == 1
    assert best["avg"]["best"]["per_rubric"] == {"r": 0.2}
