"""QWK-vs-m curves of a sample bank and their bootstrap bands (SPEC §6).

For every m the curves hold the QWK of :mod:`modules.voting`'s average and majority votes
over the first m samples of every essay; :mod:`modules.curve_engine` computes all m at once.
Inputs follow :mod:`modules.voting`'s conventions (``samples[N, m, K]``, ``-1`` invalid,
``fallback`` an int or K ints, default :func:`~modules.voting.default_fallback`).

:func:`qwk_curves` gives, for m = 1..max_m, the QWK of both votes over the first m samples
of every essay; :func:`bootstrap_curves` gives the mean and a 95% band (2.5 / 97.5
percentiles) of the same curves over random orderings of each essay's samples (one
independent permutation per essay and ordering, of all the samples in the bank, so with
``max_m < m`` the prefixes are random subsets of all samples).  Both return plain
JSON-ready dicts; per-rubric curves are keyed by rubric name (``rubric_names``; default
``rubric_1..rubric_K``) in rubric order.  Keys shared by both:

``ms``                  [1, ..., max_m]
``rubrics``             rubric names, in order
``ranges``              [[lo, hi], ...] per rubric
``n_essays``            N
``overall_avg/_maj``    QWK over all essay-rubric pairs pooled (labels: the union range
                        min(lo)..max(hi)) per m
``avgk_avg/_maj``       mean over rubrics of the per-rubric QWK, per m
``per_rubric_avg/_maj`` {rubric name: per-m QWK}

In :func:`qwk_curves` each value is a list over m; in :func:`bootstrap_curves` each is a
``{"mean": [...], "lo": [...], "hi": [...]}`` dict (per rubric: a dict of those), plus
``n_orderings``, ``seed`` and ``band`` ([2.5, 97.5]).  The self-consistency tool stores the
bootstrap next to the curves: ``curves["bootstrap"] = bootstrap_curves(...)``;
:func:`modules.voting.best_scores` ignores that key.

Speed: QWK for every m comes from three moments per (ordering, m, rubric) (sum p, sum p^2,
sum gold*p), which determine quadratic kappa exactly.  N=1000, m=50, K=8 with 200 orderings
takes about a second on two CPU cores (benchmarks/bench_analysis.py).  Orderings are
processed in chunks on up to 4 threads ($AES_VOTING_THREADS overrides); results do not
depend on the number of threads.
"""
from __future__ import annotations

from typing import Iterable

import numpy as np

from modules.curve_engine import CurveEngine
from modules.metrics import kappa_from_moments
from modules.voting import (
    INVALID,
    as_int_array,
    as_sample_bank,
    default_fallback,
    fallback_vector,
    rubric_bounds,
)

__all__ = ["BAND_PERCENTILES", "qwk_curves", "bootstrap_curves"]

BAND_PERCENTILES = (2.5, 97.5)


# ----------------------------------------------------------------------------- input checks

def _rubric_names(rubric_names, K: int) -> list[str]:
    """K distinct names as strings; None gives rubric_1..rubric_K."""
    if rubric_names is None:
        return [f"rubric_{k + 1}" for k in range(K)]
    names = [str(n) for n in rubric_names]
    if len(names) != K:
        raise ValueError(f"rubric_names has {len(names)} names but the data has K={K} rubrics")
    if len(set(names)) != K:
        raise ValueError(f"rubric_names must be distinct, got {names}")
    return names


