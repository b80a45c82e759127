"""Tests for modules.voting: votes, QWK, QWK-vs-m curves and their bootstrap (SPEC §6, §10)."""
from __future__ import annotations

import json
import warnings
from collections import Counter
from fractions import Fraction

import numpy as np
import pytest
from sklearn.metrics import cohen_kappa_score

from modules import voting
from modules.voting import (
    average_vote,
    best_scores,
    bootstrap_curves,
    default_fallback,
    majority_vote,
    qwk,
    qwk_curves,
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


def slow_curves(samples, gold, ranges, fallback, max_m):
    """QWK per m from the public vote functions and sklearn."""
    K = samples.shape[2]
    lo_all = min(r[0] for r in ranges)
    hi_all = max(r[1] for r in ranges)
    out = {}
    for name, fn in (("avg", average_vote), ("maj", majority_vote)):
        overall, avgk, per = [], [], []
        for m in range(1, max_m + 1):
            votes = fn(samples[:, :m], fallback)
            pr = [sk_qwk(gold[:, k], votes[:, k], *ranges[k]) for k in range(K)]
            per.append(pr)
            avgk.append(float(np.mean(pr)))
            overall.append(sk_qwk(gold.ravel(), votes.ravel(), lo_all, hi_all))
        out[name] = (np.array(overall), np.array(avgk), np.array(per))
    return out


def random_bank(rng, N, M, K, ranges, invalid=0.2, whole_row=True, noise=1.5):
    lo = np.array([r[0] for r in ranges])
    hi = np.array([r[1] for r in ranges])
    gold = rng.integers(lo, hi + 1, size=(N, K))
    draws = np.rint(gold[:, None, :] + rng.normal(0, noise, size=(N, M, K)))
    samples = np.clip(draws, lo, hi).astype(np.int64)
    if whole_row:
        samples[rng.random((N, M)) < invalid] = -1
    else:
        samples[rng.random((N, M, K)) < invalid] = -1
    return samples, gold


def assert_curves_match(curves, ref, names):
    for v in ("avg", "maj"):
        overall, avgk, per = ref[v]
        np.testing.assert_allclose(curves[f"overall_{v}"], overall, rtol=0, atol=1e-12)
        np.testing.assert_allclose(curves[f"avgk_{v}"], avgk, rtol=0, atol=1e-12)
        for k, name in enumerate(names):
            np.testing.assert_allclose(curves[f"per_rubric_{v}"][name], per[:, k], rtol=0, atol=1e-12)


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


# ----------------------------------------------------------------------------- curves

CURVE_CASES = [
    # (N, M, K, ranges, whole_row_invalid)
    (30, 9, 3, [(1, 9), (0, 5), (2, 4)], True),
    (25, 7, 2, [(1, 6), (1, 6)], False),
    (12, 5, 1, [(0, 60)], True),                 # wide range: 16-bit engine path
    (20, 6, 2, [(0, 3), (10, 14)], False),
]


@pytest.mark.parametrize("N,M,K,ranges,whole_row", CURVE_CASES)
def test_qwk_curves_match_slow_reference(N, M, K, ranges, whole_row):
    rng = np.random.default_rng(N * 100 + M)
    samples, gold = random_bank(rng, N, M, K, ranges, invalid=0.25, whole_row=whole_row)
    samples[0] = -1                               # an essay without any valid sample
    samples[1, :2] = -1                           # one whose first samples are invalid
    fallback = [int(rng.integers(lo, hi + 1)) for lo, hi in ranges]
    names = [f"trait{k}" for k in range(K)]
    curves = qwk_curves(samples, gold, ranges, fallback, rubric_names=names)
    assert curves["ms"] == list(range(1, M + 1))
    assert curves["rubrics"] == names and curves["n_essays"] == N
    for key in ("overall_avg", "overall_maj", "avgk_avg", "avgk_maj"):
        assert len(curves[key]) == M
    assert_curves_match(curves, slow_curves(samples, gold, ranges, fallback, M), names)
    json.dumps(curves)                            # JSON-ready


def test_qwk_curves_max_m_default_fallback_and_names():
    rng = np.random.default_rng(3)
    ranges = [(1, 9)] * 2
    samples, gold = random_bank(rng, 15, 8, 2, ranges)
    samples[2] = -1
    curves = qwk_curves(samples, gold, ranges, max_m=4)
    assert curves["ms"] == [1, 2, 3, 4]
    assert curves["rubrics"] == ["rubric_1", "rubric_2"]
    assert set(curves["per_rubric_avg"]) == {"rubric_1", "rubric_2"}
    ref = slow_curves(samples, gold, ranges, default_fallback(ranges), 4)
    assert_curves_match(curves, ref, curves["rubrics"])


def test_qwk_curves_identical_samples_equal_direct_qwk():
    rng = np.random.default_rng(4)
    ranges = [(1, 9), (0, 4)]
    gold = np.stack([rng.integers(1, 10, 40), rng.integers(0, 5, 40)], 1)
    pred = np.clip(gold + rng.integers(-2, 3, gold.shape), [1, 0], [9, 4])
    samples = np.repeat(pred[:, None, :], 6, axis=1)
    curves = qwk_curves(samples, gold, ranges)
    per = [qwk(gold[:, k], pred[:, k], *ranges[k]) for k in range(2)]
    for v in ("avg", "maj"):
        np.testing.assert_allclose(curves[f"overall_{v}"], qwk(gold.ravel(), pred.ravel(), 0, 9), atol=1e-12)
        np.testing.assert_allclose(curves[f"avgk_{v}"], np.mean(per), atol=1e-12)
        np.testing.assert_allclose(curves[f"per_rubric_{v}"]["rubric_2"], per[1], atol=1e-12)


def test_qwk_curves_float64_path_large_bank():
    # N * (R - 1)^2 >= 2^24 switches the engine to float64; still exact
    rng = np.random.default_rng(5)
    ranges = [(0, 60)]
    samples, gold = random_bank(rng, 5000, 3, 1, ranges, noise=4.0)
    engine = voting._Engine(*voting._prepare(samples, gold, ranges, 30, None, None)[:6])
    assert engine.ft is np.float64 and engine.it is np.int16
    curves = qwk_curves(samples, gold, ranges, 30)
    assert_curves_match(curves, slow_curves(samples, gold, ranges, 30, 3), curves["rubrics"])


def test_qwk_curves_independent_of_chunking(monkeypatch):
    rng = np.random.default_rng(6)
    ranges = [(1, 9), (1, 5), (0, 3)]
    samples, gold = random_bank(rng, 40, 7, 3, ranges, whole_row=False)
    full = qwk_curves(samples, gold, ranges)
    monkeypatch.setattr(voting, "_CHUNK_CELLS", 7)      # essays split into many chunks
    assert qwk_curves(samples, gold, ranges) == full


def test_qwk_curves_validates_input():
    rng = np.random.default_rng(7)
    ranges = [(1, 9), (1, 9)]
    samples, gold = random_bank(rng, 5, 4, 2, ranges)
    bad = samples.copy()
    bad[3, 2, 1] = 12
    with pytest.raises(ValueError, match=r"samples\[3, 2, 1\] = 12"):
        qwk_curves(bad, gold, ranges)
    bad_gold = gold.copy()
    bad_gold[0, 0] = 0
    with pytest.raises(ValueError, match="gold"):
        qwk_curves(samples, bad_gold, ranges)
    with pytest.raises(ValueError, match="fallback"):
        qwk_curves(samples, gold, ranges, fallback=0)
    with pytest.raises(ValueError, match="max_m"):
        qwk_curves(samples, gold, ranges, max_m=5)
    with pytest.raises(ValueError):
        qwk_curves(samples, gold, ranges[:1])
    with pytest.raises(ValueError):
        qwk_curves(samples, gold, [(-1, 9), (1, 9)])          # -1 is the invalid marker


# ----------------------------------------------------------------------------- bootstrap

def explicit_bootstrap(samples, gold, ranges, fallback, B, seed, max_m, names):
    """Per-ordering curves on banks permuted with the engine's documented orderings."""
    N, M, _ = samples.shape
    gens = voting._ordering_generators(seed, B)
    out = []
    for b in range(B):
        perm = voting._random_orderings(gens[b], N, M).astype(np.intp)
        assert (np.sort(perm, axis=1) == np.arange(M)).all()
        permuted = np.take_along_axis(samples, perm[:, :, None], axis=1)
        out.append(qwk_curves(permuted, gold, ranges, fallback, max_m=max_m, rubric_names=names))
    return out


@pytest.mark.parametrize("whole_row", [True, False])
def test_bootstrap_matches_explicit_orderings(whole_row, monkeypatch):
    rng = np.random.default_rng(8)
    ranges = [(1, 9), (0, 3)]
    names = ["content", "language"]
    samples, gold = random_bank(rng, 30, 8, 2, ranges, invalid=0.3, whole_row=whole_row)
    samples[4] = -1
    boot = bootstrap_curves(samples, gold, ranges, None, n_orderings=5, seed=3, max_m=6, rubric_names=names)
    refs = explicit_bootstrap(samples, gold, ranges, None, 5, 3, 6, names)
    for key in ("overall_avg", "overall_maj", "avgk_avg", "avgk_maj"):
        per_ordering = np.array([r[key] for r in refs])
        np.testing.assert_allclose(boot[key]["mean"], per_ordering.mean(0), atol=1e-12)
        np.testing.assert_allclose(boot[key]["lo"], np.percentile(per_ordering, 2.5, axis=0), atol=1e-12)
        np.testing.assert_allclose(boot[key]["hi"], np.percentile(per_ordering, 97.5, axis=0), atol=1e-12)
    for name in names:
        per_ordering = np.array([r["per_rubric_maj"][name] for r in refs])
        np.testing.assert_allclose(boot["per_rubric_maj"][name]["mean"], per_ordering.mean(0), atol=1e-12)
    # the same with threads, small chunks and split essays
    monkeypatch.setenv("AES_VOTING_THREADS", "3")
    monkeypatch.setattr(voting, "_CHUNK_CELLS", 9)
    again = bootstrap_curves(samples, gold, ranges, None, n_orderings=5, seed=3, max_m=6, rubric_names=names)
    assert again == boot


def test_bootstrap_is_deterministic_and_seeded():
    rng = np.random.default_rng(9)
    ranges = [(1, 6)] * 3
    samples, gold = random_bank(rng, 50, 10, 3, ranges)
    a = bootstrap_curves(samples, gold, ranges, n_orderings=20, seed=7)
    b = bootstrap_curves(samples, gold, ranges, n_orderings=20, seed=7)
    c = bootstrap_curves(samples, gold, ranges, n_orderings=20, seed=8)
    assert a == b
    assert a["overall_maj"]["mean"] != c["overall_maj"]["mean"]
    assert a["n_orderings"] == 20 and a["seed"] == 7 and a["band"] == [2.5, 97.5]
    json.dumps(a)


def test_bootstrap_band_contains_mean_and_collapses_at_full_m():
    rng = np.random.default_rng(10)
    ranges = [(1, 9), (1, 9)]
    samples, gold = random_bank(rng, 60, 12, 2, ranges, invalid=0.05)
    boot = bootstrap_curves(samples, gold, ranges, n_orderings=40, seed=0)
    curves = qwk_curves(samples, gold, ranges)
    for key in ("overall_avg", "overall_maj", "avgk_avg", "avgk_maj"):
        lo, mean, hi = (np.array(boot[key][f]) for f in ("lo", "mean", "hi"))
        assert (lo <= mean).all() and (mean <= hi).all()
        assert (hi - lo)[0] > 0                                  # m = 1 varies with the ordering
        # all samples used: the vote no longer depends on the order
        assert lo[-1] == pytest.approx(curves[key][-1], abs=1e-12)
        assert hi[-1] == pytest.approx(curves[key][-1], abs=1e-12)


def test_bootstrap_band_collapses_for_identical_samples():
    rng = np.random.default_rng(11)
    ranges = [(1, 9), (0, 3)]
    gold = np.stack([rng.integers(1, 10, 30), rng.integers(0, 4, 30)], 1)
    pred = np.clip(gold + rng.integers(-1, 2, gold.shape), [1, 0], [9, 3])
    samples = np.repeat(pred[:, None, :], 7, axis=1)
    boot = bootstrap_curves(samples, gold, ranges, n_orderings=10, seed=1)
    direct = qwk(gold.ravel(), pred.ravel(), 0, 9)
    for v in ("avg", "maj"):
        for f in ("lo", "mean", "hi"):
            np.testing.assert_allclose(boot[f"overall_{v}"][f], direct, atol=1e-12)
        band = boot[f"per_rubric_{v}"]["rubric_1"]
        np.testing.assert_allclose(band["lo"], band["hi"], atol=0)


def test_bootstrap_rejects_bad_orderings():
    samples = np.ones((3, 2, 1), int)
    gold = np.ones((3, 1), int)
    with pytest.raises(ValueError):
        bootstrap_curves(samples, gold, [(1, 3)], n_orderings=0)


# ----------------------------------------------------------------------------- summaries

def test_best_scores_structure():
    rng = np.random.default_rng(12)
    ranges = [(1, 9), (1, 5)]
    names = ["a", "b"]
    samples, gold = random_bank(rng, 40, 9, 2, ranges)
    curves = qwk_curves(samples, gold, ranges, rubric_names=names)
    curves["bootstrap"] = bootstrap_curves(samples, gold, ranges, n_orderings=3, rubric_names=names)
    best = best_scores(curves, names)
    assert set(best) == {"avg", "maj"}
    for v in ("avg", "maj"):
        assert set(best[v]) == {"best", "m1", "max_m"}
        for entry in best[v].values():
            assert set(entry) == {"m", "overall", "average", "per_rubric"}
            assert set(entry["per_rubric"]) == set(names)
            i = entry["m"] - 1
            assert entry["overall"] == curves[f"overall_{v}"][i]
            assert entry["average"] == curves[f"avgk_{v}"][i]
            assert entry["per_rubric"]["b"] == curves[f"per_rubric_{v}"]["b"][i]
        assert best[v]["m1"]["m"] == 1 and best[v]["max_m"]["m"] == 9
        overall = curves[f"overall_{v}"]
        assert best[v]["best"]["overall"] == max(overall)
        assert best[v]["best"]["m"] == overall.index(max(overall)) + 1     # first best m
    assert best_scores(curves) == best
    json.dumps(best)
    with pytest.raises(KeyError):
        best_scores(curves, ["a", "nope"])


def test_best_scores_ties_pick_smallest_m():
    curves = {"ms": [1, 2, 3], "rubrics": ["r"],
              "overall_avg": [0.5, 0.7, 0.7], "overall_maj": [0.9, 0.1, 0.9],
              "avgk_avg": [0.1, 0.2, 0.3], "avgk_maj": [0.1, 0.2, 0.3],
              "per_rubric_avg": {"r": [0.1, 0.2, 0.3]}, "per_rubric_maj": {"r": [0.1, 0.2, 0.3]}}
    best = best_scores(curves)
    assert best["avg"]["best"]["m"] == 2 and best["maj"]["best"]["m"] == 1
    assert best["avg"]["best"]["per_rubric"] == {"r": 0.2}


# ----------------------------------------------------------------------------- scale

def test_full_size_bank_runs():
    # The SPEC §7 shape (N=1000, m=50, K=8); speed is measured by benchmarks/bench_analysis.py.
    rng = np.random.default_rng(13)
    ranges = [(1, 9)] * 8
    samples, gold = random_bank(rng, 1000, 50, 8, ranges, invalid=0.03, noise=1.0)
    curves = qwk_curves(samples, gold, ranges)
    boot = bootstrap_curves(samples, gold, ranges, n_orderings=4, seed=0)
    for v in ("avg", "maj"):
        c = np.array(curves[f"overall_{v}"])
        assert c.shape == (50,) and np.isfinite(c).all() and (c <= 1).all()
        assert c[-1] > c[0]                                      # voting over more samples helps
        band = boot[f"overall_{v}"]
        assert len(band["mean"]) == 50
        assert band["lo"][-1] == pytest.approx(c[-1], abs=1e-12)
    # spot check a middle m against the vote functions and sklearn
    m = 17
    votes = majority_vote(samples[:, :m], default_fallback(ranges))
    assert curves["overall_maj"][m - 1] == pytest.approx(sk_qwk(gold.ravel(), votes.ravel(), 1, 9), abs=1e-12)
