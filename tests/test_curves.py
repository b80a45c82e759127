"""Tests for modules.curves and modules.curve_engine: QWK-vs-m curves and their bootstrap.

The engine's curves are compared with the public vote functions of modules.voting and
sklearn's QWK, prefix by prefix, over random banks that contain majority ties of both kinds
(won by nearness to the mean, and half-way ties won by the lower value), essays without any
valid sample, invalid entries in single rubrics, and a 0-60 score range.
"""
from __future__ import annotations

import json
from collections import Counter
from fractions import Fraction

import numpy as np
import pytest
from test_voting import ref_majority, sk_qwk

from modules import curve_engine
from modules.curve_engine import CurveEngine, engine_dtypes, ordering_generators, random_orderings
from modules.curves import bootstrap_curves, qwk_curves
from modules.voting import average_vote, best_scores, default_fallback, majority_vote, qwk


# ----------------------------------------------------------------------------- references

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



def tie_kinds(samples, max_m):
    """Prefixes (essay, rubric, m <= max_m) whose majority vote needs the tie rule.

    Returns (ties, won by a tied value other than the lowest, mean half-way between the two
    tied values nearest to it, where the lower one wins).
    """
    N, _, K = samples.shape
    ties = not_lowest = halfway = 0
    for n in range(N):
        for k in range(K):
            for m in range(1, max_m + 1):
                vals = [int(v) for v in samples[n, :m, k] if v != -1]
                counts = Counter(vals)
                tied = sorted(v for v, c in counts.items() if c == max(counts.values(), default=0))
                if len(tied) < 2:
                    continue
                ties += 1
                mean = Fraction(sum(vals), len(vals))
                nearest = sorted(abs(v - mean) for v in tied)
                not_lowest += ref_majority(vals, 0) != tied[0]
                halfway += nearest[0] == nearest[1]
    return ties, not_lowest, halfway


def assert_curves_match(curves, ref, names):
    for v in ("avg", "maj"):
        overall, avgk, per = ref[v]
        np.testing.assert_allclose(curves[f"overall_{v}"], overall, rtol=0, atol=1e-12)
        np.testing.assert_allclose(curves[f"avgk_{v}"], avgk, rtol=0, atol=1e-12)
        for k, name in enumerate(names):
            np.testing.assert_allclose(curves[f"per_rubric_{v}"][name], per[:, k], rtol=0, atol=1e-12)


# ----------------------------------------------------------------------------- curves

CURVE_CASES = [
    # (N, M, K, ranges, whole_row_invalid); whole_row False: -1 in single entries
    (30, 9, 3, [(1, 9), (0, 5), (2, 4)], True),
    (25, 7, 2, [(1, 6), (1, 6)], False),
    (12, 5, 1, [(0, 60)], True),                 # wide range: 16-bit engine path
    (15, 6, 2, [(0, 60), (1, 9)], False),
    (20, 6, 2, [(0, 3), (10, 14)], False),
]


@pytest.mark.parametrize("N,M,K,ranges,whole_row", CURVE_CASES)
def test_qwk_curves_match_slow_reference(N, M, K, ranges, whole_row):
    rng = np.random.default_rng(N * 100 + M)
    samples, gold = random_bank(rng, N, M, K, ranges, invalid=0.25, whole_row=whole_row)
    samples[0] = -1                               # an essay without any valid sample
    samples[1, :2] = -1                           # one whose first samples are invalid
    if not whole_row:
        samples[2, :, 0] = -1                     # one rubric never valid, the others valid
    fallback = [int(rng.integers(lo, hi + 1)) for lo, hi in ranges]
    lo, hi = np.array(ranges).T
    engine = CurveEngine(samples, gold, lo, hi, np.array(fallback), M)
    assert engine.whole_row == whole_row          # both invalid-sample paths are compared
    assert engine.it is (np.int16 if (hi - lo).max() > 30 else np.int8)
    ties, not_lowest, halfway = tie_kinds(samples, M)
    assert not_lowest > 0 and halfway > 0         # both halves of the tie rule are compared
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


def repeated_bank(seed, N, M, ranges, spread):
    """(gold, pred, samples): every essay's M samples are the same prediction pred."""
    rng = np.random.default_rng(seed)
    lo, hi = np.array(ranges).T
    gold = rng.integers(lo, hi + 1, size=(N, len(ranges)))
    pred = np.clip(gold + rng.integers(-spread, spread + 1, gold.shape), lo, hi)
    return gold, pred, np.repeat(pred[:, None, :], M, axis=1)


def test_qwk_curves_identical_samples_equal_direct_qwk():
    ranges = [(1, 9), (0, 4)]
    gold, pred, samples = repeated_bank(4, 40, 6, ranges, spread=2)
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
    assert engine_dtypes(61, 3, 5000) == (np.int16, np.float64)
    assert engine_dtypes(61, 3, 4000) == (np.int16, np.float32)
    engine = CurveEngine(samples, gold, np.array([0]), np.array([60]), np.array([30]), 3)
    assert engine.ft is np.float64 and engine.it is np.int16
    curves = qwk_curves(samples, gold, ranges, 30)
    assert_curves_match(curves, slow_curves(samples, gold, ranges, 30, 3), curves["rubrics"])


def test_qwk_curves_independent_of_chunking(monkeypatch):
    rng = np.random.default_rng(6)
    ranges = [(1, 9), (1, 5), (0, 3)]
    samples, gold = random_bank(rng, 40, 7, 3, ranges, whole_row=False)
    full = qwk_curves(samples, gold, ranges)
    monkeypatch.setattr(curve_engine, "CHUNK_CELLS", 7)      # essays split into many chunks
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
    gens = ordering_generators(seed, B)
    out = []
    for b in range(B):
        perm = random_orderings(gens[b], N, M).astype(np.intp)
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
    monkeypatch.setattr(curve_engine, "CHUNK_CELLS", 9)
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
    ranges = [(1, 9), (0, 3)]
    gold, pred, samples = repeated_bank(11, 30, 7, ranges, spread=1)
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