def _check_samples_in_range(s: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> None:
    bad = (s != INVALID) & ((s < lo[None, None, :]) | (s > hi[None, None, :]))
    if bad.any():
        n, i, k = (int(v[0]) for v in np.nonzero(bad))
        raise ValueError(
            f"samples[{n}, {i}, {k}] = {int(s[n, i, k])} is outside rubric {k}'s range "
            f"{lo[k]}..{hi[k]} (invalid samples must be {INVALID})")


def _prepare(samples, gold, ranges, fallback, max_m, rubric_names):
    """Checked inputs for the engine: (samples, gold, lo, hi, fallback, max_m, names).

    The engine trusts these: every valid sample and gold score and the fallback inside its
    rubric's range, and no range containing the invalid marker.
    """
    s = as_sample_bank(samples)
    N, M, K = s.shape
    if N == 0 or M == 0 or K == 0:
        raise ValueError(f"samples must have N, m, K >= 1, got shape {s.shape}")
    g = as_int_array(gold, "gold")
    if g.shape != (N, K):
        raise ValueError(f"gold must have shape [N, K] = [{N}, {K}], got {g.shape}")
    lo, hi = rubric_bounds(ranges, K)
    clash = np.flatnonzero((lo <= INVALID) & (hi >= INVALID))
    if clash.size:
        k = int(clash[0])
        raise ValueError(f"rubric {k}: range {lo[k]}..{hi[k]} contains {INVALID}, the invalid-sample marker")
    bad = (g < lo[None, :]) | (g > hi[None, :])
    if bad.any():
        n, k = (int(v[0]) for v in np.nonzero(bad))
        raise ValueError(f"gold[{n}, {k}] = {int(g[n, k])} is outside rubric {k}'s range {lo[k]}..{hi[k]}")
    _check_samples_in_range(s, lo, hi)
    fb = default_fallback(np.stack([lo, hi], 1)) if fallback is None else fallback_vector(fallback, K)
    bad = np.flatnonzero((fb < lo) | (fb > hi))
    if bad.size:
        k = int(bad[0])
        raise ValueError(f"fallback {int(fb[k])} for rubric {k} is outside its range {lo[k]}..{hi[k]}")
    if max_m is None:
        mm = M
    else:
        mm = int(max_m)
        if mm != max_m or not 1 <= mm <= M:
            raise ValueError(f"max_m must be an integer in 1..{M}, got {max_m!r}")
    names = _rubric_names(rubric_names, K)
    return s, g, lo, hi, fb, mm, names


def _kappas(engine: CurveEngine, mom: np.ndarray, lo: np.ndarray):
    """Per-rubric, overall (pooled) and rubric-average QWK from engine moments.

    Returns (per_rubric [2, B, mm, K], overall [2, B, mm], avgk [2, B, mm]).
    """
    N = float(engine.N)
    g = engine.gold.astype(np.float64)                      # [K, N] offsets
    g1, g2 = g.sum(axis=1), (g * g).sum(axis=1)             # [K]
    p1, p2, x = mom[0], mom[1], mom[2]                      # [2, B, mm, K]
    per = kappa_from_moments(N, g1, g2, p1, p2, x)
    # pooled over rubrics: back to actual scores (QWK is shift invariant per rubric, but the
    # pooled one mixes rubrics with different offsets)
    L = lo.astype(np.float64)
    P1 = p1 + N * L
    P2 = p2 + 2 * L * p1 + N * L * L
    X = x + L * p1 + L * g1 + N * L * L
    G1 = g1 + N * L
    G2 = g2 + 2 * L * g1 + N * L * L
    overall = kappa_from_moments(N * engine.K, G1.sum(), G2.sum(), P1.sum(-1), P2.sum(-1), X.sum(-1))
    return per, overall, per.mean(axis=-1)


def _tolist(a) -> list:
    return [float(v) for v in np.asarray(a, dtype=np.float64).ravel()]


def qwk_curves(samples, gold, ranges, fallback=None, max_m: int | None = None,
               rubric_names: Iterable[str] | None = None) -> dict:
    """QWK of the average and majority votes over the first m samples, for m = 1..max_m.

    samples: int [N, m, K] (-1 = invalid); gold: int [N, K]; ranges: K (lo, hi) pairs;
    fallback: None (rubric midpoints, :func:`~modules.voting.default_fallback`), int or
    int[K]; max_m: default all samples; rubric_names: default rubric_1..rubric_K.  Returns the
    dict described in the module docstring (lists over m).
    """
    s, g, lo, hi, fb, mm, names = _prepare(samples, gold, ranges, fallback, max_m, rubric_names)
    eng = CurveEngine(s, g, lo, hi, fb, mm)
    per, overall, avgk = _kappas(eng, eng.moments(None), lo)
    res = _header(names, lo, hi, eng.N, mm)
    for vi, v in enumerate(("avg", "maj")):
        res[f"overall_{v}"] = _tolist(overall[vi, 0])
        res[f"avgk_{v}"] = _tolist(avgk[vi, 0])
        res[f"per_rubric_{v}"] = {name: _tolist(per[vi, 0, :, k]) for k, name in enumerate(names)}
    return res


def _header(names, lo, hi, N, mm) -> dict:
    return {
        "ms": list(range(1, mm + 1)),
        "rubrics": list(names),
        "ranges": [[int(a), int(b)] for a, b in zip(lo, hi)],
        "n_essays": int(N),
    }


def bootstrap_curves(samples, gold, ranges, fallback=None, n_orderings: int = 200, seed: int = 0,
                     max_m: int | None = None, rubric_names: Iterable[str] | None = None) -> dict:
    """Mean and 95% band of the QWK-vs-m curves over random orderings of each essay's samples.

    For each of ``n_orderings`` orderings every essay's samples are permuted independently
    (all m samples of the bank, also when ``max_m`` is smaller), the curves of
    :func:`qwk_curves` are computed on the permuted bank, and for every m the mean and the
    2.5 / 97.5 percentiles (numpy's linear interpolation) over orderings are reported.

    Randomness: ordering b uses ``np.random.default_rng(np.random.SeedSequence(seed).spawn(
    n_orderings)[b])``, so a seed always gives the same result (independent of threads and
    chunking), and the first orderings of a larger ``n_orderings`` are the same orderings.
    Keys: see the module docstring.
    """
    s, g, lo, hi, fb, mm, names = _prepare(samples, gold, ranges, fallback, max_m, rubric_names)
    B = int(n_orderings)
    if B != n_orderings or B < 1:
        raise ValueError(f"n_orderings must be a positive integer, got {n_orderings!r}")
    eng = CurveEngine(s, g, lo, hi, fb, mm)
    per, overall, avgk = _kappas(eng, eng.moments(int(seed), B), lo)
    res = _header(names, lo, hi, eng.N, mm)
    res.update({"n_orderings": B, "seed": int(seed), "band": list(BAND_PERCENTILES)})
    for vi, v in enumerate(("avg", "maj")):
        res[f"overall_{v}"] = _band(overall[vi])
        res[f"avgk_{v}"] = _band(avgk[vi])
        res[f"per_rubric_{v}"] = {name: _band(per[vi, :, :, k]) for k, name in enumerate(names)}
    return res


def _band(values: np.ndarray) -> dict:
    """values [B, mm] -> {"mean", "lo", "hi"} lists over m."""
    lo_q, hi_q = np.percentile(values, BAND_PERCENTILES, axis=0)
    # a mean of identical values can land one ulp outside them; keep lo <= mean <= hi exact
    mean = np.clip(values.mean(axis=0), values.min(axis=0), values.max(axis=0))
    return {"mean": _tolist(mean), "lo": _tolist(lo_q), "hi": _tolist(hi_q)}
